//! SQL → [`FederatedPlan`]: the local part every party runs, the secure step
//! that combines the partials, what is revealed to whom, and the post part.
//!
//! DataFusion plans the SQL against empty tables with the catalog's schema.
//! The plan must have the shape `[Limit] [Sort] Projection [Filter(HAVING)]
//! Aggregate [Filter(WHERE)] TableScan`; everything above the Aggregate runs
//! on revealed values only, everything below runs at each party on its own
//! rows, and the Aggregate itself is split into linear partials (counts, sums,
//! sums of squares) that are combined under additive secret sharing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, Int64Array, StringArray};
use datafusion::arrow::datatypes::{i256, DataType, FieldRef};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::Column;
use datafusion::datasource::empty::EmptyTable;
use datafusion::functions_aggregate::count::count_all;
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::{try_cast, Aggregate, Expr, ExprSchemable, LogicalPlan};
use datafusion::prelude::SessionContext;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::{Catalog, ColumnType, DomainValue, TableDef, DEFAULT_FLOAT_SCALE, MAX_GROUPS};
use crate::privacy::{Dec, DpParams, PartialNoise};
use crate::PlanError;

/// The largest result share (bytes) a plan may need: a gateway holds a
/// share stream whole (within this bound, `gateway::service`), and the
/// leader one per peer.
pub const MAX_SHARE_BYTES: usize = 48 << 20;

/// Options the querying analyst may set; part of the fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryOptions {
    /// The MPC engine; only `additive` exists so far.
    #[serde(default)]
    pub engine: Engine,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// Additive N-party sharing over Z_2^64: linear operators only; secure
    /// against any coalition of all parties but one (semi-honest).
    #[default]
    Additive,
}

impl Engine {
    /// One line for EXPLAIN.
    pub fn describe(&self, parties: usize) -> String {
        match self {
            Engine::Additive => format!(
                "additive secret sharing over Z_2^64 for counts, Z_2^128 for sums and sums of squares, \
                 Z_2^256 for sums of squares of wide values, among all {parties} parties with data"
            ),
        }
    }
}

/// The SQL aggregate the analyst wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AggKind {
    CountStar,
    Count,
    Sum,
    Avg,
    VarSamp,
    VarPop,
    StddevSamp,
    StddevPop,
    Min,
    Max,
}

impl AggKind {
    /// The name a policy uses for this aggregate.
    pub fn policy_name(self) -> &'static str {
        match self {
            AggKind::CountStar | AggKind::Count => "count",
            AggKind::Sum => "sum",
            AggKind::Avg => "avg",
            AggKind::VarSamp | AggKind::VarPop => "var",
            AggKind::StddevSamp | AggKind::StddevPop => "stddev",
            AggKind::Min => "min",
            AggKind::Max => "max",
        }
    }
}

/// A linear partial each party computes over its own rows, per group.
/// Digits (in units of 10^-scale) of one summand of a `Sum` partial: a
/// value of 10^26 units or more has no fixed-point encoding and counts as
/// NULL, like NaN. Decided so that no single row can make a query abort by
/// its value: a party's sum must stay within ±(2^127−1)/N of the ring, and
/// with summands below 10^26 only some 10^12/N rows of extreme values can
/// reach that, never one row (with 38 digits one row of an analyst's
/// `CASE WHEN … THEN 9e33 END` could, and its abort was a bit about that
/// row). Every declared `decimal(p,s)` with p ≤ 26 is unaffected; money at
/// scale 2 keeps 24 integer digits, a float at the default scale 4 keeps 22.
pub const SUM_DIGITS: u8 = 26;

/// Digits of one factor of a sum of squares: a value of 10^18 units or more
/// counts as NULL in VAR and STDDEV (and in their count and sum).
pub const SQUARE_DIGITS: u8 = 18;

/// Squares are summed whole only where every factor is below 10^13 units
/// (by its type, or under DP by its clamp): each square is then below
/// 10^26, the bound every summand of every shared sum keeps. Wider factors
/// are split into limbs (see [`Limb`]).
pub const WHOLE_SQUARE_DIGITS: u8 = 13;

/// The base of the limbs of a square's factor: x = hi·10^9 + lo in units,
/// |hi|, |lo| < 10^9, so hi², hi·lo and lo² are each below 10^18 and no
/// sum of them can wrap (or pass a party's share of the ring) whatever the
/// values: only a count of some 10^12/N rows could, as for plain sums.
pub const LIMB_BASE: i64 = 1_000_000_000;

/// One of the three partials of a sum of squares in limbs:
/// Σx² = Σhi²·10^18 + 2·Σhi·lo·10^9 + Σlo², combined after the reveal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Limb {
    /// Σ hi·hi
    High,
    /// Σ hi·lo
    Cross,
    /// Σ lo·lo
    Low,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PartialKind {
    /// Rows in the group (after WHERE).
    RowCount,
    /// Non-NULL values of the argument.
    Count,
    /// Σ x, as an integer at the partial's scale.
    Sum,
    /// Σ x², exact at twice the scale, shared in Z_2^128; only where every
    /// factor is below 10^WHOLE_SQUARE_DIGITS units.
    SumSquares,
    /// A limb of Σ x², summed locally in 128 bits; the high limb's partial
    /// carries the party's whole Σx² (all three combined), shared in
    /// Z_2^256, and the other two are never shared.
    SquareLimb(Limb),
    /// The party's least (or with `max`, greatest) value, an integer at
    /// the partial's scale below 10^SQUARE_DIGITS units; combined across
    /// parties by the replicated engine's secure minimum (a greatest value
    /// as the negated least of the negated values), never summed.
    Extreme { max: bool },
}

impl PartialKind {
    /// Whether the partial is shared in the wide ring Z_2^128. Sums are:
    /// a party's sum then needs to exceed ±(2^127−1)/N (about 10^37 units
    /// at three parties) to be refused, which one row cannot reach with
    /// summands below 10^SUM_DIGITS, so no single row can make a query
    /// abort by its value (in Z_2^64 one row of `x * 10^17` could).
    pub fn is_wide(self) -> bool {
        self.is_sum()
    }

    /// A sum of summands (not a count).
    pub fn is_sum(self) -> bool {
        matches!(
            self,
            PartialKind::Sum | PartialKind::SumSquares | PartialKind::SquareLimb(_)
        )
    }

    /// Combined by comparison (the replicated engine), not by addition.
    pub fn is_extreme(self) -> bool {
        matches!(self, PartialKind::Extreme { .. })
    }

    /// How a party's local values of this partial combine within a group.
    pub fn fold(self) -> executor::encode::Fold {
        match self {
            PartialKind::Extreme { max: false } => executor::encode::Fold::Min,
            PartialKind::Extreme { max: true } => executor::encode::Fold::Max,
            _ => executor::encode::Fold::Sum,
        }
    }
}

/// Where an aggregate's sum of squares is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Squares {
    Whole(usize),
    Limbs {
        high: usize,
        cross: usize,
        low: usize,
    },
}

impl Squares {
    pub fn partials(self) -> Vec<usize> {
        match self {
            Squares::Whole(i) => vec![i],
            Squares::Limbs { high, cross, low } => vec![high, cross, low],
        }
    }

    /// The partial whose total carries Σx²: the whole square, or the high
    /// limb, which each party shares combined with its other two limbs
    /// ([`combine_limbs`]) in Z_2^256, so that only Σx² is revealed, never
    /// a limb (Σhi² alone would tell whether any value reaches 10^9 units).
    pub fn shared(self) -> usize {
        match self {
            Squares::Whole(i) | Squares::Limbs { high: i, .. } => i,
        }
    }

    /// Σx² of group `g` from the revealed totals (`None`: not revealed).
    pub fn total(self, r: &crate::finalize::Revealed, g: usize) -> Option<i256> {
        let i = self.shared();
        match self {
            Squares::Whole(_) => r
                .totals
                .get(i)
                .and_then(|t| t.get(g))
                .map(|&v| i256::from_i128(v)),
            Squares::Limbs { .. } => r.wide.get(&i).and_then(|t| t.get(g)).copied(),
        }
    }
}

/// One party's Σx² from its limbs: Σhi²·10^18 + 2·Σhi·lo·10^9 + Σlo²,
/// exact (each below 2^127, so the result is below 2^188).
pub fn combine_limbs(high: i128, cross: i128, low: i128) -> i256 {
    let base = i256::from_i128(LIMB_BASE as i128);
    i256::from_i128(high)
        .wrapping_mul(base)
        .wrapping_mul(base)
        .wrapping_add(
            i256::from_i128(cross)
                .wrapping_mul(base)
                .wrapping_mul(i256::from_i128(2)),
        )
        .wrapping_add(i256::from_i128(low))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    pub kind: PartialKind,
    /// The aggregate's argument, with column names unqualified.
    pub arg: Option<Expr>,
    /// Decimal digits of the fixed-point encoding.
    pub scale: u32,
    /// Index of the partial (of the same argument) that counts non-NULL values.
    pub count_of_arg: Option<usize>,
    /// `Some(d)`: a value of 10^d units or more (or NaN, ±∞) counts as
    /// NULL, in every partial of the aggregate alike (its count, sum and
    /// squares then describe the same rows, so AVG, VAR and STDDEV stay
    /// consistent), through `CASE WHEN -B < x AND x < B THEN x END` (B =
    /// 10^(d−scale)) and a TRY_CAST. `None`: the argument's type keeps every
    /// value below the bound, and the argument is taken as it is (COUNT(x)
    /// always is). The guard is a CASE rather than a bare TRY_CAST because
    /// casts do not change DataFusion's column names: a source that plans
    /// the local part from SQL text would see `sum(x)` twice.
    pub digits: Option<u8>,
}

impl Partial {
    /// The largest |summand| of this partial, in units: proven by the
    /// guard or the type for sums, by the planner's choice of whole squares
    /// (factors below 10^WHOLE_SQUARE_DIGITS) or by the limbs' base.
    /// Every shared sum's summands stay below 10^SUM_DIGITS, so its count
    /// alone proves that it cannot wrap (no row's value decides).
    pub fn summand_cap(&self) -> u128 {
        match self.kind {
            PartialKind::RowCount | PartialKind::Count => 1,
            PartialKind::Sum => 10u128.pow(self.digits.unwrap_or(SUM_DIGITS) as u32) - 1,
            PartialKind::SumSquares => (10u128.pow(WHOLE_SQUARE_DIGITS as u32) - 1).pow(2),
            PartialKind::SquareLimb(_) => ((LIMB_BASE - 1) as u128).pow(2),
            PartialKind::Extreme { .. } => 10u128.pow(SQUARE_DIGITS as u32) - 1,
        }
    }

    /// The argument's value in units (x·10^scale) as a BIGINT, through the
    /// guard of SQUARE_DIGITS digits (so |units| < 10^18 fits, exactly).
    fn units_arg(&self) -> Expr {
        let f = self.fixed_arg(SQUARE_DIGITS);
        let shifted = if self.scale == 0 {
            f
        } else {
            f * datafusion::logical_expr::lit(10i64.pow(self.scale))
        };
        try_cast(shifted, DataType::Int64)
    }

    /// The argument in fixed point: `TRY_CAST(x AS DECIMAL(p, scale))`,
    /// guarded to `digits` where the type does not bound it.
    pub fn fixed_arg(&self, precision: u8) -> Expr {
        let x = self
            .arg
            .clone()
            .unwrap_or_else(|| datafusion::logical_expr::lit(1i64));
        let ty = DataType::Decimal128(precision, self.scale as i8);
        match self.digits {
            None => try_cast(x, ty),
            Some(d) => {
                let d = d.max(self.scale as u8);
                // Compared in DECIMAL(38, scale), exact for integers and
                // decimals, with bounds of that type spelled as text casts
                // (exact in DataFusion and in SQL text sent to a source).
                let wide = DataType::Decimal128(38, self.scale as i8);
                let c = try_cast(x, wide.clone());
                let bound = 10i128.pow((d as u32).saturating_sub(self.scale));
                let b = |v: i128| {
                    datafusion::logical_expr::cast(
                        datafusion::logical_expr::lit(v.to_string()),
                        wide.clone(),
                    )
                };
                let guarded = datafusion::logical_expr::when(
                    c.clone().gt(b(-bound)).and(c.clone().lt(b(bound))),
                    c,
                )
                .end()
                .unwrap_or_else(|_| {
                    datafusion::logical_expr::lit(datafusion::scalar::ScalarValue::Null)
                });
                try_cast(guarded, DataType::Decimal128(d, self.scale as i8))
            }
        }
    }

