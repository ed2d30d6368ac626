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

use num_bigint::BigUint;
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
pub fn discrete_laplace<R: Rng + CryptoRng>(rng: &mut R, s: u128, t: u128) -> i128 {
    assert!(s > 0 && t > 0, "the scale s/t must be positive");
    // In CKS's notation the output scale is t'/s' with t' = s and s' = t.
    let (s, t) = (t, s);
    loop {
        let u = rng.random_range(0..t);
        if !bernoulli_exp(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp(rng, 1, 1) {
            v += 1;
        }
        // x = u + t·v; a v large enough to overflow has probability
        // below e^-100: draw again.
        let Some(x) = t.checked_mul(v).and_then(|tv| tv.checked_add(u)) else {
            continue;
        };
        let y = x / s;
        let negative: bool = rng.random();
        if negative && y == 0 {
            continue;
        }
        let y = i128::try_from(y).unwrap_or(i128::MAX);
        return if negative { -y } else { y };
    }
}

/// A uniform integer below `n` (> 0): rejection over the bit length.
fn uniform_below<R: Rng + CryptoRng>(rng: &mut R, n: &BigUint) -> BigUint {
    let bits = n.bits();
    let bytes = bits.div_ceil(8) as usize;
    let mut buf = vec![0u8; bytes];
    loop {
        rng.fill_bytes(&mut buf);
        let extra = bytes as u64 * 8 - bits;
        if extra > 0 {
            if let Some(top) = buf.last_mut() {
                *top &= 0xff >> extra;
            }
        }
        let x = BigUint::from_bytes_le(&buf);
        if &x < n {
            return x;
        }
    }
}

/// [`bernoulli_exp`] for rationals beyond 128 bits (the discrete
/// Gaussian's acceptance test at large σ), exactly.
fn bernoulli_exp_big<R: Rng + CryptoRng>(rng: &mut R, num: &BigUint, den: &BigUint) -> bool {
    if num <= den {
        let mut k = BigUint::from(1u32);
        loop {
            let d = den * &k;
            if &uniform_below(rng, &d) >= num {
                return (&k % 2u32) == BigUint::from(1u32);
            }
            k += 1u32;
        }
    }
    let whole = num / den;
    let mut i = BigUint::from(0u32);
    while i < whole {
        if !bernoulli_exp(rng, 1, 1) {
            return false;
        }
        i += 1u32;
    }
    bernoulli_exp_big(rng, &(num % den), den)
}

/// Integer square root (floor).
fn isqrt(n: u128) -> u128 {
    if n < 2 {
        return n;
    }
    let mut x = (n as f64).sqrt() as u128;
    while x.checked_mul(x).is_none_or(|v| v > n) {
        x -= 1;
    }
    while (x + 1).checked_mul(x + 1).is_some_and(|v| v <= n) {
        x += 1;
    }
    x
}

/// Largest σ² the Gaussian sampler takes (its draws and the ring's
/// headroom stay far inside 128 bits).
pub const MAX_SIGMA2: u128 = 1 << 120;

/// One draw of the discrete Gaussian distribution with variance parameter
/// σ² = `sigma2`: P(x) ∝ exp(-x²/(2σ²)) (CKS Algorithm 3: discrete Laplace
/// proposals of scale t = ⌊σ⌋+1, accepted with probability
/// exp(-(|Y| - σ²/t)²/(2σ²)), in exact integer arithmetic: 128-bit where it
/// fits, arbitrary precision where it does not).
pub fn discrete_gaussian<R: Rng + CryptoRng>(rng: &mut R, sigma2: u128) -> i128 {
    assert!(
        (1..=MAX_SIGMA2).contains(&sigma2),
        "σ² must be in 1..=2^120"
    );
    let t = isqrt(sigma2) + 1;
    loop {
        let y = discrete_laplace(rng, t, 1);
        // γ = (|Y|·t - σ²)² / (2σ²t²).
        let small = y.unsigned_abs().checked_mul(t).and_then(|a| {
            let diff = a.abs_diff(sigma2);
            Some((
                diff.checked_mul(diff)?,
                sigma2.checked_mul(2)?.checked_mul(t.checked_mul(t)?)?,
            ))
        });
        let accept = match small {
            Some((num, den)) => bernoulli_exp(rng, num, den),
            None => {
                let a = BigUint::from(y.unsigned_abs()) * BigUint::from(t);
                let s2 = BigUint::from(sigma2);
                let diff = if a >= s2 { &a - &s2 } else { &s2 - &a };
                let num = &diff * &diff;
                let tb = BigUint::from(t);
                let den = s2 * 2u32 * &tb * &tb;
                bernoulli_exp_big(rng, &num, &den)
            }
        };
        if accept {
            return y;
        }
    }
}

/// The noise a party draws for one revealed total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    /// Discrete Laplace of scale num/den.
    Laplace { num: u128, den: u128 },
    /// Discrete Gaussian of variance parameter sigma2.
    Gaussian { sigma2: u128 },
}

