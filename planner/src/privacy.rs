//! Differential privacy: what each party's policy demands of a query
//! ([`Requirement`]), the parameters all parties agree on ([`DpParams`]),
//! and the calibration of the noise every party adds to its share of each
//! revealed total ([`PartialNoise`]).
//!
//! Neighbouring datasets differ by one individual (added or removed). An
//! individual contributes at most `max_rows` rows at a party (enforced when
//! the table has an individual id), and every aggregated value is clamped
//! into its agreed range, so one individual moves
//! - a count by at most `max_rows` (summed over all groups: the L1 norm),
//! - a sum by at most `max_rows · max(|lo|, |hi|)`,
//! - a sum of squares by at most `max_rows · max(lo², hi²)`,
//!
//! in the fixed-point units of the partial. The query's ε is split evenly
//! over the revealed totals (pure ε adds up; for the Gaussian mechanism the
//! zCDP parameter ρ is split, which composes additively too).
//!
//! Colluders: a coalition knows its own noise and can subtract it. Neither
//! discrete Laplace nor discrete Gaussian noise splits exactly into integer
//! shares, so every party draws the full calibrated noise: the noise of any
//! single honest party alone gives the declared guarantee, which holds
//! against any coalition short of all parties. The revealed total carries
//! the sum of all parties' draws (n times the variance of one). Splitting
//! the noise when fewer colluders are assumed needs a divisible mechanism
//! (Skellam) and is not built; the `colluders` setting is checked (a
//! coalition of all parties cannot be protected against) but does not yet
//! lower the noise.
//!
//! Pure computation, no I/O and no randomness: every gateway derives the
//! same calibration from the same plan and parameters.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The noise mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// Discrete Laplace noise: pure ε-DP.
    Laplace,
    /// Discrete Gaussian noise: ρ-zCDP, stated as (ε, δ)-DP.
    Gaussian,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Laplace => "laplace",
            Mechanism::Gaussian => "gaussian",
        }
    }
}

/// One millionth: ε is kept in integer micro-units, so that budgets add up
/// exactly in the ledger.
pub const MICRO: u64 = 1_000_000;

/// ε in micro-units as text: `1`, `0.25`.
pub fn epsilon_text(micro: u64) -> String {
    let whole = micro / MICRO;
    let frac = micro % MICRO;
    if frac == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{:06}", frac)
            .trim_end_matches('0')
            .to_string()
    }
}

/// A closed range `[lo, hi]` that aggregated values are clamped into, as
/// exact decimal text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clamp {
    pub lo: String,
    pub hi: String,
}

/// An exact decimal: `mantissa / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dec {
    pub mantissa: i128,
    pub scale: u32,
}

impl Dec {
    /// Parses `-12.50`, `3`, `1e3` is refused (write the digits).
    pub fn parse(s: &str) -> Result<Dec, String> {
        let t = s.trim();
        let (neg, digits) = match t.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, t.strip_prefix('+').unwrap_or(t)),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() && frac.is_empty()
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
            || int.len() + frac.len() > 30
        {
            return Err(format!(
                "`{s}` is not a decimal number (write it as digits, e.g. 100000 or 12.5)"
            ));
        }
        let frac = frac.trim_end_matches('0');
        let m: i128 = format!("{int}{frac}").parse::<i128>().unwrap_or(0);
        Ok(Dec {
            mantissa: if neg { -m } else { m },
            scale: frac.len() as u32,
        })
    }

    /// The value in units of 10^-scale, if exact.
    pub fn units(self, scale: u32) -> Option<i128> {
        if scale >= self.scale {
            self.mantissa
                .checked_mul(10i128.checked_pow(scale - self.scale)?)
        } else {
            let d = 10i128.checked_pow(self.scale - scale)?;
            (self.mantissa % d == 0).then_some(self.mantissa / d)
        }
    }

    fn cmp_value(self, o: Dec) -> std::cmp::Ordering {
        let s = self.scale.max(o.scale);
        match (self.units(s), o.units(s)) {
            (Some(a), Some(b)) => a.cmp(&b),
            _ => std::cmp::Ordering::Equal,
        }
    }
}

