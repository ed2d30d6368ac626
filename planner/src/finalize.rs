//! From revealed totals to the answer: the final aggregate values, with the
//! exact types and rounding DataFusion gives them, and the post part
//! (HAVING, ORDER BY, LIMIT, arithmetic on aggregates) as DataFusion's own
//! plan with the Aggregate node replaced by the revealed values.
//!
//! Pure computation, no I/O: the gateway executes the returned plan.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Decimal128Builder, Float64Builder, Int64Builder, RecordBatch, UInt64Builder,
};
use datafusion::arrow::datatypes::{i256, DataType, Field, Schema};
use datafusion::catalog::MemTable;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::Column;
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, Projection};

use crate::plan::{AggKind, AggregateOutput, FederatedPlan};
use crate::PlanError;

/// The revealed per-group totals, indexed `[partial][group]`; entries for
/// local-only partials are empty.
pub struct Revealed {
    pub totals: Vec<Vec<i128>>,
    /// Totals shared in Z_2^256 (a sum of squares in limbs), by partial.
    pub wide: std::collections::BTreeMap<usize, Vec<i256>>,
    /// With a gate (a minimum group size, HAVING in shares): whether each
    /// group passed it (a group that did not is left out, and its totals
    /// are zero).
    pub passing: Option<Vec<bool>>,
}

/// The groups that exist: with GROUP BY, those with at least one row (as in
/// SQL); without, the single group always.
pub fn present_groups(plan: &FederatedPlan, revealed: &Revealed) -> Vec<usize> {
    if let Some(p) = &plan.privacy {
        // Every group of the public domain is released, noised (which
        // groups are empty is itself private), unless a minimum group size
        // leaves out those whose noised row count is below it.
        if !plan.grouped {
            return vec![0];
        }
        return (0..plan.groups.len())
            .filter(|&g| !suppressed(plan, revealed, g, p.min_group_size))
            .collect();
    }
    let rows = revealed
        .totals
        .get(plan.row_count)
        .map(|r| &r[..])
        .unwrap_or(&[]);
    let passes = |g: usize| {
        revealed
            .passing
            .as_ref()
            .is_none_or(|p| p.get(g).copied().unwrap_or(false))
    };
    if plan.grouped {
        // A gate decided in shares which groups exist (the row count is
        // then revealed only if asked for); otherwise the revealed count.
        (0..plan.groups.len())
            .filter(|&g| match &revealed.passing {
                Some(_) => passes(g),
                None => rows.get(g).copied().unwrap_or(0) > 0,
            })
            .collect()
    } else {
        vec![0]
    }
}

/// Whether group `g`'s noised row count is below `min` (never without a
/// threshold).
fn suppressed(plan: &FederatedPlan, revealed: &Revealed, g: usize, min: u64) -> bool {
    min > 0
        && revealed
            .totals
            .get(plan.row_count)
            .and_then(|t| t.get(g))
            .is_none_or(|&n| n < min as i128)
}

/// Builds the batch that stands in for DataFusion's Aggregate node.
pub fn revealed_batch(plan: &FederatedPlan, revealed: &Revealed) -> Result<RecordBatch, PlanError> {
    let groups = present_groups(plan, revealed);
    let agg_schema = aggregate_schema(&plan.logical)?;
    let mut columns: Vec<ArrayRef> = plan.groups.key_arrays_for(&groups);
    // An ungrouped answer under a minimum group size it does not reach is
    // all NULL.
    let blank = !plan.grouped
        && (plan
            .privacy
            .as_ref()
            .is_some_and(|p| suppressed(plan, revealed, 0, p.min_group_size))
            || revealed
                .passing
                .as_ref()
                .is_some_and(|p| !p.first().copied().unwrap_or(false)));
    for (k, a) in plan.aggregates.iter().enumerate() {
        if !plan.revealed_aggregate(k) {
            // Used only by conjuncts the gate decided, which the post part
            // takes as TRUE: never revealed, so NULL here.
            columns.push(datafusion::arrow::array::new_null_array(
                a.field.data_type(),
                groups.len(),
            ));
            continue;
        }
        let c = final_values(a, &groups, revealed, plan.privacy.is_some())?;
        columns.push(if blank {
            datafusion::arrow::array::new_null_array(c.data_type(), c.len())
        } else {
            c
        });
    }
    let fields: Vec<Field> = agg_schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), true))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let columns = columns
        .into_iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(c)
            } else {
                datafusion::arrow::compute::cast(&c, f.data_type())
                    .map_err(|e| PlanError::Internal(e.to_string()))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema, columns).map_err(|e| PlanError::Internal(e.to_string()))
}