    fn describe(&self) -> String {
        let arg = self
            .arg
            .as_ref()
            .map(show_arg)
            .unwrap_or_else(|| "*".into());
        match self.kind {
            PartialKind::RowCount => "COUNT(*)".into(),
            PartialKind::Count => match self.digits {
                Some(d) => format!(
                    "COUNT({arg}) of values below 10^{d} units at scale {}",
                    self.scale
                ),
                None => format!("COUNT({arg})"),
            },
            PartialKind::Sum => format!("SUM({arg}) at scale {}", self.scale),
            PartialKind::SumSquares => {
                format!("SUM(({arg})^2) at scale {}, in Z_2^128", 2 * self.scale)
            }
            PartialKind::Extreme { max } => format!(
                "{}({arg}) at scale {}, in Z_2^64 (values of 10^{SQUARE_DIGITS} units or more count as NULL; \
                 a party without a value inputs 2^62 − 1, which stands for NULL)",
                if max { "MAX" } else { "MIN" },
                self.scale
            ),
            PartialKind::SquareLimb(Limb::High) => format!(
                "SUM(({arg})^2) at scale {}, in Z_2^256: each party sums hi², hi·lo and lo² locally, where \
                 ({arg})·10^{} = hi·10^9 + lo, and shares only hi²·10^18 + 2·hi·lo·10^9 + lo²",
                2 * self.scale,
                self.scale
            ),
            PartialKind::SquareLimb(l) => format!(
                "SUM({}) over ({arg})·10^{} = hi·10^9 + lo (local only, inside the sum of squares)",
                if l == Limb::Cross { "hi·lo" } else { "lo·lo" },
                self.scale
            ),
        }
    }
}

/// An aggregate's argument for people: a clamp (see [`clamp_expr`]) as
/// `CLAMP(x, lo, hi)`.
/// An expression as text, cut to a readable length for messages.
fn brief(e: &Expr) -> String {
    let s = e.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

fn show_arg(e: &Expr) -> String {
    if let Expr::Case(c) = e {
        if let (Some(x), [(_, lo), (_, hi)]) = (&c.else_expr, c.when_then_expr.as_slice()) {
            let lit = |e: &Expr| match e {
                Expr::Literal(v, _) => v.to_string(),
                other => other.to_string(),
            };
            return format!("CLAMP({x}, {}, {})", lit(lo), lit(hi));
        }
    }
    e.to_string()
}

/// One public group column and its declared values; NULL is the last value.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupColumn {
    pub name: String,
    pub data_type: DataType,
    pub values: Vec<Option<DomainValue>>,
}

/// The cross product of the group columns' domains: every party computes a
/// partial for every group in it, so no party's set of keys is revealed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GroupSpace {
    pub columns: Vec<GroupColumn>,
}

impl GroupSpace {
    pub fn len(&self) -> usize {
        self.columns.iter().map(|c| c.values.len()).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of text in the key arrays of a share over every group: each
    /// text value once per combination of the other columns' values.
    pub fn key_text_bytes(&self) -> u64 {
        let total = self.len() as u64;
        self.columns
            .iter()
            .map(|c| {
                let text: u64 = c
                    .values
                    .iter()
                    .map(|v| match v {
                        Some(DomainValue::Text(t)) => t.len() as u64,
                        _ => 0,
                    })
                    .sum();
                (total / c.values.len().max(1) as u64) * text
            })
            .sum()
    }

    /// The key of group `index`, one value per column (row-major order).
    pub fn key(&self, mut index: usize) -> Vec<Option<DomainValue>> {
        let mut key = vec![None; self.columns.len()];
        for (i, c) in self.columns.iter().enumerate().rev() {
            let n = c.values.len();
            key[i] = c.values[index % n].clone();
            index /= n;
        }
        key
    }

    /// The public companion of every share batch: one Arrow array per group
    /// column, `len()` rows, in group-index order.
    pub fn key_arrays(&self) -> Vec<ArrayRef> {
        self.key_arrays_for(&(0..self.len()).collect::<Vec<_>>())
    }

    /// Key arrays for the given group indices only.
    pub fn key_arrays_for(&self, indices: &[usize]) -> Vec<ArrayRef> {
        let keys: Vec<Vec<Option<DomainValue>>> = indices.iter().map(|&i| self.key(i)).collect();
        self.columns
            .iter()
            .enumerate()
            .map(|(ci, c)| -> ArrayRef {
                match c.data_type {
                    DataType::Int64 => {
                        Arc::new(Int64Array::from_iter(keys.iter().map(|k| match &k[ci] {
                            Some(DomainValue::Int(v)) => Some(*v),
                            _ => None,
                        })))
                    }
                    DataType::Boolean => {
                        Arc::new(BooleanArray::from_iter(keys.iter().map(|k| match &k[ci] {
                            Some(DomainValue::Bool(v)) => Some(*v),
                            _ => None,
                        })))
                    }
                    _ => Arc::new(StringArray::from_iter(keys.iter().map(|k| match &k[ci] {
                        Some(DomainValue::Text(v)) => Some(v.clone()),
                        _ => None,
                    }))),
                }
            })
            .collect()
    }
}

/// What each party runs on its own rows.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalPart {
    /// The federated table.
    pub table: String,
    pub filter: Option<Expr>,
    pub group_columns: Vec<String>,
    pub partials: Vec<Partial>,
    /// Differential privacy's contribution bound: keep at most this many
    /// rows per value of the individual id column (after the filter; rows
    /// without an id are dropped).
    pub bound: Option<(String, u64)>,
}

impl LocalPart {
    /// The DataFusion aggregate expressions, aliased `p0`, `p1`, …
    pub fn aggregate_exprs(&self) -> Vec<Expr> {
        self.partials
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let arg = p
                    .arg
                    .clone()
                    .unwrap_or_else(|| datafusion::logical_expr::lit(1i64));
                // A value without an exact fixed-point encoding (NaN, ±∞,
                // 10^digits units or more) counts as NULL rather than
                // failing the query on that row (see `total`, `SUM_DIGITS`
                // and `Partial::digits`), in every partial of the aggregate.
                let e = match p.kind {
                    PartialKind::RowCount => count_all(),
                    PartialKind::Count if p.digits.is_some() => count(p.fixed_arg(38)),
                    PartialKind::Count => count(arg.clone()),
                    PartialKind::Sum => sum(p.fixed_arg(38)),
                    PartialKind::Extreme { max: false } => {
                        datafusion::functions_aggregate::expr_fn::min(p.fixed_arg(SQUARE_DIGITS))
                    }
                    PartialKind::Extreme { max: true } => {
                        datafusion::functions_aggregate::expr_fn::max(p.fixed_arg(SQUARE_DIGITS))
                    }
                    PartialKind::SumSquares => {
                        sum(p.fixed_arg(SQUARE_DIGITS) * p.fixed_arg(SQUARE_DIGITS))
                    }
                    PartialKind::SquareLimb(l) => {
                        // Integer division truncates towards zero and the
                        // remainder keeps the dividend's sign, in DataFusion
                        // and in PostgreSQL alike: u = hi·10^9 + lo exactly.
                        let u = p.units_arg();
                        let base = || datafusion::logical_expr::lit(LIMB_BASE);
                        let hi = || u.clone() / base();
                        let lo = || u.clone() % base();
                        let product = match l {
                            Limb::High => hi() * hi(),
                            Limb::Cross => hi() * lo(),
                            Limb::Low => lo() * lo(),
                        };
                        // Each product is below 10^18; summed in 128 bits.
                        sum(datafusion::logical_expr::cast(
                            product,
                            DataType::Decimal128(38, 0),
                        ))
                    }
                };
                e.alias(format!("p{i}"))
            })
            .collect()
    }

    /// The local part as SQL, for EXPLAIN and for audits.
    pub fn to_sql(&self) -> String {
        let sql_of = |e: &Expr| match datafusion::sql::unparser::expr_to_sql(e) {
            Ok(s) => s.to_string(),
            Err(_) => e.to_string(),
        };
        let mut items: Vec<String> = self.group_columns.clone();
        items.extend(self.aggregate_exprs().iter().map(sql_of));
        let mut s = format!("SELECT {} FROM {}", items.join(", "), self.table);
        if let Some(f) = &self.filter {
            let _ = write!(s, " WHERE {}", sql_of(f));
        }
        if let Some((id, k)) = &self.bound {
            let _ = write!(s, " [at most {k} row(s) per {id}]");
        }
        if !self.group_columns.is_empty() {
            let _ = write!(s, " GROUP BY {}", self.group_columns.join(", "));
        }
        s
    }
}

/// One output aggregate of the DataFusion plan and the partials it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateOutput {
    pub kind: AggKind,
    /// DataFusion's output field (name and type), which the revealed values
    /// take, so that the post part is DataFusion's own.
    pub field: FieldRef,
    pub count: Option<usize>,
    pub sum: Option<usize>,
    pub sum_squares: Option<Squares>,
    /// The partial of a MIN or MAX.
    pub extreme: Option<usize>,
    pub scale: u32,
}

/// Which columns the query uses, and how: the policy checks this.
///
/// A use is classed by what the analyst can learn through it, not by where
/// it stands in the text. Only a column that is itself the argument of an
/// aggregate (`SUM(cost)`, `COUNT(patient_id)`) is an *aggregate* use. A
/// column anywhere in WHERE, in HAVING, or inside an expression that is an
/// aggregate's argument (`COUNT(CASE WHEN patient_id = 7 THEN 1 END)`,
/// `SUM(CASE WHEN cost > 4000 THEN los ELSE 0 END)`, `SUM(los + 0 * id)`) is a
/// *filter* use: such an expression can select rows by that column as
/// WHERE does. Columns inside an expression argument are also aggregate
/// uses of that function, since their values reach the total.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnUses {
    pub filter: BTreeSet<String>,
    pub group_by: BTreeSet<String>,
    /// Column → the policy names of the aggregates applied to it.
    pub aggregate: BTreeMap<String, BTreeSet<&'static str>>,
    pub count_star: bool,
    /// Every use with where it was found, in the order found: what EXPLAIN
    /// and `council policy test` show, and what a refusal names.
    pub notes: Vec<ColumnUse>,
}

/// One use of a column, and why it was classed so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnUse {
    pub column: String,
    /// `filter`, `group_by`, or `aggregate:<function>`.
    pub role: String,
    /// Where the use was found ("in WHERE", "inside the argument of SUM(...)").
    pub place: String,
}

impl ColumnUses {
    fn note(&mut self, column: &str, role: String, place: &str) {
        let u = ColumnUse {
            column: column.to_string(),
            role,
            place: place.to_string(),
        };
        if !self.notes.contains(&u) {
            self.notes.push(u);
        }
    }

    pub(crate) fn filter_use(&mut self, column: &str, place: &str) {
        self.filter.insert(column.to_string());
        self.note(column, "filter".into(), place);
    }

    pub(crate) fn group_use(&mut self, column: &str) {
        self.group_by.insert(column.to_string());
        self.note(column, "group_by".into(), "in GROUP BY");
    }

    pub(crate) fn aggregate_use(&mut self, column: &str, func: &'static str, place: &str) {
        self.aggregate
            .entry(column.to_string())
            .or_default()
            .insert(func);
        self.note(column, format!("aggregate:{func}"), place);
    }

    /// Where `column` was first used with `role` (for a refusal's message).
    pub fn place_of(&self, column: &str, role: &str) -> Option<&str> {
        self.notes
            .iter()
            .find(|u| u.column == column && u.role == role)
            .map(|u| u.place.as_str())
    }

    /// One line per use: `column: role (place)`.
    pub fn describe(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .notes
            .iter()
            .map(|u| format!("{}: {} ({})", u.column, u.role, u.place))
            .collect();
        if self.count_star {
            out.push("*: count_star (COUNT(*), or the row counts the query reveals)".into());
        }
        out
    }
}

/// The plan every gateway computes for itself.
#[derive(Debug, Clone)]
pub struct FederatedPlan {
    pub sql: String,
    pub parties: Vec<String>,
    pub options: QueryOptions,
    pub table: String,
    pub local: LocalPart,
    pub groups: GroupSpace,
    /// Whether the query has GROUP BY (without it, one row is always returned).
    pub grouped: bool,
    pub aggregates: Vec<AggregateOutput>,
    /// Index of the RowCount partial, which decides which groups exist.
    pub row_count: usize,
    pub uses: ColumnUses,
    /// DataFusion's logical plan of the whole query.
    pub logical: LogicalPlan,
    /// The federated table's schema (from the catalog).
    pub input_schema: datafusion::arrow::datatypes::SchemaRef,
    pub catalog_digest: String,
    pub fingerprint: String,
    /// The agreed differential-privacy parameters, if any party asked.
    pub privacy: Option<DpParams>,
    /// The noise each party adds to each revealed total (with `privacy`).
    pub noise: Vec<PartialNoise>,
    /// The secure part: its operators over the shared partials and every
    /// party's roles. Planned without a leader, no party receives the
    /// result and no engine runs it; [`FederatedPlan::led_by`] assigns it.
    pub program: executor::Program,
    /// Parties that hold no data ([`FederatedPlan::among`]), sorted.
    pub helpers: Vec<String>,
    /// The minimum group size enforced in shares (0: none;
    /// [`FederatedPlan::with_threshold`]).
    pub threshold: u64,
    /// HAVING's conjuncts that the gate decides in shares, where a gate can
    /// run ([`crate::having`]; none under DP, where HAVING applies to
    /// noised values).
    pub having: Vec<crate::having::SharedCondition>,
    /// HAVING's other conjuncts, evaluated on the revealed values at the
    /// result party (for EXPLAIN).
    pub having_left: Vec<String>,
    /// The conjuncts of `logical`'s HAVING that a gate decides (filter,
    /// conjunct): with a gate the post part takes them as TRUE.
    pub having_decided: Vec<(usize, usize)>,
    /// Per aggregate: whether only conjuncts the gate decides use it, so
    /// that with a gate it is not revealed (`HAVING COUNT(*) >= 20` alone
    /// reveals no count).
    pub having_only: Vec<bool>,
}

