//! SQL databases as sources (PostgreSQL, SQLite): the local part runs inside
//! the database, in its own dialect, and only the per-group partials come
//! back. Where some of the local part cannot be sent (a construct the
//! database would compute differently, or not at all), the database still
//! filters what it can and the gateway computes the rest, streaming, with
//! DataFusion; EXPLAIN says which and why.
//!
//! Exactness is the rule for deciding what may be pushed down. A construct is
//! sent only where the database computes exactly what DataFusion would:
//! - PostgreSQL sums in `numeric` (exact); results come back as text and are
//!   parsed at the declared scale, so no digit is lost on the way.
//! - SQLite has no exact decimal type: its partials are sums of scaled
//!   integers (SQLite raises "integer overflow" rather than wrap; a result
//!   that turns REAL is refused), so decimal columns with a scale are refused
//!   at startup.
//! - Text ordering (`<`, `BETWEEN`) depends on PostgreSQL's collation and is
//!   computed in the gateway; SQLite's `LIKE` ignores case and its division
//!   by zero is NULL, so neither is sent there.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int64Builder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::array::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, Operator};
use datafusion::sql::unparser::dialect::{DefaultDialect, PostgreSqlDialect, SqliteDialect};
use datafusion::sql::unparser::Unparser;
use planner::plan::{Limb, PartialKind, LIMB_BASE, SQUARE_DIGITS};
use planner::{LocalPart, TableDef};

use crate::SourceError;

/// The SQL dialect of a source database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
    /// A DataFusion-based Flight SQL server: the same engine, so the local
    /// part is sent exactly as the gateway would run it.
    DataFusion,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "PostgreSQL",
            Dialect::Sqlite => "SQLite",
            Dialect::DataFusion => "Flight SQL (DataFusion dialect)",
        }
    }

    fn unparse(self, e: &Expr) -> Result<String, String> {
        let sql = match self {
            Dialect::Postgres => Unparser::new(&PostgreSqlDialect {}).expr_to_sql(e),
            Dialect::Sqlite => Unparser::new(&SqliteDialect {}).expr_to_sql(e),
            Dialect::DataFusion => Unparser::new(&DefaultDialect {}).expr_to_sql(e),
        };
        sql.map(|s| s.to_string()).map_err(|e| e.to_string())
    }
}

/// A quoted SQL identifier (both dialects accept double quotes).
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// One federated table as a table or view of a SQL database.
#[derive(Debug, Clone)]
pub struct SqlTable {
    pub table: TableDef,
    /// The local table or view, `name` or `schema.name`.
    pub local: String,
    /// Federated column name → local column name, where they differ.
    pub renames: BTreeMap<String, String>,
}

impl SqlTable {
    pub fn local_column<'a>(&'a self, federated: &'a str) -> &'a str {
        self.renames
            .get(federated)
            .map(String::as_str)
            .unwrap_or(federated)
    }

    /// `(schema, name)` of the local table.
    pub fn schema_and_name(&self) -> (Option<&str>, &str) {
        match self.local.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, self.local.as_str()),
        }
    }

    pub fn from_clause(&self) -> String {
        match self.schema_and_name() {
            (Some(s), n) => format!("{}.{}", quote(s), quote(n)),
            (None, n) => quote(n),
        }
    }

    /// `e` with every column renamed to its local name.
    fn localize(&self, e: &Expr) -> Expr {
        e.clone()
            .transform_up(|e| {
                Ok(match e {
                    Expr::Column(c) => Transformed::yes(Expr::Column(Column::new_unqualified(
                        self.local_column(&c.name).to_string(),
                    ))),
                    other => Transformed::no(other),
                })
            })
            .map(|t| t.data)
            .unwrap_or_else(|_| e.clone())
    }
}

/// Every column of `t` that a database lacks or holds in a type that cannot
/// be read exactly. `fit(local name, federated type)`: `None` if there is no
/// such column, `Some(None)` if it fits, `Some(Some(why))` if not.
pub fn column_problems(
    t: &SqlTable,
    place: &str,
    fit: impl Fn(&str, &planner::ColumnType) -> Option<Option<String>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for col in &t.table.columns {
        let local = t.local_column(&col.name);
        let why = match fit(local, &col.ty) {
            None => format!("found no column `{local}`"),
            Some(None) => continue,
            Some(Some(why)) => why,
        };
        problems.push(format!(
            "table {}, column {}: expected {}, {why} in {place}",
            t.table.name, col.name, col.ty
        ));
    }
    problems
}