impl Clamp {
    pub fn bounds(&self) -> Result<(Dec, Dec), String> {
        let lo = Dec::parse(&self.lo)?;
        let hi = Dec::parse(&self.hi)?;
        if lo.cmp_value(hi) == std::cmp::Ordering::Greater {
            return Err(format!(
                "the clamp range [{}, {}] is empty",
                self.lo, self.hi
            ));
        }
        Ok((lo, hi))
    }

    /// Whether `self` lies within `outer`.
    pub fn within(&self, outer: &Clamp) -> bool {
        match (self.bounds(), outer.bounds()) {
            (Ok((lo, hi)), Ok((olo, ohi))) => {
                lo.cmp_value(olo) != std::cmp::Ordering::Less
                    && hi.cmp_value(ohi) != std::cmp::Ordering::Greater
            }
            _ => false,
        }
    }

    /// The intersection, or `None` if it is empty.
    fn intersect(&self, o: &Clamp) -> Option<Clamp> {
        let (a_lo, a_hi) = self.bounds().ok()?;
        let (b_lo, b_hi) = o.bounds().ok()?;
        let lo = if a_lo.cmp_value(b_lo) == std::cmp::Ordering::Less {
            &o.lo
        } else {
            &self.lo
        };
        let hi = if a_hi.cmp_value(b_hi) == std::cmp::Ordering::Greater {
            &o.hi
        } else {
            &self.hi
        };
        let c = Clamp {
            lo: lo.clone(),
            hi: hi.clone(),
        };
        c.bounds().ok().map(|_| c)
    }
}

/// What one party's policy demands of one query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Requirement {
    pub party: String,
    pub mechanism: Mechanism,
    /// Largest ε this party allows for one query.
    pub epsilon_micro: u64,
    /// Largest δ (Gaussian only; 0 for Laplace).
    pub delta: f64,
    /// Parties that may collude; `None`: any coalition short of all.
    pub colluders: Option<u32>,
    /// Column → the range its values must be clamped into.
    pub clamps: BTreeMap<String, Clamp>,
    /// The column naming the individual a row belongs to, if any.
    pub individual_id: Option<String>,
    /// Most rows one individual contributes (enforced with an id).
    pub max_rows: u64,
    /// Groups whose noised row count is below this are left out (0: none).
    #[serde(default)]
    pub min_group_size: u64,
}

/// The privacy parameters of one query, agreed by every party: the
/// strictest combination of every party's requirement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpParams {
    pub mechanism: Mechanism,
    pub epsilon_micro: u64,
    pub delta: f64,
    /// Number of parties that may collude (at most all but one).
    pub colluders: u32,
    pub clamps: BTreeMap<String, Clamp>,
    pub individual_id: Option<String>,
    pub max_rows: u64,
    /// Groups whose noised row count is below this are left out (0: none).
    #[serde(default)]
    pub min_group_size: u64,
    /// The parties whose policies asked for DP.
    pub required_by: Vec<String>,
}