/// One column of the gate: each party's value of `partial` (negated if
/// `negate`), and the condition on its total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateColumn {
    pub partial: usize,
    pub negate: bool,
    pub bound: executor::Bound,
    pub text: String,
    /// A HAVING condition: a value beyond the gate's exact range makes it
    /// pass ([`executor::gate::FORCED_PASS`]), for the post part to decide.
    pub having: bool,
}

impl GateColumn {
    /// What a party inputs to this column for its partial `v`.
    pub fn value(&self, v: i128) -> i256 {
        let v = if self.negate { v.saturating_neg() } else { v };
        if self.having && v.unsigned_abs() > u128::from(executor::gate::EXACT_BOUND) {
            i256::from_i128(executor::gate::FORCED_PASS as i128)
        } else {
            i256::from_i128(v)
        }
    }
}

impl FederatedPlan {
    /// The plan of a query that `leader` asked: it alone receives the
    /// result. The roles are part of the fingerprint, so parties that
    /// disagree on who leads do not agree on the plan.
    pub fn led_by(mut self, leader: &str) -> Result<FederatedPlan, PlanError> {
        if !self.parties.iter().any(|p| p == leader) {
            return Err(PlanError::Invalid(format!(
                "{leader} is not a party of this federation"
            )));
        }
        if self.helpers.iter().any(|p| p == leader) {
            return Err(PlanError::not_permitted(
                format!("a query at {leader}"),
                "the query",
                format!(
                    "{leader} is a helper party: it holds no data and computes only on shares, so it does not \
                     lead queries; ask at a party that holds data"
                ),
            ));
        }
        self.restage(leader)?;
        self.fingerprint = fingerprint(&self);
        Ok(self)
    }

    /// The plan in a federation whose `helpers` hold no data (the same list
    /// at every party, from each gateway's config; it is in the roles and so
    /// in the fingerprint): they contribute no input and compute only
    /// where a comparison needs a third party.
    pub fn among(mut self, helpers: &[String]) -> Result<FederatedPlan, PlanError> {
        if let Some(h) = helpers.iter().find(|h| !self.parties.contains(h)) {
            return Err(PlanError::Invalid(format!(
                "helper party {h} is not a party of this federation"
            )));
        }
        let mut helpers = helpers.to_vec();
        helpers.sort();
        helpers.dedup();
        if helpers.len() > 3 {
            return Err(PlanError::Invalid(format!(
                "{} helper parties: at most three can compute, and a helper that never computes has no part",
                helpers.len()
            )));
        }
        if helpers.len() >= self.parties.len() {
            return Err(PlanError::Invalid(
                "every party of this federation is a helper: none holds data".into(),
            ));
        }
        self.helpers = helpers;
        let leader = self.leader();
        self.restage(&leader)?;
        self.fingerprint = fingerprint(&self);
        Ok(self)
    }

    /// The plan with a minimum group size of `k` rows decided in shares,
    /// without differential privacy (under DP the threshold applies to
    /// noised counts instead): a gate stage first compares each group's
    /// row count with `k` among three compute parties and reveals only
    /// whether it passes, to every party; each party then contributes
    /// nothing for a group that fails, so that neither its count nor any
    /// total or extreme computed from its rows is revealed. The gate needs
    /// three compute parties (a helper completes two).
    pub fn with_threshold(mut self, k: u64) -> Result<FederatedPlan, PlanError> {
        if self.privacy.is_some() {
            return Err(PlanError::Internal(
                "a minimum group size in shares is for plans without DP".into(),
            ));
        }
        if k > executor::gate::GATE_INPUT_BOUND {
            return Err(PlanError::Invalid(format!(
                "a minimum group size of {k} rows is beyond 2^58"
            )));
        }
        if k > 0 && !self.can_gate() {
            return Err(PlanError::not_permitted(
                format!("a query at a party that requires groups of at least {k} rows"),
                "the query",
                "without differential privacy, a minimum group size is enforced by a secure comparison among \
                 three compute parties, and this federation has fewer; add a data-less helper party \
                 (`helpers` in every gateway's config) or require differential privacy \
                 (policy: results.min_group_size)",
            ));
        }
        self.threshold = k;
        let leader = self.leader();
        self.restage(&leader)?;
        self.fingerprint = fingerprint(&self);
        Ok(self)
    }

