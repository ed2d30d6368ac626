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

    /// Domain index of every row of `columns` (local group keys). A key
    /// outside the declared domain is an error naming the value: silently
    /// dropping it would give a wrong answer, revealing it would leak.
    pub fn lookup(&self, columns: &[ArrayRef], rows: usize) -> Result<Vec<usize>, ExecError> {
        let Some(converter) = &self.converter else {
            return Ok(vec![0; rows]);
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
            match self.index.get(r.as_ref()) {
                Some(&i) => out.push(i),
                None => {
                    let shown: Vec<String> = cast_cols
                        .iter()
                        .map(|c| {
                            arrow::util::display::array_value_to_string(c, row)
                                .unwrap_or_else(|_| "?".into())
                        })
                        .collect();
                    return Err(ExecError::Encode(format!(
                        "local data has group key ({}) outside the declared public domain; add it to the \
                         catalog's domain or fix the data",
                        shown.join(", ")
                    )));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use std::sync::Arc;

    #[test]
    fn maps_keys_and_refuses_undeclared_ones() {
        let dom: ArrayRef = Arc::new(StringArray::from(vec![Some("F"), Some("M"), None]));
        let idx = GroupIndex::new(vec![dom]).unwrap();
        let local: ArrayRef = Arc::new(StringArray::from(vec![None, Some("M")]));
        assert_eq!(idx.lookup(&[local], 2).unwrap(), vec![2, 1]);
        let bad: ArrayRef = Arc::new(StringArray::from(vec![Some("X")]));
        let e = idx.lookup(&[bad], 1).unwrap_err().to_string();
        assert!(
            e.contains("group key (X) outside the declared public domain"),
            "{e}"
        );
    }
}
