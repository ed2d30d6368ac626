//! [`SharedTable`]: additive shares of per-group values, with their public
//! companions (the group keys), as one Arrow batch on the wire.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, UInt64Array};
use arrow::datatypes::{i256, DataType, Field, Schema};
use rand::{CryptoRng, RngCore, SeedableRng};

use crate::ring;

/// The ring a share column lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// Z_2^64: one UInt64 column.
    Z64,
    /// Z_2^128: two UInt64 columns, low then high limb.
    Z128,
    /// Z_2^256: four UInt64 columns, least significant limb first.
    Z256,
}

impl Width {
    /// UInt64 columns per share column on the wire.
    pub fn limbs(self) -> usize {
        match self {
            Width::Z64 => 1,
            Width::Z128 => 2,
            Width::Z256 => 4,
        }
    }
}

/// One column of shares.
#[derive(Debug, Clone, PartialEq)]
pub enum ShareColumn {
    Z64(Vec<u64>),
    Z128 {
        lo: Vec<u64>,
        hi: Vec<u64>,
    },
    /// Limbs, least significant first.
    Z256([Vec<u64>; 4]),
}

impl ShareColumn {
    pub fn width(&self) -> Width {
        match self {
            ShareColumn::Z64(_) => Width::Z64,
            ShareColumn::Z128 { .. } => Width::Z128,
            ShareColumn::Z256(_) => Width::Z256,
        }
    }

    fn zeros(w: Width, rows: usize) -> Self {
        match w {
            Width::Z64 => ShareColumn::Z64(vec![0; rows]),
            Width::Z128 => ShareColumn::Z128 {
                lo: vec![0; rows],
                hi: vec![0; rows],
            },
            Width::Z256 => ShareColumn::Z256(std::array::from_fn(|_| vec![0; rows])),
        }
    }

    fn random<R: RngCore + CryptoRng>(w: Width, rows: usize, rng: &mut R) -> Self {
        let mut fill = || {
            let mut v = vec![0u64; rows];
            for x in v.iter_mut() {
                *x = rng.next_u64();
            }
            v
        };
        match w {
            Width::Z64 => ShareColumn::Z64(fill()),
            Width::Z128 => {
                let lo = fill();
                let hi = fill();
                ShareColumn::Z128 { lo, hi }
            }
            Width::Z256 => ShareColumn::Z256(std::array::from_fn(|_| fill())),
        }
    }

    fn add_assign(&mut self, o: &ShareColumn) {
        match (self, o) {
            (ShareColumn::Z64(a), ShareColumn::Z64(b)) => ring::add_assign(a, b),
            (ShareColumn::Z128 { lo, hi }, ShareColumn::Z128 { lo: bl, hi: bh }) => {
                ring::add_assign_wide(lo, hi, bl, bh)
            }
            (ShareColumn::Z256(a), ShareColumn::Z256(b)) => ring::add_assign_256(a, b),
            _ => {}
        }
    }

    fn sub_assign(&mut self, o: &ShareColumn) {
        match (self, o) {
            (ShareColumn::Z64(a), ShareColumn::Z64(b)) => ring::sub_assign(a, b),
            (ShareColumn::Z128 { lo, hi }, ShareColumn::Z128 { lo: bl, hi: bh }) => {
                ring::sub_assign_wide(lo, hi, bl, bh)
            }
            (ShareColumn::Z256(a), ShareColumn::Z256(b)) => ring::sub_assign_256(a, b),
            _ => {}
        }
    }

    /// The column read as signed integers.
    pub fn decode(&self) -> Vec<i256> {
        match self {
            ShareColumn::Z64(v) => v
                .iter()
                .map(|&x| i256::from_i128(ring::decode(x) as i128))
                .collect(),
            ShareColumn::Z128 { lo, hi } => lo
                .iter()
                .zip(hi)
                .map(|(&l, &h)| i256::from_i128(ring::decode_wide(l, h)))
                .collect(),
            ShareColumn::Z256(l) => (0..l[0].len())
                .map(|i| ring::decode_256([l[0][i], l[1][i], l[2][i], l[3][i]]))
                .collect(),
        }
    }
}

/// Shares of values for every group of the public domain.
#[derive(Debug, Clone)]
pub struct SharedTable {
    /// Public group keys, one array per group column (may be none).
    pub keys: Vec<ArrayRef>,
    pub columns: Vec<ShareColumn>,
    pub rows: usize,
}