fn aggregate_schema(plan: &LogicalPlan) -> Result<datafusion::common::DFSchemaRef, PlanError> {
    let mut found = None;
    plan.apply(|n| {
        if let LogicalPlan::Aggregate(a) = n {
            found = Some(a.schema.clone());
            return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    })
    .map_err(|e| PlanError::Internal(e.to_string()))?;
    found.ok_or_else(|| PlanError::Internal("no aggregate in plan".into()))
}

/// The query's plan with the Aggregate replaced by a scan of `batch`,
/// re-labelled with the Aggregate's own (qualified) column names.
pub fn post_plan(plan: &FederatedPlan, batch: RecordBatch) -> Result<LogicalPlan, PlanError> {
    let agg_schema = aggregate_schema(&plan.logical)?;
    let internal = |e: datafusion::error::DataFusionError| PlanError::Internal(e.to_string());
    let table = MemTable::try_new(batch.schema(), vec![vec![batch]]).map_err(internal)?;
    let scan = LogicalPlanBuilder::scan("__revealed", provider_as_source(Arc::new(table)), None)
        .map_err(internal)?
        .build()
        .map_err(internal)?;
    let exprs: Vec<Expr> = (0..agg_schema.fields().len())
        .map(|i| {
            let (qualifier, field) = agg_schema.qualified_field(i);
            Expr::Column(Column::new_unqualified(format!("c{i}")))
                .alias_qualified(qualifier.cloned(), field.name())
        })
        .collect();
    let relabel =
        LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(scan)).map_err(internal)?);
    // With a gate, HAVING's conjuncts it decided are TRUE here (their
    // aggregates may not be revealed); the filters above the aggregate are
    // numbered innermost first, as `having::having_filters` does.
    let decided: &[(usize, usize)] = if plan.gated() {
        &plan.having_decided
    } else {
        &[]
    };
    let mut above = false;
    let mut filter = 0;
    plan.logical
        .clone()
        .transform_up(|node| {
            if matches!(node, LogicalPlan::Aggregate(_)) {
                above = true;
                Ok(Transformed::yes(relabel.clone()))
            } else if let (true, LogicalPlan::Filter(f)) = (above, &node) {
                let mine: Vec<usize> = decided
                    .iter()
                    .filter(|(fi, _)| *fi == filter)
                    .map(|(_, ci)| *ci)
                    .collect();
                filter += 1;
                if mine.is_empty() {
                    return Ok(Transformed::yes(node.recompute_schema()?));
                }
                let predicate = crate::having::without_decided(&f.predicate, &mine);
                Ok(Transformed::yes(LogicalPlan::Filter(
                    datafusion::logical_expr::Filter::try_new(predicate, f.input.clone())?,
                )))
            } else {
                // The nodes above take the revealed columns' schema (an
                // answer left out by a minimum group size is NULL even in
                // a column DataFusion declared non-nullable, as COUNT's).
                Ok(Transformed::yes(node.recompute_schema()?))
            }
        })
        .map(|t| t.data)
        .map_err(internal)
        .and_then(|p| {
            // The filters above the aggregate were numbered as the planner
            // numbered them, or the decided conjuncts would be the wrong ones.
            if !decided.is_empty() && filter != crate::having::having_filters(&plan.logical).len() {
                return Err(PlanError::Internal(
                    "the HAVING filters of the post part do not match the plan's".into(),
                ));
            }
            Ok(p)
        })
}