/// How a column of a query's result is read back from the database.
#[derive(Debug, Clone)]
pub struct OutColumn {
    pub field: Arc<Field>,
    /// The database returns an integer count of units of the field's decimal
    /// scale (SQLite's scaled sums) rather than the number itself.
    pub units: bool,
}

/// What a source runs for one local part.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    /// The statement sent to the database.
    pub sql: String,
    /// How to read its result.
    pub columns: Vec<OutColumn>,
    /// `None`: the database computes the whole local part. `Some`: it returns
    /// rows (only the columns used, filtered by what could be sent) and the
    /// gateway computes the rest.
    pub residual: Option<Residual>,
}

#[derive(Debug, Clone)]
pub struct Residual {
    /// The filter conjuncts the gateway applies (federated names).
    pub filter: Option<Expr>,
    /// Why each construct stayed in the gateway.
    pub reasons: Vec<String>,
}

impl SourcePlan {
    /// EXPLAIN lines.
    pub fn explain(&self, dialect: Dialect, source: &str) -> Vec<String> {
        let sql = |e: &Expr| {
            datafusion::sql::unparser::expr_to_sql(e)
                .map(|s| s.to_string())
                .unwrap_or_else(|_| e.to_string())
        };
        let mut lines = vec![format!(
            "sent to {} ({source}): {}",
            dialect.name(),
            self.sql
        )];
        if let Some(r) = &self.residual {
            let mut s = String::from(
                "then computed in the gateway (DataFusion, streaming): the partial aggregates",
            );
            if let Some(f) = &r.filter {
                s.push_str(&format!(" and the filter {}", sql(f)));
            }
            lines.push(s);
            for why in &r.reasons {
                lines.push(format!("  not pushed down: {why}"));
            }
        }
        lines
    }
}

/// Decides what `dialect` runs for `part` over `table`. `input` is the
/// federated table's schema; `output` the local part's result schema (group
/// columns, then `p0..pk`), as DataFusion computes it. With `aggregate`
/// false the database only filters (the benchmark's "pull rows" baseline).
pub fn plan_source(
    dialect: Dialect,
    table: &SqlTable,
    part: &LocalPart,
    input: &DFSchema,
    output: &Schema,
    aggregate: bool,
) -> SourcePlan {
    let conjuncts: Vec<&Expr> = part
        .filter
        .as_ref()
        .map(split_conjunction)
        .unwrap_or_default();
    let mut pushed = Vec::new();
    let mut kept = Vec::new();
    let mut reasons = Vec::new();
    for c in conjuncts {
        match pushable(dialect, c, input, table) {
            Ok(()) => pushed.push(c.clone()),
            Err(why) => {
                let shown = datafusion::sql::unparser::expr_to_sql(c)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|_| c.to_string());
                reasons.push(format!("{shown}: {why}"));
                kept.push(c.clone());
            }
        }
    }
    let where_clause = |exprs: &[Expr]| -> Result<String, String> {
        if exprs.is_empty() {
            return Ok(String::new());
        }
        let parts: Result<Vec<String>, String> = exprs
            .iter()
            .map(|e| {
                dialect
                    .unparse(&table.localize(e))
                    .map(|s| format!("({s})"))
            })
            .collect();
        Ok(format!(" WHERE {}", parts?.join(" AND ")))
    };

    // The whole local part, if every conjunct and every partial can go.
    if !aggregate {
        reasons.push("pushdown of the aggregates is turned off for this source".into());
    }
    if let Some((id, k)) = &part.bound {
        reasons.push(format!(
            "differential privacy keeps at most {k} row(s) per {id}, which the gateway enforces"
        ));
    }
    let aggregate = aggregate && part.bound.is_none();
    if kept.is_empty() && aggregate {
        match pushdown(dialect, table, part, input, output) {
            Ok((select, columns)) => match where_clause(&pushed) {
                Ok(w) => {
                    let mut sql = format!("SELECT {select} FROM {}{w}", table.from_clause());
                    if !part.group_columns.is_empty() {
                        let g: Vec<String> = part
                            .group_columns
                            .iter()
                            .map(|g| quote(table.local_column(g)))
                            .collect();
                        sql.push_str(&format!(" GROUP BY {}", g.join(", ")));
                    }
                    return SourcePlan {
                        sql,
                        columns,
                        residual: None,
                    };
                }
                Err(e) => reasons.push(format!("the filter could not be written as SQL: {e}")),
            },
            Err(why) => reasons.push(why),
        }
    }

    // Rows of the columns used, filtered by what can be sent.
    let mut used: Vec<String> = part.group_columns.clone();
    let mut note = |e: &Expr| {
        for c in e.column_refs() {
            if !used.contains(&c.name) {
                used.push(c.name.clone());
            }
        }
    };
    for e in &kept {
        note(e);
    }
    for p in &part.partials {
        if let Some(a) = &p.arg {
            note(a);
        }
    }
    if let Some((id, _)) = &part.bound {
        note(&Expr::Column(datafusion::common::Column::new_unqualified(
            id.clone(),
        )));
    }
    let (select, columns) = select_columns(dialect, table, Some(&used));
    let (w, kept) = match where_clause(&pushed) {
        Ok(w) => (w, kept),
        Err(e) => {
            reasons.push(format!("the filter could not be written as SQL: {e}"));
            (String::new(), part.filter.iter().cloned().collect())
        }
    };
    SourcePlan {
        sql: format!("{select}{w}"),
        columns,
        residual: Some(Residual {
            filter: kept.into_iter().reduce(datafusion::logical_expr::and),
            reasons,
        }),
    }
}

