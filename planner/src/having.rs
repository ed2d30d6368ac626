//! HAVING in shares (issue 13): the conjuncts of a HAVING clause that
//! compare one COUNT or SUM with a constant (`HAVING COUNT(*) >= 20`,
//! `HAVING SUM(cost) > 1e6`, `HAVING 5 < COUNT(x)`) become conditions of the
//! plan's gate ([`executor::gate`]): each party puts its own partial (or
//! its negation, for an upper bound) into a column, the compute parties
//! compare the column's total with a public bound, and only whether a
//! group meets all of them is revealed. A group that fails reveals nothing:
//! not its totals, not its count, not that it came close.
//!
//! The bound is found so that it decides exactly as DataFusion's own HAVING
//! would on the revealed value: the conjunct, as DataFusion analysed it
//! (with its casts, say a decimal SUM compared with a float as a float), is
//! evaluated by DataFusion on candidate totals turned into the aggregate's
//! value as [`crate::finalize`] turns a revealed total, and the least total
//! for which it holds is found by bisection. That is sound because such a
//! conjunct is monotone in the total: one side is the aggregate under
//! casts only (each monotone), the other a constant. Anything else (AVG,
//! an expression of two aggregates, OR, `<>`) stays where it was, on the
//! revealed values at the result party, and EXPLAIN says so.
//!
//! The leader's post part still evaluates the whole HAVING on the revealed
//! values of the groups that passed, where the conjuncts in shares hold by
//! construction.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray};
use datafusion::arrow::datatypes::Schema;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{Column, DFSchema};
use datafusion::logical_expr::execution_props::ExecutionProps;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlan, Operator};
use datafusion::physical_expr::PhysicalExpr;

use crate::finalize::{final_values, Revealed};
use crate::plan::{AggKind, FederatedPlan};

/// The largest total a gate decides exactly: every party's value within
/// [`executor::gate::EXACT_BOUND`] = 2^53, and at most 16 input parties. A
/// party's value beyond it is input as [`executor::gate::FORCED_PASS`]
/// (the condition passes and the post part decides on the revealed value).
pub const TOTAL_BOUND: i64 = 16 * executor::gate::EXACT_BOUND as i64;

/// At most this many conditions in shares per query; further conjuncts
/// are left to the post part.
pub const MAX_CONDITIONS: usize = 16;

/// One HAVING conjunct (or half of an equality) decided in shares: the
/// total of `partial` (negated if `negate`) is at least `at_least`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedCondition {
    pub partial: usize,
    pub negate: bool,
    pub at_least: i64,
    /// What it stands for, for EXPLAIN.
    pub text: String,
    /// Where it stands: the HAVING filter (innermost first) and the
    /// conjunct within it.
    pub at: (usize, usize),
    /// The aggregate output it compares.
    pub column: String,
}

/// The conditions in shares of `analyzed`'s HAVING (DataFusion's analysed
/// plan of the query, whose aggregate outputs are `plan.aggregates`), and
/// the conjuncts left to the post part, as text.
pub(crate) fn shared_conditions(
    plan: &FederatedPlan,
    analyzed: &LogicalPlan,
) -> (Vec<SharedCondition>, Vec<String>) {
    let mut shared = Vec::new();
    let mut left = Vec::new();
    for (fi, (pred, schema)) in having_filters(analyzed).into_iter().enumerate() {
        for (ci, conjunct) in split_conjunction(pred).into_iter().enumerate() {
            // Bounded: each condition is a gate column and some hundred
            // evaluations to find its bound.
            if shared.len() >= MAX_CONDITIONS {
                left.push(conjunct.to_string());
                continue;
            }
            match condition(plan, conjunct, schema) {
                Some(mut c) => {
                    for mut x in c.drain(..) {
                        x.at = (fi, ci);
                        // One gate column per distinct condition (two
                        // bounds on one SUM need its "not NULL" once).
                        let same = |y: &SharedCondition| {
                            (y.partial, y.negate, y.at_least) == (x.partial, x.negate, x.at_least)
                        };
                        if !shared.iter().any(same) {
                            shared.push(x);
                        }
                    }
                }
                None => left.push(conjunct.to_string()),
            }
        }
    }
    (shared, left)
}

/// The HAVING filters above the aggregate, each with its input's schema.
pub(crate) fn having_filters(plan: &LogicalPlan) -> Vec<(&Expr, &DFSchema)> {
    match plan {
        LogicalPlan::Projection(p) => having_filters(&p.input),
        LogicalPlan::Sort(s) => having_filters(&s.input),
        LogicalPlan::Limit(l) => having_filters(&l.input),
        LogicalPlan::Filter(f) => {
            let mut v = having_filters(&f.input);
            v.push((&f.predicate, f.input.schema().as_ref()));
            v
        }
        _ => Vec::new(),
    }
}