impl DpParams {
    /// The strictest parameters that satisfy every requirement, or why
    /// none do. `None` when no party asks for DP.
    pub fn merge(reqs: &[Requirement], parties: usize) -> Result<Option<DpParams>, String> {
        let Some(first) = reqs.first() else {
            return Ok(None);
        };
        let all_but_one = parties.saturating_sub(1) as u32;
        let mut p = DpParams {
            mechanism: first.mechanism,
            epsilon_micro: first.epsilon_micro,
            delta: first.delta,
            colluders: 0,
            clamps: BTreeMap::new(),
            individual_id: None,
            max_rows: first.max_rows,
            min_group_size: 0,
            required_by: Vec::new(),
        };
        for r in reqs {
            if r.mechanism == Mechanism::Laplace {
                // Pure ε-DP also satisfies every (ε, δ) requirement.
                p.mechanism = Mechanism::Laplace;
            }
            p.epsilon_micro = p.epsilon_micro.min(r.epsilon_micro);
            p.min_group_size = p.min_group_size.max(r.min_group_size);
            let c = r.colluders.unwrap_or(all_but_one);
            if c > all_but_one {
                return Err(format!(
                    "{}'s policy assumes {c} colluding parties, but a query among {parties} parties \
                     cannot protect against a coalition of all of them (privacy.colluders)",
                    r.party
                ));
            }
            p.colluders = p.colluders.max(c);
            for (col, clamp) in &r.clamps {
                let merged = match p.clamps.get(col) {
                    None => Some(clamp.clone()),
                    Some(have) => have.intersect(clamp),
                };
                let Some(m) = merged else {
                    return Err(format!(
                        "the parties' clamp ranges for column {col} do not overlap ({} asks for [{}, {}]); \
                         their governance teams must agree on overlapping ranges",
                        r.party, clamp.lo, clamp.hi
                    ));
                };
                p.clamps.insert(col.clone(), m);
            }
            match (&p.individual_id, &r.individual_id) {
                (Some(a), Some(b)) if a != b => {
                    return Err(format!(
                        "the parties name different individual id columns ({a} and {b}, the latter by {}); \
                         their policies must name the same column",
                        r.party
                    ))
                }
                (None, Some(b)) => p.individual_id = Some(b.clone()),
                _ => {}
            }
            p.required_by.push(r.party.clone());
        }
        // The row bound k is both what each party enforces (with an
        // individual id) and the sensitivity the noise is calibrated to. A
        // party that enforces it is protected by any k (rows beyond k are
        // dropped, and the noise grows with k); a party without an id only
        // *declares* that an individual has at most its k rows, so the
        // merged k may never be below its declaration.
        let enforced = reqs
            .iter()
            .filter(|r| r.individual_id.is_some())
            .map(|r| r.max_rows)
            .min();
        let declared = reqs
            .iter()
            .filter(|r| r.individual_id.is_none())
            .map(|r| r.max_rows)
            .max();
        p.max_rows = match (enforced, declared) {
            (Some(e), Some(d)) => e.max(d),
            (Some(e), None) => e,
            (None, Some(d)) => d,
            (None, None) => first.max_rows,
        };
        p.delta = if p.mechanism == Mechanism::Laplace {
            0.0
        } else {
            reqs.iter().map(|r| r.delta).fold(f64::INFINITY, f64::min)
        };
        p.required_by.sort();
        p.required_by.dedup();
        Ok(Some(p))
    }

    /// Checks parameters that came over the network before using them.
    pub fn validate(&self, parties: usize) -> Result<(), String> {
        if !(1..=1000 * MICRO).contains(&self.epsilon_micro) {
            return Err(format!(
                "ε = {} is out of range",
                epsilon_text(self.epsilon_micro)
            ));
        }
        match self.mechanism {
            Mechanism::Gaussian
                if !(self.delta.is_finite() && self.delta > 0.0 && self.delta < 1.0) =>
            {
                return Err(format!("δ = {} is out of range", self.delta))
            }
            Mechanism::Laplace if self.delta != 0.0 => {
                return Err("the laplace mechanism takes no δ".into())
            }
            _ => {}
        }
        if !(1..=1_000_000).contains(&self.max_rows) {
            return Err(format!(
                "{} rows per individual is out of range",
                self.max_rows
            ));
        }
        if self.colluders as usize >= parties.max(1) {
            return Err(format!(
                "{} colluders among {parties} parties leave no honest party",
                self.colluders
            ));
        }
        for (c, r) in &self.clamps {
            r.bounds().map_err(|e| format!("clamp range of {c}: {e}"))?;
        }
        Ok(())
    }