impl SharedTable {
    /// Adds the signed integer `v` (mod the column's ring) to one entry.
    pub fn add_value(&mut self, column: usize, row: usize, v: i128) {
        match self.columns.get_mut(column) {
            Some(ShareColumn::Z64(a)) => {
                if let Some(x) = a.get_mut(row) {
                    *x = x.wrapping_add(v as u64);
                }
            }
            Some(ShareColumn::Z128 { lo, hi }) => {
                if let (Some(l), Some(h)) = (lo.get_mut(row), hi.get_mut(row)) {
                    let u = v as u128;
                    let (nl, carry) = l.overflowing_add(u as u64);
                    *l = nl;
                    *h = h.wrapping_add((u >> 64) as u64).wrapping_add(carry as u64);
                }
            }
            Some(ShareColumn::Z256(limbs)) => {
                if limbs[0].len() > row {
                    let add = ring::encode_256(i256::from_i128(v), i256::MAX).unwrap_or([0; 4]);
                    let mut one: [Vec<u64>; 4] = std::array::from_fn(|k| vec![limbs[k][row]]);
                    ring::add_assign_256(&mut one, &add.map(|l| vec![l]));
                    for k in 0..4 {
                        limbs[k][row] = one[k][0];
                    }
                }
            }
            None => {}
        }
    }

    pub fn widths(&self) -> Vec<Width> {
        self.columns.iter().map(|c| c.width()).collect()
    }

    /// Splits this table's values into `n` additive shares: n-1 uniformly
    /// random, the last the difference. Any n-1 of them are independent of
    /// the values.
    pub fn split<R: RngCore + CryptoRng>(&self, n: usize, rng: &mut R) -> Vec<SharedTable> {
        let mut last = self.columns.clone();
        let mut out = Vec::with_capacity(n);
        for _ in 1..n {
            let cols: Vec<ShareColumn> = self
                .columns
                .iter()
                .map(|c| ShareColumn::random(c.width(), self.rows, rng))
                .collect();
            for (l, c) in last.iter_mut().zip(&cols) {
                l.sub_assign(c);
            }
            out.push(SharedTable {
                keys: self.keys.clone(),
                columns: cols,
                rows: self.rows,
            });
        }
        out.push(SharedTable {
            keys: self.keys.clone(),
            columns: last,
            rows: self.rows,
        });
        out
    }

    /// The share that `seed` expands to under ChaCha20: uniformly random
    /// columns of the given widths, the same at both ends of a seed.
    pub fn from_seed(
        keys: &[ArrayRef],
        widths: &[Width],
        rows: usize,
        seed: [u8; 32],
    ) -> SharedTable {
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(seed);
        let columns = widths
            .iter()
            .map(|w| ShareColumn::random(*w, rows, &mut rng))
            .collect();
        SharedTable {
            keys: keys.to_vec(),
            columns,
            rows,
        }
    }

    /// Subtracts another share table of the same shape.
    pub fn sub_assign(&mut self, other: &SharedTable) {
        for (a, b) in self.columns.iter_mut().zip(&other.columns) {
            a.sub_assign(b);
        }
    }

    /// Adds another share table of the same shape.
    pub fn add_assign(&mut self, other: &SharedTable) {
        for (a, b) in self.columns.iter_mut().zip(&other.columns) {
            a.add_assign(b);
        }
    }

    pub fn zeros(keys: Vec<ArrayRef>, widths: &[Width], rows: usize) -> Self {
        SharedTable {
            keys,
            columns: widths
                .iter()
                .map(|w| ShareColumn::zeros(*w, rows))
                .collect(),
            rows,
        }
    }

