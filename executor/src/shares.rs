//! [`SharedTable`]: additive shares of per-group values, with their public
//! companions (the group keys), as one Arrow batch on the wire.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use rand::{CryptoRng, RngCore};

use crate::ring;

/// Shares of `columns.len()` values for every group of the public domain.
#[derive(Debug, Clone)]
pub struct SharedTable {
    /// Public group keys, one array per group column (may be none).
    pub keys: Vec<ArrayRef>,
    /// Share columns, each `rows` long.
    pub columns: Vec<Vec<u64>>,
    pub rows: usize,
}

impl SharedTable {
    pub fn zeros(keys: Vec<ArrayRef>, ncols: usize, rows: usize) -> Self {
        SharedTable { keys, columns: vec![vec![0; rows]; ncols], rows }
    }

    /// Splits `values` into `n` additive shares: n-1 uniformly random, the
    /// last the difference. Any n-1 of them are independent of `values`.
    pub fn split<R: RngCore + CryptoRng>(keys: &[ArrayRef], values: &[Vec<u64>], rows: usize, n: usize, rng: &mut R) -> Vec<SharedTable> {
        let mut last: Vec<Vec<u64>> = values.to_vec();
        let mut out = Vec::with_capacity(n);
        for _ in 1..n {
            let cols: Vec<Vec<u64>> = values
                .iter()
                .map(|_| {
                    let mut c = vec![0u64; rows];
                    for x in c.iter_mut() {
                        *x = rng.next_u64();
                    }
                    c
                })
                .collect();
            for (l, c) in last.iter_mut().zip(&cols) {
                ring::sub_assign(l, c);
            }
            out.push(SharedTable { keys: keys.to_vec(), columns: cols, rows });
        }
        out.push(SharedTable { keys: keys.to_vec(), columns: last, rows });
        out
    }

    /// Adds another share table of the same shape.
    pub fn add_assign(&mut self, other: &SharedTable) {
        for (a, b) in self.columns.iter_mut().zip(&other.columns) {
            ring::add_assign(a, b);
        }
    }

    /// The Arrow form: key columns `k0..`, then UInt64 share columns `s0..`.
    pub fn to_batch(&self) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut fields = Vec::new();
        let mut arrays: Vec<ArrayRef> = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            fields.push(Field::new(format!("k{i}"), k.data_type().clone(), true));
            arrays.push(k.clone());
        }
        for (i, c) in self.columns.iter().enumerate() {
            fields.push(Field::new(format!("s{i}"), DataType::UInt64, false));
            arrays.push(Arc::new(UInt64Array::from(c.clone())));
        }
        let opts = arrow::array::RecordBatchOptions::new().with_row_count(Some(self.rows));
        RecordBatch::try_new_with_options(Arc::new(Schema::new(fields)), arrays, &opts)
    }

    /// Reads a batch a peer sent, checking it against the expected shape and
    /// public keys. The error says what was wrong, never panics.
    pub fn from_batch(batch: &RecordBatch, expect_keys: &[ArrayRef], ncols: usize, rows: usize) -> Result<Self, String> {
        if batch.num_columns() != expect_keys.len() + ncols {
            return Err(format!(
                "{} columns, expected {} key and {} share columns",
                batch.num_columns(),
                expect_keys.len(),
                ncols
            ));
        }
        if batch.num_rows() != rows {
            return Err(format!("{} rows, expected {rows}", batch.num_rows()));
        }
        for (i, k) in expect_keys.iter().enumerate() {
            let got = batch.column(i);
            if got.data_type() != k.data_type() || got.to_data() != k.to_data() {
                return Err(format!("group key column {i} differs from the public domain"));
            }
        }
        let mut columns = Vec::with_capacity(ncols);
        for i in 0..ncols {
            let c = batch.column(expect_keys.len() + i);
            let a = c
                .as_any()
                .downcast_ref::<UInt64Array>()
                .ok_or_else(|| format!("share column {i} has type {}, expected UInt64", c.data_type()))?;
            if a.null_count() > 0 {
                return Err(format!("share column {i} has nulls"));
            }
            columns.push(a.values().to_vec());
        }
        Ok(SharedTable { keys: expect_keys.to_vec(), columns, rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn shares_add_up_and_survive_the_wire() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let values = vec![vec![1u64, 2, 3], vec![u64::MAX, 0, 42]];
        let shares = SharedTable::split(&[], &values, 3, 4, &mut rng);
        let mut acc = SharedTable::zeros(vec![], 2, 3);
        for s in &shares {
            let back = SharedTable::from_batch(&s.to_batch().unwrap(), &[], 2, 3).unwrap();
            acc.add_assign(&back);
        }
        assert_eq!(acc.columns, values);
        assert_ne!(shares[0].columns, values);
        let e = SharedTable::from_batch(&shares[0].to_batch().unwrap(), &[], 3, 3).unwrap_err();
        assert!(e.contains("expected 0 key and 3 share columns"), "{e}");
    }
}
