//! The public companion of a share batch: the group keys, and the map from a
//! party's local group keys to positions in the public domain.

use std::collections::HashMap;

use arrow::array::{Array, ArrayRef, Int64Array};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::row::{RowConverter, SortField};

use crate::ExecError;

/// Maps group keys to their index in the public group domain.
pub struct GroupIndex {
    keys: Vec<ArrayRef>,
    converter: Option<RowConverter>,
    index: HashMap<Box<[u8]>, usize>,
    /// One integer column whose declared values are consecutive (a
    /// `{ min, max }` range): a key's index is arithmetic, not a hash
    /// lookup, and nothing is built per value of the domain.
    range: Option<IntRange>,
    len: usize,
}

/// The domain `first, first + 1, …, first + count − 1` in index order at
/// positions `at..at + count`, and NULL (if declared) at `null`.
#[derive(Debug, Clone, Copy)]
struct IntRange {
    first: i64,
    count: usize,
    at: usize,
    null: Option<usize>,
}

impl IntRange {
    /// The range `keys` is, if it is one: a single Int64 column of
    /// consecutive values, with at most one NULL before or after them.
    fn of(keys: &[ArrayRef]) -> Option<IntRange> {
        let [k] = keys else { return None };
        if k.data_type() != &DataType::Int64 {
            return None;
        }
        let ints = k.as_any().downcast_ref::<Int64Array>()?;
        let n = ints.len();
        let nulls = ints.null_count();
        let null = match nulls {
            0 => None,
            1 if ints.is_null(0) => Some(0),
            1 if ints.is_null(n - 1) => Some(n - 1),
            _ => return None,
        };
        let at = usize::from(null == Some(0));
        let count = n - nulls;
        if count == 0 {
            return None;
        }
        let first = ints.value(at);
        for i in 0..count {
            if first.checked_add(i as i64) != Some(ints.value(at + i)) {
                return None;
            }
        }
        Some(IntRange {
            first,
            count,
            at,
            null,
        })
    }

    fn index(&self, key: Option<i64>) -> Option<usize> {
        match key {
            None => self.null,
            Some(v) => {
                let off = v.checked_sub(self.first)?;
                (0..self.count as i64)
                    .contains(&off)
                    .then(|| self.at + off as usize)
            }
        }
    }
}

impl GroupIndex {
    /// `keys`: one array per group column, the whole domain in index order.
    /// No key columns means a single group (a query without GROUP BY).
    pub fn new(keys: Vec<ArrayRef>) -> Result<Self, ExecError> {
        if keys.is_empty() {
            return Ok(GroupIndex {
                keys,
                converter: None,
                index: HashMap::new(),
                range: None,
                len: 1,
            });
        }
        let len = keys[0].len();
        if let Some(range) = IntRange::of(&keys) {
            return Ok(GroupIndex {
                keys,
                converter: None,
                index: HashMap::new(),
                range: Some(range),
                len,
            });
        }
        Self::hashed(keys)
    }