/// What an output column's noise is, for analysts: the distribution of
/// the noise on the revealed totals behind it and, where it is the same for
/// every row (COUNT, SUM), the half-width of the interval that holds the
/// noise with 95% probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ColumnNoise {
    pub column: String,
    pub distribution: String,
    /// ± this around the answer covers the true (clamped, bounded) value
    /// with probability 95%, for every row.
    pub ci95: Option<f64>,
    pub note: String,
}

/// The noise behind each output column of a DP query (`None` for group
/// columns); empty without DP.
pub fn noise_report(plan: &FederatedPlan) -> Vec<Option<ColumnNoise>> {
    if plan.privacy.is_none() {
        return Vec::new();
    }
    let n = plan.parties.len();
    let describe = |i: Option<usize>| {
        let noise = plan.noise_of(i?)?;
        Some((
            format!(
                "sum of {n} independent {} draws (one per party)",
                noise.noise.describe_units(noise.scale)
            ),
            noise.half_width_value(n),
        ))
    };
    let schema = plan.logical.schema();
    let exprs = output_exprs(&plan.logical);
    (0..schema.fields().len())
        .map(|col| {
            let name = schema.field(col).name().clone();
            let agg = match &exprs {
                Some(exprs) => {
                    let mut inner = exprs.get(col)?;
                    while let Expr::Alias(a) = inner {
                        inner = a.expr.as_ref();
                    }
                    match inner {
                        Expr::Column(c) => plan.aggregates.iter().find(|a| a.field.name() == &c.name),
                        other => {
                            let refs = other.column_refs();
                            if plan.aggregates.iter().any(|a| refs.iter().any(|c| &c.name == a.field.name())) {
                                return Some(ColumnNoise {
                                    column: name,
                                    distribution: "computed from noised aggregates".into(),
                                    ci95: None,
                                    note: "an expression over noised values; see the aggregates it uses".into(),
                                });
                            }
                            None
                        }
                    }
                }
                None => col
                    .checked_sub(plan.groups.columns.len())
                    .and_then(|i| plan.aggregates.get(i)),
            }?;
            let (distribution, ci95, note) = match agg.kind {
                AggKind::CountStar | AggKind::Count => {
                    let (d, w) = describe(agg.count)?;
                    (d, Some(w), "unbiased; may be negative for small groups".to_string())
                }
                AggKind::Sum => {
                    let (d, w) = describe(agg.sum)?;
                    (d, Some(w), "of the clamped values".to_string())
                }
                AggKind::Avg => {
                    let (ds, ws) = describe(agg.sum)?;
                    let (_, wc) = describe(agg.count)?;
                    (
                        format!("noised sum / noised count; the sum's noise: {ds}"),
                        None,
                        format!(
                            "about ±({} + |avg|·{}) / count per row (95% each for sum and count); NULL where the noised count is ≤ 0",
                            fmt_f(ws),
                            fmt_f(wc)
                        ),
                    )
                }
                _ => (
                    "computed from the noised count, sum and sum of squares".to_string(),
                    None,
                    "no closed-form interval; NULL where the noised count is too small".to_string(),
                ),
            };
            Some(ColumnNoise {
                column: name,
                distribution,
                ci95,
                note,
            })
        })
        .collect()
}