/// `SELECT` of the table's columns (those in `only`, or all), under their
/// federated names, and how to read them.
pub fn select_columns(
    dialect: Dialect,
    table: &SqlTable,
    only: Option<&[String]>,
) -> (String, Vec<OutColumn>) {
    let mut items = Vec::new();
    let mut columns = Vec::new();
    for c in &table.table.columns {
        if only.is_some_and(|u| !u.contains(&c.name)) {
            continue;
        }
        let local = quote(table.local_column(&c.name));
        let ty = c.ty.arrow_type();
        // PostgreSQL numerics come back as text, parsed exactly.
        let item = match (dialect, &ty) {
            (Dialect::Postgres, DataType::Decimal128(..)) => format!("CAST({local} AS TEXT)"),
            _ => local,
        };
        items.push(format!("{item} AS {}", quote(&c.name)));
        columns.push(OutColumn {
            field: Arc::new(Field::new(&c.name, ty, true)),
            units: false,
        });
    }
    if items.is_empty() {
        // COUNT(*) alone: one constant column per row.
        items.push(format!("1 AS {}", quote("__one")));
        columns.push(OutColumn {
            field: Arc::new(Field::new("__one", DataType::Int64, true)),
            units: false,
        });
    }
    (
        format!("SELECT {} FROM {}", items.join(", "), table.from_clause()),
        columns,
    )
}

