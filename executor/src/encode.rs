//! Local partials → dense per-group integers → ring elements.
//!
//! The local engine returns one row per group a party has, with counts as
//! Int64 and sums as Decimal128 (integers at the partial's scale). These are
//! spread over the whole public domain (zero where the party has no rows) as
//! exact i128 values, then encoded into the ring within the party bound.

use arrow::array::{Array, ArrayRef, Decimal128Array, Int64Array, RecordBatch};
use arrow::datatypes::i256;

use crate::groups::GroupIndex;
use crate::ring;
use crate::shares::{ShareColumn, Width};
use crate::ExecError;

/// A party's local result spread over the public domain.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    /// `values[partial][group]`.
    pub values: Vec<Vec<i128>>,
    /// Local groups whose key is outside the declared domain, left out (see
    /// `GroupIndex::lookup`). For the party's own log only: it depends on
    /// the party's rows and is never sent.
    pub outside: usize,
}

/// How a partial's local values combine within a group: summed (counts,
/// sums; zero where the party has no rows), or the least or greatest
/// (`i128::MAX` or `i128::MIN` where it has no value: see
/// [`crate::replicated::min_input`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    Sum,
    Min,
    Max,
}

impl Fold {
    fn empty(self) -> i128 {
        match self {
            Fold::Sum => 0,
            Fold::Min => i128::MAX,
            Fold::Max => i128::MIN,
        }
    }
}

/// Spreads the local result over the domain. `batches` hold the group key
/// columns first, then one column per partial, combined as `folds` says.
pub fn dense_partials(
    batches: &[RecordBatch],
    index: &GroupIndex,
    folds: &[Fold],
) -> Result<Dense, ExecError> {
    let nkeys = index.keys().len();
    let npartials = folds.len();
    let mut out: Vec<Vec<i128>> = folds.iter().map(|f| vec![f.empty(); index.len()]).collect();
    let mut outside = 0;
    for b in batches {
        if b.num_columns() != nkeys + npartials {
            return Err(ExecError::Encode(format!(
                "local result has {} columns, expected {}",
                b.num_columns(),
                nkeys + npartials
            )));
        }
        let keys: Vec<ArrayRef> = b.columns()[..nkeys].to_vec();
        let pos = index.lookup(&keys, b.num_rows())?;
        outside += pos.iter().filter(|p| p.is_none()).count();
        for (k, dst) in out.iter_mut().enumerate() {
            let col = b.column(nkeys + k);
            let fold = folds[k];
            let add = |dst: &mut Vec<i128>, g: usize, v: i128| -> Result<(), ExecError> {
                dst[g] = match fold {
                    Fold::Sum => dst[g].checked_add(v).ok_or_else(|| {
                        ExecError::Encode("a local partial overflows 128 bits".into())
                    })?,
                    Fold::Min => dst[g].min(v),
                    Fold::Max => dst[g].max(v),
                };
                Ok(())
            };
            if let Some(a) = col.as_any().downcast_ref::<Int64Array>() {
                for (row, g) in pos.iter().enumerate() {
                    if let (Some(g), true) = (*g, a.is_valid(row)) {
                        add(dst, g, a.value(row) as i128)?;
                    }
                }
            } else if let Some(a) = col.as_any().downcast_ref::<Decimal128Array>() {
                for (row, g) in pos.iter().enumerate() {
                    if let (Some(g), true) = (*g, a.is_valid(row)) {
                        add(dst, g, a.value(row))?;
                    }
                }
            } else {
                return Err(ExecError::Encode(format!(
                    "local partial column {k} has type {}, expected Int64 or Decimal128",
                    col.data_type()
                )));
            }
        }
    }
    Ok(Dense {
        values: out,
        outside,
    })
}

/// True if a 128-bit sum of `count` terms each at most `cap` in magnitude
/// cannot have wrapped.
pub fn sum_cannot_wrap(count: i128, cap: u128) -> bool {
    match cap.checked_mul(count.max(0) as u128) {
        Some(total) => total < (1u128 << 127),
        None => false,
    }
}

/// A partial that does not fit the ring: which one, which group, how big.
#[derive(Debug, Clone, PartialEq)]
pub struct OutOfRange {
    pub partial: usize,
    pub group: usize,
    pub value: i256,
    pub bound: i256,
}