    /// Whether these parameters give at least the protection `req` asks
    /// for; if not, what falls short (a party checks the leader's merge).
    pub fn satisfies(&self, req: &Requirement, parties: usize) -> Result<(), String> {
        if req.mechanism == Mechanism::Laplace && self.mechanism != Mechanism::Laplace {
            return Err("this party requires the laplace mechanism (pure ε-DP)".into());
        }
        if self.epsilon_micro > req.epsilon_micro || self.epsilon_micro == 0 {
            return Err(format!(
                "ε = {} exceeds this party's ε = {} per query",
                epsilon_text(self.epsilon_micro),
                epsilon_text(req.epsilon_micro)
            ));
        }
        if self.mechanism == Mechanism::Gaussian && !(self.delta > 0.0 && self.delta <= req.delta) {
            return Err(format!(
                "δ = {} exceeds this party's δ = {}",
                self.delta, req.delta
            ));
        }
        let want = req.colluders.unwrap_or(parties.saturating_sub(1) as u32);
        if (self.colluders as usize) >= parties || self.colluders < want {
            return Err(format!(
                "calibrated against {} colluders, this party requires {want}",
                self.colluders
            ));
        }
        for (col, c) in &req.clamps {
            match self.clamps.get(col) {
                Some(m) if m.within(c) => {}
                _ => {
                    return Err(format!(
                        "column {col} is not clamped within this party's range [{}, {}]",
                        c.lo, c.hi
                    ))
                }
            }
        }
        if self.max_rows == 0 {
            return Err("a bound of 0 rows per individual".into());
        }
        if req.individual_id.is_none() && self.max_rows < req.max_rows {
            return Err(format!(
                "the noise is calibrated to {} row(s) per individual, below the {} this party declares \
                 (max_rows_per_individual)",
                self.max_rows, req.max_rows
            ));
        }
        if self.min_group_size < req.min_group_size {
            return Err(format!(
                "groups below {} rows are not left out (this party's min_group_size)",
                req.min_group_size
            ));
        }
        if req.individual_id.is_some() && self.individual_id != req.individual_id {
            return Err("the individual id column differs from this party's".into());
        }
        Ok(())
    }
}

/// The noise one party draws for one revealed total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Noise {
    /// Discrete Laplace, P(x) ∝ exp(-|x|·den/num): scale `num/den`.
    Laplace { num: u128, den: u128 },
    /// Discrete Gaussian, P(x) ∝ exp(-x²/(2·sigma2)).
    Gaussian { sigma2: u128 },
}

/// Largest σ² the exact Gaussian sampler takes (the executor's bound).
pub const MAX_SIGMA2: u128 = 1 << 120;

impl Noise {
    /// The scale of one party's draw: b for Laplace, σ for Gaussian.
    pub fn scale(&self) -> f64 {
        match *self {
            Noise::Laplace { num, den } => num as f64 / den as f64,
            Noise::Gaussian { sigma2 } => (sigma2 as f64).sqrt(),
        }
    }

    /// A bound no honest draw exceeds but with probability below 10^-25;
    /// a draw beyond it aborts the query (which reveals nothing of the data).
    pub fn draw_bound(&self) -> u128 {
        ((self.scale() * 60.0).ceil() as u128).saturating_add(64)
    }

    pub fn describe(&self) -> String {
        match *self {
            Noise::Laplace { .. } => format!("discrete Laplace, scale {}", fmt_num(self.scale())),
            Noise::Gaussian { .. } => format!("discrete Gaussian, σ = {}", fmt_num(self.scale())),
        }
    }

    /// One party's pmf, for exact intervals at small scales.
    fn pmf(&self, w: i64) -> Vec<f64> {
        let mut v: Vec<f64> = (-w..=w)
            .map(|x| match *self {
                Noise::Laplace { .. } => (-(x.unsigned_abs() as f64) / self.scale()).exp(),
                Noise::Gaussian { sigma2 } => (-((x * x) as f64) / (2.0 * sigma2 as f64)).exp(),
            })
            .collect();
        let total: f64 = v.iter().sum();
        v.iter_mut().for_each(|p| *p /= total);
        v
    }

