//! Expressions that cannot fail at run time: the mechanism behind "no
//! data-dependent outcome".
//!
//! A local part runs at every party on its own rows. If an expression in it
//! could fail on some row (`1 / (CASE WHEN <condition on one patient> THEN 0
//! ELSE 1 END)`, a failing cast, an invalid pattern, a date that does not
//! parse), whether the query succeeds would tell the analyst whether such a
//! row exists: one bit about one person per query, outside every policy and
//! outside differential privacy. So the planner admits in the local part
//! (WHERE and the aggregates' arguments) only expressions that return a value
//! for every row, checked here at plan time on DataFusion's type-coerced
//! plan (where implicit casts are visible):
//!
//! - columns, literals, comparisons, AND/OR/NOT, IS [NOT] NULL/TRUE/FALSE,
//!   IS [NOT] DISTINCT FROM, BETWEEN, IN lists, CASE, `||`, TRY_CAST;
//! - `+`, `-`, `*` and unary minus on numbers (DataFusion wraps integers, as
//!   its plaintext answer does);
//! - `/` and `%` only by a non-zero literal (not `-1` for integers; decimal
//!   dividends of at most 18 digits), so no row divides by zero;
//! - casts that succeed for every value of their source type (widening
//!   numbers, anything to text, dates to timestamps), or of a literal that
//!   casts at plan time; any other cast of a column must be written TRY_CAST
//!   (a failing row gives NULL);
//! - LIKE/ILIKE with a literal pattern; regular-expression matches with a
//!   literal pattern that compiles here (with the same engine DataFusion
//!   uses);
//! - the scalar functions of [`TOTAL_FUNCTIONS`], [`FLOAT_FUNCTIONS`] (on
//!   floating-point arguments) and a few with literal arguments checked here
//!   (`left`, `right`, `substr`). Dates are compared, not formatted or
//!   truncated: outside chrono's range those functions fail.
//!
//! Everything else is refused naming the construct, with the way to write
//! it. The list errs on the side of refusing: extending it is a matter of
//! showing that the function returns a value of bounded size for every
//! input.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::logical_expr::{Expr, ExprSchemable, Operator};

use crate::PlanError;

/// Functions that return a value of bounded size for every input.
pub const TOTAL_FUNCTIONS: &[&str] = &[
    "lower",
    "upper",
    "btrim",
    "ltrim",
    "rtrim",
    "trim",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "starts_with",
    "ends_with",
    "strpos",
    "instr",
    "position",
    "concat",
    "concat_ws",
    "coalesce",
    "nullif",
    "nvl",
    "ifnull",
    "greatest",
    "least",
    "now",
    "current_date",
    "current_timestamp",
];

/// Functions that are total on floating-point arguments (IEEE gives NaN or
/// infinity, never an error). On integers some are not (`abs(i64::MIN)` is
/// an overflow error), so their arguments must be floats.
pub const FLOAT_FUNCTIONS: &[&str] = &[
    "abs", "floor", "ceil", "round", "trunc", "signum", "sqrt", "cbrt", "exp", "ln", "log10",
    "log2", "sin", "cos", "tan", "degrees", "radians", "isnan", "iszero",
];

