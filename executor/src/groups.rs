//! The public companion of a share batch: the group keys, and the map from a
//! party's local group keys to positions in the public domain.

use std::collections::HashMap;

use arrow::array::ArrayRef;
use arrow::compute::cast;
use arrow::row::{RowConverter, SortField};

use crate::ExecError;

/// Maps group keys to their index in the public group domain.
pub struct GroupIndex {
    keys: Vec<ArrayRef>,
    converter: Option<RowConverter>,
    index: HashMap<Box<[u8]>, usize>,
    len: usize,
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
                len: 1,
            });
        }
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
        let Some(converter) = &self.converter else {
            return Ok(vec![Some(0); rows]);
        };
        if columns.len() != self.keys.len() {
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
    use arrow::array::{Int32Array, Int64Array, StringArray};
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
}