/// The SELECT list of the whole local part, or why it cannot be sent.
fn pushdown(
    dialect: Dialect,
    table: &SqlTable,
    part: &LocalPart,
    input: &DFSchema,
    output: &Schema,
) -> Result<(String, Vec<OutColumn>), String> {
    let mut items = Vec::new();
    let mut columns = Vec::new();
    let fields = output.fields();
    if fields.len() != part.group_columns.len() + part.partials.len() {
        return Err("the local part's result has an unexpected shape".into());
    }
    for (g, f) in part.group_columns.iter().zip(fields.iter()) {
        items.push(format!("{} AS {}", quote(table.local_column(g)), quote(g)));
        columns.push(OutColumn {
            field: f.clone(),
            units: false,
        });
    }
    for (i, p) in part.partials.iter().enumerate() {
        let f = &fields[part.group_columns.len() + i];
        let arg = match &p.arg {
            Some(a) => {
                pushable(dialect, a, input, table)
                    .map_err(|why| format!("aggregate argument {a}: {why}"))?;
                let ty = a
                    .get_type(input)
                    .map_err(|e| format!("aggregate argument {a}: {e}"))?;
                let sql = dialect
                    .unparse(&table.localize(a))
                    .map_err(|e| format!("aggregate argument {a}: {e}"))?;
                Some((sql, ty))
            }
            None => None,
        };
        let s = p.scale;
        let (item, units) = match dialect {
            Dialect::DataFusion => {
                let e = match part.aggregate_exprs().into_iter().nth(i) {
                    Some(Expr::Alias(a)) => *a.expr,
                    Some(e) => e,
                    None => return Err("a partial without an expression".into()),
                };
                let sql = dialect
                    .unparse(&table.localize(&e))
                    .map_err(|e| format!("partial {i}: {e}"))?;
                (sql, false)
            }
            Dialect::Postgres => {
                let a = || arg.as_ref().map(|(s, _)| s.as_str()).unwrap_or("1");
                let int_arg = matches!(
                    arg.as_ref().map(|(_, t)| t),
                    Some(DataType::Int64 | DataType::Int32 | DataType::Int16)
                );
                let float_arg = matches!(
                    arg.as_ref().map(|(_, t)| t),
                    Some(DataType::Float64 | DataType::Float32)
                );
                // CAST(x AS NUMERIC(p,s)) fails in PostgreSQL where x has
                // more than p−s integer digits (or is ±Infinity); DataFusion's
                // partials use TRY_CAST, which gives NULL. The same NULL
                // here, so that no row can make the query fail: below the
                // bound the cast is exact, at or above it (NaN included) the
                // value counts as NULL. Floats are bounded at half the limit,
                // so that rounding to s digits cannot carry past it.
                let fixed = |x: &str, prec: u32| -> String {
                    let digits = prec.saturating_sub(s);
                    if float_arg {
                        // As DataFusion's guard (`Partial::fixed_arg`): the
                        // value rounded to s digits (NUMERIC(38,s), reached
                        // only below 10^(37−s)), then bounded by 10^digits.
                        let c = format!(
                            "(CASE WHEN ABS({x}) < 1e{} THEN CAST({x} AS NUMERIC(38,{s})) END)",
                            37u32.saturating_sub(s)
                        );
                        let bound = format!("1{}", "0".repeat(digits as usize));
                        format!("(CASE WHEN {c} > -{bound} AND {c} < {bound} THEN CAST({c} AS NUMERIC({prec},{s})) END)")
                    } else {
                        // No ABS on integers: ABS of the smallest integer
                        // is itself an error in PostgreSQL.
                        let bound = format!("1{}", "0".repeat(digits as usize));
                        format!(
                            "(CASE WHEN {x} > -{bound} AND {x} < {bound} THEN CAST({x} AS NUMERIC({prec},{s})) END)"
                        )
                    }
                };
                // The same per-value bound as DataFusion's partials
                // (`planner::plan::Partial::digits`), in every partial; where
                // the type bounds the values, casts as they always were.
                let item = match (p.kind, p.digits) {
                    (PartialKind::RowCount, _) => "COUNT(*)".to_string(),
                    (PartialKind::Count, Some(d)) => format!("COUNT({})", fixed(a(), d as u32)),
                    (PartialKind::Count, None) => format!("COUNT({})", a()),
                    (PartialKind::Sum, Some(d)) => {
                        format!("CAST(SUM({}) AS TEXT)", fixed(a(), d as u32))
                    }
                    // PostgreSQL sums integers exactly (into numeric, with
                    // 128-bit accumulators): no per-row cast needed.
                    (PartialKind::Sum, None) if s == 0 && int_arg => {
                        format!("CAST(SUM({}) AS TEXT)", a())
                    }
                    (PartialKind::Sum, None) => {
                        format!("CAST(SUM(CAST({} AS NUMERIC(38,{s}))) AS TEXT)", a())
                    }
                    // The least or greatest value within the same bound as
                    // DataFusion's partial; NULL where the group has none.
                    (PartialKind::Extreme { max }, _) => format!(
                        "CAST({}({}) AS TEXT)",
                        if max { "MAX" } else { "MIN" },
                        fixed(a(), SQUARE_DIGITS as u32)
                    ),
                    (PartialKind::SumSquares, _) => {
                        let f = fixed(a(), SQUARE_DIGITS as u32);
                        format!("CAST(SUM({f} * {f}) AS TEXT)")
                    }
                    (PartialKind::SquareLimb(l), _) => {
                        // As `LocalPart::aggregate_exprs`: the units as a
                        // BIGINT (below 10^18), split at LIMB_BASE; bigint
                        // division truncates towards zero and % keeps the
                        // dividend's sign, as in DataFusion. SUM(bigint)
                        // is an exact numeric.
                        let f = fixed(a(), SQUARE_DIGITS as u32);
                        let u = format!("CAST({f} * {} AS BIGINT)", 10i64.pow(s));
                        let hi = format!("({u} / {LIMB_BASE})");
                        let lo = format!("({u} % {LIMB_BASE})");
                        let product = match l {
                            Limb::High => format!("{hi} * {hi}"),
                            Limb::Cross => format!("{hi} * {lo}"),
                            Limb::Low => format!("{lo} * {lo}"),
                        };
                        format!("CAST(SUM({product}) AS TEXT)")
                    }
                };
                (item, false)
            }
            Dialect::Sqlite => {
                // SQLite's SUM raises "integer overflow" past 64 bits, turns
                // a product that overflows into REAL, and clamps a float's
                // cast to INTEGER; any of these on an analyst's expression
                // (`CASE WHEN id = 7 THEN 9223372036854775807 ELSE x END`)
                // would make one row decide the outcome. So SQLite sums
                // only plain integer columns (stored values alone can reach
                // 2^63, and only with many rows), counts anything, and the
                // gateway computes the rest from the filtered rows.
                let plain_int_column = matches!(&p.arg, Some(Expr::Column(_)))
                    && matches!(
                        arg.as_ref().map(|(_, t)| t),
                        Some(
                            DataType::Int64
                                | DataType::Int32
                                | DataType::Int16
                                | DataType::Decimal128(_, 0)
                        )
                    );
                let a = arg.as_ref().map(|(s, _)| s.as_str()).unwrap_or("1");
                match p.kind {
                    PartialKind::RowCount => ("COUNT(*)".to_string(), false),
                    PartialKind::Count if p.digits.is_none() => (format!("COUNT({a})"), false),
                    PartialKind::Sum if p.digits.is_none() && s == 0 && plain_int_column => {
                        (format!("SUM({a})"), true)
                    }
                    PartialKind::Count | PartialKind::Sum => {
                        return Err(format!(
                            "aggregate argument {a}: SQLite cannot bound or sum it exactly as DataFusion does"
                        ))
                    }
                    PartialKind::SumSquares | PartialKind::SquareLimb(_) => {
                        return Err(format!(
                            "aggregate argument {a}: SQLite's squares overflow 64-bit integers"
                        ))
                    }
                    PartialKind::Extreme { .. } => {
                        return Err(format!(
                            "aggregate argument {a}: SQLite compares mixed types by its own rules, not as DataFusion does"
                        ))
                    }
                }
            }
        };
        items.push(format!("{item} AS {}", quote(&format!("p{i}"))));
        columns.push(OutColumn {
            field: f.clone(),
            units,
        });
    }
    Ok((items.join(", "), columns))
}

