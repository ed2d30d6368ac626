//! The ring Z_2^64 and the signed encoding of integers into it.
//!
//! Every party's partial is an integer (a count, or a sum at a fixed decimal
//! scale). Shares are uniformly random elements of Z_2^64 that add up, with
//! wrapping, to the encoded value. Decoding reads the sum as a signed 64-bit
//! integer, which is exact only if the true total lies in [-2^63, 2^63).
//! [`party_bound`] makes that certain: with N parties each keeping its own
//! partial within ±(2^63 - 1)/N, no total can wrap.

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
}
