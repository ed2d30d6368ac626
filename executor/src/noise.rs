//! Exact integer noise for differential privacy (the first piece of the DP
//! issue): the discrete Laplace and discrete Gaussian distributions sampled
//! with integer arithmetic only, after Canonne, Kamath and Steinke, "The
//! Discrete Gaussian for Differential Privacy" (NeurIPS 2020), Algorithms
//! 1–3. No floating point is involved, so the attack on textbook
//! floating-point Laplace noise (Mironov, CCS 2012) does not apply: every
//! probability is an exact rational, realised by comparing uniform integers.
//!
//! Exact means exact at every parameter the functions accept: no product
//! is allowed to overflow into an early exit, a redraw or a saturation.
//! Where a 128-bit product does not fit, the computation continues either
//! in arbitrary precision (`BigUint`) or by an equivalent factorisation
//! (see [`bernoulli_exp`]). Uniform integers come from our own rejection
//! sampler over [`RngCore::next_u64`] (rand's `random_range` is only
//! guaranteed unbiased with a crate feature we do not enable).
//!
//! The only event the samplers cannot express is a draw whose magnitude
//! does not fit the `i128` they return: [`try_discrete_laplace`] and
//! [`try_discrete_gaussian`] report it as `None` (and [`NoiseSpec::draw`]
//! treats it like a draw beyond its bound: the query aborts, it is never
//! clipped or redrawn).
//!
//! Written here because no maintained crate offers exact discrete Laplace
//! sampling over a caller-chosen CSPRNG; the algorithms are short and
//! tested against their exact distribution below.

use num_bigint::BigUint;
use rand::{CryptoRng, Rng, RngCore};

/// A uniform integer in `0..n`, without bias: the minimal number of bits
/// for `n - 1` is drawn from `next_u64` and a value `≥ n` is rejected (each
/// attempt succeeds with probability above 1/2). `n = 1` draws nothing and
/// gives 0.
///
/// # Panics
/// If `n = 0` (no integer lies below it); every caller passes a positive
/// `n` by construction.
fn uniform_u128_below<R: RngCore + ?Sized>(rng: &mut R, n: u128) -> u128 {
    assert!(n > 0, "a uniform integer below 0 does not exist");
    let bits = 128 - (n - 1).leading_zeros();
    if bits == 0 {
        return 0;
    }
    loop {
        let x = if bits <= 64 {
            u128::from(rng.next_u64() >> (64 - bits))
        } else {
            let hi = rng.next_u64() >> (128 - bits);
            (u128::from(hi) << 64) | u128::from(rng.next_u64())
        };
        if x < n {
            return x;
        }
    }
}

/// A fair bit (the top bit of one `next_u64`).
fn fair_bit<R: RngCore + ?Sized>(rng: &mut R) -> bool {
    rng.next_u64() >> 63 == 1
}

/// [`uniform_u128_below`] for `n` beyond 128 bits, the same way: the bits
/// of `n - 1` drawn from `next_u64`, the excess masked off, `≥ n` rejected.
///
/// # Panics
/// If `n = 0`; every caller passes a positive `n` by construction.
fn uniform_below<R: RngCore + ?Sized>(rng: &mut R, n: &BigUint) -> BigUint {
    assert!(n.bits() > 0, "a uniform integer below 0 does not exist");
    let bits = (n - 1u32).bits();
    if bits == 0 {
        return BigUint::ZERO;
    }
    let words = bits.div_ceil(64) as usize;
    let excess = words as u64 * 64 - bits;
    let mut digits = vec![0u32; 2 * words];
    loop {
        for i in 0..words {
            let mut w = rng.next_u64();
            if i + 1 == words {
                w &= u64::MAX >> excess;
            }
            digits[2 * i] = w as u32;
            digits[2 * i + 1] = (w >> 32) as u32;
        }
        let x = BigUint::new(digits.clone());
        if &x < n {
            return x;
        }
    }
}