/// One draw per row for every column that has a spec, from ChaCha20
/// seeded by the operating system; an error if a draw falls beyond its
/// bound (probability below 10^-25) or the OS has no randomness.
pub fn draw_all(
    specs: &[Option<NoiseSpec>],
    rows: usize,
) -> Result<Vec<Option<Vec<i128>>>, String> {
    use rand::SeedableRng;
    if specs.iter().all(|s| s.is_none()) {
        return Ok(vec![None; specs.len()]);
    }
    let mut rng = rand_chacha::ChaCha20Rng::try_from_os_rng()
        .map_err(|e| format!("OS randomness failed: {e}"))?;
    specs
        .iter()
        .map(|spec| {
            spec.map(|spec| {
                (0..rows)
                    .map(|_| {
                        spec.draw(&mut rng).ok_or_else(|| {
                            "a noise draw fell beyond its safety bound (probability below 10^-25); run the query again"
                                .to_string()
                        })
                    })
                    .collect::<Result<Vec<i128>, String>>()
            })
            .transpose()
        })
        .collect()
}

/// A distribution and the bound beyond which a draw aborts the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoiseSpec {
    pub distribution: Distribution,
    pub bound: u128,
}

impl NoiseSpec {
    /// One draw; `None` if it exceeds the bound (probability below 10^-25
    /// for the bounds the planner sets).
    pub fn draw<R: Rng + CryptoRng>(&self, rng: &mut R) -> Option<i128> {
        let x = match self.distribution {
            Distribution::Laplace { num, den } => discrete_laplace(rng, num, den),
            Distribution::Gaussian { sigma2 } => discrete_gaussian(rng, sigma2),
        };
        (x.unsigned_abs() <= self.bound).then_some(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// Fixed seeds in CI; `COUNCIL_NOISE_SEED=fresh` draws one from the OS
    /// (and prints it), any number replays that seed.
    fn base_seed() -> u64 {
        let seed = match std::env::var("COUNCIL_NOISE_SEED").as_deref() {
            Ok("fresh") => rand::random(),
            Ok(s) => s.parse().unwrap_or(1),
            Err(_) => 1,
        };
        eprintln!("noise test seed {seed}");
        seed
    }

    /// Pearson's chi-square of `draws` against `pmf` over the bins -k..=k
    /// and the two tails (whose mass is what the bins leave, split evenly:
    /// every pmf here is symmetric).
    fn chi_square(draws: &[i64], pmf: &dyn Fn(i64) -> f64, k: i64) -> (f64, usize) {
        let n = draws.len() as f64;
        let mut stat = 0.0;
        let mut bins = 0;
        let mut inside = 0.0;
        for x in -k..=k {
            let seen = draws.iter().filter(|&&d| d == x).count() as f64;
            let p = pmf(x);
            inside += p;
            let want = n * p;
            stat += (seen - want).powi(2) / want;
            bins += 1;
        }
        let tail = n * ((1.0 - inside) / 2.0).max(1e-300);
        for side in [1, -1] {
            let seen = draws.iter().filter(|&&d| d * side > k).count() as f64;
            stat += (seen - tail).powi(2) / tail;
            bins += 1;
        }
        (stat, bins - 1)
    }

    fn assert_fits(what: &str, draws: &[i64], pmf: &dyn Fn(i64) -> f64, k: i64) {
        let (stat, dof) = chi_square(draws, pmf, k);
        // The 0.999 quantile of chi-square is below dof + 3.1·sqrt(2·dof) + 10
        // for these degrees of freedom (a loose, safe bound).
        let bound = dof as f64 + 3.1 * (2.0 * dof as f64).sqrt() + 10.0;
        assert!(
            stat < bound,
            "{what}: chi-square {stat:.1} with {dof} degrees of freedom exceeds {bound:.1}"
        );
    }

    /// The pmf of one draw, normalised over a wide window.
    fn pmf_table(d: Distribution, w: i64) -> Vec<f64> {
        let mut v: Vec<f64> = (-w..=w)
            .map(|x| match d {
                Distribution::Laplace { num, den } => {
                    (-(x.unsigned_abs() as f64) * den as f64 / num as f64).exp()
                }
                Distribution::Gaussian { sigma2 } => {
                    (-((x * x) as f64) / (2.0 * sigma2 as f64)).exp()
                }
            })
            .collect();
        let t: f64 = v.iter().sum();
        v.iter_mut().for_each(|p| *p /= t);
        v
    }

    /// The pmf of the sum of `n` independent draws (centre at index len/2).
    fn convolve(one: &[f64], n: usize) -> Vec<f64> {
        let mut total = one.to_vec();
        for _ in 1..n {
            let mut next = vec![0.0; total.len() + one.len() - 1];
            for (i, a) in total.iter().enumerate() {
                for (j, b) in one.iter().enumerate() {
                    next[i + j] += a * b;
                }
            }
            total = next;
        }
        total
    }

    fn lookup(table: &[f64]) -> impl Fn(i64) -> f64 + '_ {
        let mid = (table.len() / 2) as i64;
        move |x| table.get((x + mid) as usize).copied().unwrap_or(0.0)
    }

    #[test]
    fn discrete_laplace_fits_its_distribution() {
        let seed = base_seed();
        for (i, (s, t, k)) in [(1u128, 1u128, 6), (5, 2, 12), (1, 3, 2), (40, 1, 60)]
            .into_iter()
            .enumerate()
        {
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ i as u64);
            let draws: Vec<i64> = (0..100_000)
                .map(|_| discrete_laplace(&mut rng, s, t) as i64)
                .collect();
            let table = pmf_table(Distribution::Laplace { num: s, den: t }, 4000);
            assert_fits(
                &format!("Laplace {s}/{t}, seed {seed}"),
                &draws,
                &lookup(&table),
                k,
            );
            let mean = draws.iter().sum::<i64>() as f64 / draws.len() as f64;
            assert!(
                mean.abs() < 0.1 * (s as f64 / t as f64).max(1.0),
                "mean {mean}"
            );
        }
    }

