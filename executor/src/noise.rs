//! Exact integer noise for differential privacy (the first piece of the DP
//! issue): the discrete Laplace distribution sampled with integer arithmetic
//! only, after Canonne, Kamath and Steinke, "The Discrete Gaussian for
//! Differential Privacy" (NeurIPS 2020), Algorithms 1 and 2. No floating
//! point is involved, so the attack on textbook floating-point Laplace noise
//! (Mironov, CCS 2012) does not apply: every probability is an exact
//! rational, realised by comparing uniform integers.
//!
//! Written here because no maintained crate offers exact discrete Laplace
//! sampling over a caller-chosen CSPRNG; the algorithms are short and
//! tested against their exact distribution below.

use rand::{CryptoRng, Rng};

/// Bernoulli(num/den), exactly: a uniform integer below `den` compared to
/// `num`.
fn bernoulli_rational<R: Rng + CryptoRng>(rng: &mut R, num: u128, den: u128) -> bool {
    debug_assert!(den > 0 && num <= den);
    rng.random_range(0..den) < num
}

/// Bernoulli(exp(-num/den)) for num/den ≥ 0, exactly (CKS Algorithm 1).
pub fn bernoulli_exp<R: Rng + CryptoRng>(rng: &mut R, num: u128, den: u128) -> bool {
    assert!(den > 0, "a rational needs a positive denominator");
    if num <= den {
        // γ ≤ 1: K counts successes of Bernoulli(γ/k), k = 1, 2, …; the
        // result is whether K is odd.
        let mut k: u128 = 1;
        loop {
            let Some(d) = den.checked_mul(k) else {
                // γ/k is below 1/den·2^-k: beyond any practical k; stop.
                return k % 2 == 1;
            };
            if !bernoulli_rational(rng, num, d) {
                return k % 2 == 1;
            }
            k += 1;
        }
    }
    // γ > 1: exp(-γ) = exp(-1)^⌊γ⌋ · exp(-(γ - ⌊γ⌋)).
    for _ in 0..num / den {
        if !bernoulli_exp(rng, 1, 1) {
            return false;
        }
    }
    bernoulli_exp(rng, num % den, den)
}

/// One draw of the discrete Laplace distribution with scale `s/t`:
/// P(x) ∝ exp(-|x|·t/s) over the integers (CKS Algorithm 2, which names
/// the scale t/s: its uniform part runs over the numerator and its division
/// is by the denominator).
pub fn discrete_laplace<R: Rng + CryptoRng>(rng: &mut R, s: u64, t: u64) -> i64 {
    assert!(s > 0 && t > 0, "the scale s/t must be positive");
    // In CKS's notation the output scale is t'/s' with t' = s and s' = t.
    let (s, t) = (t as u128, s as u128);
    loop {
        let u = rng.random_range(0..t);
        if !bernoulli_exp(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp(rng, 1, 1) {
            v += 1;
        }
        let x = u + t * v;
        let y = x / s;
        let negative: bool = rng.random();
        if negative && y == 0 {
            continue;
        }
        let y = i64::try_from(y).unwrap_or(i64::MAX);
        return if negative { -y } else { y };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// Pearson's chi-square of `draws` against the discrete Laplace pmf of
    /// scale `b`, over the bins -k..=k and the two tails.
    fn chi_square(draws: &[i64], b: f64, k: i64) -> (f64, usize) {
        let n = draws.len() as f64;
        let q = (-1.0 / b).exp();
        let pmf = |x: i64| (1.0 - q) / (1.0 + q) * q.powi(x.unsigned_abs() as i32);
        let mut stat = 0.0;
        let mut bins = 0;
        for x in -k..=k {
            let seen = draws.iter().filter(|&&d| d == x).count() as f64;
            let want = n * pmf(x);
            stat += (seen - want).powi(2) / want;
            bins += 1;
        }
        // Each tail |x| > k has mass q^(k+1) / (1 + q).
        let tail = n * q.powi(k as i32 + 1) / (1.0 + q);
        for side in [1, -1] {
            let seen = draws.iter().filter(|&&d| d * side > k).count() as f64;
            stat += (seen - tail).powi(2) / tail;
            bins += 1;
        }
        (stat, bins - 1)
    }

    fn check(seed: u64, s: u64, t: u64, k: i64) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let draws: Vec<i64> = (0..100_000)
            .map(|_| discrete_laplace(&mut rng, s, t))
            .collect();
        let (stat, dof) = chi_square(&draws, s as f64 / t as f64, k);
        // The 0.999 quantile of chi-square is below dof + 3.1·sqrt(2·dof) + 10
        // for these degrees of freedom (a loose, safe bound).
        let bound = dof as f64 + 3.1 * (2.0 * dof as f64).sqrt() + 10.0;
        assert!(
            stat < bound,
            "scale {s}/{t}, seed {seed}: chi-square {stat:.1} with {dof} degrees of freedom exceeds {bound:.1}"
        );
        let mean = draws.iter().sum::<i64>() as f64 / draws.len() as f64;
        assert!(
            mean.abs() < 0.1 * (s as f64 / t as f64).max(1.0),
            "mean {mean}"
        );
    }

    #[test]
    fn discrete_laplace_fits_its_distribution() {
        // Fixed seeds in CI; `COUNCIL_NOISE_SEED=fresh` draws one from the OS.
        let seed = match std::env::var("COUNCIL_NOISE_SEED").as_deref() {
            Ok("fresh") => rand::random(),
            Ok(s) => s.parse().unwrap_or(1),
            Err(_) => 1,
        };
        check(seed, 1, 1, 6); // scale 1
        check(seed ^ 2, 5, 2, 12); // scale 2.5
        check(seed ^ 3, 1, 3, 2); // scale 1/3
        check(seed ^ 4, 40, 1, 60); // scale 40
    }

    #[test]
    fn bernoulli_exp_matches_its_probability() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        for (num, den) in [(0u128, 1u128), (1, 2), (1, 1), (7, 3)] {
            let n = 100_000;
            let hits = (0..n).filter(|_| bernoulli_exp(&mut rng, num, den)).count() as f64;
            let p = (-(num as f64) / den as f64).exp();
            let sd = (p * (1.0 - p) / n as f64).sqrt().max(1e-9);
            assert!(
                ((hits / n as f64) - p).abs() < 5.0 * sd + 1e-9,
                "exp(-{num}/{den}): {} vs {p}",
                hits / n as f64
            );
        }
    }
}