    /// The Arrow form: key columns `k0..`, then UInt64 share columns `s0..`
    /// (`sN_lo`, `sN_hi` for Z_2^128, `sN_0` … `sN_3` for Z_2^256).
    pub fn to_batch(&self) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut fields = Vec::new();
        let mut arrays: Vec<ArrayRef> = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            fields.push(Field::new(format!("k{i}"), k.data_type().clone(), true));
            arrays.push(k.clone());
        }
        for (i, c) in self.columns.iter().enumerate() {
            match c {
                ShareColumn::Z64(v) => {
                    fields.push(Field::new(format!("s{i}"), DataType::UInt64, false));
                    arrays.push(Arc::new(UInt64Array::from(v.clone())));
                }
                ShareColumn::Z128 { lo, hi } => {
                    fields.push(Field::new(format!("s{i}_lo"), DataType::UInt64, false));
                    arrays.push(Arc::new(UInt64Array::from(lo.clone())));
                    fields.push(Field::new(format!("s{i}_hi"), DataType::UInt64, false));
                    arrays.push(Arc::new(UInt64Array::from(hi.clone())));
                }
                ShareColumn::Z256(limbs) => {
                    for (k, l) in limbs.iter().enumerate() {
                        fields.push(Field::new(format!("s{i}_{k}"), DataType::UInt64, false));
                        arrays.push(Arc::new(UInt64Array::from(l.clone())));
                    }
                }
            }
        }
        let opts = arrow::array::RecordBatchOptions::new().with_row_count(Some(self.rows));
        RecordBatch::try_new_with_options(Arc::new(Schema::new(fields)), arrays, &opts)
    }

    /// Reads a batch a peer sent, checking it against the expected widths,
    /// row count and public keys. The error says what was wrong.
    pub fn from_batch(
        batch: &RecordBatch,
        expect_keys: &[ArrayRef],
        widths: &[Width],
        rows: usize,
    ) -> Result<Self, String> {
        let ncols: usize = widths.iter().map(|w| w.limbs()).sum();
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
                return Err(format!(
                    "group key column {i} differs from the public domain"
                ));
            }
        }
        let mut next = expect_keys.len();
        let schema = batch.schema();
        let mut take = |i: usize, name: String| -> Result<Vec<u64>, String> {
            if schema.field(next).name() != &name {
                return Err(format!(
                    "share column {} is named `{}`, expected `{name}`",
                    next,
                    schema.field(next).name()
                ));
            }
            let c = batch.column(next);
            next += 1;
            let a = c.as_any().downcast_ref::<UInt64Array>().ok_or_else(|| {
                format!(
                    "share column {i} has type {}, expected UInt64",
                    c.data_type()
                )
            })?;
            if a.null_count() > 0 {
                return Err(format!("share column {i} has nulls"));
            }
            Ok(a.values().to_vec())
        };
        let mut columns = Vec::with_capacity(widths.len());
        for (i, w) in widths.iter().enumerate() {
            columns.push(match w {
                Width::Z64 => ShareColumn::Z64(take(i, format!("s{i}"))?),
                Width::Z128 => {
                    let lo = take(i, format!("s{i}_lo"))?;
                    let hi = take(i, format!("s{i}_hi"))?;
                    ShareColumn::Z128 { lo, hi }
                }
                Width::Z256 => ShareColumn::Z256([
                    take(i, format!("s{i}_0"))?,
                    take(i, format!("s{i}_1"))?,
                    take(i, format!("s{i}_2"))?,
                    take(i, format!("s{i}_3"))?,
                ]),
            });
        }
        Ok(SharedTable {
            keys: expect_keys.to_vec(),
            columns,
            rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_survive_the_wire() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let values = SharedTable {
            keys: vec![],
            columns: vec![
                ShareColumn::Z64(vec![1, 2, 3]),
                ShareColumn::Z128 {
                    lo: vec![u64::MAX, 0, 42],
                    hi: vec![1, 2, u64::MAX],
                },
                ShareColumn::Z256([
                    vec![u64::MAX, 0, 1],
                    vec![u64::MAX, 5, 0],
                    vec![u64::MAX, 0, 0],
                    vec![7, u64::MAX, 0],
                ]),
            ],
            rows: 3,
        };
        let widths = values.widths();
        let shares = values.split(4, &mut rng);
        let mut acc = SharedTable::zeros(vec![], &widths, 3);
        for s in &shares {
            let back = SharedTable::from_batch(&s.to_batch().unwrap(), &[], &widths, 3).unwrap();
            acc.add_assign(&back);
        }
        assert_eq!(acc.columns, values.columns);
        assert_ne!(shares[0].columns, values.columns);
        let e = SharedTable::from_batch(&shares[0].to_batch().unwrap(), &[], &[Width::Z64; 4], 3)
            .unwrap_err();
        assert!(e.contains("expected 0 key and 4 share columns"), "{e}");
        // A noise draw added to a Z_2^256 entry carries through every limb.
        let mut t = SharedTable::zeros(vec![], &[Width::Z256], 1);
        t.add_value(0, 0, -1);
        assert_eq!(t.columns[0].decode(), vec![i256::MINUS_ONE]);
        t.add_value(0, 0, 3);
        assert_eq!(t.columns[0].decode(), vec![i256::from_i128(2)]);
        let e = SharedTable::from_batch(&shares[0].to_batch().unwrap(), &[], &[Width::Z64; 7], 3)
            .unwrap_err();
        assert!(e.contains("named"), "{e}");
    }
}