    /// The parties that hold data, sorted.
    pub fn data_parties(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .parties
            .iter()
            .filter(|p| !self.helpers.contains(p))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// The three compute parties of a comparison: the helpers first, then
    /// the data parties, each in sorted order, the first three. Decided so
    /// that every party computes the same choice from the agreed list, and
    /// that a helper, which exists to be one, always is.
    pub fn comparison_parties(&self) -> Vec<String> {
        let mut v = self.helpers.clone();
        v.extend(self.data_parties());
        v.truncate(3);
        v
    }

    /// The program's stages from the shared partials, `leader` receiving
    /// the result: comparisons first, by the replicated engine over the
    /// extremes (three compute parties, honest majority), then the sums,
    /// by the additive engine over every other shared partial (any
    /// coalition short of all parties). [`FederatedPlan::shared_partials`]
    /// orders the partials so.
    fn restage(&mut self, leader: &str) -> Result<(), PlanError> {
        let shared = self.shared_partials();
        let extremes = shared
            .iter()
            .filter(|&&i| self.local.partials[i].kind.is_extreme())
            .count();
        let mut stages = Vec::new();
        let gate = self.gate_columns();
        if !gate.is_empty() {
            // The gate's columns come before the shared partials.
            stages.push(executor::Stage {
                ops: vec![executor::Op::Pass, executor::Op::Reveal],
                columns: gate.len(),
                compute: self.comparison_parties(),
                bounds: gate.iter().map(|g| g.bound).collect(),
            });
        }
        if extremes > 0 {
            let compute = self.comparison_parties();
            if compute.len() < 3 || self.data_parties().len() < 2 {
                let f = if self.aggregates.iter().any(|a| a.kind == AggKind::Min) {
                    "MIN"
                } else {
                    "MAX"
                };
                return Err(PlanError::not_supported(
                    format!(
                        "{f} in a federation of {} data part{} and {} helper{}",
                        self.data_parties().len(),
                        if self.data_parties().len() == 1 { "y" } else { "ies" },
                        self.helpers.len(),
                        if self.helpers.len() == 1 { "" } else { "s" }
                    ),
                    crate::ast_check::function_position(
                        &crate::ast_check::parse_and_check(&self.sql)?,
                        &f.to_ascii_lowercase(),
                    )
                    .unwrap_or_else(|| "the SELECT list".into()),
                    "a secure comparison runs on three compute parties and needs at least two parties with \
                     data; a federation of two adds a data-less helper party (`helpers` in every gateway's \
                     config, and a gateway without tables)",
                ));
            }
            stages.push(executor::Stage {
                ops: vec![executor::Op::Min, executor::Op::Reveal],
                columns: extremes,
                compute,
                bounds: Vec::new(),
            });
        }
        if shared.len() > extremes || stages.is_empty() {
            stages.push(executor::Stage {
                ops: vec![executor::Op::Sum, executor::Op::Reveal],
                columns: shared.len() - extremes,
                compute: self.data_parties(),
                bounds: Vec::new(),
            });
        }
        self.program = executor::Program::with_stages(&self.parties, &self.helpers, leader, stages);
        Ok(())
    }

    /// Whether a gate decides which groups pass (a minimum group size
    /// without DP).
    pub fn gated(&self) -> bool {
        self.privacy.is_none()
            && (self.threshold > 0 || (!self.having.is_empty() && self.can_gate()))
    }

    /// Whether a gate can run in this federation: three compute parties,
    /// at least two parties with data (the querying one and another), and
    /// at most 16 (`executor::gate`). Otherwise HAVING stays in the post
    /// part, and a minimum group size without DP is refused.
    fn can_gate(&self) -> bool {
        let data = self.data_parties().len();
        self.comparison_parties().len() == 3 && (2..=16).contains(&data)
    }

    /// Whether aggregate `k`'s value is revealed: always, except with a
    /// gate for one that only HAVING's conjuncts decided in the gate use.
    pub fn revealed_aggregate(&self, k: usize) -> bool {
        !self.gated() || !self.having_only.get(k).copied().unwrap_or(false)
    }

    /// The gate's columns, in order (none without a gate). The first is
    /// always the row count, so that the gate's shape is the same with a
    /// minimum group size or without one (a party may receive gate
    /// messages before it learns, at `start`, which minimum applies): with
    /// one, the rows of every party but the result party, at least k;
    /// without, every party's rows, at least one (the group exists;
    /// without GROUP BY the single group always does). Then HAVING's
    /// conditions, over every party's rows.
    pub fn gate_columns(&self) -> Vec<GateColumn> {
        if !self.gated() {
            return Vec::new();
        }
        let first = if self.threshold > 0 {
            GateColumn {
                partial: self.row_count,
                negate: false,
                bound: executor::Bound {
                    at_least: self.threshold as i64,
                    result_party: false,
                },
                text: format!(
                    "at least {} rows at the parties other than the querying one (minimum group size)",
                    self.threshold
                ),
                having: false,
            }
        } else {
            GateColumn {
                partial: self.row_count,
                negate: false,
                bound: executor::Bound {
                    at_least: i64::from(self.grouped),
                    result_party: true,
                },
                text: "the group has rows".into(),
                having: false,
            }
        };
        let mut v = vec![first];
        v.extend(self.having.iter().map(|h| GateColumn {
            partial: h.partial,
            negate: h.negate,
            bound: executor::Bound {
                at_least: h.at_least,
                result_party: true,
            },
            text: format!(
                "HAVING {}: the total{} at least {}",
                h.text,
                if h.negate { ", negated," } else { "" },
                h.at_least
            ),
            having: true,
        }));
        v
    }

    /// The party that receives the result (empty before [`Self::led_by`]).
    pub fn leader(&self) -> String {
        self.program
            .with(|r| r.result)
            .first()
            .cloned()
            .unwrap_or_default()
    }

    /// Indices of the partials that are secret-shared and revealed. With
    /// differential privacy, only those the aggregates need (every revealed
    /// total costs a share of ε): the row count only for COUNT(*), and a
    /// SUM's count not at all.
    pub fn shared_partials(&self) -> Vec<usize> {
        if self.privacy.is_some() {
            return self.shared_partials_under_dp();
        }
        // The cross and low limbs are shared inside the high one; the
        // extremes come first, as the program's stages take them.
        let mut idx: Vec<usize> = (0..self.local.partials.len())
            .filter(|&i| {
                !matches!(
                    self.local.partials[i].kind,
                    PartialKind::SquareLimb(Limb::Cross | Limb::Low)
                )
            })
            .collect();
        idx.sort_by_key(|&i| !self.local.partials[i].kind.is_extreme());
        if self.gated() {
            // The gate decides which groups exist: a partial is revealed
            // only where an aggregate that is revealed needs it (not the
            // row count for its own sake, not an aggregate that only
            // conjuncts decided in the gate use).
            let mut needed = BTreeSet::new();
            for (k, a) in self.aggregates.iter().enumerate() {
                if self.revealed_aggregate(k) {
                    needed.extend(a.count);
                    needed.extend(a.sum);
                    needed.extend(a.extreme);
                    needed.extend(a.sum_squares.iter().flat_map(|q| q.partials()));
                }
            }
            idx.retain(|i| needed.contains(i));
        }
        idx
    }

    /// The ring partial `i` is shared in: counts in Z_2^64, sums in
    /// Z_2^128, the high limb of squares (a party's whole Σx², up to
    /// 2^188) in Z_2^256.
    pub fn ring_bits(&self, i: usize) -> u16 {
        match self.local.partials[i].kind {
            PartialKind::RowCount | PartialKind::Count | PartialKind::Extreme { .. } => 64,
            PartialKind::SquareLimb(Limb::High) => 256,
            _ => 128,
        }
    }

    /// What this party shares for shared partial `i`, per group, from its
    /// dense partials: the partial itself, or for the high limb of squares
    /// its whole Σx² combined from the three limbs.
    pub fn shared_values(&self, i: usize, dense: &[Vec<i128>]) -> Vec<i256> {
        if let PartialKind::Extreme { max } = self.local.partials[i].kind {
            return executor::replicated::min_input(&dense[i], max);
        }
        let limbs = self.aggregates.iter().find_map(|a| match a.sum_squares {
            Some(Squares::Limbs { high, cross, low }) if high == i => Some((cross, low)),
            _ => None,
        });
        match limbs {
            Some((cross, low)) => (0..dense[i].len())
                .map(|g| combine_limbs(dense[i][g], dense[cross][g], dense[low][g]))
                .collect(),
            None => dense[i].iter().map(|&v| i256::from_i128(v)).collect(),
        }
    }

    /// Under DP every factor of a square is clamped, so squares are summed
    /// whole (one noised total rather than three, each with its share of
    /// ε); the clamp must then keep them below 10^WHOLE_SQUARE_DIGITS units
    /// (checked with the clamps). The limbs no aggregate needs any more are
    /// dropped.
    fn squares_whole(&mut self) {
        for a in &mut self.aggregates {
            if let Some(Squares::Limbs { high, .. }) = a.sum_squares {
                self.local.partials[high].kind = PartialKind::SumSquares;
                a.sum_squares = Some(Squares::Whole(high));
            }
        }
        let mut used = BTreeSet::from([self.row_count]);
        for a in &self.aggregates {
            used.extend(a.count);
            used.extend(a.sum);
            used.extend(a.sum_squares.iter().flat_map(|q| q.partials()));
        }
        for &i in used.clone().iter() {
            used.extend(self.local.partials[i].count_of_arg);
        }
        let new_index: BTreeMap<usize, usize> = used
            .iter()
            .enumerate()
            .map(|(new, &old)| (old, new))
            .collect();
        let map = |i: usize| new_index[&i];
        let partials = std::mem::take(&mut self.local.partials);
        self.local.partials = partials
            .into_iter()
            .enumerate()
            .filter(|(i, _)| used.contains(i))
            .map(|(_, mut p)| {
                p.count_of_arg = p.count_of_arg.map(map);
                p
            })
            .collect();
        self.row_count = map(self.row_count);
        for a in &mut self.aggregates {
            a.count = a.count.map(map);
            a.sum = a.sum.map(map);
            a.sum_squares = match a.sum_squares {
                Some(Squares::Whole(i)) => Some(Squares::Whole(map(i))),
                other => other,
            };
        }
    }

    /// The plan under the agreed differential-privacy parameters: aggregated
    /// columns clamped, each individual's rows bounded, the noise of every
    /// revealed total calibrated, and a new fingerprint.
    pub fn with_privacy(mut self, params: DpParams) -> Result<FederatedPlan, PlanError> {
        params
            .validate(self.parties.len())
            .map_err(|e| PlanError::Invalid(format!("differential privacy: {e}")))?;
        let table = self.table.clone();
        let refuse =
            |what: String, hint: String| PlanError::not_permitted(what, "the SELECT list", hint);
        if let Some(a) = self
            .aggregates
            .iter()
            .find(|a| matches!(a.kind, AggKind::Min | AggKind::Max))
        {
            // A minimum's sensitivity is the column's whole range: noise
            // of that size says nothing, and Council has no mechanism for
            // it (an exponential mechanism over a public range would be).
            return Err(refuse(
                format!("{}(...) under differential privacy", a.kind.policy_name().to_uppercase()),
                "MIN and MAX have no differentially private mechanism in Council; a party requires DP for \
                 this query, so ask for COUNT, SUM or AVG instead"
                    .into(),
            ));
        }
        let mut sensitivities = Vec::new();
        let k = params.max_rows as u128;
        self.squares_whole();
        for p in self.local.partials.iter_mut() {
            if !p.kind.is_sum() {
                continue;
            }
            let Some(Expr::Column(c)) = &p.arg else {
                return Err(refuse(
                    format!("aggregating the expression {} under differential privacy", p.arg.as_ref().map(|a| a.to_string()).unwrap_or_default()),
                    "aggregate a plain column: its clamp range is what bounds one individual's influence".into(),
                ));
            };
            let name = c.name.clone();
            let Some(clamp) = params.clamps.get(&name) else {
                return Err(refuse(
                    format!("SUM/AVG/VAR/STDDEV of {name} under differential privacy"),
                    format!("no party's policy gives a clamp range for {table}.{name}; add `clamp = [LO, HI]` to its column policy"),
                ));
            };
            let (lo, hi) = clamp.bounds().map_err(PlanError::Invalid)?;
            let units = |d: crate::privacy::Dec| {
                d.units(p.scale).ok_or_else(|| {
                    PlanError::Invalid(format!(
                        "the clamp bound {} of {name} has more decimal digits than the column's scale {}",
                        if d == lo { &clamp.lo } else { &clamp.hi },
                        p.scale
                    ))
                })
            };
            let c_max = units(lo)?.unsigned_abs().max(units(hi)?.unsigned_abs());
            let ty = self
                .input_schema
                .field_with_name(&name)
                .map(|f| f.data_type().clone())
                .ok();
            p.arg = Some(clamp_expr(
                p.arg
                    .take()
                    .unwrap_or_else(|| Expr::Column(Column::new_unqualified(&name))),
                lo,
                hi,
                &name,
                ty.clone(),
            )?);
            // Unconditionally: a clamp bound outside the column's type is
            // itself a value every clamped row can take.
            if p.kind == PartialKind::SumSquares && c_max >= 10u128.pow(WHOLE_SQUARE_DIGITS as u32)
            {
                return Err(refuse(
                    format!("VAR/STDDEV of {name} under differential privacy with its clamp range"),
                    format!(
                        "a square's factor must stay below 10^{WHOLE_SQUARE_DIGITS} units (|bound| < 1e{} at scale {}) so that no \
                         total can wrap; narrow `clamp` of {table}.{name}",
                        WHOLE_SQUARE_DIGITS as i64 - p.scale as i64,
                        p.scale
                    ),
                ));
            }
            let sens = match p.kind {
                PartialKind::Sum => k.checked_mul(c_max),
                PartialKind::SumSquares => c_max.checked_mul(c_max).and_then(|v| v.checked_mul(k)),
                _ => continue,
            };
            sensitivities.push((p.kind, name, sens));
        }
        self.privacy = Some(params.clone());
        let shared = self.shared_partials_under_dp();
        let mut totals = Vec::new();
        for i in shared {
            let p = &self.local.partials[i];
            let sens = match p.kind {
                PartialKind::RowCount | PartialKind::Count => Some(k),
                PartialKind::Sum | PartialKind::SumSquares | PartialKind::SquareLimb(_) => {
                    let name = match &p.arg {
                        Some(e) => e.column_refs().iter().next().map(|c| c.name.clone()),
                        None => None,
                    };
                    sensitivities
                        .iter()
                        .find(|(kind, n, _)| *kind == p.kind && Some(n) == name.as_ref())
                        .and_then(|(_, _, s)| *s)
                }
                // Refused above: no mechanism for a minimum.
                PartialKind::Extreme { .. } => None,
            };
            let sens = sens.ok_or_else(|| {
                PlanError::Invalid(
                    "the sensitivity of a total overflows; narrow the clamp ranges".into(),
                )
            })?;
            let scale = if p.kind == PartialKind::SumSquares {
                2 * p.scale
            } else {
                p.scale
            };
            totals.push((i, sens, scale));
        }
        if let Some(id) = &params.individual_id {
            if self.input_schema.field_with_name(id).is_err() {
                return Err(PlanError::Invalid(format!(
                    "the individual id column {id} is not a column of {table}"
                )));
            }
            self.local.bound = Some((id.clone(), params.max_rows));
        }
        self.noise = crate::privacy::calibrate(&params, &totals).map_err(PlanError::Invalid)?;
        // The noise is part of each party's input, which must stay within
        // its share of the ring (±(2^63−1)/N for counts, ±(2^127−1)/N for
        // sums and sums of squares): refuse at plan time a noise that could come near it,
        // rather than abort at run time on a large draw.
        let n = self.parties.len().max(1) as u128;
        // A noised total must also fit the answer's type: SUM of an integer
        // column is a BIGINT, and a total pushed past it by noise would
        // fail after the budget is spent.
        for a in &self.aggregates {
            let (Some(i), DataType::Int64) = (a.sum, a.field.data_type()) else {
                continue;
            };
            if let Some(pn) = self.noise_of(i) {
                if pn.noise.draw_bound().saturating_mul(n) > (i64::MAX as u128) / 2 {
                    return Err(PlanError::Invalid(format!(
                        "the noise for {} ({}) could take the answer beyond BIGINT; narrow the clamp range \
                         or raise epsilon_per_query",
                        a.field.name(),
                        pn.noise.describe()
                    )));
                }
            }
        }
        for pn in &self.noise {
            let wide = self.local.partials[pn.partial].kind.is_wide();
            let ring = if wide {
                (i128::MAX as u128) / n
            } else {
                (i64::MAX as u128) / n
            };
            if pn.noise.draw_bound() > ring / 4 {
                return Err(PlanError::Invalid(format!(
                    "the noise for {} ({}) is too large for the {}-bit ring shared by {} parties; \
                     raise epsilon_per_query, narrow the clamp ranges or lower the column's declared scale",
                    self.local.partials[pn.partial].describe(),
                    pn.noise.describe(),
                    if wide { 128 } else { 64 },
                    n
                )));
            }
        }
        self.privacy = Some(params);
        let leader = self.leader();
        self.restage(&leader)?;
        self.fingerprint = fingerprint(&self);
        Ok(self)
    }

    fn shared_partials_under_dp(&self) -> Vec<usize> {
        let mut used = BTreeSet::new();
        if self.privacy.as_ref().is_some_and(|p| p.min_group_size > 0) {
            // The threshold is applied to the noised row count.
            used.insert(self.row_count);
        }
        for a in &self.aggregates {
            if a.kind != AggKind::Sum {
                used.extend(a.count);
            }
            used.extend(a.sum);
            used.extend(a.sum_squares.map(|q| q.shared()));
        }
        used.into_iter().collect()
    }

    /// EXPLAIN's differential-privacy section, if the plan has DP.
    pub fn explain_privacy(&self) -> Option<String> {
        let params = self.privacy.as_ref()?;
        let names: Vec<String> = self
            .noise
            .iter()
            .map(|n| self.local.partials[n.partial].describe())
            .collect();
        Some(crate::privacy::explain(
            params,
            &self.noise,
            &names,
            self.parties.len(),
        ))
    }

    /// The noise of partial `i`, if it is noised.
    pub fn noise_of(&self, i: usize) -> Option<&PartialNoise> {
        self.noise.iter().find(|n| n.partial == i)
    }

    /// The disclosure manifest and plan, for EXPLAIN.
    pub fn explain(&self, leader: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Federated plan {}",
            self.fingerprint.chars().take(16).collect::<String>()
        );
        let _ = writeln!(s, "  parties: {}", self.parties.join(", "));
        let _ = writeln!(
            s,
            "  engine: {}",
            self.options.engine.describe(self.data_parties().len())
        );
        if self.program.needs_honest_majority() {
            let _ = writeln!(
                s,
                "  engine for comparisons: replicated secret sharing over Z_2^64 among three compute parties; \
                 secure while at most one of them is corrupted and none deviates (honest majority, semi-honest)"
            );
        }
        let _ = writeln!(s, "  secure part: {}", self.program.describe());
        let _ = writeln!(
            s,
            "1. Local part (each party, on its own rows only; raw rows never leave the party):"
        );
        let _ = writeln!(s, "     {}", self.local.to_sql());
        if self.grouped {
            let dims: Vec<String> = self
                .groups
                .columns
                .iter()
                .map(|c| format!("{} ({} declared values + NULL)", c.name, c.values.len() - 1))
                .collect();
            let _ = writeln!(
                s,
                "   then spread over the public group domain: {} = {} groups (zero where a party has none)",
                dims.join(" x "),
                self.groups.len()
            );
            let _ = writeln!(
                s,
                "   rows whose group key is outside the declared domain are left out (never an abort), as by WHERE key IN (domain)"
            );
        }
        let _ = writeln!(
            s,
            "   column uses, as each party's policy checks them (a column inside an aggregate's expression is a filter use):"
        );
        for line in self.uses.describe() {
            let _ = writeln!(s, "     {line}");
        }
        let shared = self.shared_partials();
        let mut at = 0;
        for (k, stage) in self.program.stages.iter().enumerate() {
            let gate = stage.gate().is_some();
            let cols = if gate {
                &[][..]
            } else {
                let c = &shared[at.min(shared.len())..(at + stage.columns).min(shared.len())];
                at += stage.columns;
                c
            };
            let compute = stage.compute.join(", ");
            if gate {
                let _ = writeln!(
                    s,
                    "2.{}. Gate in shares (replicated engine; compute parties {compute}; security: {}): each party \
                     with data shares one value per group and condition; the three compare each group's totals \
                     with the bounds and reveal, to every party, only whether the group meets all of them. For a \
                     group that does not, every party then contributes nothing (zero to a sum, no value to a \
                     minimum): it is left out of the answer and nothing computed from its rows is revealed, not \
                     its count, not how far it missed. Conditions:",
                    k + 1,
                    stage.model()
                );
                for c in self.gate_columns() {
                    let _ = writeln!(s, "     {}", c.text);
                }
            } else if stage.compares() {
                let _ = writeln!(
                    s,
                    "2.{}. Secure step (replicated engine; compute parties {compute}; security: {}): each party \
                     with data splits its values into 2-out-of-3 replicated shares over Z_2^64 for the three compute \
                     parties, and the three compare them \
                     in a tournament (a parallel-prefix comparison, one round per circuit layer for every group \
                     at once); which party held an extreme is never revealed:",
                    k + 1,
                    stage.model()
                );
            } else {
                let _ = writeln!(
                    s,
                    "2.{}. Secure step (additive engine; compute parties {compute}; security: {}): each party \
                     splits its partials into additive shares, one per party:",
                    k + 1,
                    stage.model()
                );
            }
            for &i in cols {
                let _ = writeln!(s, "     {}", self.local.partials[i].describe());
            }
            if !stage.compares() {
                let _ = writeln!(
                    s,
                    "   Over mutual TLS, a party sends each other party a 256-bit seed that both expand (ChaCha20) into that \
                     party's share; each party adds the shares it holds and sends the sum to the querying gateway as an \
                     Arrow batch of UInt64."
                );
            }
        }
        let _ = writeln!(s, "3. Reveal: the per-group results of the partials above, to {leader} (the querying gateway) only.");
        if self.privacy.is_some() {
            let _ = writeln!(
                s,
                "   {leader} learns only the noised totals listed, for every group of the domain; \
                 no party learns another party's partials or the noise."
            );
        } else if self.gated() {
            let _ = writeln!(
                s,
                "   every party learns which groups pass the gate; {leader} learns, for those groups only, the \
                 totals listed{}; no party learns another party's partials.",
                if shared.contains(&self.row_count) {
                    " (the row count among them)"
                } else {
                    " (not their row counts)"
                }
            );
        } else {
            let _ = writeln!(
                s,
                "   {leader} learns each group's total row count (even if not selected) and the totals listed; \
                 no party learns another party's partials."
            );
        }
        if let Some(dp) = self.explain_privacy() {
            s.push_str(&dp);
        }
        let _ = writeln!(s, "4. Post part at {leader}, on revealed values only:");
        for line in post_lines(&self.logical) {
            let _ = writeln!(s, "     {line}");
        }
        if !self.having_left.is_empty() && self.privacy.is_none() {
            let _ = writeln!(
                s,
                "   HAVING {} is evaluated here, on the revealed values: {leader} learns the totals of the groups it \
                 removes (only a COUNT or SUM compared with a constant is decided in shares, and only with three \
                 compute parties).",
                self.having_left.join(" AND ")
            );
        } else if !self.having.is_empty() && !self.gated() && self.privacy.is_none() {
            let _ = writeln!(
                s,
                "   HAVING is evaluated here, on the revealed values: {leader} learns the totals of the groups it \
                 removes (this federation has no third compute party for a gate in shares; add a data-less helper)."
            );
        }
        let _ = writeln!(
            s,
            "Output leakage: the revealed aggregates themselves say something about the rows behind them \
             (small groups, differences between queries); the policies bound what may be asked."
        );
        s
    }
}