    /// The general index: every domain key's row encoding, hashed.
    fn hashed(keys: Vec<ArrayRef>) -> Result<Self, ExecError> {
        let len = keys[0].len();
        let fields = keys
            .iter()
            .map(|k| SortField::new(k.data_type().clone()))
            .collect();
        let converter = RowConverter::new(fields).map_err(|e| ExecError::Encode(e.to_string()))?;
        let rows = converter
            .convert_columns(&keys)
            .map_err(|e| ExecError::Encode(e.to_string()))?;
        let mut index = HashMap::with_capacity(len);
        for (i, r) in rows.iter().enumerate() {
            if index
                .insert(r.as_ref().to_vec().into_boxed_slice(), i)
                .is_some()
            {
                return Err(ExecError::Encode(
                    "the group domain lists a key twice".into(),
                ));
            }
        }
        Ok(GroupIndex {
            keys,
            converter: Some(converter),
            index,
            range: None,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn keys(&self) -> &[ArrayRef] {
        &self.keys
    }

    /// Domain index of every row of `columns` (local group keys); `None` for
    /// a row whose key is outside the declared domain.
    ///
    /// Such a row is left out of the query rather than failing it: an abort
    /// would tell the analyst (and every party) whether one row with an
    /// undeclared key matched the query, which a filter on anything can make
    /// into a bit about one person. The catalog's domain is the contract of
    /// what may be grouped by; the answer is over the rows that keep it, the
    /// same as plaintext SQL with `WHERE key IN (domain)`. The party's own
    /// operator log says how many rows were left out (see `Dense::outside`).
    /// A key that does not convert to the domain's type (an integer too
    /// large for it) is outside too, never taken for NULL.
    pub fn lookup(
        &self,
        columns: &[ArrayRef],
        rows: usize,
    ) -> Result<Vec<Option<usize>>, ExecError> {
        if columns.len() != self.keys.len() && !self.keys.is_empty() {
            return Err(ExecError::Encode(format!(
                "expected {} group columns, got {}",
                self.keys.len(),
                columns.len()
            )));
        }
        let cast_cols = columns
            .iter()
            .zip(&self.keys)
            .map(|(c, k)| {
                if c.data_type() == k.data_type() {
                    Ok(c.clone())
                } else {
                    cast(c, k.data_type())
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ExecError::Encode(e.to_string()))?;
        if let (Some(range), [c], [cast]) = (&self.range, columns, cast_cols.as_slice()) {
            let ints = cast
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(|| ExecError::Encode("a range key is not Int64".into()))?;
            // A key that did not convert (NULL after the cast only) is
            // outside, as below.
            return Ok((0..ints.len())
                .map(|row| match (c.is_null(row), ints.is_valid(row)) {
                    (true, _) => range.index(None),
                    (false, true) => range.index(Some(ints.value(row))),
                    (false, false) => None,
                })
                .collect());
        }
        let Some(converter) = &self.converter else {
            return Ok(vec![Some(0); rows]);
        };
        let local = converter
            .convert_columns(&cast_cols)
            .map_err(|e| ExecError::Encode(e.to_string()))?;
        let mut out = Vec::with_capacity(rows);
        for (row, r) in local.iter().enumerate() {
            let converted = columns
                .iter()
                .zip(&cast_cols)
                .all(|(c, k)| c.is_null(row) || k.is_valid(row));
            out.push(if converted {
                self.index.get(r.as_ref()).copied()
            } else {
                None
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int32Array, Int64Array, StringArray, UInt64Array};
    use std::sync::Arc;

    #[test]
    fn maps_keys_and_leaves_out_undeclared_ones() {
        let dom: ArrayRef = Arc::new(StringArray::from(vec![Some("F"), Some("M"), None]));
        let idx = GroupIndex::new(vec![dom]).unwrap();
        let local: ArrayRef = Arc::new(StringArray::from(vec![None, Some("M"), Some("X")]));
        assert_eq!(
            idx.lookup(&[local], 3).unwrap(),
            vec![Some(2), Some(1), None]
        );
    }

    #[test]
    fn a_key_that_does_not_convert_is_outside_not_null() {
        // Domain of Int32 with NULL; a local Int64 too large for Int32 would
        // cast to NULL and land in the NULL group if not caught.
        let dom: ArrayRef = Arc::new(Int32Array::from(vec![Some(1), None]));
        let idx = GroupIndex::new(vec![dom]).unwrap();
        let local: ArrayRef = Arc::new(Int64Array::from(vec![Some(1), Some(1 << 40), None]));
        assert_eq!(
            idx.lookup(&[local], 3).unwrap(),
            vec![Some(0), None, Some(1)]
        );
    }

    #[test]
    fn a_range_domain_maps_by_arithmetic_as_a_listed_one_would() {
        // NULL after the values (the planner's order), before them, or not
        // declared; values near the ends of i64 do not overflow.
        for (first, count, null_at) in [
            (0i64, 1000usize, Some("end")),
            (-5, 10, Some("start")),
            (7, 3, None),
            (i64::MAX - 4, 5, Some("end")),
            (i64::MIN, 4, None),
        ] {
            let mut dom: Vec<Option<i64>> = (0..count as i64).map(|i| Some(first + i)).collect();
            match null_at {
                Some("end") => dom.push(None),
                Some(_) => dom.insert(0, None),
                None => {}
            }
            let keys: ArrayRef = Arc::new(Int64Array::from(dom.clone()));
            let idx = GroupIndex::new(vec![keys]).unwrap();
            assert!(idx.range.is_some(), "{first} {count} {null_at:?}");
            let mut local: Vec<Option<i64>> = vec![
                None,
                Some(first),
                Some(first.wrapping_add(count as i64 - 1)),
                Some(first.wrapping_sub(1)),
                Some(first.wrapping_add(count as i64)),
                Some(i64::MIN),
                Some(i64::MAX),
            ];
            local.extend((0..50).map(|i| Some(first.wrapping_add(i * 37 % 1100))));
            let want: Vec<Option<usize>> = local
                .iter()
                .map(|k| dom.iter().position(|d| d == k))
                .collect();
            let col: ArrayRef = Arc::new(Int64Array::from(local.clone()));
            assert_eq!(idx.lookup(&[col.clone()], local.len()).unwrap(), want);
            // The same as the general index, for keys of any type.
            let keys: ArrayRef = Arc::new(Int64Array::from(dom.clone()));
            let general = GroupIndex::hashed(vec![keys]).unwrap();
            assert!(general.range.is_none());
            let unsigned: ArrayRef = Arc::new(UInt64Array::from(vec![
                Some(first as u64),
                Some(u64::MAX),
                None,
                Some((i64::MAX as u64) + 1),
            ]));
            let narrow: ArrayRef =
                Arc::new(Int32Array::from(vec![Some(0), Some(-5), None, Some(7)]));
            let float: ArrayRef = Arc::new(Float64Array::from(vec![
                Some(first as f64),
                Some(0.5),
                None,
            ]));
            for c in [col, unsigned, narrow, float] {
                assert_eq!(
                    idx.lookup(&[c.clone()], c.len()).unwrap(),
                    general.lookup(&[c.clone()], c.len()).unwrap(),
                    "{c:?}"
                );
            }
        }
        // Not consecutive, two NULLs, or another type: the general index.
        let keys: ArrayRef = Arc::new(Int64Array::from(vec![Some(1), Some(3)]));
        assert!(GroupIndex::new(vec![keys]).unwrap().range.is_none());
        let keys: ArrayRef = Arc::new(Int64Array::from(vec![None, Some(1), None]));
        assert!(GroupIndex::new(vec![keys]).is_err(), "NULL listed twice");
        let keys: ArrayRef = Arc::new(Int32Array::from(vec![1, 2]));
        assert!(GroupIndex::new(vec![keys]).unwrap().range.is_none());
        // A local key that does not convert is outside, not NULL.
        let keys: ArrayRef = Arc::new(Int64Array::from(vec![Some(0), Some(1), None]));
        let idx = GroupIndex::new(vec![keys]).unwrap();
        let local: ArrayRef = Arc::new(StringArray::from(vec![Some("1"), Some("x"), None]));
        assert_eq!(
            idx.lookup(&[local], 3).unwrap(),
            vec![Some(1), None, Some(2)]
        );
    }
}