    /// The smallest w with P(|total| ≤ w) ≥ 0.95, where the total is the
    /// sum of `parties` independent draws: exact (numerical convolution of
    /// the pmfs) at small scales, from the continuous distribution (the
    /// sum of Laplace variables has a closed-form tail; the sum of
    /// Gaussians is Gaussian) at large ones, where the two agree to about
    /// 1/scale.
    pub fn half_width_95(&self, parties: usize) -> u128 {
        let n = parties.max(1);
        let b = self.scale();
        let width = match self {
            Noise::Laplace { .. } => (b * 40.0).ceil() + 2.0,
            Noise::Gaussian { .. } => (b * 12.0).ceil() + 2.0,
        };
        if width * n as f64 <= 4000.0 {
            let w = width as i64;
            let one = self.pmf(w);
            let mut total = one.clone();
            for _ in 1..n {
                let mut next = vec![0.0; total.len() + one.len() - 1];
                for (i, a) in total.iter().enumerate() {
                    for (j, c) in one.iter().enumerate() {
                        next[i + j] += a * c;
                    }
                }
                total = next;
            }
            let mid = (total.len() / 2) as i64;
            let mut mass = total[mid as usize];
            let mut k = 0i64;
            while mass < 0.95 && k < mid {
                k += 1;
                mass += total[(mid - k) as usize] + total[(mid + k) as usize];
            }
            return k as u128;
        }
        let tail = |x: f64| -> f64 {
            match self {
                Noise::Laplace { .. } => 2.0 * laplace_sum_tail(n, x / b),
                Noise::Gaussian { .. } => {
                    erfc(x / (b * (n as f64).sqrt() * std::f64::consts::SQRT_2))
                }
            }
        };
        let (mut lo, mut hi) = (0.0f64, b * 100.0 * n as f64);
        for _ in 0..200 {
            let mid = (lo + hi) / 2.0;
            if tail(mid) > 0.05 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi.ceil() as u128
    }
}

/// P(X > s·b) for X the sum of n independent Laplace(b) variables:
/// e^{-s} Σ_{i<n} Σ_{l≤i} C(i,l) s^{i-l} (n-1+l)! / (i! (n-1)! 2^{n+l}).
fn laplace_sum_tail(n: usize, s: f64) -> f64 {
    let fact = |k: usize| (1..=k).fold(1.0f64, |a, x| a * x as f64);
    let choose = |i: usize, l: usize| fact(i) / (fact(l) * fact(i - l));
    let mut total = 0.0;
    for i in 0..n {
        for l in 0..=i {
            total += choose(i, l) * s.powi((i - l) as i32) * fact(n - 1 + l)
                / (fact(i) * fact(n - 1) * 2f64.powi((n + l) as i32));
        }
    }
    (-s).exp() * total
}

/// The complementary error function (W. J. Cody's rational approximation
/// via erfc = 1 - erf is not needed at this precision: Numerical Recipes'
/// Chebyshev fit, relative error below 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398
                                    + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{v:.3e}")
    } else if v >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The calibrated noise of one revealed total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialNoise {
    /// Index of the partial in the local part.
    pub partial: usize,
    /// How far one individual moves the total, in its fixed-point units.
    pub sensitivity: u128,
    /// Decimal digits of the total's fixed-point units.
    pub scale: u32,
    /// What each party draws.
    pub noise: Noise,
    /// The share of the query's privacy loss spent on this total: ε for
    /// Laplace, ρ (zCDP) for Gaussian.
    pub loss: f64,
}

impl PartialNoise {
    /// 95% of the total noise (one draw from each of `parties`) lies within
    /// ± this, in the total's own units (e.g. currency). Computed where it
    /// is shown (the leader's answer, EXPLAIN), not at every party.
    pub fn half_width_value(&self, parties: usize) -> f64 {
        self.noise.half_width_95(parties) as f64 / 10f64.powi(self.scale as i32)
    }
}

/// ρ for which ρ-zCDP implies (ε, δ)-DP (Bun and Steinke 2016, Prop. 1.3:
/// ε = ρ + 2·sqrt(ρ·ln(1/δ))), slightly lowered against rounding.
pub fn rho_for(epsilon: f64, delta: f64) -> f64 {
    let l = (1.0 / delta).ln();
    let r = ((l + epsilon).sqrt() - l.sqrt()).powi(2);
    r * (1.0 - 1e-9)
}