/// Checks that `e` (type-coerced, over `schema`) returns a value for every
/// row. `place` says where it was written ("WHERE", "the argument of SUM").
pub fn check(e: &Expr, schema: &DFSchema, place: &str) -> Result<(), PlanError> {
    let mut found: Option<PlanError> = None;
    // Strings may only grow by a bounded factor: every `||` and every
    // argument of CONCAT/CONCAT_WS counts, at most MAX_STRING_PIECES in one
    // expression (otherwise 80,000 copies of a column concatenated take a
    // gateway's memory on one batch).
    let mut pieces = 0usize;
    let _ = e.apply(|node| {
        match node {
            Expr::BinaryExpr(b) if b.op == Operator::StringConcat => pieces += 1,
            Expr::ScalarFunction(f) if matches!(f.func.name(), "concat" | "concat_ws") => {
                pieces += f.args.len()
            }
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    });
    if pieces > MAX_STRING_PIECES {
        return Err(refuse(
            format!("an expression that concatenates {pieces} strings"),
            place,
            format!("at most {MAX_STRING_PIECES} pieces may be concatenated in one expression"),
        ));
    }
    let _ = e.apply(|node| match check_node(node, schema, place) {
        Ok(()) => Ok(TreeNodeRecursion::Continue),
        Err(err) => {
            found = Some(err);
            Ok(TreeNodeRecursion::Stop)
        }
    });
    match found {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn refuse(what: impl Into<String>, place: &str, hint: impl Into<String>) -> PlanError {
    PlanError::not_permitted(what, place, hint)
}

/// The most strings one expression may concatenate.
pub const MAX_STRING_PIECES: usize = 32;
/// The longest LIKE or regular-expression pattern (each is compiled into
/// an automaton, per batch, by DataFusion).
pub const MAX_PATTERN_CHARS: usize = 1_000;

const WHY: &str = "the local part may only contain expressions that return a value for every row \
                   (a failure on some rows would tell whether such rows exist)";

fn check_node(e: &Expr, schema: &DFSchema, place: &str) -> Result<(), PlanError> {
    let ty = |x: &Expr| x.get_type(schema).unwrap_or(DataType::Null);
    match e {
        Expr::Column(_) | Expr::Literal(..) | Expr::Alias(_) => Ok(()),
        Expr::Not(_)
        | Expr::IsNull(_)
        | Expr::IsNotNull(_)
        | Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsUnknown(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNotFalse(_)
        | Expr::IsNotUnknown(_)
        | Expr::Between(_)
        | Expr::Case(_)
        | Expr::TryCast(_)
        | Expr::InList(_) => Ok(()),
        Expr::Negative(inner) => {
            if is_numeric(&ty(inner)) {
                Ok(())
            } else {
                Err(refuse(format!("unary minus on {}", ty(inner)), place, WHY))
            }
        }
        Expr::BinaryExpr(b) => {
            use Operator::*;
            match b.op {
                Eq | NotEq | Lt | LtEq | Gt | GtEq | And | Or | IsDistinctFrom
                | IsNotDistinctFrom | StringConcat => Ok(()),
                Plus | Minus | Multiply => {
                    let (l, r) = (ty(&b.left), ty(&b.right));
                    if is_numeric(&l) && is_numeric(&r) {
                        // Integers and floats wrap or saturate; arrow's
                        // decimal arithmetic is checked (it fails where the
                        // exact value leaves i128). A literal counts with
                        // the digits of its value. Where a literal is what
                        // takes the result past 38 digits (`cost *
                        // 99999999999999999999`: an analyst's tool to make
                        // one chosen row fail), the expression is refused.
                        // Where the columns' declared types alone allow it
                        // (TPC-H Q1's price * (1 - discount) * (1 + tax)),
                        // only values near their types' limits could fail:
                        // a data-quality abort, like a partial beyond the
                        // ring (see ARCHITECTURE's known limits).
                        let _ = (&l, &r);
                        match (
                            effective_digits(node_expr(e), schema, false),
                            effective_digits(node_expr(e), schema, true),
                        ) {
                            (Some((p, _)), Some((p1, _))) if p > 38 && p1 <= 38 => Err(refuse(
                                format!(
                                    "`{}` by a literal that lets the exact result need {p} digits",
                                    b.op
                                ),
                                place,
                                format!("{WHY}; use a smaller literal, or cast to DOUBLE"),
                            )),
                            _ => Ok(()),
                        }
                    } else {
                        Err(refuse(
                            format!("`{}` on {} and {}", b.op, ty(&b.left), ty(&b.right)),
                            place,
                            format!("{WHY}; date and interval arithmetic can overflow, so it is not admitted"),
                        ))
                    }
                }
                Divide | Modulo => check_divisor(&b.op, &b.left, &b.right, schema, place),
                RegexMatch | RegexIMatch | RegexNotMatch | RegexNotIMatch => {
                    let insensitive = matches!(b.op, RegexIMatch | RegexNotIMatch);
                    check_regex(&b.right, insensitive, place)
                }
                other => Err(refuse(format!("the operator `{other}`"), place, WHY)),
            }
        }
        Expr::Like(l) => {
            if l.pattern.column_refs().is_empty() {
                if let Some(s) = literal_text(&l.pattern) {
                    if s.chars().count() > MAX_PATTERN_CHARS
                        || (l.case_insensitive && !s.is_ascii())
                    {
                        return Err(refuse(
                            "a LIKE pattern longer than 1000 characters, or an ILIKE pattern with non-ASCII letters",
                            place,
                            "shorten the pattern (an automaton is built from it for every batch); for non-ASCII text compare lower() with LIKE",
                        ));
                    }
                    let esc = l.escape_char.unwrap_or('\\');
                    let trailing = s.chars().rev().take_while(|c| *c == esc).count();
                    if trailing % 2 == 1 {
                        return Err(refuse(
                            format!("the LIKE pattern '{s}', which ends with its escape character"),
                            place,
                            "escape the escape character or remove it",
                        ));
                    }
                    return Ok(());
                }
            }
            Err(refuse(
                "LIKE with a pattern that is not a text literal",
                place,
                "write the pattern as a literal, e.g. LIKE 'E11%'",
            ))
        }
        Expr::Cast(c) => {
            let from = ty(&c.expr);
            if infallible_cast(&from, c.field.data_type()) {
                return Ok(());
            }
            if let Expr::Literal(v, _) = c.expr.as_ref() {
                return v.cast_to(c.field.data_type()).map(|_| ()).map_err(|_| {
                    PlanError::Invalid(format!(
                        "the literal {v} in {place} cannot be read as {}; write a literal of that type",
                        c.field.data_type()
                    ))
                });
            }
            Err(refuse(
                format!("CAST({} AS {}), which fails on some values", c.expr, c.field.data_type()),
                place,
                format!(
                    "{WHY}; write TRY_CAST (a value that does not convert becomes NULL), or compare with a literal \
                     of the column's own type"
                ),
            ))
        }
        Expr::ScalarFunction(f) => {
            let name = f.func.name().to_ascii_lowercase();
            let args = &f.args;
            if TOTAL_FUNCTIONS.contains(&name.as_str()) {
                return Ok(());
            }
            if FLOAT_FUNCTIONS.contains(&name.as_str()) {
                let first = args.first().map(&ty).unwrap_or(DataType::Null);
                let rest_ok = args.iter().skip(1).all(|a| a.column_refs().is_empty());
                if matches!(
                    first,
                    DataType::Float64 | DataType::Float32 | DataType::Null
                ) && rest_ok
                {
                    return Ok(());
                }
                return Err(refuse(
                    format!("{}() on {first}", name.to_uppercase()),
                    place,
                    format!("{WHY}; on integers and decimals it can overflow: cast the argument to DOUBLE first"),
                ));
            }
            match name.as_str() {
                "left" | "right" | "substr" | "substring" => {
                    // Bounded positions: substr(s, i64::MIN) overflows inside.
                    let literal_ints = args
                        .iter()
                        .skip(1)
                        .all(|a| literal_int(a).is_some_and(|n| n.unsigned_abs() < 1 << 62));
                    let len_ok = match name.as_str() {
                        "substr" | "substring" => {
                            args.get(2).is_none_or(|a| literal_int(a).is_some_and(|n| n >= 0))
                        }
                        _ => true,
                    };
                    if literal_ints && len_ok {
                        Ok(())
                    } else {
                        Err(refuse(
                            format!("{}() with positions that are not literal (non-negative) integers", name.to_uppercase()),
                            place,
                            "write the positions and lengths as integer literals",
                        ))
                    }
                }
                _ => Err(refuse(
                    format!("the function {}()", name.to_uppercase()),
                    place,
                    format!(
                        "{WHY}; the functions admitted are {}, {} (on floats), LEFT, RIGHT and SUBSTR",
                        TOTAL_FUNCTIONS.join(", "),
                        FLOAT_FUNCTIONS.join(", ")
                    ),
                )),
            }
        }
        other => Err(refuse(format!("the expression `{other}`"), place, WHY)),
    }
}

fn is_numeric(t: &DataType) -> bool {
    t.is_integer() || t.is_floating() || matches!(t, DataType::Decimal128(..) | DataType::Null)
}

fn literal_text(e: &Expr) -> Option<String> {
    match e {
        Expr::Literal(ScalarValue::Utf8(Some(s)), _)
        | Expr::Literal(ScalarValue::LargeUtf8(Some(s)), _)
        | Expr::Literal(ScalarValue::Utf8View(Some(s)), _) => Some(s.clone()),
        Expr::Cast(c) => literal_text(&c.expr),
        Expr::Alias(a) => literal_text(&a.expr),
        _ => None,
    }
}

fn literal_int(e: &Expr) -> Option<i128> {
    match e {
        Expr::Literal(v, _) => match v {
            ScalarValue::Int8(Some(x)) => Some(*x as i128),
            ScalarValue::Int16(Some(x)) => Some(*x as i128),
            ScalarValue::Int32(Some(x)) => Some(*x as i128),
            ScalarValue::Int64(Some(x)) => Some(*x as i128),
            ScalarValue::UInt8(Some(x)) => Some(*x as i128),
            ScalarValue::UInt16(Some(x)) => Some(*x as i128),
            ScalarValue::UInt32(Some(x)) => Some(*x as i128),
            ScalarValue::UInt64(Some(x)) => Some(*x as i128),
            _ => None,
        },
        Expr::Cast(c) => literal_int(&c.expr),
        _ => None,
    }
}

/// The divisor of `/` or `%` must be a literal that no row can make fail.
fn check_divisor(
    op: &Operator,
    left: &Expr,
    right: &Expr,
    schema: &DFSchema,
    place: &str,
) -> Result<(), PlanError> {
    let lt = left.get_type(schema).unwrap_or(DataType::Null);
    let refused = |why: &str| {
        refuse(
            format!("`{op}` by {right}"),
            place,
            format!("{why}; divide the revealed aggregate instead (e.g. SUM(x) / 100), or divide by a non-zero literal"),
        )
    };
    if !is_numeric(&lt) {
        return Err(refused("only numbers may be divided"));
    }
    let v = match strip_cast(right) {
        Expr::Literal(v, _) => v.clone(),
        _ => return Err(refused("a divisor that depends on the row can be zero")),
    };
    if v.is_null() {
        return Ok(());
    }
    let zero = ScalarValue::new_zero(&v.data_type()).ok();
    if zero.as_ref() == Some(&v)
        || v.to_string()
            .trim_start_matches('-')
            .trim_matches(|c| c == '0' || c == '.')
            .is_empty()
    {
        return Err(refused("division by zero fails"));
    }
    if lt.is_integer() && literal_int(right) == Some(-1) {
        return Err(refused("the smallest integer divided by -1 overflows"));
    }
    let rt = right.get_type(schema).unwrap_or(DataType::Null);
    if let Some(p) = decimal_result_digits(op, &lt, &rt) {
        if p > 38 {
            return Err(refused(&format!(
                "the exact quotient of {lt} by {rt} can need {p} digits, more than a decimal holds"
            )));
        }
    }
    Ok(())
}

fn node_expr(e: &Expr) -> &Expr {
    e
}

/// The exact digits (precision, scale) a numeric expression's values can
/// need, whatever DataFusion's capped type says: columns by their declared
/// type, a cast of a column by the column's integer digits at the cast's
/// scale, a literal by its value (`literals_as_one`: as the literal 1, so
/// that what literals add can be told from what the columns' types allow),
/// and `+ - *` by arrow's rules. `None` where it is not a decimal or
/// integer computation.
fn effective_digits(e: &Expr, schema: &DFSchema, literals_as_one: bool) -> Option<(i32, i32)> {
    let type_digits = |t: &DataType| -> Option<(i32, i32)> {
        Some(match t {
            DataType::Decimal128(p, s) => (*p as i32, *s as i32),
            DataType::Int8 | DataType::UInt8 => (3, 0),
            DataType::Int16 | DataType::UInt16 => (5, 0),
            DataType::Int32 | DataType::UInt32 => (10, 0),
            DataType::Int64 => (19, 0),
            DataType::UInt64 => (20, 0),
            _ => return None,
        })
    };
    let literal = |v: &ScalarValue| -> Option<(i32, i32)> {
        let (units, scale): (u128, i32) = match v {
            ScalarValue::Decimal128(Some(x), _, s) => (x.unsigned_abs(), *s as i32),
            ScalarValue::Int8(Some(x)) => (x.unsigned_abs() as u128, 0),
            ScalarValue::Int16(Some(x)) => (x.unsigned_abs() as u128, 0),
            ScalarValue::Int32(Some(x)) => (x.unsigned_abs() as u128, 0),
            ScalarValue::Int64(Some(x)) => (x.unsigned_abs() as u128, 0),
            ScalarValue::UInt8(Some(x)) => (*x as u128, 0),
            ScalarValue::UInt16(Some(x)) => (*x as u128, 0),
            ScalarValue::UInt32(Some(x)) => (*x as u128, 0),
            ScalarValue::UInt64(Some(x)) => (*x as u128, 0),
            _ => return None,
        };
        if literals_as_one {
            return Some((1, 0));
        }
        let digits = units.checked_ilog10().map(|d| d as i32 + 1).unwrap_or(1);
        Some((digits.max(scale), scale))
    };
    match e {
        Expr::Alias(a) => effective_digits(&a.expr, schema, literals_as_one),
        Expr::Literal(v, _) => literal(v),
        Expr::Cast(c) => {
            let to = type_digits(c.field.data_type())?;
            if let Expr::Literal(v, _) = c.expr.as_ref() {
                // A literal cast to a decimal: its value at the cast's scale.
                let (p, s) = literal(v).or_else(|| {
                    v.cast_to(c.field.data_type())
                        .ok()
                        .and_then(|x| literal(&x))
                })?;
                if literals_as_one {
                    return Some((1, 0));
                }
                let int = (p - s).max(1);
                return Some((int + to.1, to.1));
            }
            match effective_digits(&c.expr, schema, literals_as_one) {
                // Rescaled to the cast's scale: the source's integer digits.
                Some((p, s)) => Some(((p - s).max(1) + to.1, to.1)),
                None => Some(to),
            }
        }
        Expr::BinaryExpr(b)
            if matches!(b.op, Operator::Plus | Operator::Minus | Operator::Multiply) =>
        {
            let l = effective_digits(&b.left, schema, literals_as_one)?;
            let r = effective_digits(&b.right, schema, literals_as_one)?;
            let ((p1, s1), (p2, s2)) = (l, r);
            Some(match b.op {
                Operator::Multiply => (p1 + p2 + 1, s1 + s2),
                _ => {
                    let s = s1.max(s2);
                    (s + (p1 - s1).max(p2 - s2) + 1, s)
                }
            })
        }
        Expr::Negative(x) => effective_digits(x, schema, literals_as_one),
        other => type_digits(&other.get_type(schema).ok()?),
    }
}

/// The digits DataFusion's exact decimal result of `l op r` needs before
/// it caps them at 38 (arrow's decimal kernels are checked: a value beyond
/// the capped precision is an error). `None` if neither side is a decimal.
fn decimal_result_digits(op: &Operator, l: &DataType, r: &DataType) -> Option<i32> {
    let ps = |t: &DataType| -> Option<(i32, i32)> {
        match t {
            DataType::Decimal128(p, s) => Some((*p as i32, *s as i32)),
            DataType::Int8 | DataType::UInt8 => Some((3, 0)),
            DataType::Int16 | DataType::UInt16 => Some((5, 0)),
            DataType::Int32 | DataType::UInt32 => Some((10, 0)),
            DataType::Int64 => Some((19, 0)),
            DataType::UInt64 => Some((20, 0)),
            _ => None,
        }
    };
    if !matches!(l, DataType::Decimal128(..)) && !matches!(r, DataType::Decimal128(..)) {
        return None;
    }
    let ((p1, s1), (p2, s2)) = (ps(l)?, ps(r)?);
    Some(match op {
        Operator::Multiply => p1 + p2 + 1,
        Operator::Plus | Operator::Minus => s1.max(s2) + (p1 - s1).max(p2 - s2) + 1,
        Operator::Divide => p1 - s1 + s2 + 6.max(s1 + p2 + 1),
        Operator::Modulo => (p1 - s1).max(p2 - s2) + s1.max(s2),
        _ => return None,
    })
}

fn strip_cast(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip_cast(&c.expr),
        Expr::TryCast(c) => strip_cast(&c.expr),
        Expr::Alias(a) => strip_cast(&a.expr),
        other => other,
    }
}

fn check_regex(pattern: &Expr, insensitive: bool, place: &str) -> Result<(), PlanError> {
    let Some(p) = literal_text(pattern) else {
        return Err(refuse(
            "a regular-expression match whose pattern is not a text literal",
            place,
            "write the pattern as a literal",
        ));
    };
    if p.chars().count() > MAX_PATTERN_CHARS {
        return Err(refuse(
            "a regular expression longer than 1000 characters",
            place,
            "shorten the pattern",
        ));
    }
    let full = if insensitive {
        format!("(?i){p}")
    } else {
        p.clone()
    };
    regex::Regex::new(&full).map(|_| ()).map_err(|e| {
        PlanError::Invalid(format!(
            "the regular expression '{p}' in {place} is not valid: {e}"
        ))
    })
}

/// Whether `CAST(x AS to)` succeeds for every value `x` of type `from`.
pub fn infallible_cast(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    if from == to {
        return true;
    }
    let int_digits = |t: &DataType| -> Option<u8> {
        Some(match t {
            Int8 | UInt8 => 3,
            Int16 | UInt16 => 5,
            Int32 | UInt32 => 10,
            Int64 => 19,
            UInt64 => 20,
            _ => return None,
        })
    };
    let signed_bits = |t: &DataType| -> Option<(bool, u32)> {
        Some(match t {
            Int8 => (true, 8),
            Int16 => (true, 16),
            Int32 => (true, 32),
            Int64 => (true, 64),
            UInt8 => (false, 8),
            UInt16 => (false, 16),
            UInt32 => (false, 32),
            UInt64 => (false, 64),
            _ => return None,
        })
    };
    match (from, to) {
        (Null, _) => true,
        (Utf8 | LargeUtf8 | Utf8View, Utf8 | LargeUtf8 | Utf8View) => true,
        (Binary | LargeBinary | BinaryView | FixedSizeBinary(_), _) => false,
        (_, Utf8 | LargeUtf8 | Utf8View) => {
            // Not dates or timestamps: outside chrono's range (±262,143
            // years) formatting one fails.
            from.is_integer() || from.is_floating() || matches!(from, Boolean | Decimal128(..))
        }
        (Boolean, t) if t.is_integer() || t.is_floating() => true,
        (f, t) if f.is_integer() && t.is_integer() => match (signed_bits(f), signed_bits(t)) {
            (Some((fs, fb)), Some((ts, tb))) => match (fs, ts) {
                (true, true) | (false, false) => tb >= fb,
                (false, true) => tb > fb,
                (true, false) => false,
            },
            _ => false,
        },
        (f, Float32 | Float64) if f.is_integer() => true,
        (f, Decimal128(p, s)) if f.is_integer() => {
            int_digits(f).is_some_and(|d| (*p as i16 - *s as i16) >= d as i16)
        }
        (Decimal128(p1, s1), Decimal128(p2, s2)) => {
            let int1 = *p1 as i16 - *s1 as i16;
            let int2 = *p2 as i16 - *s2 as i16;
            // Fewer decimals round, which may carry into one more digit.
            if s2 >= s1 {
                int2 >= int1
            } else {
                int2 > int1
            }
        }
        (Decimal128(..), Float32 | Float64) => true,
        (Float32, Float64) | (Float64, Float32) => true,
        (Date32, Date64) => true,
        // 2^31 days fit i64 in seconds and milliseconds, not in µs or ns.
        (Date32, Timestamp(unit, _)) => matches!(
            unit,
            datafusion::arrow::datatypes::TimeUnit::Second
                | datafusion::arrow::datatypes::TimeUnit::Millisecond
        ),
        (Timestamp(..), Date32) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn casts_that_cannot_fail() {
        use DataType::*;
        assert!(infallible_cast(&Int32, &Int64));
        assert!(!infallible_cast(&Int64, &Int32));
        assert!(!infallible_cast(&Utf8, &Int64));
        assert!(infallible_cast(&Int64, &Utf8));
        assert!(infallible_cast(&Int64, &Decimal128(38, 2)));
        assert!(!infallible_cast(&Int64, &Decimal128(20, 2)));
        assert!(infallible_cast(&Decimal128(10, 2), &Decimal128(12, 4)));
        assert!(!infallible_cast(&Decimal128(10, 2), &Decimal128(8, 0)));
        assert!(infallible_cast(&Decimal128(10, 2), &Decimal128(9, 0)));
        assert!(!infallible_cast(&Float64, &Int64));
        assert!(!infallible_cast(&Float64, &Decimal128(38, 4)));
    }
}