/// Encodes dense partials into ring elements of the given widths, each
/// within the party bound so that the sum over all parties cannot wrap.
pub fn to_ring(
    values: &[Vec<i256>],
    widths: &[Width],
    parties: usize,
) -> Result<Vec<ShareColumn>, OutOfRange> {
    let w = i256::from_i128;
    values
        .iter()
        .zip(widths)
        .enumerate()
        .map(|(k, (col, width))| {
            let bound = match width {
                Width::Z64 => w(ring::party_bound(parties)),
                Width::Z128 => w(ring::party_bound_wide(parties)),
                Width::Z256 => ring::party_bound_256(parties),
            };
            let out_of_range = |g: usize, v: i256| OutOfRange {
                partial: k,
                group: g,
                value: v,
                bound,
            };
            // Within the bound, the value fits the width's signed range.
            let narrow = |g: usize, v: i256| -> Result<i128, OutOfRange> {
                match v.to_i128() {
                    Some(x) if v.checked_abs().is_some_and(|a| a <= bound) => Ok(x),
                    _ => Err(out_of_range(g, v)),
                }
            };
            match width {
                Width::Z64 => col
                    .iter()
                    .enumerate()
                    .map(|(g, &v)| {
                        let x = narrow(g, v)?;
                        ring::encode(x, ring::party_bound(parties)).ok_or(out_of_range(g, v))
                    })
                    .collect::<Result<Vec<u64>, _>>()
                    .map(ShareColumn::Z64),
                Width::Z128 => {
                    let mut lo = Vec::with_capacity(col.len());
                    let mut hi = Vec::with_capacity(col.len());
                    for (g, &v) in col.iter().enumerate() {
                        let x = narrow(g, v)?;
                        let (l, h) = ring::encode_wide(x, ring::party_bound_wide(parties))
                            .ok_or(out_of_range(g, v))?;
                        lo.push(l);
                        hi.push(h);
                    }
                    Ok(ShareColumn::Z128 { lo, hi })
                }
                Width::Z256 => {
                    let mut limbs: [Vec<u64>; 4] = Default::default();
                    for (g, &v) in col.iter().enumerate() {
                        let l = ring::encode_256(v, bound).ok_or(out_of_range(g, v))?;
                        for (k, x) in l.into_iter().enumerate() {
                            limbs[k].push(x);
                        }
                    }
                    Ok(ShareColumn::Z256(limbs))
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[test]
    fn spreads_over_the_domain_with_zeros() {
        let dom: ArrayRef = Arc::new(StringArray::from(vec![Some("F"), Some("M"), None]));
        let idx = GroupIndex::new(vec![dom]).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
            Field::new("s", DataType::Decimal128(38, 2), true),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![Some("M"), Some("X")])),
                Arc::new(Int64Array::from(vec![3, 4])),
                Arc::new(
                    Decimal128Array::from(vec![-1250i128, 7])
                        .with_precision_and_scale(38, 2)
                        .unwrap(),
                ),
            ],
        )
        .unwrap();
        let d = dense_partials(&[b], &idx, &[Fold::Sum, Fold::Sum]).unwrap();
        assert_eq!(d.values, vec![vec![0, 3, 0], vec![0, -1250, 0]]);
        assert_eq!(d.outside, 1, "the undeclared key X is left out and counted");
        assert!(!sum_cannot_wrap(1 << 20, 1 << 120));
        assert!(sum_cannot_wrap(1 << 20, 1 << 100));
        assert!(!sum_cannot_wrap(1 << 63, 1 << 64));
        let e = to_ring(&[vec![i256::from_i128(i64::MAX as i128)]], &[Width::Z64], 2).unwrap_err();
        assert_eq!(e.partial, 0);
    }

    #[test]
    fn extremes_keep_the_least_or_greatest_and_mark_absence() {
        let dom: ArrayRef = Arc::new(StringArray::from(vec![Some("F"), Some("M"), None]));
        let idx = GroupIndex::new(vec![dom]).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new("lo", DataType::Int64, true),
            Field::new("hi", DataType::Int64, true),
        ]));
        // M appears twice (as two batches of one source could give it) and
        // F's value is NULL.
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![Some("M"), Some("F"), Some("M")])),
                Arc::new(Int64Array::from(vec![Some(4), None, Some(-2)])),
                Arc::new(Int64Array::from(vec![Some(4), None, Some(-2)])),
            ],
        )
        .unwrap();
        let d = dense_partials(&[b], &idx, &[Fold::Min, Fold::Max]).unwrap();
        assert_eq!(
            d.values,
            vec![
                vec![i128::MAX, -2, i128::MAX],
                vec![i128::MIN, 4, i128::MIN]
            ]
        );
    }
}