fn post_lines(plan: &LogicalPlan) -> Vec<String> {
    let mut out = Vec::new();
    for line in plan.display_indent().to_string().lines() {
        if line.trim_start().starts_with("Aggregate:") {
            out.push(format!(
                "{}<revealed aggregates>",
                &line[..line.len() - line.trim_start().len()]
            ));
            break;
        }
        out.push(line.to_string());
    }
    out
}

/// Plans `sql` over `catalog` for the federation `parties` (sorted ids).
///
/// Planning runs on a thread of its own with a large stack
/// ([`crate::limits`]): the SQL may come from any analyst or peer, and no
/// shape of it may overflow a gateway's stack.
pub async fn plan_query(
    sql: &str,
    catalog: &Catalog,
    parties: &[String],
    options: &QueryOptions,
) -> Result<FederatedPlan, PlanError> {
    crate::limits::check_text(sql)?;
    let (sql, catalog, parties, options) = (
        sql.to_string(),
        catalog.clone(),
        parties.to_vec(),
        options.clone(),
    );
    crate::limits::on_planning_thread(move || {
        futures::executor::block_on(plan_query_here(&sql, &catalog, &parties, &options))
    })
    .await
}

async fn plan_query_here(
    sql: &str,
    catalog: &Catalog,
    parties: &[String],
    options: &QueryOptions,
) -> Result<FederatedPlan, PlanError> {
    let stmt = crate::ast_check::parse_and_check(sql)?;
    let ast = stmt.clone();
    let at_column = |c: &str| {
        crate::ast_check::column_position(&ast, c).unwrap_or_else(|| "the GROUP BY clause".into())
    };
    let at_function = |f: &str| {
        crate::ast_check::function_position(&ast, f).unwrap_or_else(|| "the SELECT list".into())
    };
    let ctx = SessionContext::new();
    for t in catalog.tables().values() {
        ctx.register_table(t.name.as_str(), Arc::new(EmptyTable::new(t.schema())))
            .map_err(|e| PlanError::Internal(e.to_string()))?;
    }
    let logical = ctx
        .state()
        .statement_to_plan(datafusion::sql::parser::Statement::Statement(Box::new(
            stmt,
        )))
        .await
        .map_err(|e| PlanError::Invalid(clean_df_error(&e.to_string())))?;

    let agg = find_aggregate(&logical)?;
    let (filter, table_name) = local_input(&agg.input)?;
    let table = catalog.table(&table_name).ok_or_else(|| {
        PlanError::Invalid(format!(
            "`{table_name}` is not a federated table in the catalog"
        ))
    })?;

    let mut uses = ColumnUses::default();
    if let Some(f) = &filter {
        for c in f.column_refs() {
            uses.filter_use(&c.name, "in WHERE");
        }
    }
    for pred in having_predicates(&logical) {
        for c in pred.column_refs() {
            if agg
                .group_expr
                .iter()
                .any(|g| matches!(g, Expr::Column(gc) if gc.name == c.name))
            {
                uses.filter_use(&c.name, "in HAVING");
            }
        }
    }
    // Type-coerced, the plan shows the casts DataFusion adds: the local part
    // must not contain anything that can fail on some row.
    let analyzed = {
        let state = ctx.state();
        state
            .analyzer()
            .execute_and_check(logical.clone(), state.config_options(), |_, _| {})
            .map_err(|e| PlanError::Invalid(clean_df_error(&e.to_string())))?
    };
    {
        let a_agg = find_aggregate(&analyzed)?;
        let (a_filter, _) = local_input(&a_agg.input)?;
        let schema = a_agg.input.schema();
        // Checked as DataFusion will run them: simplified, which moves a
        // cast from a column to the literal it is compared with where the
        // literal converts exactly (`ts >= TIMESTAMP '…'` with `ts` in
        // microseconds), and folds constants.
        let simplifier = datafusion::optimizer::simplify_expressions::ExprSimplifier::new(
            datafusion::optimizer::simplify_expressions::SimplifyContext::builder()
                .with_schema(schema.clone())
                .build(),
        );
        let simplified = |e: &Expr| simplifier.simplify(e.clone()).unwrap_or_else(|_| e.clone());
        if let Some(f) = &a_filter {
            crate::total::check(&simplified(f), schema, "WHERE")?;
        }
        for e in &a_agg.aggr_expr {
            let inner = match e {
                Expr::Alias(a) => a.expr.as_ref(),
                other => other,
            };
            if let Expr::AggregateFunction(af) = inner {
                let place = format!("the argument of {}", af.func.name().to_uppercase());
                for arg in &af.params.args {
                    crate::total::check(&simplified(arg), schema, &place)?;
                }
            }
        }
    }

    // Group columns: plain columns with a public domain.
    let mut groups = GroupSpace::default();
    let mut group_columns = Vec::new();
    for g in &agg.group_expr {
        let Expr::Column(c) = g else {
            return Err(PlanError::not_supported(
                format!("GROUP BY expression `{g}`"),
                "the GROUP BY clause",
                "group by a column whose domain the catalog declares",
            ));
        };
        let col = table
            .column(&c.name)
            .ok_or_else(|| PlanError::Internal(format!("group column {} not in table", c.name)))?;
        let Some(domain) = &col.domain else {
            return Err(PlanError::not_permitted(
                format!("GROUP BY {}", c.name),
                at_column(&c.name),
                format!(
                    "column `{}` has no public domain in the catalog, so grouping by it would reveal which values exist; \
                     declare its values (domain = [...]) in the catalog",
                    c.name
                ),
            ));
        };
        uses.group_use(&c.name);
        let mut values: Vec<Option<DomainValue>> =
            domain.values.iter().cloned().map(Some).collect();
        values.push(None);
        groups.columns.push(GroupColumn {
            name: c.name.clone(),
            data_type: col.ty.arrow_type(),
            values,
        });
        group_columns.push(c.name.clone());
    }
    let group_count = groups
        .columns
        .iter()
        .try_fold(1usize, |acc, c| acc.checked_mul(c.values.len()));
    match group_count {
        Some(n) if n <= MAX_GROUPS => {}
        _ => {
            return Err(PlanError::not_permitted(
                "this GROUP BY",
                "the GROUP BY clause",
                format!("the group domains multiply to more than {MAX_GROUPS} groups; group by fewer columns"),
            ))
        }
    }

    // Aggregates → partials.
    let mut partials: Vec<Partial> = vec![Partial {
        kind: PartialKind::RowCount,
        arg: None,
        scale: 0,
        count_of_arg: None,
        digits: None,
    }];
    let input_schema = agg.input.schema();
    let mut aggregates = Vec::new();
    for (i, e) in agg.aggr_expr.iter().enumerate() {
        let field = agg.schema.field(agg.group_expr.len() + i).clone();
        let inner = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            other => other,
        };
        let Expr::AggregateFunction(af) = inner else {
            return Err(PlanError::Internal(format!(
                "unexpected aggregate expression {e}"
            )));
        };
        let name = af.func.name().to_ascii_lowercase();
        if af.params.distinct {
            return Err(PlanError::not_supported(
                format!("{}(DISTINCT ...)", name.to_uppercase()),
                at_function(&name),
                "distinct counts need secure set union, which is not built yet",
            ));
        }
        if af.params.filter.is_some() || !af.params.order_by.is_empty() {
            return Err(PlanError::not_supported(
                format!("FILTER or ORDER BY inside {}", name.to_uppercase()),
                at_function(&name),
                "move the condition to WHERE",
            ));
        }
        let arg = af.params.args.first().cloned();
        let is_star = matches!(&arg, Some(Expr::Literal(v, _)) if !v.is_null()) && name == "count";
        let kind = match name.as_str() {
            "count" if is_star => AggKind::CountStar,
            "count" => AggKind::Count,
            "sum" => AggKind::Sum,
            "avg" | "mean" => AggKind::Avg,
            "var" | "var_samp" | "var_sample" => AggKind::VarSamp,
            "var_pop" | "var_population" => AggKind::VarPop,
            "stddev" | "stddev_samp" => AggKind::StddevSamp,
            "stddev_pop" => AggKind::StddevPop,
            "min" => AggKind::Min,
            "max" => AggKind::Max,
            other => {
                return Err(PlanError::not_supported(
                    format!("aggregate {}", other.to_uppercase()),
                    "the SELECT list",
                    "Council computes COUNT, SUM, AVG, VAR_SAMP, VAR_POP, STDDEV_SAMP, STDDEV_POP, MIN and MAX so far",
                ))
            }
        };
        if kind == AggKind::CountStar {
            uses.count_star = true;
            aggregates.push(AggregateOutput {
                kind,
                field,
                count: Some(0),
                sum: None,
                sum_squares: None,
                extreme: None,
                scale: 0,
            });
            continue;
        }
        let Some(arg) = arg else {
            return Err(PlanError::Invalid(format!(
                "{} needs an argument",
                name.to_uppercase()
            )));
        };
        if af.params.args.len() != 1 {
            return Err(PlanError::Invalid(format!(
                "{} takes one argument",
                name.to_uppercase()
            )));
        }
        let refs: Vec<String> = arg.column_refs().iter().map(|c| c.name.clone()).collect();
        if refs.is_empty() && kind != AggKind::Count {
            return Err(PlanError::Invalid(format!(
                "{}({arg}) aggregates a constant; aggregate a column",
                name.to_uppercase()
            )));
        }
        match &arg {
            Expr::Column(c) => {
                uses.aggregate_use(
                    &c.name,
                    kind.policy_name(),
                    &format!("the argument of {}", name.to_uppercase()),
                );
            }
            expr => {
                let place = format!(
                    "inside the argument of {}({})",
                    name.to_uppercase(),
                    brief(expr)
                );
                for r in &refs {
                    uses.filter_use(r, &place);
                    uses.aggregate_use(r, kind.policy_name(), &place);
                }
            }
        }
        let arg_type = arg
            .get_type(input_schema)
            .map_err(|e| PlanError::Invalid(clean_df_error(&e.to_string())))?;
        let arg = unqualify(arg)?;
        let extreme = matches!(kind, AggKind::Min | AggKind::Max);
        if extreme
            && !(arg_type.is_integer() || matches!(arg_type, DataType::Decimal128(_, s) if s >= 0))
        {
            return Err(PlanError::not_supported(
                format!("{}({}) of type {arg_type}", name.to_uppercase(), brief(&arg)),
                at_function(&name),
                "MIN and MAX are computed exactly over integer and decimal values so far; \
                 cast the argument to a decimal (CAST(x AS DECIMAL(12, 2))) or ask for another aggregate",
            ));
        }
        let scale = if kind == AggKind::Count {
            0
        } else {
            encoding_scale(&arg_type, &refs, table, &name)?
        };
        let squares = matches!(
            kind,
            AggKind::VarSamp | AggKind::VarPop | AggKind::StddevSamp | AggKind::StddevPop
        );
        // Every partial of one aggregate keeps the same values (see
        // `Partial::digits`); a count needs the cast only where the type
        // can reach the bound.
        let digits = match kind {
            AggKind::Count => None,
            _ if squares || extreme => Some(SQUARE_DIGITS),
            _ => Some(SUM_DIGITS),
        };
        let mut intern = |kind: PartialKind, count_of_arg: Option<usize>| -> usize {
            // Where the type keeps every value below the bound no guard is
            // needed, and SUM and VAR of one column share their partials.
            let digits = digits.filter(|d| !always_encodes(&arg_type, *d));
            let p = Partial {
                kind,
                arg: Some(arg.clone()),
                scale,
                count_of_arg,
                digits,
            };
            if let Some(i) = partials.iter().position(|q| {
                q.kind == p.kind && q.arg == p.arg && q.scale == p.scale && q.digits == p.digits
            }) {
                i
            } else {
                partials.push(p);
                partials.len() - 1
            }
        };
        if extreme {
            // No count: the minimum itself says whether any value exists
            // (`executor::replicated::NO_VALUE`).
            let max = kind == AggKind::Max;
            aggregates.push(AggregateOutput {
                kind,
                field,
                count: None,
                sum: None,
                sum_squares: None,
                extreme: Some(intern(PartialKind::Extreme { max }, None)),
                scale,
            });
            continue;
        }
        let count_idx = intern(PartialKind::Count, None);
        let mut out = AggregateOutput {
            kind,
            field,
            count: Some(count_idx),
            sum: None,
            sum_squares: None,
            extreme: None,
            scale,
        };
        if kind != AggKind::Count {
            out.sum = Some(intern(PartialKind::Sum, Some(count_idx)));
        }
        if squares {
            // Whole squares where the type keeps every factor below
            // 10^WHOLE_SQUARE_DIGITS, limbs elsewhere: either way no
            // summand reaches 10^SUM_DIGITS, so no value can make a local
            // sum wrap or a party's input leave its share of the ring.
            let whole = integer_digits(&arg_type).is_some_and(|d| d <= WHOLE_SQUARE_DIGITS);
            out.sum_squares = Some(if whole {
                Squares::Whole(intern(PartialKind::SumSquares, Some(count_idx)))
            } else {
                let mut limb = |l| intern(PartialKind::SquareLimb(l), Some(count_idx));
                Squares::Limbs {
                    high: limb(Limb::High),
                    cross: limb(Limb::Cross),
                    low: limb(Limb::Low),
                }
            });
        }
        aggregates.push(out);
    }

    // A result share carries up to two 8-byte words per group and partial
    // (a Z_2^256 sum of squares four, for its three limb partials); peers
    // refuse shares beyond a fixed size, so a plan whose shares would not
    // fit is refused here, before anything runs.
    let share_bytes = (groups.len().max(1) as u128) * (partials.len() as u128) * 16;
    if share_bytes > MAX_SHARE_BYTES as u128 {
        return Err(PlanError::not_permitted(
            "this combination of GROUP BY and aggregates",
            "the query",
            format!(
                "its result shares would take {share_bytes} bytes, above the {MAX_SHARE_BYTES} a gateway accepts; \
                 group by fewer columns or ask for fewer aggregates per query"
            ),
        ));
    }
    let filter = filter.map(unqualify).transpose()?;
    let local = LocalPart {
        table: table.name.clone(),
        filter,
        group_columns,
        partials,
        bound: None,
    };
    let grouped = !agg.group_expr.is_empty();
    let catalog_digest = catalog.digest().to_string();
    let mut plan = FederatedPlan {
        sql: sql.to_string(),
        parties: parties.to_vec(),
        options: options.clone(),
        table: table.name.clone(),
        local,
        groups,
        grouped,
        aggregates,
        row_count: 0,
        uses,
        logical: logical.clone(),
        input_schema: table.schema(),
        catalog_digest,
        fingerprint: String::new(),
        privacy: None,
        noise: Vec::new(),
        program: executor::Program::sum_and_reveal(parties, ""),
        helpers: Vec::new(),
        threshold: 0,
        having: Vec::new(),
        having_left: Vec::new(),
        having_decided: Vec::new(),
        having_only: Vec::new(),
    };
    let (having, left) = crate::having::shared_conditions(&plan, &analyzed);
    plan.having_decided = crate::having::decided_conjuncts(&plan, &having, &plan.logical);
    let used = crate::having::referenced_above(&plan.logical, &plan.having_decided);
    plan.having_only = plan
        .aggregates
        .iter()
        .map(|a| !plan.having_decided.is_empty() && !used.iter().any(|n| n == a.field.name()))
        .collect();
    plan.having = having;
    plan.having_left = left;
    plan.restage("")?;
    plan.fingerprint = fingerprint(&plan);
    Ok(plan)
}