    #[test]
    fn discrete_gaussian_fits_its_distribution() {
        let seed = base_seed();
        for (i, (sigma2, k)) in [(1u128, 4), (7, 8), (400, 50)].into_iter().enumerate() {
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ (100 + i as u64));
            let draws: Vec<i64> = (0..100_000)
                .map(|_| discrete_gaussian(&mut rng, sigma2) as i64)
                .collect();
            let table = pmf_table(Distribution::Gaussian { sigma2 }, 4000);
            assert_fits(
                &format!("Gaussian σ²={sigma2}, seed {seed}"),
                &draws,
                &lookup(&table),
                k,
            );
        }
        // Large σ² (the arbitrary-precision acceptance test): the right
        // spread, and the standardised draws fit a normal distribution.
        for big in [1u128 << 56, 1u128 << 80, 1u128 << 118] {
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ big as u64);
            let sd = (big as f64).sqrt();
            let z: Vec<f64> = (0..20_000)
                .map(|_| discrete_gaussian(&mut rng, big) as f64 / sd)
                .collect();
            let var = z.iter().map(|x| x * x).sum::<f64>() / z.len() as f64;
            assert!(
                (var - 1.0).abs() < 0.05,
                "σ² = 2^{}: variance ratio {var}",
                big.ilog2()
            );
            let within = z.iter().filter(|x| x.abs() <= 1.959964).count() as f64 / z.len() as f64;
            assert!(
                (within - 0.95).abs() < 0.007,
                "σ² = 2^{}: {within} within 1.96σ",
                big.ilog2()
            );
        }
    }

    /// Every party draws its noise from its own CSPRNG; the revealed total
    /// carries the sum. A coalition knows (and can subtract) its own draws:
    /// what remains for every coalition short of all parties must still be
    /// the declared honest noise — here, for every coalition of 3 parties,
    /// the residual is checked against the exact distribution of the sum of
    /// the honest parties' draws, which for coalitions of all but one is a
    /// single calibrated draw.
    #[test]
    fn removing_any_coalition_leaves_calibrated_noise() {
        let seed = base_seed();
        let parties = 3;
        for (di, d) in [
            Distribution::Laplace { num: 3, den: 2 },
            Distribution::Gaussian { sigma2: 5 },
        ]
        .into_iter()
        .enumerate()
        {
            let spec = NoiseSpec {
                distribution: d,
                bound: 1 << 40,
            };
            let mut rngs: Vec<ChaCha20Rng> = (0..parties)
                .map(|p| ChaCha20Rng::seed_from_u64(seed ^ (1000 * (di as u64 + 1) + p as u64)))
                .collect();
            let draws: Vec<Vec<i64>> = (0..100_000)
                .map(|_| {
                    rngs.iter_mut()
                        .map(|r| spec.draw(r).expect("within bound") as i64)
                        .collect()
                })
                .collect();
            let one = pmf_table(d, 200);
            for coalition in 0u32..(1 << parties) - 1 {
                let honest: Vec<usize> =
                    (0..parties).filter(|p| coalition & (1 << p) == 0).collect();
                let residual: Vec<i64> = draws
                    .iter()
                    .map(|row| honest.iter().map(|&p| row[p]).sum())
                    .collect();
                let table = convolve(&one, honest.len());
                assert_fits(
                    &format!("{d:?} with coalition {coalition:03b} removed, seed {seed}"),
                    &residual,
                    &lookup(&table),
                    8,
                );
            }
        }
    }

    /// Through the engine: three parties share zeros and add their noise
    /// shares; what the leader reveals is exactly the summed noise, which
    /// must fit the distribution of three independent draws.
    #[tokio::test]
    async fn the_revealed_total_carries_the_summed_noise() {
        use crate::shares::{SharedTable, Width};
        use crate::transport::InMemoryNetwork;
        use crate::{AdditiveEngine, SecureSum};
        let parties: Vec<String> = (0..3).map(|i| format!("p{i}")).collect();
        let d = Distribution::Laplace { num: 2, den: 1 };
        let spec = NoiseSpec {
            distribution: d,
            bound: 1 << 40,
        };
        let rows = 1000;
        let mut totals = Vec::new();
        let seed = base_seed();
        for run in 0..40u64 {
            let net = InMemoryNetwork::connect(&parties, std::time::Duration::from_secs(10));
            let mut tasks = Vec::new();
            for (i, t) in net.into_iter().enumerate() {
                let mut e =
                    AdditiveEngine::new(parties.clone(), parties[i].clone(), parties[0].clone());
                // Seeded here, so that the test is deterministic in CI
                // (gateways draw with `draw_all`, seeded by the OS).
                let mut rng = ChaCha20Rng::seed_from_u64(seed ^ (run * 16 + i as u64));
                e.noise = vec![
                    Some((0..rows).map(|_| spec.draw(&mut rng).unwrap()).collect()),
                    None,
                ];
                tasks.push(tokio::spawn(async move {
                    let input = SharedTable::zeros(vec![], &[Width::Z64, Width::Z128], rows);
                    e.sum_and_reveal(&t, &input).await.unwrap()
                }));
            }
            let mut out = None;
            for t in tasks {
                if let Some(r) = t.await.unwrap() {
                    out = Some(r);
                }
            }
            let out = out.unwrap();
            assert!(
                out[1].iter().all(|&v| v == 0),
                "the un-noised column stays exact"
            );
            totals.extend(out[0].iter().map(|&v| v as i64));
        }
        let table = convolve(&pmf_table(d, 400), 3);
        assert_fits(
            "engine total of 3 Laplace(2) draws",
            &totals,
            &lookup(&table),
            10,
        );
    }

    #[test]
    fn draw_all_gives_one_draw_per_row_where_asked() {
        let spec = NoiseSpec {
            distribution: Distribution::Laplace { num: 3, den: 1 },
            bound: 1 << 40,
        };
        let d = draw_all(&[None, Some(spec)], 7).unwrap();
        assert!(d[0].is_none());
        assert_eq!(d[1].as_ref().map(|v| v.len()), Some(7));
        let tight = NoiseSpec { bound: 0, ..spec };
        // With a bound of 0 some draw of 10^4 is non-zero: refused, not wrapped.
        let e = draw_all(&[Some(tight)], 10_000).unwrap_err();
        assert!(e.contains("safety bound"), "{e}");
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