/// Bernoulli(exp(-num/den)) for num/den ≥ 0, exactly (CKS Algorithm 1).
///
/// Exact at every `num` and `den > 0`: for γ = num/den ≤ 1 the series
/// draws Bernoulli(γ/k), k = 1, 2, … until one fails, and returns whether
/// the failure came at an odd k. Bernoulli(num/(den·k)) is a uniform
/// integer below den·k compared to num; where den·k does not fit 128 bits
/// it is realised as Bernoulli(1/k) ∧ Bernoulli(num/den) from two
/// independent uniform integers (below k and below den), which is the
/// same event: a uniform value below den·k written as q·den + r is below
/// num ≤ den exactly when q = 0 and r < num. The series never stops early.
/// For γ > 1, exp(-γ) = exp(-1)^⌊γ⌋ · exp(-(γ - ⌊γ⌋)), each factor drawn
/// as above (no product at all).
pub fn bernoulli_exp<R: Rng + CryptoRng>(rng: &mut R, num: u128, den: u128) -> bool {
    assert!(den > 0, "a rational needs a positive denominator");
    if num <= den {
        let mut k: u128 = 1;
        loop {
            let success = match den.checked_mul(k) {
                Some(d) => uniform_u128_below(rng, d) < num,
                None => uniform_u128_below(rng, k) == 0 && uniform_u128_below(rng, den) < num,
            };
            if !success {
                return k % 2 == 1;
            }
            // Reaching k = 2^128 needs 2^128 - 1 successes in a row, each
            // of probability at most 1/k: impossible, not merely unlikely.
            k = k.checked_add(1).expect("2^128 successes of Bernoulli(γ/k)");
        }
    }
    for _ in 0..num / den {
        if !bernoulli_exp(rng, 1, 1) {
            return false;
        }
    }
    bernoulli_exp(rng, num % den, den)
}

/// [`bernoulli_exp`] for rationals beyond 128 bits (the discrete
/// Gaussian's acceptance test at large σ), exactly, by the same algorithm:
/// Bernoulli(num/(den·k)) as Bernoulli(1/k) ∧ Bernoulli(num/den), so no
/// product grows with k; ⌊γ⌋ in arbitrary precision.
fn bernoulli_exp_big<R: Rng + CryptoRng>(rng: &mut R, num: &BigUint, den: &BigUint) -> bool {
    assert!(den.bits() > 0, "a rational needs a positive denominator");
    if num <= den {
        let mut k: u128 = 1;
        loop {
            let success = uniform_u128_below(rng, k) == 0 && &uniform_below(rng, den) < num;
            if !success {
                return k % 2 == 1;
            }
            k = k.checked_add(1).expect("2^128 successes of Bernoulli(γ/k)");
        }
    }
    let whole = num / den;
    let mut i = BigUint::ZERO;
    while i < whole {
        if !bernoulli_exp(rng, 1, 1) {
            return false;
        }
        i += 1u32;
    }
    bernoulli_exp_big(rng, &(num % den), den)
}

/// The magnitude of a draw: 128-bit where it fits, arbitrary precision
/// where it does not (never clipped).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Magnitude {
    Fits(u128),
    Big(BigUint),
}

impl Magnitude {
    fn is_zero(&self) -> bool {
        matches!(self, Magnitude::Fits(0))
    }

    fn to_big(&self) -> BigUint {
        match self {
            Magnitude::Fits(m) => BigUint::from(*m),
            Magnitude::Big(m) => m.clone(),
        }
    }

    /// The signed draw, if it fits `i128`.
    fn signed(&self, negative: bool) -> Option<i128> {
        let Magnitude::Fits(m) = *self else {
            return None;
        };
        let m = i128::try_from(m).ok()?;
        Some(if negative { -m } else { m })
    }
}

/// CKS Algorithm 2, P(x) ∝ exp(-|x|·t/s), as (negative, |x|).
///
/// Exact at every `s, t > 0` in u128: U is uniform below s (our unbiased
/// sampler), the test Bernoulli(exp(-U/s)) and the geometric V (a run of
/// Bernoulli(exp(-1))) are exact by [`bernoulli_exp`], X = U + s·V and
/// ⌊X/t⌋ are computed in 128 bits where they fit and in `BigUint` where
/// they do not (so no V is ever discarded), and the sign is a fair bit.
fn laplace_parts<R: Rng + CryptoRng>(rng: &mut R, s: u128, t: u128) -> (bool, Magnitude) {
    assert!(s > 0 && t > 0, "the scale s/t must be positive");
    // In CKS's notation the output scale is t'/s' with t' = s and s' = t:
    // the uniform part runs over the numerator, the division is by the
    // denominator.
    loop {
        let u = uniform_u128_below(rng, s);
        if !bernoulli_exp(rng, u, s) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp(rng, 1, 1) {
            // 2^128 successes of Bernoulli(1/e) in a row: impossible.
            v = v.checked_add(1).expect("2^128 successes of Bernoulli(1/e)");
        }
        let y = match s.checked_mul(v).and_then(|sv| sv.checked_add(u)) {
            Some(x) => Magnitude::Fits(x / t),
            None => {
                let y = (BigUint::from(s) * BigUint::from(v) + BigUint::from(u)) / BigUint::from(t);
                match u128::try_from(&y) {
                    Ok(y) => Magnitude::Fits(y),
                    Err(_) => Magnitude::Big(y),
                }
            }
        };
        let negative = fair_bit(rng);
        if negative && y.is_zero() {
            continue;
        }
        return (negative, y);
    }
}

