//! The rings Z_2^64, Z_2^128 and Z_2^256 and the signed encoding of integers
//! into them.
//!
//! Counts live in Z_2^64. Sums and sums of squares (for VAR and STDDEV) live
//! in Z_2^128 (so that no single value can push a party's sum past its
//! bound, and squares get twice the digits), carried as two Z_2^64 limbs
//! (low, high) that add with a carry: still UInt64 columns on the wire.
//! Sums of squares of wide values (up to 10^36 per row) live in Z_2^256,
//! four limbs, where no count of rows can reach a party's bound.
//!
//! Every party's partial is an integer (a count, or a sum at a fixed decimal
//! scale). Shares are uniformly random elements of Z_2^64 that add up, with
//! wrapping, to the encoded value. Decoding reads the sum as a signed 64-bit
//! integer, which is exact only if the true total lies in [-2^63, 2^63).
//! [`party_bound`] makes that certain: with N parties each keeping its own
//! partial within ±(2^63 - 1)/N, no total can wrap.

use arrow::datatypes::i256;

/// The largest magnitude a single party's partial may have with `parties`
/// parties, so that the sum of all partials never wraps the ring.
pub fn party_bound(parties: usize) -> i128 {
    (i64::MAX as i128) / parties.max(1) as i128
}

/// Encodes a signed integer as a ring element, refusing values out of bound.
pub fn encode(v: i128, bound: i128) -> Option<u64> {
    if v.abs() > bound {
        None
    } else {
        Some(v as i64 as u64)
    }
}

/// Reads a ring element as a signed integer.
pub fn decode(v: u64) -> i64 {
    v as i64
}

/// The largest magnitude of one party's Z_2^128 partial with `parties` parties.
pub fn party_bound_wide(parties: usize) -> i128 {
    i128::MAX / parties.max(1) as i128
}

/// Encodes a signed integer as two limbs (low, high) of Z_2^128.
pub fn encode_wide(v: i128, bound: i128) -> Option<(u64, u64)> {
    if v.checked_abs().is_none_or(|a| a > bound) {
        None
    } else {
        let u = v as u128;
        Some((u as u64, (u >> 64) as u64))
    }
}

pub fn decode_wide(lo: u64, hi: u64) -> i128 {
    (((hi as u128) << 64) | lo as u128) as i128
}

/// (alo, ahi) += (blo, bhi) in Z_2^128, elementwise.
pub fn add_assign_wide(alo: &mut [u64], ahi: &mut [u64], blo: &[u64], bhi: &[u64]) {
    for i in 0..alo.len().min(ahi.len()).min(blo.len()).min(bhi.len()) {
        let (lo, carry) = alo[i].overflowing_add(blo[i]);
        alo[i] = lo;
        ahi[i] = ahi[i].wrapping_add(bhi[i]).wrapping_add(carry as u64);
    }
}

/// (alo, ahi) -= (blo, bhi) in Z_2^128, elementwise.
pub fn sub_assign_wide(alo: &mut [u64], ahi: &mut [u64], blo: &[u64], bhi: &[u64]) {
    for i in 0..alo.len().min(ahi.len()).min(blo.len()).min(bhi.len()) {
        let (lo, borrow) = alo[i].overflowing_sub(blo[i]);
        alo[i] = lo;
        ahi[i] = ahi[i].wrapping_sub(bhi[i]).wrapping_sub(borrow as u64);
    }
}

/// The largest magnitude of one party's Z_2^256 partial with `parties` parties.
pub fn party_bound_256(parties: usize) -> i256 {
    i256::MAX.wrapping_div(i256::from_i128(parties.max(1) as i128))
}

/// Encodes a signed 256-bit integer as four limbs, least significant first.
pub fn encode_256(v: i256, bound: i256) -> Option<[u64; 4]> {
    if v.checked_abs().is_none_or(|a| a > bound) {
        None
    } else {
        let b = v.to_le_bytes();
        let limb = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[8 * i..8 * i + 8]);
            u64::from_le_bytes(w)
        };
        Some([limb(0), limb(1), limb(2), limb(3)])
    }
}

pub fn decode_256(limbs: [u64; 4]) -> i256 {
    let mut b = [0u8; 32];
    for (i, l) in limbs.iter().enumerate() {
        b[8 * i..8 * i + 8].copy_from_slice(&l.to_le_bytes());
    }
    i256::from_le_bytes(b)
}

/// a += b in Z_2^256, elementwise over four limb columns.
pub fn add_assign_256(a: &mut [Vec<u64>; 4], b: &[Vec<u64>; 4]) {
    add_assign_256_slices(
        a.each_mut().map(|v| v.as_mut_slice()),
        b.each_ref().map(|v| v.as_slice()),
    );
}