/// `CASE WHEN x < lo THEN lo WHEN x > hi THEN hi ELSE x END`, with the
/// bounds as literals of the column's own type (NULL stays NULL).
fn clamp_expr(
    x: Expr,
    lo: Dec,
    hi: Dec,
    name: &str,
    ty: Option<DataType>,
) -> Result<Expr, PlanError> {
    use datafusion::common::ScalarValue;
    let lit = |d: Dec| -> Result<Expr, PlanError> {
        let v = match &ty {
            Some(DataType::Int64) => ScalarValue::Int64(Some(
                d.units(0)
                    .and_then(|v| i64::try_from(v).ok())
                    .ok_or_else(|| {
                        PlanError::Invalid(format!(
                            "the clamp bounds of the integer column {name} must be integers"
                        ))
                    })?,
            )),
            Some(DataType::Decimal128(p, s)) => ScalarValue::Decimal128(
                Some(d.units(*s as u32).ok_or_else(|| {
                    PlanError::Invalid(format!(
                        "a clamp bound of {name} has more decimal digits than its scale {s}"
                    ))
                })?),
                *p,
                *s,
            ),
            Some(DataType::Float64) => {
                ScalarValue::Float64(Some(d.mantissa as f64 / 10f64.powi(d.scale as i32)))
            }
            other => {
                return Err(PlanError::Invalid(format!(
                    "column {name} of type {other:?} cannot be clamped; aggregate a numeric column"
                )))
            }
        };
        Ok(Expr::Literal(v, None))
    };
    let (lo, hi) = (lit(lo)?, lit(hi)?);
    datafusion::logical_expr::when(x.clone().lt(lo.clone()), lo)
        .when(x.clone().gt(hi.clone()), hi)
        .otherwise(x)
        .map_err(|e| PlanError::Internal(e.to_string()))
}

/// Decimal digits of the largest magnitude a value of `ty` can have at its
/// encoding scale (integers at scale 0, decimals at their own), where the
/// type bounds it; `None` for floats.
fn integer_digits(ty: &DataType) -> Option<u8> {
    match ty {
        DataType::Int8 | DataType::UInt8 => Some(3),
        DataType::Int16 | DataType::UInt16 => Some(5),
        DataType::Int32 | DataType::UInt32 => Some(10),
        DataType::Int64 => Some(19),
        DataType::UInt64 => Some(20),
        DataType::Decimal128(p, _) => Some(*p),
        _ => None,
    }
}

/// Whether every value of `ty` has an encoding below 10^digits units (at
/// the type's own scale, which is the encoding scale for decimals).
pub fn always_encodes(ty: &DataType, digits: u8) -> bool {
    integer_digits(ty).is_some_and(|d| d <= digits)
}

fn encoding_scale(
    ty: &DataType,
    refs: &[String],
    table: &TableDef,
    func: &str,
) -> Result<u32, PlanError> {
    match ty {
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => Ok(0),
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => Ok(0),
        DataType::Decimal128(_, s) if *s >= 0 && *s <= 18 => Ok(*s as u32),
        DataType::Float16 | DataType::Float32 | DataType::Float64 => Ok(refs
            .iter()
            .filter_map(|r| match table.column(r).map(|c| &c.ty) {
                Some(ColumnType::Float { scale }) => Some(*scale),
                _ => None,
            })
            .max()
            .unwrap_or(DEFAULT_FLOAT_SCALE)),
        other => Err(PlanError::Invalid(format!(
            "{}() over a value of type {other} is not supported; aggregate a numeric column",
            func.to_uppercase()
        ))),
    }
}