/// One draw of the discrete Laplace distribution with scale `s/t`:
/// P(x) ∝ exp(-|x|·t/s) over the integers (CKS Algorithm 2, which names
/// the scale t/s), or `None` if the draw's magnitude exceeds `i128::MAX`
/// (possible only at scales s/t beyond about 2^120; the draw is exact, it
/// just has no `i128`). Exact at every `s, t > 0`: see `laplace_parts`.
///
/// # Panics
/// If `s` or `t` is 0 (use [`Distribution::check`] on parameters from a
/// user or the network first, as [`draw_all`] does).
pub fn try_discrete_laplace<R: Rng + CryptoRng>(rng: &mut R, s: u128, t: u128) -> Option<i128> {
    let (negative, y) = laplace_parts(rng, s, t);
    y.signed(negative)
}

/// [`try_discrete_laplace`], for scales whose draws fit `i128`.
///
/// # Panics
/// If `s` or `t` is 0, or if the draw does not fit `i128` (probability
/// about exp(-2^127·t/s): negligible up to s/t ≈ 2^120, not beyond;
/// scales from a user or the network go through [`NoiseSpec::draw`],
/// which returns `None` instead).
pub fn discrete_laplace<R: Rng + CryptoRng>(rng: &mut R, s: u128, t: u128) -> i128 {
    try_discrete_laplace(rng, s, t).expect("a discrete Laplace draw beyond i128")
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
/// exp(-(|Y| - σ²/t)²/(2σ²)) = exp(-(|Y|·t - σ²)²/(2σ²t²))), or `None` if
/// the draw exceeds `i128` (probability below exp(-2^132) for σ² ≤ 2^120).
///
/// Exact at every σ² in 1..=2^120: the proposal is exact (see
/// `laplace_parts`), and the acceptance rational is formed in 128 bits
/// only when numerator and denominator both fit, in `BigUint` otherwise
/// (never approximated), and then drawn exactly by [`bernoulli_exp`] or
/// `bernoulli_exp_big`, neither of which stops its series early.
///
/// # Panics
/// If σ² is outside 1..=[`MAX_SIGMA2`] (use [`Distribution::check`] on
/// parameters from a user or the network first, as [`draw_all`] does).
pub fn try_discrete_gaussian<R: Rng + CryptoRng>(rng: &mut R, sigma2: u128) -> Option<i128> {
    assert!(
        (1..=MAX_SIGMA2).contains(&sigma2),
        "σ² must be in 1..=2^120"
    );
    let t = isqrt(sigma2) + 1;
    // 2σ²t² ≤ 2^121·(2^60 + 1)^2: fits 128 bits only for σ² below ~2^63.
    let den = sigma2
        .checked_mul(2)
        .and_then(|d| d.checked_mul(t.checked_mul(t)?));
    loop {
        let (negative, y) = laplace_parts(rng, t, 1);
        let small = match (&y, den) {
            (Magnitude::Fits(m), Some(den)) => m
                .checked_mul(t)
                .and_then(|a| {
                    let diff = a.abs_diff(sigma2);
                    diff.checked_mul(diff)
                })
                .map(|num| (num, den)),
            _ => None,
        };
        let accept = match small {
            Some((num, den)) => bernoulli_exp(rng, num, den),
            None => {
                let tb = BigUint::from(t);
                let s2 = BigUint::from(sigma2);
                let a = y.to_big() * &tb;
                let diff = if a >= s2 { &a - &s2 } else { &s2 - &a };
                let num = &diff * &diff;
                let den = s2 * 2u32 * &tb * &tb;
                bernoulli_exp_big(rng, &num, &den)
            }
        };
        if accept {
            return y.signed(negative);
        }
    }
}

/// [`try_discrete_gaussian`] as an `i128`.
///
/// # Panics
/// If σ² is outside 1..=[`MAX_SIGMA2`], or on a draw beyond `i128`
/// (probability below exp(-2^132)).
pub fn discrete_gaussian<R: Rng + CryptoRng>(rng: &mut R, sigma2: u128) -> i128 {
    try_discrete_gaussian(rng, sigma2).expect("a discrete Gaussian draw beyond i128")
}

/// The noise a party draws for one revealed total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    /// Discrete Laplace of scale num/den.
    Laplace { num: u128, den: u128 },
    /// Discrete Gaussian of variance parameter sigma2.
    Gaussian { sigma2: u128 },
}