/// Whether `dialect` computes `e` exactly as DataFusion does; if not, why.
fn pushable(dialect: Dialect, e: &Expr, input: &DFSchema, table: &SqlTable) -> Result<(), String> {
    let ty = |e: &Expr| e.get_type(input).unwrap_or(DataType::Null);
    let is_text = |e: &Expr| {
        matches!(
            ty(e),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        )
    };
    let sqlite = dialect == Dialect::Sqlite;
    if dialect == Dialect::DataFusion {
        // The same engine computes the same values.
        return Ok(());
    }
    let rec = |e: &Expr| pushable(dialect, e, input, table);
    match e {
        Expr::Column(c) => {
            match ty(e) {
                DataType::Date32 | DataType::Timestamp(..) if sqlite => {
                    return Err(format!(
                        "SQLite stores the date/time column {} as text",
                        c.name
                    ))
                }
                DataType::Decimal128(_, s) if sqlite && s > 0 => {
                    return Err(format!(
                        "SQLite stores the exact decimal column {} as text",
                        c.name
                    ))
                }
                _ => {}
            }
            if table.table.column(&c.name).is_none() {
                return Err(format!(
                    "{} is not a column of {}",
                    c.name, table.table.name
                ));
            }
            Ok(())
        }
        Expr::Literal(v, _) => match v {
            ScalarValue::Null
            | ScalarValue::Boolean(_)
            | ScalarValue::Int8(_)
            | ScalarValue::Int16(_)
            | ScalarValue::Int32(_)
            | ScalarValue::Int64(_)
            | ScalarValue::UInt8(_)
            | ScalarValue::UInt16(_)
            | ScalarValue::UInt32(_)
            | ScalarValue::Float64(_)
            | ScalarValue::Utf8(_) => Ok(()),
            ScalarValue::Decimal128(..)
            | ScalarValue::Date32(_)
            | ScalarValue::TimestampMicrosecond(_, None)
                if !sqlite =>
            {
                Ok(())
            }
            other => Err(format!(
                "{} has no literal for {}",
                dialect.name(),
                other.data_type()
            )),
        },
        Expr::Alias(a) => rec(&a.expr),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            use Operator::*;
            match op {
                And | Or | Eq | NotEq | IsDistinctFrom | IsNotDistinctFrom => {}
                Lt | LtEq | Gt | GtEq => {
                    if !sqlite && (is_text(left) || is_text(right)) {
                        return Err("the order of text depends on PostgreSQL's collation".into());
                    }
                }
                // No arithmetic: PostgreSQL raises an error where an integer
                // sum or product overflows, DataFusion wraps; an error on some
                // row would make the query's outcome depend on the data
                // (planner::total). Not `/` or `%` either: decimal quotients
                // round at engine-specific scales.
                other => {
                    return Err(format!(
                        "{} would compute `{other}` differently",
                        dialect.name()
                    ))
                }
            }
            rec(left)?;
            rec(right)
        }
        Expr::Not(x)
        | Expr::IsNull(x)
        | Expr::IsNotNull(x)
        | Expr::IsTrue(x)
        | Expr::IsFalse(x)
        | Expr::IsNotTrue(x)
        | Expr::IsNotFalse(x) => rec(x),
        Expr::Negative(x) if !sqlite => rec(x),
        Expr::Between(b) => {
            if !sqlite && is_text(&b.expr) {
                return Err("the order of text depends on PostgreSQL's collation".into());
            }
            rec(&b.expr)?;
            rec(&b.low)?;
            rec(&b.high)
        }
        Expr::InList(l) => {
            rec(&l.expr)?;
            l.list.iter().try_for_each(rec)
        }
        Expr::Like(l) if !sqlite && l.escape_char.is_none() => {
            rec(&l.expr)?;
            rec(&l.pattern)
        }
        Expr::Like(_) if sqlite => Err("SQLite's LIKE ignores case".into()),
        Expr::Cast(c) => {
            let from = ty(&c.expr);
            let int = |t: &DataType| {
                matches!(
                    t,
                    DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64
                )
            };
            let to = c.field.data_type();
            let ok = match (&from, to) {
                (f, DataType::Int64 | DataType::Float64) if int(f) => true,
                (DataType::Float32, DataType::Float64) => true,
                (f, DataType::Decimal128(..)) if int(f) => !sqlite,
                // A date literal: PostgreSQL reads ISO dates as DataFusion does.
                (DataType::Utf8, DataType::Date32 | DataType::Timestamp(_, None)) => {
                    !sqlite && matches!(c.expr.as_ref(), Expr::Literal(..))
                }
                (&DataType::Decimal128(p, s), DataType::Decimal128(tp, ts)) => {
                    !sqlite && *ts >= s && (*tp as i16 - *ts as i16) >= (p as i16 - s as i16)
                }
                _ => false,
            };
            if !ok {
                return Err(format!("a cast from {from} to {to} may round differently"));
            }
            rec(&c.expr)
        }
        Expr::ScalarFunction(f) => {
            let name = f.name();
            let allowed: &[&str] = match dialect {
                // Not lower/upper: PostgreSQL's follow the database's
                // LC_CTYPE (ASCII only under C), DataFusion's all of Unicode.
                Dialect::Postgres => &["abs", "coalesce", "character_length"],
                Dialect::Sqlite | Dialect::DataFusion => &["abs", "coalesce"],
            };
            if !allowed.contains(&name) {
                return Err(format!("the function {name} is computed in the gateway"));
            }
            f.args.iter().try_for_each(rec)
        }
        other => Err(format!(
            "{} is computed in the gateway",
            other.variant_name()
        )),
    }
}