/// The aggregate column under casts to numbers only, each monotone where
/// it gives a value (a narrowing CAST that fails makes the evaluation fail,
/// and the conjunct stays in the post part). Not TRY_CAST, which gives
/// NULL beyond a narrow type's range and so is not monotone; not a cast to
/// text, which compares lexicographically.
fn aggregate_column(e: &Expr) -> Option<&Column> {
    match e {
        Expr::Column(c) => Some(c),
        Expr::Cast(c) if c.field.data_type().is_numeric() => aggregate_column(&c.expr),
        _ => None,
    }
}

/// A constant: literals under casts and arithmetic, no column.
fn constant(e: &Expr) -> bool {
    match e {
        Expr::Literal(..) => true,
        Expr::Cast(c) => constant(&c.expr),
        Expr::TryCast(c) => constant(&c.expr),
        Expr::Negative(x) => constant(x),
        _ => false,
    }
}

/// The conditions of one conjunct, or `None` if it is not of the form.
fn condition(plan: &FederatedPlan, e: &Expr, schema: &DFSchema) -> Option<Vec<SharedCondition>> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = e else {
        return None;
    };
    // The aggregate on the left.
    let (col, op, agg_side, other) = match (aggregate_column(left), aggregate_column(right)) {
        (Some(c), None) if constant(right) => (c, *op, left.as_ref(), right.as_ref()),
        (None, Some(c)) if constant(left) => (c, op.swap()?, right.as_ref(), left.as_ref()),
        _ => return None,
    };
    let a = plan
        .aggregates
        .iter()
        .find(|a| a.field.name() == &col.name)?;
    let (partial, has_value) = match a.kind {
        AggKind::CountStar | AggKind::Count => (a.count?, None),
        // A SUM over no value is NULL, and NULL compares as false.
        AggKind::Sum => (a.sum?, Some(a.count?)),
        _ => return None,
    };
    let (_, field) = schema.qualified_field_from_column(col).ok()?;
    let one = DFSchema::new_with_metadata(
        vec![(col.relation.clone(), field.clone())],
        Default::default(),
    )
    .ok()?;
    let arrow_schema = Arc::new(Schema::new(vec![field.clone()]));
    // P(S): whether the conjunct, with `op`, holds where the total is S.
    let physical = |op: Operator| {
        let expr = Expr::BinaryExpr(BinaryExpr::new(
            Box::new(agg_side.clone()),
            op,
            Box::new(other.clone()),
        ));
        datafusion::physical_expr::create_physical_expr(
            &expr,
            &one,
            &ExecutionProps::new(),
            &PhysicalPlanningContext::default(),
        )
        .ok()
    };
    let holds = |phys: &Arc<dyn PhysicalExpr>, s: i64| -> Option<bool> {
        let mut totals = vec![Vec::new(); plan.local.partials.len()];
        totals[partial] = vec![s as i128];
        if let Some(c) = has_value {
            totals[c] = vec![1];
        }
        let revealed = Revealed {
            totals,
            wide: Default::default(),
            passing: None,
        };
        let value: ArrayRef = final_values(a, &[0], &revealed, false).ok()?;
        let value = datafusion::arrow::compute::cast(&value, field.data_type()).ok()?;
        let batch = RecordBatch::try_new(arrow_schema.clone(), vec![value]).ok()?;
        let out = phys.evaluate(&batch).ok()?.into_array(1).ok()?;
        let b = out.as_any().downcast_ref::<BooleanArray>()?;
        // NULL for some total (a cast that gives NULL, a NULL constant):
        // not a monotone comparison; the post part decides.
        b.is_valid(0).then(|| b.value(0))
    };
    let text = e.to_string();
    let mut out = Vec::new();
    let halves: &[(Operator, bool)] = match op {
        Operator::Gt | Operator::GtEq => &[(op, false)],
        Operator::Lt | Operator::LtEq => &[(op, true)],
        Operator::Eq => &[(Operator::GtEq, false), (Operator::LtEq, true)],
        _ => return None,
    };
    for &(op, negate) in halves {
        let phys = physical(op)?;
        let at_least = bound(|s| holds(&phys, s), negate)?;
        out.push(SharedCondition {
            partial,
            negate,
            at_least,
            text: text.clone(),
            at: (0, 0),
            column: col.name.clone(),
        });
    }
    if let Some(c) = has_value {
        out.push(SharedCondition {
            partial: c,
            negate: false,
            at_least: 1,
            text: format!("{} is not NULL", col.name),
            at: (0, 0),
            column: col.name.clone(),
        });
    }
    Some(out)
}