impl Distribution {
    /// Whether the samplers take these parameters: a positive Laplace
    /// scale num/den (num, den > 0), σ² in 1..=[`MAX_SIGMA2`].
    pub fn check(&self) -> Result<(), String> {
        match *self {
            Distribution::Laplace { num, den } if num == 0 || den == 0 => Err(format!(
                "the discrete Laplace scale {num}/{den} is not positive"
            )),
            Distribution::Gaussian { sigma2 } if !(1..=MAX_SIGMA2).contains(&sigma2) => Err(
                format!("the discrete Gaussian σ² = {sigma2} is outside 1..=2^120"),
            ),
            _ => Ok(()),
        }
    }
}

/// One draw per row for every column that has a spec, from ChaCha20
/// seeded by the operating system; an error if a spec's parameters are
/// invalid, a draw falls beyond its bound (probability below 10^-25) or
/// the OS has no randomness.
pub fn draw_all(
    specs: &[Option<NoiseSpec>],
    rows: usize,
) -> Result<Vec<Option<Vec<i128>>>, String> {
    use rand::SeedableRng;
    if specs.iter().all(|s| s.is_none()) {
        return Ok(vec![None; specs.len()]);
    }
    for spec in specs.iter().flatten() {
        spec.distribution.check()?;
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
    /// One exact draw; `None` if it exceeds the bound (probability below
    /// 10^-25 for the bounds the planner sets) or `i128`, or if the
    /// parameters fail [`Distribution::check`]. Never panics.
    pub fn draw<R: Rng + CryptoRng>(&self, rng: &mut R) -> Option<i128> {
        self.distribution.check().ok()?;
        let x = match self.distribution {
            Distribution::Laplace { num, den } => try_discrete_laplace(rng, num, den)?,
            Distribution::Gaussian { sigma2 } => try_discrete_gaussian(rng, sigma2)?,
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
        use crate::{AdditiveEngine, Engine};
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
                    e.run(&t, &input).await.unwrap()
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
                out[1].iter().all(|&v| v == arrow::datatypes::i256::ZERO),
                "the un-noised column stays exact"
            );
            totals.extend(out[0].iter().map(|&v| v.as_i128() as i64));
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

    /// An RNG that counts its `next_u64` calls (rejection rates).
    struct Counting<R> {
        inner: R,
        calls: u64,
    }

    impl<R: RngCore> RngCore for Counting<R> {
        fn next_u32(&mut self) -> u32 {
            self.calls += 1;
            self.inner.next_u32()
        }
        fn next_u64(&mut self) -> u64 {
            self.calls += 1;
            self.inner.next_u64()
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            self.calls += 1;
            self.inner.fill_bytes(dst)
        }
    }

    /// Pearson's chi-square of observed counts against expected
    /// probabilities, checked against the loose 0.999 bound of
    /// [`assert_fits`].
    fn assert_counts_fit(what: &str, seen: &[u64], probs: &[f64]) {
        let n: u64 = seen.iter().sum();
        let stat: f64 = seen
            .iter()
            .zip(probs)
            .map(|(&o, &p)| {
                let want = n as f64 * p;
                (o as f64 - want).powi(2) / want
            })
            .sum();
        let dof = (seen.len() - 1) as f64;
        let bound = dof + 3.1 * (2.0 * dof).sqrt() + 10.0;
        assert!(
            stat < bound,
            "{what}: chi-square {stat:.1} with {dof} degrees of freedom exceeds {bound:.1} ({seen:?})"
        );
    }

    /// `|seen/n - p|` within 5 binomial standard deviations.
    fn assert_frequency(what: &str, hits: u64, n: u64, p: f64) {
        let f = hits as f64 / n as f64;
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (f - p).abs() < 5.0 * sd + 1e-12,
            "{what}: frequency {f:.5} vs exact {p:.5} (5 sd = {:.5})",
            5.0 * sd
        );
    }

    #[test]
    fn uniform_u128_below_is_unbiased_for_small_n() {
        let seed = base_seed();
        for n in [2u128, 3, 5, 6, 7] {
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ (200 + n as u64));
            let draws = 30_000 * n as u64;
            let mut seen = vec![0u64; n as usize];
            for _ in 0..draws {
                let x = uniform_u128_below(&mut rng, n);
                assert!(x < n);
                seen[x as usize] += 1;
            }
            assert_counts_fit(
                &format!("uniform below {n}, seed {seed}"),
                &seen,
                &vec![1.0 / n as f64; n as usize],
            );
        }
    }

    #[test]
    fn uniform_u128_below_one_is_zero_and_draws_nothing() {
        let mut rng = Counting {
            inner: ChaCha20Rng::seed_from_u64(base_seed()),
            calls: 0,
        };
        for _ in 0..1000 {
            assert_eq!(uniform_u128_below(&mut rng, 1), 0);
            assert_eq!(uniform_below(&mut rng, &BigUint::from(1u32)), BigUint::ZERO);
        }
        assert_eq!(rng.calls, 0);
    }

    #[test]
    #[should_panic(expected = "below 0")]
    fn uniform_u128_below_zero_is_refused() {
        uniform_u128_below(&mut ChaCha20Rng::seed_from_u64(1), 0);
    }

    #[test]
    #[should_panic(expected = "below 0")]
    fn uniform_below_zero_is_refused() {
        uniform_below(&mut ChaCha20Rng::seed_from_u64(1), &BigUint::ZERO);
    }

    /// Near 2^127 the bit length is 128 and about half of the attempts are
    /// rejected: the draws stay below n, split evenly, and the number of
    /// words drawn matches the rejection rate.
    #[test]
    fn uniform_u128_below_rejects_near_2_127() {
        let seed = base_seed();
        let draws = 40_000u64;
        for (i, n) in [
            (1u128 << 127) + 1,
            (1u128 << 127) - 1,
            (1u128 << 127) + (1 << 126),
            (1u128 << 64) + 1,
            u128::MAX,
        ]
        .into_iter()
        .enumerate()
        {
            let mut rng = Counting {
                inner: ChaCha20Rng::seed_from_u64(seed ^ (300 + i as u64)),
                calls: 0,
            };
            let mut thirds = [0u64; 3];
            for _ in 0..draws {
                let x = uniform_u128_below(&mut rng, n);
                assert!(x < n, "{x} ≥ {n}");
                // ⌊3x/n⌋ without overflow: compare with n/3 and 2n/3.
                let third = n / 3;
                thirds[if x < third {
                    0
                } else if x < n - third {
                    1
                } else {
                    2
                }] += 1;
            }
            let third = (n / 3) as f64 / n as f64;
            assert_counts_fit(
                &format!("uniform below {n:#x} in thirds, seed {seed}"),
                &thirds,
                &[third, 1.0 - 2.0 * third, third],
            );
            // Each attempt takes two words and succeeds with probability
            // n / 2^bits.
            let bits = 128 - (n - 1).leading_zeros();
            let accept = n as f64 / 2f64.powi(bits as i32);
            let attempts = rng.calls as f64 / 2.0;
            let want = draws as f64 / accept;
            // Attempts per draw are geometric: sd sqrt(1-p)/p per draw.
            let sd = (draws as f64 * (1.0 - accept)).sqrt() / accept;
            assert!(
                (attempts - want).abs() < 5.0 * sd + 1.0,
                "uniform below {n:#x}: {attempts} attempts for {draws} draws, expected {want:.0}"
            );
        }
    }

    #[test]
    fn uniform_below_big_is_unbiased() {
        let seed = base_seed();
        let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 400);
        for n in [3u32, 5, 7, 8] {
            let nb = BigUint::from(n);
            let mut seen = vec![0u64; n as usize];
            for _ in 0..20_000 * n {
                let x = u32::try_from(&uniform_below(&mut rng, &nb)).unwrap();
                seen[x as usize] += 1;
            }
            assert_counts_fit(
                &format!("big uniform below {n}, seed {seed}"),
                &seen,
                &vec![1.0 / n as f64; n as usize],
            );
        }
        // Beyond 128 bits, just above a power of two (about half rejected),
        // in thirds.
        let n = (BigUint::from(1u32) << 200u32) + 1u32;
        let third = &n / 3u32;
        let upper = &n - &third;
        let mut thirds = [0u64; 3];
        for _ in 0..30_000 {
            let x = uniform_below(&mut rng, &n);
            assert!(x < n);
            thirds[if x < third {
                0
            } else if x < upper {
                1
            } else {
                2
            }] += 1;
        }
        assert_counts_fit(
            &format!("big uniform below 2^200+1, seed {seed}"),
            &thirds,
            &[1.0 / 3.0; 3],
        );
    }

    /// The cases where den·k overflows 128 bits (den ≥ 2^127 at k = 2,
    /// den ≥ 2^126 at k = 4), which used to cut the series short, plus
    /// den ≈ 2^100 and γ > 1 (with ⌊γ⌋ of 1 and 2).
    #[test]
    fn bernoulli_exp_is_exact_where_den_times_k_overflows() {
        let seed = base_seed();
        let n = 40_000u64;
        let mut case = 0u64;
        for den in [
            (1u128 << 100) + 7,
            (1u128 << 126) + 3,
            (1u128 << 127) + 1,
            u128::MAX - 2,
            u128::MAX,
        ] {
            // γ ≈ 0.3, 0.95, 1.7 and 2.4, where num fits 128 bits.
            let tenth = den / 10;
            let nums: Vec<u128> = [
                (tenth * 3).checked_add(5),
                (den / 20 * 19).checked_add(1),
                (tenth * 7).checked_add(den),
                (tenth * 4)
                    .checked_add(den)
                    .and_then(|x| x.checked_add(den)),
            ]
            .into_iter()
            .flatten()
            .collect();
            for num in nums {
                case += 1;
                let mut rng = ChaCha20Rng::seed_from_u64(seed ^ (500 + case));
                let hits = (0..n).filter(|_| bernoulli_exp(&mut rng, num, den)).count() as u64;
                // γ in f64: the whole part and the remainder, each to 1e-16.
                let gamma = (num / den) as f64 + (num % den) as f64 / den as f64;
                assert_frequency(
                    &format!("exp(-{num}/{den}) (γ = {gamma:.3}), seed {seed}"),
                    hits,
                    n,
                    (-gamma).exp(),
                );
            }
        }
    }

    #[test]
    fn bernoulli_exp_big_matches_its_probability() {
        let seed = base_seed();
        let n = 30_000u64;
        let den = (BigUint::from(1u32) << 200u32) + 12345u32;
        for (i, tenths) in [0u32, 3, 10, 17, 24].into_iter().enumerate() {
            let num = &den * tenths / 10u32;
            let gamma = tenths as f64 / 10.0;
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ (600 + i as u64));
            let hits = (0..n)
                .filter(|_| bernoulli_exp_big(&mut rng, &num, &den))
                .count() as u64;
            assert_frequency(
                &format!("big exp(-{gamma}), seed {seed}"),
                hits,
                n,
                (-gamma).exp(),
            );
        }
    }

    /// Φ, from the complementary error function (Numerical Recipes'
    /// Chebyshev fit, relative error below 1.2e-7: far below what the
    /// chi-square below can see).
    fn normal_cdf(z: f64) -> f64 {
        let x = -z / std::f64::consts::SQRT_2;
        let a = x.abs();
        let t = 1.0 / (1.0 + 0.5 * a);
        let r = t
            * (-a * a - 1.26551223
                + t * (1.00002368
                    + t * (0.37409196
                        + t * (0.09678418
                            + t * (-0.18628806
                                + t * (0.27886807
                                    + t * (-1.13520398
                                        + t * (1.48851587
                                            + t * (-0.82215223 + t * 0.17087277)))))))))
                .exp();
        let erfc = if x >= 0.0 { r } else { 2.0 - r };
        0.5 * erfc
    }

    /// Draws at σ² where the distribution is effectively continuous: the
    /// sample variance over σ², the mean, the balance of signs and a
    /// chi-square of the standardised draws over N(0,1) bins, each within
    /// 5 standard errors of the sample size (the chi-square at the
    /// 0.999 bound).
    fn check_continuous_gaussian(what: &str, draws: &[i128], sigma2: u128) {
        let n = draws.len() as f64;
        let sd = (sigma2 as f64).sqrt();
        let z: Vec<f64> = draws.iter().map(|&x| x as f64 / sd).collect();
        let var = z.iter().map(|x| x * x).sum::<f64>() / n;
        assert!(
            (var - 1.0).abs() < 5.0 * (2.0 / n).sqrt(),
            "{what}: variance/σ² = {var:.4}"
        );
        let mean = z.iter().sum::<f64>() / n;
        assert!(mean.abs() < 5.0 / n.sqrt(), "{what}: mean/σ = {mean:.4}");
        let pos = draws.iter().filter(|&&x| x > 0).count() as f64;
        let neg = draws.iter().filter(|&&x| x < 0).count() as f64;
        assert!(
            (pos - neg).abs() < 5.0 * (pos + neg).sqrt(),
            "{what}: {pos} positive vs {neg} negative draws"
        );
        let edges = [-2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5];
        let mut seen = vec![0u64; edges.len() + 1];
        for &x in &z {
            seen[edges.iter().filter(|&&e| x >= e).count()] += 1;
        }
        let mut probs = Vec::new();
        let mut below = 0.0;
        for &e in &edges {
            let c = normal_cdf(e);
            probs.push(c - below);
            below = c;
        }
        probs.push(1.0 - below);
        assert_counts_fit(&format!("{what}: N(0,1) bins"), &seen, &probs);
    }

    /// The band where 2σ²t² (t = ⌊σ⌋+1) crosses 2^128 and den·k used to
    /// overflow in the acceptance test, and the largest σ² taken.
    #[test]
    fn discrete_gaussian_is_exact_across_the_128_bit_band() {
        let seed = base_seed();
        for (i, log2) in [62.0f64, 62.5, 63.0, 63.5, 64.0, 120.0]
            .into_iter()
            .enumerate()
        {
            let sigma2 = if log2.fract() == 0.0 {
                1u128 << log2 as u32
            } else {
                2f64.powf(log2) as u128
            };
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ (700 + i as u64));
            let draws: Vec<i128> = (0..12_000)
                .map(|_| discrete_gaussian(&mut rng, sigma2))
                .collect();
            check_continuous_gaussian(&format!("σ² = 2^{log2}, seed {seed}"), &draws, sigma2);
        }
    }

    /// σ² = 1, 2, 3: against the exact pmf, and the sample variance
    /// against the exact variance of the discrete distribution.
    #[test]
    fn discrete_gaussian_is_exact_at_tiny_sigma() {
        let seed = base_seed();
        for sigma2 in [1u128, 2, 3] {
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ (800 + sigma2 as u64));
            let draws: Vec<i64> = (0..60_000)
                .map(|_| discrete_gaussian(&mut rng, sigma2) as i64)
                .collect();
            let table = pmf_table(Distribution::Gaussian { sigma2 }, 200);
            let pmf = lookup(&table);
            assert_fits(
                &format!("Gaussian σ²={sigma2}, seed {seed}"),
                &draws,
                &pmf,
                5,
            );
            let var: f64 = (-200i64..=200).map(|x| (x * x) as f64 * pmf(x)).sum();
            let n = draws.len() as f64;
            let seen = draws.iter().map(|&x| (x * x) as f64).sum::<f64>() / n;
            let fourth: f64 = (-200i64..=200).map(|x| (x as f64).powi(4) * pmf(x)).sum();
            let sd = ((fourth - var * var) / n).sqrt();
            assert!(
                (seen - var).abs() < 5.0 * sd,
                "σ²={sigma2}: sample variance {seen:.4} vs exact {var:.4}"
            );
            let mean = draws.iter().sum::<i64>() as f64 / n;
            assert!(
                mean.abs() < 5.0 * (var / n).sqrt(),
                "σ²={sigma2}: mean {mean}"
            );
        }
    }

    /// At huge scales (X = U + s·V and ⌊X/t⌋ beyond 128 bits on the way):
    /// mean ≈ 0 and E|X| = 1/sinh(t/s) ≈ s/t, within 5 standard errors
    /// (|X|/b is nearly Exp(1), X/b nearly Laplace(1) of variance 2).
    #[test]
    fn discrete_laplace_is_exact_at_huge_scales() {
        let seed = base_seed();
        let n = 20_000usize;
        for (i, (s, t)) in [
            (1u128 << 64, 1u128),
            ((1u128 << 64) + 1, 3),
            (1u128 << 100, 1),
            ((1u128 << 100) + 12345, 7),
            (u128::MAX, 1 << 8),
            (u128::MAX - 1, (1 << 8) + 1),
        ]
        .into_iter()
        .enumerate()
        {
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ (900 + i as u64));
            let b = s as f64 / t as f64;
            let x: Vec<f64> = (0..n)
                .map(|_| try_discrete_laplace(&mut rng, s, t).expect("fits i128") as f64 / b)
                .collect();
            let mean = x.iter().sum::<f64>() / n as f64;
            assert!(
                mean.abs() < 5.0 * (2.0 / n as f64).sqrt(),
                "Laplace {s}/{t}: mean/b = {mean:.4}, seed {seed}"
            );
            let abs = x.iter().map(|v| v.abs()).sum::<f64>() / n as f64;
            let want = 1.0 / (1.0 / b).sinh() / b;
            assert!(
                (abs - want).abs() < 5.0 / (n as f64).sqrt(),
                "Laplace {s}/{t}: E|X|/b = {abs:.4} vs {want:.4}, seed {seed}"
            );
            let pos = x.iter().filter(|&&v| v > 0.0).count() as f64;
            let neg = x.iter().filter(|&&v| v < 0.0).count() as f64;
            assert!(
                (pos - neg).abs() < 5.0 * (pos + neg).sqrt(),
                "Laplace {s}/{t}: {pos} positive vs {neg} negative"
            );
        }
    }

    /// At scale 2^128 - 1 a draw exceeds i128 with probability
    /// P(|X| ≥ 2^127) = 2q^m/(1+q), q = exp(-1/b), m = 2^127 (≈ e^-1/2): it
    /// is reported (`None`), never clipped to i128::MAX nor redrawn; the
    /// draws that fit follow the truncated distribution.
    #[test]
    fn discrete_laplace_reports_draws_beyond_i128() {
        let seed = base_seed();
        let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 1000);
        let n = 40_000u64;
        let b = u128::MAX as f64;
        let spec = NoiseSpec {
            distribution: Distribution::Laplace {
                num: u128::MAX,
                den: 1,
            },
            bound: u128::MAX,
        };
        let mut beyond = 0u64;
        let mut fits = Vec::new();
        for _ in 0..n {
            match spec.draw(&mut rng) {
                None => beyond += 1,
                Some(x) => fits.push(x as f64 / b),
            }
        }
        let m = 2f64.powi(127);
        let q = (-1.0 / b).exp();
        let p = 2.0 * (-m / b).exp() / (1.0 + q);
        assert_frequency(&format!("draws beyond i128, seed {seed}"), beyond, n, p);
        // |X|/b given |X| < m/b ≈ 1/2: Exp(1) truncated at c = m/b.
        let c = m / b;
        let want = 1.0 - c * (-c).exp() / (1.0 - (-c).exp());
        let k = fits.len() as f64;
        let abs = fits.iter().map(|v| v.abs()).sum::<f64>() / k;
        // Its standard deviation is below c/sqrt(12)·2 (a loose bound).
        assert!(
            (abs - want).abs() < 5.0 * c / 6f64.sqrt() / k.sqrt(),
            "E|X|/b among draws that fit: {abs:.4} vs {want:.4}"
        );
    }

    #[test]
    fn invalid_parameters_are_errors_not_panics() {
        let mut rng = ChaCha20Rng::seed_from_u64(base_seed());
        for d in [
            Distribution::Laplace { num: 0, den: 1 },
            Distribution::Laplace { num: 1, den: 0 },
            Distribution::Gaussian { sigma2: 0 },
            Distribution::Gaussian {
                sigma2: MAX_SIGMA2 + 1,
            },
        ] {
            assert!(d.check().is_err(), "{d:?}");
            let spec = NoiseSpec {
                distribution: d,
                bound: u128::MAX,
            };
            assert_eq!(spec.draw(&mut rng), None);
            assert!(draw_all(&[Some(spec)], 3).is_err());
        }
        assert!(Distribution::Gaussian { sigma2: MAX_SIGMA2 }
            .check()
            .is_ok());
        assert!(Distribution::Laplace {
            num: u128::MAX,
            den: u128::MAX
        }
        .check()
        .is_ok());
    }
}