/// One value as a database returned it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
    /// Days since 1970-01-01.
    Date(i32),
    /// Microseconds since 1970-01-01 00:00:00 (no time zone).
    Timestamp(i64),
}

/// Builds one Arrow column from database values, exactly or not at all.
pub enum ColumnBuilder {
    Int(Int64Builder),
    Float(Float64Builder),
    Decimal(Decimal128Builder, u8, i8, bool),
    Text(StringBuilder),
    Bool(BooleanBuilder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
}

impl ColumnBuilder {
    pub fn new(c: &OutColumn) -> Result<Self, SourceError> {
        Ok(match c.field.data_type() {
            DataType::Int64 => ColumnBuilder::Int(Int64Builder::new()),
            DataType::Float64 => ColumnBuilder::Float(Float64Builder::new()),
            DataType::Decimal128(p, s) => ColumnBuilder::Decimal(
                Decimal128Builder::new()
                    .with_precision_and_scale(*p, *s)
                    .map_err(|e| SourceError::Run(e.to_string()))?,
                *p,
                *s,
                c.units,
            ),
            DataType::Utf8 => ColumnBuilder::Text(StringBuilder::new()),
            DataType::Boolean => ColumnBuilder::Bool(BooleanBuilder::new()),
            DataType::Date32 => ColumnBuilder::Date(Date32Builder::new()),
            DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None) => {
                ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::new())
            }
            other => {
                return Err(SourceError::Run(format!(
                    "column {}: type {other} cannot be read from a SQL source",
                    c.field.name()
                )))
            }
        })
    }

    /// Appends `v`, or says why it cannot be represented exactly.
    pub fn push(&mut self, v: Value) -> Result<(), String> {
        match (self, v) {
            (ColumnBuilder::Int(b), Value::Null) => b.append_null(),
            (ColumnBuilder::Float(b), Value::Null) => b.append_null(),
            (ColumnBuilder::Decimal(b, ..), Value::Null) => b.append_null(),
            (ColumnBuilder::Text(b), Value::Null) => b.append_null(),
            (ColumnBuilder::Bool(b), Value::Null) => b.append_null(),
            (ColumnBuilder::Date(b), Value::Null) => b.append_null(),
            (ColumnBuilder::Timestamp(b), Value::Null) => b.append_null(),
            (ColumnBuilder::Timestamp(b), Value::Timestamp(t)) => b.append_value(t),
            (ColumnBuilder::Timestamp(b), Value::Date(d)) => {
                b.append_value(d as i64 * 86_400_000_000)
            }
            (ColumnBuilder::Timestamp(b), Value::Text(t)) => b.append_value(parse_timestamp(&t)?),
            (ColumnBuilder::Int(b), Value::Int(i)) => b.append_value(i),
            (ColumnBuilder::Float(b), Value::Float(f)) => b.append_value(f),
            (ColumnBuilder::Float(b), Value::Int(i)) => {
                if i.unsigned_abs() > 1 << 53 {
                    return Err(format!("the integer {i} has no exact float"));
                }
                b.append_value(i as f64)
            }
            (ColumnBuilder::Decimal(b, p, s, units), Value::Int(i)) => {
                let v = if *units {
                    i as i128
                } else {
                    (i as i128)
                        .checked_mul(10i128.pow((*s).max(0) as u32))
                        .ok_or_else(|| format!("{i} does not fit at scale {s}"))?
                };
                check_precision(v, *p)?;
                b.append_value(v)
            }
            (ColumnBuilder::Decimal(b, p, s, _), Value::Text(t)) => {
                let v = parse_decimal(&t, *s)?;
                check_precision(v, *p)?;
                b.append_value(v)
            }
            (ColumnBuilder::Text(b), Value::Text(t)) => b.append_value(t),
            (ColumnBuilder::Bool(b), Value::Bool(x)) => b.append_value(x),
            (ColumnBuilder::Bool(b), Value::Int(i @ (0 | 1))) => b.append_value(i == 1),
            (ColumnBuilder::Date(b), Value::Date(d)) => b.append_value(d),
            (ColumnBuilder::Date(b), Value::Text(t)) => b.append_value(parse_date(&t)?),
            (b, v) => {
                return Err(format!(
                    "a {} value where {} was expected",
                    match v {
                        Value::Int(_) => "integer",
                        Value::Float(_) => "floating-point",
                        Value::Text(_) => "text",
                        Value::Bool(_) => "boolean",
                        Value::Date(_) => "date",
                        Value::Timestamp(_) => "timestamp",
                        Value::Null => "NULL",
                    },
                    b.type_name()
                ))
            }
        }
        Ok(())
    }

    fn type_name(&self) -> &'static str {
        match self {
            ColumnBuilder::Int(_) => "an integer",
            ColumnBuilder::Float(_) => "a float",
            ColumnBuilder::Decimal(..) => "an exact decimal",
            ColumnBuilder::Text(_) => "text",
            ColumnBuilder::Bool(_) => "a boolean",
            ColumnBuilder::Date(_) => "a date",
            ColumnBuilder::Timestamp(_) => "a timestamp",
        }
    }

    pub fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Int(b) => Arc::new(b.finish()),
            ColumnBuilder::Float(b) => Arc::new(b.finish()),
            ColumnBuilder::Decimal(b, ..) => Arc::new(b.finish()),
            ColumnBuilder::Text(b) => Arc::new(b.finish()),
            ColumnBuilder::Bool(b) => Arc::new(b.finish()),
            ColumnBuilder::Date(b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(b) => Arc::new(b.finish()),
        }
    }
}