/// The bound of a monotone predicate over totals in ±[`TOTAL_BOUND`]:
/// rising (`negate` false), the least S for which it holds (the condition
/// is S ≥ it); falling, the negated greatest (the condition is −S ≥ it).
/// A bound beyond every total stands for "never", one below for "always".
/// `None` if the predicate cannot be evaluated, or is not monotone where
/// it is checked.
fn bound(p: impl Fn(i64) -> Option<bool>, negate: bool) -> Option<i64> {
    let m = TOTAL_BOUND;
    // In the negated view q(t) = p(−t) rises with t.
    let q = |t: i64| p(if negate { -t } else { t });
    let t = if !q(m)? {
        m + 1
    } else if q(-m)? {
        -m
    } else {
        let (mut lo, mut hi) = (-m, m);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if q(mid)? {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi
    };
    // Monotone where it is checked: false below the bound, true from it.
    for k in 0..62 {
        for probe in [t.saturating_sub(1 << k), t.saturating_add(1 << k) - 1] {
            if (-m..=m).contains(&probe) && q(probe)? != (probe >= t) {
                return None;
            }
        }
    }
    Some(t)
}

/// The conjuncts of `logical`'s HAVING (the query's own plan, which the
/// post part runs) that the gate decides, as (filter, conjunct): each one
/// checked to compare the same aggregate there as in the analysed plan the
/// conditions came from, or none is dropped. With a gate the post part
/// replaces them by TRUE, so that an aggregate they alone use need not be
/// revealed (`FederatedPlan::revealed_aggregate`).
///
/// Only conjuncts over counts, and only with GROUP BY: a SUM's condition passes in the gate where
/// a party's value is beyond the gate's exact range
/// ([`executor::gate::FORCED_PASS`]), and then the post part must decide it
/// on the revealed SUM. A count never leaves that range.
pub(crate) fn decided_conjuncts(
    plan: &FederatedPlan,
    conditions: &[SharedCondition],
    logical: &LogicalPlan,
) -> Vec<(usize, usize)> {
    // Without GROUP BY a failing gate leaves one row of NULLs (a minimum
    // group size's answer), which only the post part's HAVING removes.
    if !plan.grouped {
        return Vec::new();
    }
    let filters = having_filters(logical);
    let mut out: Vec<(usize, usize)> = Vec::new();
    let on_sum = |at: (usize, usize)| {
        conditions.iter().any(|c| {
            c.at == at
                && !matches!(
                    plan.local.partials[c.partial].kind,
                    crate::PartialKind::RowCount | crate::PartialKind::Count
                )
        })
    };
    for c in conditions {
        if on_sum(c.at) {
            continue;
        }
        let (fi, ci) = c.at;
        let Some(conjunct) = filters
            .get(fi)
            .and_then(|(p, _)| split_conjunction(p).get(ci).copied())
        else {
            return Vec::new();
        };
        if !conjunct.column_refs().iter().all(|r| r.name == c.column) {
            return Vec::new();
        }
        if !out.contains(&c.at) {
            out.push(c.at);
        }
    }
    out
}

/// The column names referenced above the aggregate of `logical`, but for
/// the `decided` conjuncts.
pub(crate) fn referenced_above(logical: &LogicalPlan, decided: &[(usize, usize)]) -> Vec<String> {
    let mut names = Vec::new();
    let mut stack = vec![logical];
    while let Some(node) = stack.pop() {
        let exprs: Vec<&Expr> = match node {
            LogicalPlan::Projection(p) => {
                stack.push(&p.input);
                p.expr.iter().collect()
            }
            LogicalPlan::Sort(s) => {
                stack.push(&s.input);
                s.expr.iter().map(|e| &e.expr).collect()
            }
            LogicalPlan::Limit(l) => {
                stack.push(&l.input);
                Vec::new()
            }
            LogicalPlan::Filter(f) => {
                stack.push(&f.input);
                Vec::new()
            }
            _ => Vec::new(),
        };
        for e in exprs {
            names.extend(e.column_refs().into_iter().map(|c| c.name.clone()));
        }
    }
    // The filters, innermost first as `having_filters` numbers them.
    for (fi, (pred, _)) in having_filters(logical).into_iter().enumerate() {
        for (ci, conjunct) in split_conjunction(pred).into_iter().enumerate() {
            if !decided.contains(&(fi, ci)) {
                names.extend(conjunct.column_refs().into_iter().map(|c| c.name.clone()));
            }
        }
    }
    names
}

/// `predicate` with the conjuncts at `decided` (of this filter) replaced
/// by TRUE.
pub(crate) fn without_decided(predicate: &Expr, decided: &[usize]) -> Expr {
    let kept: Vec<Expr> = split_conjunction(predicate)
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            if decided.contains(&i) {
                datafusion::logical_expr::lit(true)
            } else {
                e.clone()
            }
        })
        .collect();
    datafusion::logical_expr::utils::conjunction(kept)
        .unwrap_or_else(|| datafusion::logical_expr::lit(true))
}
