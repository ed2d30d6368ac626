//! [`SharedTable`]: additive shares of per-group values, with their public
//! companions (the group keys), as Arrow batches on the wire: a message of
//! batches of at most [`crate::transport::BATCH_ROWS`] rows, each added
//! into the receiver's table where it belongs as it arrives.

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
    /// Its rows (the shortest limb).
    pub fn len(&self) -> usize {
        match self {
            ShareColumn::Z64(v) => v.len(),
            ShareColumn::Z128 { lo, hi } => lo.len().min(hi.len()),
            ShareColumn::Z256(l) => l.iter().map(|v| v.len()).min().unwrap_or(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

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

    /// Adds limb slices `b` (least significant first, one per limb of
    /// this column's width, all of one length) into the rows from `at`, or
    /// subtracts them with `negate`. `false` (and nothing added) if the
    /// rows run past the column's end or the limbs do not match its width.
    #[must_use]
    fn add_limbs_at(&mut self, at: usize, b: &[&[u64]], negate: bool) -> bool {
        let n = b.iter().map(|l| l.len()).min().unwrap_or(0);
        if b.iter().any(|l| l.len() != n) {
            return false;
        }
        let range = at..at.saturating_add(n);
        match (self, b) {
            (ShareColumn::Z64(a), [b0]) => {
                let Some(a) = a.get_mut(range) else {
                    return false;
                };
                if negate {
                    ring::sub_assign(a, b0)
                } else {
                    ring::add_assign(a, b0)
                }
            }
            (ShareColumn::Z128 { lo, hi }, [bl, bh]) => {
                let (Some(lo), Some(hi)) = (lo.get_mut(range.clone()), hi.get_mut(range)) else {
                    return false;
                };
                if negate {
                    ring::sub_assign_wide(lo, hi, bl, bh)
                } else {
                    ring::add_assign_wide(lo, hi, bl, bh)
                }
            }
            (ShareColumn::Z256(limbs), [b0, b1, b2, b3]) => {
                let [l0, l1, l2, l3] = limbs;
                let (Some(l0), Some(l1), Some(l2), Some(l3)) = (
                    l0.get_mut(range.clone()),
                    l1.get_mut(range.clone()),
                    l2.get_mut(range.clone()),
                    l3.get_mut(range),
                ) else {
                    return false;
                };
                let (a, b) = ([l0, l1, l2, l3], [*b0, *b1, *b2, *b3]);
                if negate {
                    ring::sub_assign_256_slices(a, b)
                } else {
                    ring::add_assign_256_slices(a, b)
                }
            }
            _ => return false,
        }
        true
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
        self.batch_of(0, self.rows)
    }

    /// Rows `start..start + n` in the Arrow form of [`SharedTable::to_batch`].
    pub fn batch_of(
        &self,
        start: usize,
        n: usize,
    ) -> Result<RecordBatch, arrow::error::ArrowError> {
        let out_of_range = || {
            arrow::error::ArrowError::InvalidArgumentError(format!(
                "rows {start}..{start}+{n} of a table of {}",
                self.rows
            ))
        };
        let end = start
            .checked_add(n)
            .filter(|&e| e <= self.rows)
            .ok_or_else(out_of_range)?;
        let mut fields = Vec::new();
        let mut arrays: Vec<ArrayRef> = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            if k.len() < end {
                return Err(out_of_range());
            }
            fields.push(Field::new(format!("k{i}"), k.data_type().clone(), true));
            // Copied, not sliced: arrow-flight sizes a batch by its
            // buffers, and a slice's are the whole column's (every batch
            // would be split as if it held all the keys).
            let data = k.to_data();
            let mut copy = arrow::array::MutableArrayData::new(vec![&data], false, n);
            copy.try_extend(0, start, end)?;
            arrays.push(arrow::array::make_array(copy.freeze()));
        }
        let mut limb = |name: String, v: &[u64]| -> Result<(), arrow::error::ArrowError> {
            let part = v.get(start..end).ok_or_else(out_of_range)?;
            fields.push(Field::new(name, DataType::UInt64, false));
            arrays.push(Arc::new(UInt64Array::from(part.to_vec())));
            Ok(())
        };
        for (i, c) in self.columns.iter().enumerate() {
            match c {
                ShareColumn::Z64(v) => limb(format!("s{i}"), v)?,
                ShareColumn::Z128 { lo, hi } => {
                    limb(format!("s{i}_lo"), lo)?;
                    limb(format!("s{i}_hi"), hi)?;
                }
                ShareColumn::Z256(limbs) => {
                    for (k, l) in limbs.iter().enumerate() {
                        limb(format!("s{i}_{k}"), l)?;
                    }
                }
            }
        }
        let opts = arrow::array::RecordBatchOptions::new().with_row_count(Some(n));
        RecordBatch::try_new_with_options(Arc::new(Schema::new(fields)), arrays, &opts)
    }

    /// The table as a message of batches of at most `batch_rows` rows,
    /// each made as it is sent (every share has at least one row: a group
    /// column's domain holds NULL).
    pub fn into_message(self, batch_rows: usize) -> crate::transport::Outbound {
        let rows = self.rows;
        let step = batch_rows.max(1);
        let starts = (0..rows.max(1)).step_by(step);
        crate::transport::Outbound::new(
            rows,
            starts.map(move |start| self.batch_of(start, step.min(rows - start))),
        )
    }

    /// Adds the share that `seed` expands to (see [`SharedTable::from_seed`])
    /// to this table, or subtracts it with `negate`, without making it:
    /// the stream of each limb column is read from its own position, a
    /// few thousand rows at a time.
    pub fn add_seed(&mut self, seed: [u8; 32], negate: bool) {
        const CHUNK: usize = 4096;
        let rows = self.rows;
        // Position in the ChaCha20 stream, in 32-bit words: the limb
        // columns one after another, each `rows` u64 words long.
        let mut pos: u128 = 0;
        let mut buf: Vec<Vec<u64>> = Vec::new();
        for c in self.columns.iter_mut() {
            let limbs = c.width().limbs();
            let mut rngs: Vec<rand_chacha::ChaCha20Rng> = (0..limbs)
                .map(|k| {
                    let mut r = rand_chacha::ChaCha20Rng::from_seed(seed);
                    r.set_word_pos(pos + 2 * (rows as u128) * k as u128);
                    r
                })
                .collect();
            buf.resize(limbs, vec![0; CHUNK.min(rows)]);
            for start in (0..rows).step_by(CHUNK) {
                let n = CHUNK.min(rows - start);
                for (r, b) in rngs.iter_mut().zip(buf.iter_mut()) {
                    for x in b[..n].iter_mut() {
                        *x = r.next_u64();
                    }
                }
                let parts: Vec<&[u64]> = buf.iter().map(|b| &b[..n]).collect();
                // The table's own shape: a column shorter than its rows
                // is a bug in whoever built the table.
                let added = c.add_limbs_at(start, &parts, negate);
                debug_assert!(added, "a share column shorter than its table");
            }
            pos += 2 * (rows as u128) * limbs as u128;
        }
    }

    /// Reads a batch a peer sent, checking it against the expected widths,
    /// row count and public keys. The error says what was wrong.
    pub fn from_batch(
        batch: &RecordBatch,
        expect_keys: &[ArrayRef],
        widths: &[Width],
        rows: usize,
    ) -> Result<Self, String> {
        let mut t = SharedTable::zeros(expect_keys.to_vec(), widths, rows);
        if batch.num_columns() == expect_keys.len() + t.limb_columns() && batch.num_rows() != rows {
            return Err(format!("{} rows, expected {rows}", batch.num_rows()));
        }
        t.add_batch(batch, 0)?;
        Ok(t)
    }

    fn limb_columns(&self) -> usize {
        self.columns.iter().map(|c| c.width().limbs()).sum()
    }

    /// Adds a batch a peer sent, holding rows `offset..` of its share of
    /// this table, into those rows; checks its columns against this
    /// table's widths and its keys against this table's keys there. Returns
    /// the rows it held. The error says what was wrong.
    pub fn add_batch(&mut self, batch: &RecordBatch, offset: usize) -> Result<usize, String> {
        let ncols = self.limb_columns();
        if batch.num_columns() != self.keys.len() + ncols {
            return Err(format!(
                "{} columns, expected {} key and {} share columns",
                batch.num_columns(),
                self.keys.len(),
                ncols
            ));
        }
        let n = batch.num_rows();
        if offset.checked_add(n).is_none_or(|end| end > self.rows) {
            return Err(format!(
                "rows {offset} to {} where the table has {}",
                offset.saturating_add(n),
                self.rows
            ));
        }
        for (i, k) in self.keys.iter().enumerate() {
            let got = batch.column(i);
            if got.data_type() != k.data_type()
                || k.len() < offset + n
                || got.to_data() != k.slice(offset, n).to_data()
            {
                return Err(format!(
                    "group key column {i} differs from the public domain"
                ));
            }
        }
        let mut next = self.keys.len();
        let schema = batch.schema();
        let mut take = |i: usize, name: String| -> Result<&[u64], String> {
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
            Ok(a.values().as_ref())
        };
        // Every column is checked before any is added.
        let mut parts = Vec::with_capacity(self.columns.len());
        for (i, c) in self.columns.iter().enumerate() {
            parts.push(match c.width() {
                Width::Z64 => vec![take(i, format!("s{i}"))?],
                Width::Z128 => vec![take(i, format!("s{i}_lo"))?, take(i, format!("s{i}_hi"))?],
                Width::Z256 => (0..4)
                    .map(|k| take(i, format!("s{i}_{k}")))
                    .collect::<Result<_, _>>()?,
            });
        }
        // A column shorter than the table (built wrongly) is refused, not
        // left out of the sum; the check comes first so that nothing is
        // added unless all is.
        if self.columns.iter().any(|c| c.len() < offset + n) {
            return Err(format!(
                "this party's share has fewer than {} rows",
                offset + n
            ));
        }
        for (c, p) in self.columns.iter_mut().zip(&parts) {
            if !c.add_limbs_at(offset, p, false) {
                return Err("a batch that does not fit its rows".into());
            }
        }
        Ok(n)
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

    #[test]
    fn a_seed_expands_in_place_as_it_does_whole() {
        let widths = [Width::Z128, Width::Z64, Width::Z256];
        for rows in [1usize, 7, 4096, 4097, 10_000] {
            let seed = [rows as u8; 32];
            let whole = SharedTable::from_seed(&[], &widths, rows, seed);
            let mut t = SharedTable::zeros(vec![], &widths, rows);
            t.add_seed(seed, false);
            assert_eq!(t.columns, whole.columns, "{rows} rows");
            t.add_seed(seed, true);
            assert_eq!(t.columns, SharedTable::zeros(vec![], &widths, rows).columns);
        }
    }

    #[test]
    fn a_table_survives_the_wire_in_batches() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let rows = 1000;
        let keys: Vec<ArrayRef> = vec![Arc::new(arrow::array::Int64Array::from_iter_values(
            0..rows as i64,
        ))];
        let widths = [Width::Z64, Width::Z128, Width::Z256];
        let t = SharedTable {
            keys: keys.clone(),
            columns: widths
                .iter()
                .map(|w| ShareColumn::random(*w, rows, &mut rng))
                .collect(),
            rows,
        };
        let message = t.clone().into_message(64);
        assert_eq!(message.rows, rows);
        let mut back = SharedTable::zeros(keys.clone(), &widths, rows);
        let mut at = 0;
        for b in message {
            let b = b.unwrap();
            assert!(b.num_rows() <= 64);
            at += back.add_batch(&b, at).unwrap();
        }
        assert_eq!((at, &back.columns), (rows, &t.columns));
        // A batch out of place: its keys are not the domain's there.
        let b = t.batch_of(64, 64).unwrap();
        // Its keys are its own, not a view of the whole column (which
        // arrow-flight would count as the batch's size).
        assert!(b.column(0).get_buffer_memory_size() < keys[0].get_buffer_memory_size() / 4);
        let e = back.add_batch(&b, 0).unwrap_err();
        assert!(e.contains("differs from the public domain"), "{e}");
        let e = back.add_batch(&b, rows - 10).unwrap_err();
        assert!(e.contains("where the table has 1000"), "{e}");
        assert!(t.batch_of(990, 11).is_err());
        // No groups: one empty batch.
        let empty = SharedTable::zeros(vec![], &widths, 0).into_message(64);
        assert_eq!(
            empty.map(|b| b.unwrap().num_rows()).collect::<Vec<_>>(),
            [0]
        );
    }
}