fn unqualify(e: Expr) -> Result<Expr, PlanError> {
    e.transform_up(|e| match e {
        Expr::Column(c) if c.relation.is_some() => Ok(Transformed::yes(Expr::Column(
            Column::new_unqualified(c.name),
        ))),
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
    .map_err(|err| PlanError::Internal(err.to_string()))
}

fn find_aggregate(plan: &LogicalPlan) -> Result<&Aggregate, PlanError> {
    match plan {
        LogicalPlan::Projection(p) => find_aggregate(&p.input),
        LogicalPlan::Sort(s) => find_aggregate(&s.input),
        LogicalPlan::Limit(l) => find_aggregate(&l.input),
        LogicalPlan::Filter(f) => find_aggregate(&f.input),
        LogicalPlan::Aggregate(a) => Ok(a),
        LogicalPlan::TableScan(_) | LogicalPlan::SubqueryAlias(_) => Err(PlanError::not_permitted(
            "a query without aggregates",
            "the SELECT list",
            "it would return a party's raw rows; every output must be an aggregate (COUNT, SUM, AVG, ...) \
             or a GROUP BY column",
        )),
        LogicalPlan::Distinct(_) => Err(PlanError::not_permitted(
            "DISTINCT",
            "the SELECT clause",
            "it would reveal which raw values exist",
        )),
        LogicalPlan::Window(_) => Err(PlanError::not_supported("window functions", "the SELECT list", "")),
        LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => Err(PlanError::Invalid(
            "the query reads no federated table; name one in FROM".into(),
        )),
        other => Err(PlanError::not_supported(
            format!("plan node {}", other.display()),
            "the query",
            "Council answers one aggregate SELECT over a federated table",
        )),
    }
}

/// The HAVING conditions: filters above the aggregate.
fn having_predicates(plan: &LogicalPlan) -> Vec<&Expr> {
    crate::having::having_filters(plan)
        .into_iter()
        .map(|(e, _)| e)
        .collect()
}

fn local_input(plan: &LogicalPlan) -> Result<(Option<Expr>, String), PlanError> {
    match plan {
        LogicalPlan::Filter(f) => {
            let (inner, t) = local_input(&f.input)?;
            let pred = match inner {
                Some(i) => i.and(f.predicate.clone()),
                None => f.predicate.clone(),
            };
            Ok((Some(pred), t))
        }
        LogicalPlan::SubqueryAlias(a) => local_input(&a.input),
        LogicalPlan::TableScan(t) => Ok((None, t.table_name.table().to_string())),
        other => Err(PlanError::not_supported(
            format!("plan node {} below the aggregate", other.display()),
            "the FROM and WHERE clauses",
            "query one federated table with a WHERE clause",
        )),
    }
}

fn fingerprint(plan: &FederatedPlan) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "council-plan v1");
    let _ = writeln!(s, "parties {}", plan.parties.join(","));
    let _ = writeln!(s, "catalog {}", plan.catalog_digest);
    let _ = writeln!(s, "options {:?}", plan.options);
    let _ = writeln!(s, "program {}", plan.program.describe());
    let _ = writeln!(s, "logical\n{}", plan.logical.display_indent_schema());
    let _ = writeln!(s, "local {}", plan.local.to_sql());
    for p in &plan.local.partials {
        let _ = writeln!(
            s,
            "partial {:?} {:?} {}",
            p.kind,
            p.arg.as_ref().map(|a| a.to_string()),
            p.scale
        );
    }
    for c in &plan.groups.columns {
        let _ = writeln!(s, "group {} {:?}", c.name, c.values);
    }
    // Which partials are revealed, and which conjuncts of HAVING the gate
    // decided for the post part.
    let _ = writeln!(
        s,
        "revealed {:?} decided {:?}",
        plan.shared_partials(),
        plan.having_decided
    );
    // Which partial each gate column carries, and how: gateways that map
    // them differently must not agree on the plan.
    for c in plan.gate_columns() {
        let _ = writeln!(
            s,
            "gate partial {} negate {} bound {} result party {} having {}",
            c.partial, c.negate, c.bound.at_least, c.bound.result_party, c.having
        );
    }
    for a in &plan.aggregates {
        let _ = writeln!(
            s,
            "aggregate {:?} {} {}",
            a.kind,
            a.field.name(),
            a.field.data_type()
        );
    }
    if let Some(p) = &plan.privacy {
        let _ = writeln!(
            s,
            "privacy {}",
            serde_json::to_string(p).unwrap_or_default()
        );
        for n in &plan.noise {
            let _ = writeln!(s, "noise {} {} {:?}", n.partial, n.sensitivity, n.noise);
        }
    }
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Strips DataFusion's error prefixes and backtrace noise for analysts.
pub fn clean_df_error(e: &str) -> String {
    let e = e.trim();
    let e = e.strip_prefix("Error during planning: ").unwrap_or(e);
    e.split("\nbacktrace").next().unwrap_or(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOG: &str = r#"
[tables.patients]
columns = [
  { name = "patient_id", type = "int" },
  { name = "age_band", type = "text", domain = ["0-17", "18-39", "40-64", "65+"] },
  { name = "sex", type = "text", domain = ["F", "M"] },
  { name = "diagnosis", type = "text" },
  { name = "cost", type = "decimal(12,2)" },
  { name = "los", type = "int" },
]
"#;

    fn parties() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    async fn plan(sql: &str) -> Result<FederatedPlan, PlanError> {
        let cat = Catalog::from_toml(CATALOG, "catalog.toml").unwrap();
        plan_query(sql, &cat, &parties(), &QueryOptions::default()).await
    }

    #[tokio::test]
    async fn a_column_inside_an_aggregate_argument_is_a_filter_use() {
        // The attacks of the adversary issue: conditions hidden in CASE,
        // functions and arithmetic inside aggregates select rows as WHERE.
        for (sql, column) in [
            ("SELECT sex, COUNT(CASE WHEN patient_id < 2000100 THEN 1 END) FROM patients GROUP BY sex", "patient_id"),
            ("SELECT age_band, COUNT(CASE WHEN patient_id = 2000007 THEN 1 END) FROM patients GROUP BY age_band", "patient_id"),
            ("SELECT SUM(CASE WHEN cost > 4000 THEN los ELSE 0 END) FROM patients", "cost"),
            ("SELECT SUM(los + 0 * patient_id) FROM patients", "patient_id"),
            ("SELECT COUNT(NULLIF(diagnosis, 'E11')) FROM patients", "diagnosis"),
            ("SELECT SUM(los * CAST(diagnosis = 'E11' AS INT)) FROM patients", "diagnosis"),
            ("SELECT age_band, COUNT(*) FROM patients GROUP BY age_band HAVING age_band = '65+'", "age_band"),
        ] {
            let p = plan(sql).await.unwrap();
            assert!(p.uses.filter.contains(column), "{sql}: {:?}", p.uses);
            let place = p.uses.place_of(column, "filter").unwrap();
            assert!(place.starts_with("inside the argument of") || place == "in HAVING", "{place}");
        }
        // A plain column argument is an aggregate use only.
        let p = plan("SELECT COUNT(patient_id), SUM(cost) FROM patients")
            .await
            .unwrap();
        assert!(p.uses.filter.is_empty(), "{:?}", p.uses);
        assert_eq!(p.uses.aggregate["patient_id"], BTreeSet::from(["count"]));
        let lines = p.uses.describe();
        assert!(
            lines
                .iter()
                .any(|l| l == "cost: aggregate:sum (the argument of SUM)"),
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn min_and_max_are_a_comparison_stage_before_the_sums() {
        let p = plan("SELECT sex, MIN(cost), MAX(los), SUM(cost) FROM patients GROUP BY sex")
            .await
            .unwrap()
            .led_by("b")
            .unwrap();
        // The extremes come first among the shared partials, one stage of
        // the replicated engine over both; the sums and counts after.
        let shared = p.shared_partials();
        let kinds: Vec<PartialKind> = shared.iter().map(|&i| p.local.partials[i].kind).collect();
        assert_eq!(
            &kinds[..2],
            &[
                PartialKind::Extreme { max: false },
                PartialKind::Extreme { max: true }
            ]
        );
        assert!(kinds[2..].iter().all(|k| !k.is_extreme()));
        assert_eq!(p.program.stages.len(), 2);
        assert_eq!(
            p.program.stages[0].ops,
            vec![executor::Op::Min, executor::Op::Reveal]
        );
        assert_eq!(p.program.stages[0].columns, 2);
        assert_eq!(p.program.stages[1].columns, shared.len() - 2);
        assert!(p.program.needs_honest_majority());
        assert!(shared.iter().all(|&i| p.ring_bits(i) <= 128));
        let text = p.explain("b");
        for want in [
            "security: honest majority among the three compute parties (semi-honest)",
            "security: any coalition short of all parties (semi-honest)",
            "compute parties a, b, c",
            "MIN(cost) at scale 2, in Z_2^64",
            "MAX(los) at scale 0",
        ] {
            assert!(text.contains(want), "{want} not in\n{text}");
        }
        // A query of sums only keeps one additive stage; the stage is in
        // the fingerprint, so a changed engine choice changes it.
        let q = plan("SELECT sex, SUM(cost) FROM patients GROUP BY sex")
            .await
            .unwrap();
        assert_eq!(q.program.stages.len(), 1);
        assert!(!q.program.needs_honest_majority());
        let r = plan("SELECT sex, MIN(cost) FROM patients GROUP BY sex")
            .await
            .unwrap();
        assert_ne!(q.fingerprint, r.fingerprint);
        // Types without an exact integer encoding are refused with the fix.
        let cat = Catalog::from_toml(
            "[tables.v]\ncolumns = [{ name = \"f\", type = \"float\", scale = 2 }, { name = \"d\", type = \"date\" }]\n",
            "c",
        )
        .unwrap();
        for sql in ["SELECT MIN(f) FROM v", "SELECT MAX(d) FROM v"] {
            let e = plan_query(sql, &cat, &parties(), &QueryOptions::default())
                .await
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("integer and decimal values") && e.contains("CAST"),
                "{sql}: {e}"
            );
        }
        // Two parties: refused, naming the three compute parties and the
        // helper that completes them.
        let cat = Catalog::from_toml(CATALOG, "catalog.toml").unwrap();
        let two: Vec<String> = vec!["p0".into(), "p1".into()];
        let e = plan_query(
            "SELECT MAX(los) FROM patients",
            &cat,
            &two,
            &QueryOptions::default(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("three compute parties") && e.contains("helper"),
            "{e}"
        );
        // Two and a helper: the helper computes the comparison, and takes
        // no part in the sums; it may not lead.
        let three: Vec<String> = vec!["h".into(), "p0".into(), "p1".into()];
        let sql = "SELECT sex, MIN(los), COUNT(*) FROM patients GROUP BY sex";
        let p = plan_query(sql, &cat, &three, &QueryOptions::default())
            .await
            .unwrap()
            .among(&["h".into()])
            .unwrap();
        assert!(p
            .clone()
            .led_by("h")
            .unwrap_err()
            .to_string()
            .contains("helper party"));
        let p = p.led_by("p1").unwrap();
        assert_eq!(p.program.stages[0].compute, three);
        assert_eq!(
            p.program.stages[1].compute,
            vec!["p0".to_string(), "p1".into()]
        );
        assert!(!p.program.roles_of("h").input && p.program.roles_of("h").compute);
        // Five: the first three compute, the other two send them shares.
        let five: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
        let p = plan_query(sql, &cat, &five, &QueryOptions::default())
            .await
            .unwrap()
            .led_by("p4")
            .unwrap();
        assert_eq!(p.program.stages[0].compute, five[..3].to_vec());
        assert_eq!(p.program.stages[1].compute, five);
        // One data party and two helpers cannot compare across parties.
        let e = plan_query(sql, &cat, &three, &QueryOptions::default())
            .await
            .unwrap()
            .among(&["h".into(), "p0".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 data party and 2 helpers"), "{e}");
    }

    #[tokio::test]
    async fn expressions_that_can_fail_on_a_row_are_refused_at_plan_time() {
        for sql in [
            "SELECT COUNT(*) FROM patients WHERE 1 / (CASE WHEN age_band = '65+' AND los = 3 THEN 0 ELSE 1 END) = 1",
            "SELECT COUNT(*) FROM patients WHERE los % (los - 3) = 1",
            "SELECT COUNT(*) FROM patients WHERE CAST(diagnosis AS INT) = 1",
            "SELECT COUNT(*) FROM patients WHERE diagnosis ~ '(' ",
            "SELECT COUNT(*) FROM patients WHERE to_date(diagnosis) > DATE '2020-01-01'",
            "SELECT COUNT(*) FROM patients WHERE abs(los) > 1",
            "SELECT COUNT(*) FROM patients WHERE repeat(diagnosis, 1000000000) = ''",
            "SELECT SUM(los / 0) FROM patients",
            "SELECT SUM(los / -1) FROM patients",
            "SELECT COUNT(*) FROM patients WHERE substr(diagnosis, 1, los) = 'E'",
            // Review findings: checked decimal arithmetic, positions that
            // overflow inside, strings grown without bound, dates formatted.
            "SELECT COUNT(CASE WHEN diagnosis = 'E11' THEN CAST(los AS DECIMAL(20,0)) * CAST('99999999999999999999999999999999999999' AS DECIMAL(38,0)) END) FROM patients",
            "SELECT COUNT(*) FROM patients WHERE cost / CAST('0.5' AS DECIMAL(38,30)) > 1",
            "SELECT COUNT(CASE WHEN diagnosis = 'E11' THEN CAST(los AS DECIMAL(38,0)) * CAST('99999999999999999999999999999999999999' AS DECIMAL(38,0)) END) FROM patients",
            "SELECT COUNT(CASE WHEN diagnosis = 'E11' THEN CAST(los AS DECIMAL(20,0)) + CAST('0.5' AS DECIMAL(38,37)) END) FROM patients",
            "SELECT COUNT(*) FROM patients WHERE substr(diagnosis, -9223372036854775808) = 'x'",
            "SELECT COUNT(*) FROM patients WHERE length(concat(diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis, diagnosis)) > 0",
        ] {
            let e = plan(sql).await.expect_err(sql).to_string();
            assert!(
                e.contains("not permitted") || e.contains("not valid") || e.contains("cannot be read"),
                "{sql}: {e}"
            );
        }
        // What cannot fail is planned as before.
        for sql in [
            "SELECT COUNT(*) FROM patients WHERE TRY_CAST(diagnosis AS INT) = 1",
            "SELECT COUNT(*) FROM patients WHERE diagnosis LIKE 'E1%' AND lower(diagnosis) <> 'x'",
            "SELECT COUNT(*) FROM patients WHERE diagnosis ~ '^E1[0-9]$'",
            "SELECT SUM(cost / 100), SUM(los * 2 + 1) FROM patients WHERE los BETWEEN 1 AND 5 OR los IN (7, 8)",
            // Declared types alone may exceed 38 digits (TPC-H Q1's shape).
            "SELECT SUM(cost * (1 - cost) * (1 + cost)) FROM patients",
            "SELECT COUNT(*) FROM patients WHERE abs(CAST(los AS DOUBLE)) > 1 AND los = '3'",
        ] {
            plan(sql).await.expect(sql);
        }
    }

    #[tokio::test]
    async fn squares_in_limbs_are_exact_for_any_value_below_the_bound() {
        use datafusion::arrow::array::{Array, Decimal128Array, Int64Array, RecordBatch};
        let big = 10i64.pow(18);
        let los: Vec<Option<i64>> = vec![
            Some(big - 1),
            Some(-(big - 1)),
            Some(999_999_999),
            Some(-1_000_000_000),
            Some(123_456_789_012_345_678),
            Some(-7),
            Some(0),
            None,
            Some(big),
            Some(i64::MIN),
            Some(999_999_999_999_999),
            Some(-123_456_789_012_345),
        ];
        for (sql, units_per_los, limit) in [
            ("SELECT VAR_POP(los) FROM patients", 1i128, big as i128),
            (
                "SELECT VAR_POP(TRY_CAST(los AS DECIMAL(20,3))) FROM patients",
                1000,
                10i128.pow(15),
            ),
        ] {
            let p = plan(sql).await.unwrap();
            let schema = p.input_schema.clone();
            let columns = schema
                .fields()
                .iter()
                .map(|f| match f.name().as_str() {
                    "los" => Arc::new(Int64Array::from(los.clone())) as ArrayRef,
                    _ => datafusion::arrow::array::new_null_array(f.data_type(), los.len()),
                })
                .collect();
            let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
            let ctx = SessionContext::new();
            let table =
                datafusion::datasource::MemTable::try_new(schema, vec![vec![batch]]).unwrap();
            ctx.register_table("patients", Arc::new(table)).unwrap();
            let out = ctx
                .table("patients")
                .await
                .unwrap()
                .aggregate(vec![], p.local.aggregate_exprs())
                .unwrap()
                .collect()
                .await
                .unwrap();
            let raw = |i: usize| -> Option<i128> {
                let c = out[0].column(i);
                if c.is_null(0) {
                    None
                } else if let Some(a) = c.as_any().downcast_ref::<Int64Array>() {
                    Some(a.value(0) as i128)
                } else {
                    Some(
                        c.as_any()
                            .downcast_ref::<Decimal128Array>()
                            .unwrap()
                            .value(0),
                    )
                }
            };
            let agg = &p.aggregates[0];
            assert!(matches!(agg.sum_squares, Some(Squares::Limbs { .. })));
            let kept: Vec<i128> = los
                .iter()
                .flatten()
                .map(|&v| v as i128)
                .filter(|v| v.abs() < limit)
                .map(|v| v * units_per_los)
                .collect();
            let w = i256::from_i128;
            let exact = kept
                .iter()
                .fold(w(0), |acc, &x| acc.wrapping_add(w(x).wrapping_mul(w(x))));
            let Some(Squares::Limbs { high, cross, low }) = agg.sum_squares else {
                unreachable!()
            };
            let combined = combine_limbs(
                raw(high).unwrap_or(0),
                raw(cross).unwrap_or(0),
                raw(low).unwrap_or(0),
            );
            assert_eq!(combined, exact, "{sql}");
            // What the party shares: Σx², never a limb.
            assert_eq!(
                p.shared_partials()
                    .iter()
                    .filter(|&&i| i == cross || i == low)
                    .count(),
                0
            );
            assert_eq!(p.ring_bits(high), 256);
            assert_eq!(raw(agg.count.unwrap()), Some(kept.len() as i128));
            assert_eq!(raw(agg.sum.unwrap()), Some(kept.iter().sum::<i128>()));
        }
    }

    #[tokio::test]
    async fn splits_aggregates_into_linear_partials() {
        let p = plan("SELECT age_band, COUNT(*), AVG(cost), VAR_SAMP(los) FROM patients WHERE diagnosis = 'E11' GROUP BY age_band")
            .await
            .unwrap();
        let kinds: Vec<PartialKind> = p.local.partials.iter().map(|p| p.kind).collect();
        use PartialKind::*;
        // los is an int64, whose squares are summed in limbs.
        assert_eq!(
            kinds,
            vec![
                RowCount,
                Count,
                Sum,
                Count,
                Sum,
                SquareLimb(Limb::High),
                SquareLimb(Limb::Cross),
                SquareLimb(Limb::Low)
            ]
        );
        assert_eq!(p.groups.len(), 5);
        // "0-17", "18-39", "40-64", "65+" and NULL: 17 bytes of key text.
        assert_eq!(p.groups.key_text_bytes(), 17);
        assert_eq!(p.uses.filter, BTreeSet::from(["diagnosis".to_string()]));
        assert_eq!(p.uses.group_by, BTreeSet::from(["age_band".to_string()]));
        let sql = p.local.to_sql();
        assert!(
            sql.contains("WHERE (diagnosis = 'E11')") || sql.contains("WHERE diagnosis = 'E11'"),
            "{sql}"
        );
        assert!(sql.ends_with("GROUP BY age_band"), "{sql}");
    }

    #[tokio::test]
    async fn fingerprint_is_deterministic_and_sensitive() {
        let a = plan("SELECT sex, SUM(cost) FROM patients GROUP BY sex")
            .await
            .unwrap();
        let b = plan("select sex,  sum(cost) from patients group by sex")
            .await
            .unwrap();
        let c = plan("SELECT sex, SUM(cost) FROM patients WHERE los > 1 GROUP BY sex")
            .await
            .unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.fingerprint, c.fingerprint);
    }

    #[tokio::test]
    async fn the_leader_is_part_of_the_plan_and_its_fingerprint() {
        let p = plan("SELECT sex, SUM(cost) FROM patients GROUP BY sex")
            .await
            .unwrap();
        let leader = p.parties[0].clone();
        let other = p.parties[1].clone();
        let a = p.clone().led_by(&leader).unwrap();
        let b = p.clone().led_by(&other).unwrap();
        assert_ne!(a.fingerprint, p.fingerprint);
        assert_ne!(a.fingerprint, b.fingerprint);
        assert_eq!(a.program.with(|r| r.result), vec![leader.clone()]);
        assert_eq!(a.program.with(|r| r.input).len(), p.parties.len());
        let text = a.explain(&leader);
        assert!(
            text.contains(&format!(
                "secure part: sum → reveal over 3 column(s) by a, b, c; roles {leader}=input+compute+result"
            )),
            "{text}"
        );
        let e = p.led_by("mallory").unwrap_err().to_string();
        assert!(e.contains("mallory is not a party"), "{e}");
    }

    #[tokio::test]
    async fn refuses_raw_rows_and_undeclared_group_keys() {
        let e = plan("SELECT cost FROM patients")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("raw rows"), "{e}");
        let e = plan("SELECT diagnosis, COUNT(*) FROM patients GROUP BY diagnosis")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no public domain"), "{e}");
        assert!(e.contains("GROUP BY diagnosis at line 1, column 8"), "{e}");
        let e = plan("SELECT COUNT(DISTINCT los) FROM patients")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("COUNT(DISTINCT ...) at line 1, column 8"), "{e}");
        let e = plan("SELECT COUNT(*) FROM nosuch")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("nosuch"), "{e}");
    }

    fn dp(eps: u64) -> DpParams {
        DpParams {
            mechanism: crate::privacy::Mechanism::Laplace,
            epsilon_micro: eps,
            delta: 0.0,
            colluders: 2,
            clamps: BTreeMap::from([(
                "cost".to_string(),
                crate::privacy::Clamp {
                    lo: "0".into(),
                    hi: "500.25".into(),
                },
            )]),
            individual_id: Some("patient_id".into()),
            max_rows: 2,
            min_group_size: 0,
            required_by: vec!["b".into()],
        }
    }

    #[tokio::test]
    async fn a_dp_plan_clamps_bounds_and_reveals_only_what_its_aggregates_need() {
        let base = plan("SELECT sex, SUM(cost), AVG(cost) FROM patients GROUP BY sex")
            .await
            .unwrap();
        let p = base.clone().with_privacy(dp(1_000_000)).unwrap();
        assert_ne!(p.fingerprint, base.fingerprint);
        let sql = p.local.to_sql();
        assert!(
            sql.contains(
                r#"CASE WHEN ("cost" < 0.00) THEN 0.00 WHEN ("cost" > 500.25) THEN 500.25"#
            ),
            "{sql}"
        );
        assert!(sql.contains("[at most 2 row(s) per patient_id]"), "{sql}");
        // No row count: SUM and AVG need the sum and AVG the count.
        let kinds: Vec<PartialKind> = p
            .shared_partials()
            .iter()
            .map(|&i| p.local.partials[i].kind)
            .collect();
        assert_eq!(kinds, vec![PartialKind::Count, PartialKind::Sum]);
        // Count sensitivity is the row bound; the sum's is 2 · 500.25 at scale 2.
        let sens: Vec<u128> = p.noise.iter().map(|n| n.sensitivity).collect();
        assert_eq!(sens, vec![2, 100_050]);
        // ε = 1 over 2 totals: scale = Δ / 0.5.
        assert_eq!(p.noise[0].noise.scale(), 4.0);
        // Parameters from the network are checked, never trusted.
        let e = base.clone().with_privacy(dp(0)).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        let mut d = dp(1_000_000);
        d.colluders = 3;
        assert!(base.clone().with_privacy(d).is_err());
        let mut d = dp(1_000_000);
        d.clamps.clear();
        let e = base.with_privacy(d).unwrap_err().to_string();
        assert!(e.contains("no party's policy gives a clamp range"), "{e}");
        let e = plan("SELECT SUM(cost * 2) FROM patients")
            .await
            .unwrap()
            .with_privacy(dp(1_000_000))
            .unwrap_err()
            .to_string();
        assert!(e.contains("aggregate a plain column"), "{e}");
    }

    #[tokio::test]
    async fn under_dp_squares_are_whole_and_need_a_narrow_clamp() {
        let base =
            plan("SELECT sex, VAR_SAMP(los), COUNT(*), STDDEV_POP(los) FROM patients GROUP BY sex")
                .await
                .unwrap();
        assert!(matches!(
            base.aggregates[0].sum_squares,
            Some(Squares::Limbs { .. })
        ));
        let clamp = |hi: &str| {
            let mut d = dp(1_000_000);
            d.clamps.insert(
                "los".into(),
                crate::privacy::Clamp {
                    lo: "0".into(),
                    hi: hi.into(),
                },
            );
            d
        };
        let p = base.clone().with_privacy(clamp("365")).unwrap();
        use PartialKind::*;
        let kinds: Vec<PartialKind> = p.local.partials.iter().map(|p| p.kind).collect();
        // The limbs no aggregate needs are gone; every index still points
        // at a partial of the right kind.
        assert_eq!(kinds, vec![RowCount, Count, Sum, SumSquares]);
        for a in [&p.aggregates[0], &p.aggregates[2]] {
            assert_eq!(kinds[a.count.unwrap()], Count);
            assert_eq!(kinds[a.sum.unwrap()], Sum);
            let Some(Squares::Whole(q)) = a.sum_squares else {
                panic!("{:?}", a.sum_squares)
            };
            assert_eq!(kinds[q], SumSquares);
            assert_eq!(p.local.partials[q].count_of_arg, a.count);
        }
        assert_eq!(kinds[p.row_count], RowCount);
        assert_eq!(kinds[p.aggregates[1].count.unwrap()], RowCount);
        // The square's sensitivity is k · hi².
        let q = p.local.partials.len() - 1;
        let n = p.noise.iter().find(|n| n.partial == q).unwrap();
        assert_eq!(n.sensitivity, 2 * 365 * 365);
        // A clamp that lets one square reach 10^26 units is refused, naming it.
        let e = base
            .with_privacy(clamp("10000000000000"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("narrow `clamp` of patients.los"), "{e}");
    }

    /// HAVING's comparisons of a COUNT or SUM with a constant become the
    /// gate's bounds, decided as DataFusion decides them on the value
    /// (a decimal SUM in cents compared with a float, an integer COUNT with
    /// a fraction); anything else stays in the post part.
    #[tokio::test]
    async fn having_on_a_count_or_sum_against_a_constant_is_decided_in_shares() {
        let bounds = |p: &FederatedPlan| -> Vec<(PartialKind, bool, i64)> {
            p.gate_columns()
                .iter()
                .map(|c| (p.local.partials[c.partial].kind, c.negate, c.bound.at_least))
                .collect()
        };
        let p = plan(
            "SELECT age_band, SUM(cost) FROM patients GROUP BY age_band HAVING COUNT(*) >= 20",
        )
        .await
        .unwrap();
        assert!(p.gated());
        assert_eq!(
            bounds(&p),
            vec![
                (PartialKind::RowCount, false, 1),
                (PartialKind::RowCount, false, 20)
            ]
        );
        // Beyond the exact range a HAVING value forces its condition to
        // pass (the post part decides on the revealed total); the row
        // count's column never does.
        let cols = p.gate_columns();
        let forced = i256::from_i128(executor::gate::FORCED_PASS as i128);
        assert_eq!(cols[1].value(1 << 60), forced);
        assert_eq!(cols[1].value(-(1 << 60)), forced);
        assert_eq!(cols[1].value(1 << 53), i256::from_i128(1 << 53));
        assert_eq!(cols[0].value(1 << 60), i256::from_i128(1 << 60));
        // Only the conjunct decided in the gate uses COUNT(*): the post part
        // takes it as TRUE, and no count is revealed.
        assert_eq!(p.having_decided, vec![(0, 0)]);
        assert!(!p.shared_partials().contains(&p.row_count));
        let count = p
            .aggregates
            .iter()
            .position(|a| a.kind == AggKind::CountStar)
            .unwrap();
        assert!(!p.revealed_aggregate(count));
        let explain = p.clone().led_by("a").unwrap().explain("a");
        assert!(explain.contains("Gate in shares"), "{explain}");
        let p = plan(
            "SELECT age_band, SUM(cost) FROM patients GROUP BY age_band HAVING COUNT(*) > 2.5",
        )
        .await
        .unwrap();
        assert_eq!(bounds(&p)[1], (PartialKind::RowCount, false, 3));
        // cost is decimal(12,2): a SUM in cents, compared with 1e6 as
        // DataFusion compares them; its count of values at least one (NULL
        // fails, as in SQL).
        let p = plan("SELECT age_band, COUNT(*) FROM patients GROUP BY age_band HAVING SUM(cost) > 1e6 AND 5 >= SUM(los)")
            .await
            .unwrap();
        let b = bounds(&p);
        assert!(b.contains(&(PartialKind::Sum, false, 100_000_001)), "{b:?}");
        assert!(b.contains(&(PartialKind::Sum, true, -5)), "{b:?}");
        assert_eq!(
            b.iter().filter(|x| x.0 == PartialKind::Count).count(),
            2,
            "{b:?}"
        );
        // A SUM's condition stays in the post part too (a value beyond the
        // gate's exact range passes there for the post part to decide), so
        // the SUMs are revealed.
        assert!(p.having_decided.is_empty());
        assert!((0..p.aggregates.len()).all(|k| p.revealed_aggregate(k)));
        assert!(p.having_left.is_empty());
        let p =
            plan("SELECT age_band, COUNT(*) FROM patients GROUP BY age_band HAVING SUM(los) = 7")
                .await
                .unwrap();
        let b = bounds(&p);
        assert!(
            b.contains(&(PartialKind::Sum, false, 7)) && b.contains(&(PartialKind::Sum, true, -7)),
            "{b:?}"
        );
        // Without a gate the row count decides which groups exist; with
        // one, it is revealed only if asked for.
        let p =
            plan("SELECT age_band, SUM(los) FROM patients GROUP BY age_band HAVING SUM(los) < 100")
                .await
                .unwrap();
        assert!(!p.shared_partials().contains(&p.row_count));
        for sql in [
            "SELECT age_band, AVG(los) FROM patients GROUP BY age_band HAVING AVG(los) > 3",
            "SELECT age_band, COUNT(*) FROM patients GROUP BY age_band HAVING COUNT(*) > 3 OR SUM(los) > 1",
            "SELECT age_band, COUNT(*) FROM patients GROUP BY age_band HAVING COUNT(*) <> 3",
            "SELECT age_band, SUM(los) FROM patients GROUP BY age_band HAVING SUM(los) > SUM(patient_id)",
            // NULL beyond TINYINT: not monotone in the count.
            "SELECT age_band, COUNT(*) FROM patients GROUP BY age_band HAVING TRY_CAST(COUNT(*) AS TINYINT) > 5",
            "SELECT age_band, COUNT(*) FROM patients GROUP BY age_band HAVING CAST(COUNT(*) AS TEXT) > '5'",
        ] {
            let p = plan(sql).await.unwrap();
            assert!(p.having.is_empty() && !p.gated(), "{sql}");
            assert_eq!(p.having_left.len(), 1, "{sql}");
        }
        // Two parties have no third compute party: the post part decides.
        let cat = Catalog::from_toml(CATALOG, "catalog.toml").unwrap();
        let two = plan_query(
            "SELECT age_band, COUNT(*) FROM patients GROUP BY age_band HAVING COUNT(*) > 3",
            &cat,
            &["a".to_string(), "b".to_string()],
            &QueryOptions::default(),
        )
        .await
        .unwrap();
        assert!(!two.having.is_empty() && !two.gated());
    }
}