/// Calibrates the noise for totals of the given sensitivities.
pub fn calibrate(
    params: &DpParams,
    totals: &[(usize, u128, u32)],
) -> Result<Vec<PartialNoise>, String> {
    let m = totals.len().max(1) as u128;
    let mut out = Vec::new();
    for &(partial, sensitivity, scale) in totals {
        // A total no individual can move (clamped to [0, 0]) still gets
        // the noise of sensitivity 1: every scale stays positive.
        let sensitivity = sensitivity.max(1);
        let (noise, loss) = match params.mechanism {
            Mechanism::Laplace => {
                // b = Δ / (ε / m) = Δ · m · 10^6 / ε_micro.
                let num = sensitivity
                    .checked_mul(m * MICRO as u128)
                    .ok_or("the noise scale overflows; narrow the clamp ranges")?;
                let den = params.epsilon_micro as u128;
                let g = gcd(num, den);
                (
                    Noise::Laplace {
                        num: num / g,
                        den: den / g,
                    },
                    params.epsilon_micro as f64 / MICRO as f64 / m as f64,
                )
            }
            Mechanism::Gaussian => {
                let rho =
                    rho_for(params.epsilon_micro as f64 / MICRO as f64, params.delta) / m as f64;
                // Canonne, Kamath, Steinke 2020, Thm. 4: the discrete Gaussian
                // of variance σ² gives (Δ²/(2σ²))-zCDP; σ² rounded up.
                let s2 = (sensitivity as f64).powi(2) / (2.0 * rho);
                if !(s2.is_finite() && s2 < MAX_SIGMA2 as f64) {
                    return Err(format!(
                        "the Gaussian noise for a total with sensitivity {sensitivity} would need σ² ≈ {s2:.3e}, \
                         beyond the exact sampler's 2^120; narrow the clamp ranges, lower the column's declared \
                         scale, or use the laplace mechanism"
                    ));
                }
                (
                    Noise::Gaussian {
                        sigma2: (s2.ceil() as u128).max(1),
                    },
                    rho,
                )
            }
        };
        out.push(PartialNoise {
            partial,
            sensitivity,
            scale,
            noise,
            loss,
        });
    }
    Ok(out)
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// EXPLAIN lines for the agreed parameters.
pub fn explain(
    params: &DpParams,
    noise: &[PartialNoise],
    names: &[String],
    parties: usize,
) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "Differential privacy (required by {}): {} mechanism, ε = {}",
        params.required_by.join(", "),
        params.mechanism.name(),
        epsilon_text(params.epsilon_micro)
    );
    if params.mechanism == Mechanism::Gaussian {
        let _ = write!(s, ", δ = {:e}", params.delta);
    }
    let _ = writeln!(
        s,
        " for this query, split evenly over {} noised totals",
        noise.len()
    );
    let bound = match &params.individual_id {
        Some(id) => format!(
            "at most {} row(s) per {id} at each party (enforced)",
            params.max_rows
        ),
        None => format!(
            "{} row(s) per individual (declared; no individual id)",
            params.max_rows
        ),
    };
    let clamps: Vec<String> = params
        .clamps
        .iter()
        .map(|(c, r)| format!("{c} to [{}, {}]", r.lo, r.hi))
        .collect();
    let _ = writeln!(
        s,
        "   contribution bounds: {bound}; values clamped: {}",
        if clamps.is_empty() {
            "none needed".into()
        } else {
            clamps.join(", ")
        }
    );
    if parties > 1 {
        let _ = writeln!(
            s,
            "   each of the {parties} parties adds its own noise to its share before the reveal (calibrated so that \
             one honest party's noise alone suffices; no party sees the total noise):"
        );
    } else {
        let _ = writeln!(
            s,
            "   noise per party (in a federation every party adds one such draw to its share):"
        );
    }
    for (n, name) in noise.iter().zip(names) {
        let _ = writeln!(
            s,
            "     {name}: sensitivity {}, {} per party; 95% of the total noise within ±{}",
            fmt_units(n.sensitivity, n.scale),
            n.noise.describe_units(n.scale),
            fmt_num(n.half_width_value(parties))
        );
    }
    if params.min_group_size > 0 {
        let _ = writeln!(
            s,
            "   groups whose noised row count is below {} are left out (an ungrouped answer becomes NULL); \
             HAVING and ORDER BY act on noised values",
            params.min_group_size
        );
    } else {
        let _ = writeln!(
            s,
            "   every group of the public domain is released (noised); HAVING and ORDER BY act on noised values"
        );
    }
    s
}