fn fmt_f(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// The expressions of the projection that gives the query's output (under
/// any ORDER BY and LIMIT), or `None` if the Aggregate is the output.
fn output_exprs(plan: &LogicalPlan) -> Option<Vec<Expr>> {
    match plan {
        LogicalPlan::Projection(p) => Some(p.expr.clone()),
        LogicalPlan::Sort(s) => output_exprs(&s.input),
        LogicalPlan::Limit(l) => output_exprs(&l.input),
        _ => None,
    }
}

fn pow10(n: u32) -> i128 {
    10i128.pow(n)
}

/// With `noised` totals, a SUM is never NULL (whether a group has values
/// is private) and an AVG or variance is NULL where the noised count is too
/// small to divide by.
pub(crate) fn final_values(
    a: &AggregateOutput,
    groups: &[usize],
    r: &Revealed,
    noised: bool,
) -> Result<ArrayRef, PlanError> {
    let total = |i: usize, g: usize| r.totals.get(i).and_then(|t| t.get(g)).copied();
    let count = |g: usize| match a.count.and_then(|i| total(i, g)) {
        Some(c) => c,
        // A noised SUM reveals no count: never NULL.
        None if noised => 1,
        None => 0,
    };
    let sum = |g: usize| a.sum.and_then(|i| total(i, g)).unwrap_or(0);
    let overflow = |what: &str| {
        PlanError::Invalid(format!(
            "{} of `{}` does not fit its result type {}: the exact total overflows; narrow the query",
            what,
            a.field.name(),
            a.field.data_type()
        ))
    };
    let dt = a.field.data_type().clone();
    match a.kind {
        AggKind::CountStar | AggKind::Count => {
            let mut b = Int64Builder::with_capacity(groups.len());
            for &g in groups {
                b.append_value(i64::try_from(count(g)).map_err(|_| overflow("COUNT"))?);
            }
            Ok(Arc::new(b.finish()))
        }
        AggKind::Sum => match dt {
            DataType::Int64 | DataType::Int32 | DataType::Int16 | DataType::Int8 => {
                let mut b = Int64Builder::with_capacity(groups.len());
                for &g in groups {
                    if count(g) == 0 {
                        b.append_null();
                    } else {
                        b.append_value(i64::try_from(sum(g)).map_err(|_| overflow("SUM"))?);
                    }
                }
                Ok(Arc::new(b.finish()))
            }
            DataType::UInt64 | DataType::UInt32 | DataType::UInt16 | DataType::UInt8 => {
                let mut b = UInt64Builder::with_capacity(groups.len());
                for &g in groups {
                    if count(g) == 0 {
                        b.append_null();
                    } else {
                        b.append_value(u64::try_from(sum(g)).map_err(|_| overflow("SUM"))?);
                    }
                }
                Ok(Arc::new(b.finish()))
            }
            DataType::Decimal128(p, s) => {
                let mut b = Decimal128Builder::with_capacity(groups.len());
                for &g in groups {
                    if count(g) == 0 {
                        b.append_null();
                    } else {
                        let v = rescale(sum(g), a.scale, s).ok_or_else(|| overflow("SUM"))?;
                        if !fits_precision(v, p) {
                            return Err(overflow("SUM"));
                        }
                        b.append_value(v);
                    }
                }
                Ok(Arc::new(
                    b.finish()
                        .with_precision_and_scale(p, s)
                        .map_err(|e| PlanError::Internal(e.to_string()))?,
                ))
            }
            _ => {
                let mut b = Float64Builder::with_capacity(groups.len());
                for &g in groups {
                    if count(g) == 0 {
                        b.append_null();
                    } else {
                        b.append_value(sum(g) as f64 / pow10(a.scale) as f64);
                    }
                }
                Ok(Arc::new(b.finish()))
            }
        },
        AggKind::Avg => match dt {
            DataType::Decimal128(p, s) => {
                // DataFusion: sum * 10^(s_out - s_in) / count, truncated.
                let mut b = Decimal128Builder::with_capacity(groups.len());
                for &g in groups {
                    let n = count(g);
                    if n <= 0 {
                        b.append_null();
                        continue;
                    }
                    let v = rescale(sum(g), a.scale, s).ok_or_else(|| overflow("AVG"))? / n;
                    if !fits_precision(v, p) {
                        return Err(overflow("AVG"));
                    }
                    b.append_value(v);
                }
                Ok(Arc::new(
                    b.finish()
                        .with_precision_and_scale(p, s)
                        .map_err(|e| PlanError::Internal(e.to_string()))?,
                ))
            }
            _ => {
                let mut b = Float64Builder::with_capacity(groups.len());
                for &g in groups {
                    let n = count(g);
                    if n <= 0 {
                        b.append_null();
                    } else {
                        b.append_value(sum(g) as f64 / pow10(a.scale) as f64 / n as f64);
                    }
                }
                Ok(Arc::new(b.finish()))
            }
        },
        AggKind::Min | AggKind::Max => {
            let i = a
                .extreme
                .ok_or_else(|| PlanError::Internal("an extreme without its partial".into()))?;
            let max = a.kind == AggKind::Max;
            // Every value a plan lets through is below 10^18 units; a
            // revealed extreme beyond that (and not NO_VALUE) means a
            // compute party deviated from the protocol: refused, never
            // shown (it does not catch every deviation: see the README).
            let cap = 10i128.pow(crate::plan::SQUARE_DIGITS as u32);
            for &g in groups {
                if let Some(v) = total(i, g) {
                    if v != executor::replicated::NO_VALUE as i128 && v.abs() >= cap {
                        return Err(PlanError::Internal(
                            "a revealed MIN or MAX is outside the range of every value a query lets through: \
                             a compute party did not follow the protocol; nothing is shown"
                                .into(),
                        ));
                    }
                }
            }
            let value = |g: usize| {
                total(i, g).and_then(|v| executor::replicated::min_output(i256::from_i128(v), max))
            };
            match dt {
                DataType::Decimal128(p, s) => {
                    let mut b = Decimal128Builder::with_capacity(groups.len());
                    for &g in groups {
                        match value(g) {
                            None => b.append_null(),
                            Some(v) => {
                                let v =
                                    rescale(v, a.scale, s).ok_or_else(|| overflow("MIN/MAX"))?;
                                if !fits_precision(v, p) {
                                    return Err(overflow("MIN/MAX"));
                                }
                                b.append_value(v);
                            }
                        }
                    }
                    Ok(Arc::new(
                        b.finish()
                            .with_precision_and_scale(p, s)
                            .map_err(|e| PlanError::Internal(e.to_string()))?,
                    ))
                }
                DataType::UInt64 | DataType::UInt32 | DataType::UInt16 | DataType::UInt8 => {
                    let mut b = UInt64Builder::with_capacity(groups.len());
                    for &g in groups {
                        match value(g) {
                            None => b.append_null(),
                            Some(v) => {
                                b.append_value(u64::try_from(v).map_err(|_| overflow("MIN/MAX"))?)
                            }
                        }
                    }
                    Ok(Arc::new(b.finish()))
                }
                // Integers of every width: the value is one of the column's,
                // so it fits; the batch is cast to the output type.
                _ => {
                    let mut b = Int64Builder::with_capacity(groups.len());
                    for &g in groups {
                        match value(g) {
                            None => b.append_null(),
                            Some(v) => {
                                b.append_value(i64::try_from(v).map_err(|_| overflow("MIN/MAX"))?)
                            }
                        }
                    }
                    Ok(Arc::new(b.finish()))
                }
            }
        }
        AggKind::VarSamp | AggKind::VarPop | AggKind::StddevSamp | AggKind::StddevPop => {
            let sq = a
                .sum_squares
                .ok_or_else(|| PlanError::Internal("variance without squares".into()))?;
            let sample = matches!(a.kind, AggKind::VarSamp | AggKind::StddevSamp);
            let root = matches!(a.kind, AggKind::StddevSamp | AggKind::StddevPop);
            let mut b = Float64Builder::with_capacity(groups.len());
            for &g in groups {
                let n = count(g);
                let s2 = sq.total(r, g).ok_or_else(|| {
                    PlanError::Internal("the sum of squares was not revealed".into())
                })?;
                let v = variance(n, sum(g), s2, a.scale, sample);
                match v {
                    Some(v) => b.append_value(if root { v.sqrt() } else { v }),
                    None => b.append_null(),
                }
            }
            Ok(Arc::new(b.finish()))
        }
    }
}

/// Variance from n, S1 = Σx·10^s and S2 = Σx²·10^(2s), exact in 256-bit
/// integers up to the final division: (n·S2 − S1²) / (n·(n−1) or n²) / 10^(2s).
pub fn variance(n: i128, s1: i128, s2: i256, scale: u32, sample: bool) -> Option<f64> {
    if n <= 0 || (sample && n <= 1) {
        return None;
    }
    if n == 1 {
        return Some(0.0);
    }
    let denom = if sample { n * (n - 1) } else { n * n };
    let (n256, s1_256) = (i256::from_i128(n), i256::from_i128(s1));
    let exact = n256
        .checked_mul(s2)
        .and_then(|v| s1_256.checked_mul(s1_256).and_then(|q| v.checked_sub(q)));
    let scale2 = pow10(2 * scale) as f64;
    let v = match exact {
        Some(num) => i256_to_f64(num) / denom as f64 / scale2,
        None => {
            let (n, s1, s2) = (
                n as f64,
                s1 as f64 / pow10(scale) as f64,
                i256_to_f64(s2) / scale2,
            );
            (n * s2 - s1 * s1) / denom as f64
        }
    };
    Some(v.max(0.0))
}

/// The nearest f64 (within an ulp or two) of a 256-bit integer: of its
/// magnitude, then signed (two's complement parts would cancel).
fn i256_to_f64(v: i256) -> f64 {
    let m = v.checked_abs().unwrap_or(i256::MAX);
    let (low, high) = m.to_parts();
    let f = high as f64 * 2f64.powi(128) + low as f64;
    if v.is_negative() {
        -f
    } else {
        f
    }
}

fn rescale(v: i128, from: u32, to: i8) -> Option<i128> {
    let to = to.max(0) as u32;
    if to >= from {
        v.checked_mul(pow10(to - from))
    } else {
        Some(v / pow10(from - to))
    }
}

fn fits_precision(v: i128, p: u8) -> bool {
    // 10^38 still fits u128: a total of 38 digits or more is refused too.
    v.unsigned_abs() < 10u128.pow(p.min(38) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variance_matches_the_textbook_formula() {
        // x = 1, 2, 3, 4 at scale 0: mean 2.5, var_pop 1.25, var_samp 5/3.
        let w = i256::from_i128;
        assert_eq!(variance(4, 10, w(30), 0, false), Some(1.25));
        let v = variance(4, 10, w(30), 0, true).unwrap();
        assert!((v - 5.0 / 3.0).abs() < 1e-15);
        // The same at scale 2: S1 = 1000, S2 = Σ(100x)² = 300000.
        assert_eq!(variance(4, 1000, w(300_000), 2, false), Some(1.25));
        assert_eq!(variance(1, 5, w(25), 0, true), None);
        assert_eq!(variance(1, 5, w(25), 0, false), Some(0.0));
        assert_eq!(variance(0, 0, w(0), 0, false), None);
        // Squares beyond 128 bits (limbs combined): x = ±10^18 − 1, twice
        // each, at scale 0: mean 0, var_pop = (10^18 − 1)².
        let x = 10i128.pow(18) - 1;
        let s2 = w(x).checked_mul(w(x)).unwrap().checked_mul(w(4)).unwrap();
        let v = variance(4, 0, s2, 0, false).unwrap();
        assert!((v / (x as f64 * x as f64) - 1.0).abs() < 1e-12, "{v}");
    }
}