fn check_precision(v: i128, p: u8) -> Result<(), String> {
    if p < 39 && v.unsigned_abs() >= 10u128.pow(p as u32) {
        return Err(format!("{v} has more than {p} digits"));
    }
    Ok(())
}

/// A decimal string as an integer count of 10^-scale, exactly.
pub fn parse_decimal(t: &str, scale: i8) -> Result<i128, String> {
    let bad = || format!("`{t}` is not an exact decimal at scale {scale}");
    let s = t.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let scale = scale.max(0) as usize;
    let (kept, dropped) = frac.split_at(frac.len().min(scale));
    if dropped.bytes().any(|b| b != b'0') {
        return Err(bad());
    }
    let mut v: i128 = 0;
    for b in int.bytes().chain(kept.bytes()) {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add((b - b'0') as i128))
            .ok_or_else(bad)?;
    }
    for _ in kept.len()..scale {
        v = v.checked_mul(10).ok_or_else(bad)?;
    }
    Ok(if neg { -v } else { v })
}

/// `YYYY-MM-DD` as days since 1970-01-01.
pub fn parse_date(t: &str) -> Result<i32, String> {
    let d = chrono::NaiveDate::parse_from_str(t.trim(), "%Y-%m-%d")
        .map_err(|_| format!("`{t}` is not a date YYYY-MM-DD"))?;
    Ok(days_since_epoch(d))
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]` (or with `T`) as microseconds since the
/// epoch; a bare date is midnight.
pub fn parse_timestamp(t: &str) -> Result<i64, String> {
    let s = t.trim();
    for f in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(v) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Ok(v.and_utc().timestamp_micros());
        }
    }
    parse_date(s)
        .map(|d| d as i64 * 86_400_000_000)
        .map_err(|_| format!("`{t}` is not a timestamp YYYY-MM-DD HH:MM:SS"))
}

pub fn days_since_epoch(d: chrono::NaiveDate) -> i32 {
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    (d - epoch).num_days() as i32
}

/// Collects rows into Arrow batches of `columns`, `BATCH_ROWS` at a time.
pub struct BatchWriter {
    schema: SchemaRef,
    builders: Vec<ColumnBuilder>,
    rows: usize,
    source: String,
}

pub const BATCH_ROWS: usize = 8192;

impl BatchWriter {
    pub fn new(columns: &[OutColumn], source: &str) -> Result<Self, SourceError> {
        let fields: Vec<Field> = columns
            .iter()
            .map(|c| c.field.as_ref().clone().with_nullable(true))
            .collect();
        Ok(BatchWriter {
            schema: Arc::new(Schema::new(fields)),
            builders: columns
                .iter()
                .map(ColumnBuilder::new)
                .collect::<Result<_, _>>()?,
            rows: 0,
            source: source.to_string(),
        })
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Appends one row; returns a full batch when one is ready.
    pub fn push_row(
        &mut self,
        mut value: impl FnMut(usize) -> Result<Value, String>,
    ) -> Result<Option<RecordBatch>, SourceError> {
        for (i, b) in self.builders.iter_mut().enumerate() {
            value(i).and_then(|v| b.push(v)).map_err(|why| {
                SourceError::Run(format!(
                    "{} returned a value Council cannot use exactly in column {}: {why}",
                    self.source,
                    self.schema.field(i).name()
                ))
            })?;
        }
        self.rows += 1;
        if self.rows >= BATCH_ROWS {
            return self.flush().map(Some);
        }
        Ok(None)
    }

    pub fn flush(&mut self) -> Result<RecordBatch, SourceError> {
        self.rows = 0;
        let arrays: Vec<ArrayRef> = self.builders.iter_mut().map(|b| b.finish()).collect();
        RecordBatch::try_new(self.schema.clone(), arrays)
            .map_err(|e| SourceError::Run(e.to_string()))
    }

    pub fn pending(&self) -> usize {
        self.rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_parse_exactly_or_not_at_all() {
        assert_eq!(parse_decimal("12.5", 2), Ok(1250));
        assert_eq!(parse_decimal("-0.125", 3), Ok(-125));
        assert_eq!(parse_decimal("7", 3), Ok(7000));
        assert_eq!(parse_decimal("1.2300", 2), Ok(123));
        assert!(parse_decimal("1.235", 2).is_err());
        assert!(parse_decimal("NaN", 2).is_err());
        assert!(parse_decimal("", 2).is_err());
        assert!(parse_decimal("1e5", 2).is_err());
        assert!(parse_decimal("99999999999999999999999999999999999999999", 0).is_err());
        assert_eq!(parse_date("1970-01-02"), Ok(1));
        assert_eq!(parse_timestamp("1970-01-01 00:00:01.5"), Ok(1_500_000));
        assert_eq!(parse_timestamp("1970-01-02T00:00:00"), Ok(86_400_000_000));
        assert_eq!(parse_timestamp("1970-01-02"), Ok(86_400_000_000));
        assert!(parse_timestamp("yesterday").is_err());
        assert!(parse_date("02/01/1970").is_err());
    }
}