/// a -= b in Z_2^256, elementwise over four limb columns.
pub fn sub_assign_256(a: &mut [Vec<u64>; 4], b: &[Vec<u64>; 4]) {
    sub_assign_256_slices(
        a.each_mut().map(|v| v.as_mut_slice()),
        b.each_ref().map(|v| v.as_slice()),
    );
}

/// a += b in Z_2^256 over four limb slices (a part of a column).
pub fn add_assign_256_slices(a: [&mut [u64]; 4], b: [&[u64]; 4]) {
    carry_256(a, b, false)
}

/// a -= b in Z_2^256 over four limb slices (a part of a column).
pub fn sub_assign_256_slices(a: [&mut [u64]; 4], b: [&[u64]; 4]) {
    carry_256(a, b, true)
}

/// a ± b limb by limb, the carry (or borrow) running up the limbs.
fn carry_256(a: [&mut [u64]; 4], b: [&[u64]; 4], sub: bool) {
    let n = a
        .iter()
        .map(|v| v.len())
        .chain(b.iter().map(|v| v.len()))
        .min()
        .unwrap_or(0);
    let op = if sub {
        u64::overflowing_sub
    } else {
        u64::overflowing_add
    };
    for i in 0..n {
        let mut carry = false;
        for k in 0..4 {
            let (x, c1) = op(a[k][i], b[k][i]);
            let (x, c2) = op(x, carry as u64);
            a[k][i] = x;
            carry = c1 || c2;
        }
    }
}

/// a += b elementwise, wrapping (vectorises to plain adds).
pub fn add_assign(a: &mut [u64], b: &[u64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_add(*y);
    }
}

/// a -= b elementwise, wrapping.
pub fn sub_assign(a: &mut [u64], b: &[u64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_sub(*y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_within_the_bound_decode_exactly() {
        let n = 5;
        let b = party_bound(n);
        for vals in [[b, b, b, b, b], [-b, -b, -b, -b, -b], [b, -b, 7, 0, -3]] {
            let mut acc = 0u64;
            for v in vals {
                acc = acc.wrapping_add(encode(v, b).unwrap());
            }
            assert_eq!(decode(acc) as i128, vals.iter().sum::<i128>());
        }
        assert!(encode(b + 1, b).is_none());
        assert!(encode(-(b + 1), b).is_none());
    }

    #[test]
    fn wide_limbs_add_with_carry() {
        let b = party_bound_wide(3);
        let vals = [b, -b / 2, 12345678901234567890123456789i128];
        let (mut lo, mut hi) = (vec![0u64], vec![0u64]);
        for v in vals {
            let (l, h) = encode_wide(v, b).unwrap();
            add_assign_wide(&mut lo, &mut hi, &[l], &[h]);
        }
        assert_eq!(decode_wide(lo[0], hi[0]), vals.iter().sum::<i128>());
        let (l, h) = encode_wide(-7, b).unwrap();
        sub_assign_wide(&mut lo, &mut hi, &[l], &[h]);
        assert_eq!(decode_wide(lo[0], hi[0]), vals.iter().sum::<i128>() + 7);
        assert!(encode_wide(i128::MIN, b).is_none());
    }

    #[test]
    fn z256_limbs_add_with_carry_and_decode_signed() {
        let w = |v: i128| i256::from_i128(v);
        let b = party_bound_256(8);
        let big = w(i128::MAX).wrapping_mul(w(1 << 60)); // about 2^187
        let vals = [big, -big, w(-3), b, w(12345), -b];
        let mut acc: [Vec<u64>; 4] = Default::default();
        for a in acc.iter_mut() {
            a.push(0);
        }
        let mut expect = w(0);
        for v in vals {
            let l = encode_256(v, b).unwrap();
            assert_eq!(decode_256(l), v);
            add_assign_256(&mut acc, &[vec![l[0]], vec![l[1]], vec![l[2]], vec![l[3]]]);
            expect = expect.wrapping_add(v);
        }
        let total = decode_256([acc[0][0], acc[1][0], acc[2][0], acc[3][0]]);
        assert_eq!(total, expect);
        let l = encode_256(big, b).unwrap();
        sub_assign_256(&mut acc, &[vec![l[0]], vec![l[1]], vec![l[2]], vec![l[3]]]);
        let total = decode_256([acc[0][0], acc[1][0], acc[2][0], acc[3][0]]);
        assert_eq!(total, expect.wrapping_sub(big));
        assert!(encode_256(i256::MIN, b).is_none());
        assert!(encode_256(b.wrapping_add(w(1)), b).is_none());
    }
}