fn fmt_units(v: u128, scale: u32) -> String {
    fmt_num(v as f64 / 10f64.powi(scale as i32))
}

impl Noise {
    /// Like `describe`, with the scale in the total's own units.
    pub fn describe_units(&self, scale: u32) -> String {
        let f = 10f64.powi(scale as i32);
        match self {
            Noise::Laplace { .. } => {
                format!("discrete Laplace of scale {}", fmt_num(self.scale() / f))
            }
            Noise::Gaussian { .. } => {
                format!("discrete Gaussian of σ = {}", fmt_num(self.scale() / f))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(party: &str, eps: u64, lo: &str, hi: &str) -> Requirement {
        Requirement {
            party: party.into(),
            mechanism: Mechanism::Gaussian,
            epsilon_micro: eps,
            delta: 1e-6,
            colluders: None,
            clamps: BTreeMap::from([(
                "cost".to_string(),
                Clamp {
                    lo: lo.into(),
                    hi: hi.into(),
                },
            )]),
            individual_id: None,
            max_rows: 2,
            min_group_size: 0,
        }
    }

    #[test]
    fn merge_takes_the_strictest_and_each_party_can_check_it() {
        let a = req("a", 1_000_000, "0", "1000");
        let mut b = req("b", 500_000, "10.5", "5000");
        b.mechanism = Mechanism::Laplace;
        b.max_rows = 1;
        let p = DpParams::merge(&[a.clone(), b.clone()], 3)
            .unwrap()
            .unwrap();
        assert_eq!(p.mechanism, Mechanism::Laplace);
        assert_eq!(p.epsilon_micro, 500_000);
        // Neither enforces a bound: the larger declaration is the sensitivity.
        assert_eq!(p.max_rows, 2);
        assert_eq!(p.colluders, 2);
        let mut low = p.clone();
        low.max_rows = 1;
        assert!(low.satisfies(&a, 3).unwrap_err().contains("below the 2"));
        // One that enforces with an id takes the smaller bound only where
        // no declaration is larger.
        let mut e = req("e", 1_000_000, "0", "1000");
        e.individual_id = Some("pid".into());
        e.max_rows = 1;
        let q = DpParams::merge(&[e.clone(), a.clone()], 3)
            .unwrap()
            .unwrap();
        assert_eq!(q.max_rows, 2);
        assert!(q.satisfies(&e, 3).is_ok() && q.satisfies(&a, 3).is_ok());
        let mut e2 = e.clone();
        e2.max_rows = 5;
        let q = DpParams::merge(&[e.clone(), e2], 3).unwrap().unwrap();
        assert_eq!(q.max_rows, 1);
        assert_eq!(
            p.clamps["cost"],
            Clamp {
                lo: "10.5".into(),
                hi: "1000".into()
            }
        );
        assert!(p.satisfies(&a, 3).is_ok());
        assert!(p.satisfies(&b, 3).is_ok());
        // A leader that loosens anything is caught by the party it cheats.
        let mut loose = p.clone();
        loose.epsilon_micro = 2_000_000;
        assert!(loose.satisfies(&a, 3).unwrap_err().contains("ε = 2"));
        let mut loose = p.clone();
        loose.clamps.insert(
            "cost".into(),
            Clamp {
                lo: "0".into(),
                hi: "9000".into(),
            },
        );
        assert!(loose.satisfies(&b, 3).unwrap_err().contains("cost"));
        let mut loose = p;
        loose.mechanism = Mechanism::Gaussian;
        assert!(loose.satisfies(&b, 3).is_err());
        // Disjoint ranges cannot be merged.
        let c = req("c", 1, "2000", "3000");
        assert!(DpParams::merge(&[a, c], 3)
            .unwrap_err()
            .contains("do not overlap"));
    }

    #[test]
    fn laplace_scale_is_sensitivity_over_the_epsilon_share() {
        let p = DpParams {
            mechanism: Mechanism::Laplace,
            epsilon_micro: 500_000,
            delta: 0.0,
            colluders: 1,
            clamps: BTreeMap::new(),
            individual_id: None,
            max_rows: 1,
            min_group_size: 0,
            required_by: vec!["a".into()],
        };
        let n = calibrate(&p, &[(0, 1, 0), (2, 100_000, 2)]).unwrap();
        // ε = 0.5 over 2 totals: 0.25 each; b = Δ / 0.25.
        assert_eq!(n[0].noise, Noise::Laplace { num: 4, den: 1 });
        assert_eq!(n[1].noise.scale(), 400_000.0);
        assert!((n[0].loss - 0.25).abs() < 1e-12);
    }

    #[test]
    fn intervals_cover_95_percent_of_the_summed_noise() {
        // One discrete Laplace of scale 1: P(|X| ≤ k) = 1 - 2q^{k+1}/(1+q).
        let q = (-1.0f64).exp();
        let k = Noise::Laplace { num: 1, den: 1 }.half_width_95(1);
        let cover = |k: u128| 1.0 - 2.0 * q.powi(k as i32 + 1) / (1.0 + q);
        assert!(cover(k) >= 0.95 && cover(k - 1) < 0.95, "k = {k}");
        // Large scales: the continuous formula; one Laplace of scale b has
        // a 95% half-width of b·ln 20.
        let w = Noise::Laplace {
            num: 10_000,
            den: 1,
        }
        .half_width_95(1) as f64;
        assert!((w / (10_000.0 * 20f64.ln()) - 1.0).abs() < 1e-3, "{w}");
        // The exact and continuous paths agree where they meet.
        let exact = Noise::Laplace { num: 30, den: 1 }.half_width_95(3) as f64;
        let cont = 30.0 * {
            let (mut lo, mut hi) = (0.0, 100.0);
            for _ in 0..100 {
                let m = (lo + hi) / 2.0;
                if 2.0 * laplace_sum_tail(3, m) > 0.05 {
                    lo = m
                } else {
                    hi = m
                }
            }
            hi
        };
        assert!((exact - cont).abs() <= 2.0, "{exact} vs {cont}");
        let g = Noise::Gaussian { sigma2: 1_000_000 }.half_width_95(4) as f64;
        assert!((g / (1.96 * 2000.0) - 1.0).abs() < 1e-3, "{g}");
    }

    #[test]
    fn extreme_parameters_stay_well_defined() {
        let mut p = DpParams::merge(&[req("a", 1, "0", "0")], 2)
            .unwrap()
            .unwrap();
        p.mechanism = Mechanism::Laplace;
        p.delta = 0.0;
        // Sensitivity 0 (a [0, 0] clamp) still gets a positive scale.
        let n = calibrate(&p, &[(0, 0, 0)]).unwrap();
        assert!(n[0].noise.scale() > 0.0);
        // Huge scales: intervals from the continuous law, no overflow.
        let w = Noise::Laplace {
            num: u128::MAX / 2,
            den: 1,
        }
        .half_width_95(5);
        assert!(w > 0);
        let w = Noise::Gaussian { sigma2: MAX_SIGMA2 }.half_width_95(5);
        assert!(w > 0);
    }

    #[test]
    fn decimals_parse_exactly() {
        assert_eq!(Dec::parse("-12.50").unwrap().units(2), Some(-1250));
        assert_eq!(Dec::parse("3").unwrap().units(0), Some(3));
        assert_eq!(Dec::parse("0.125").unwrap().units(2), None);
        assert!(Dec::parse("1e3").is_err());
        assert_eq!(epsilon_text(250_000), "0.25");
        assert_eq!(epsilon_text(10 * MICRO), "10");
    }
}
