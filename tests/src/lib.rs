//! Shared helpers for Council's end-to-end tests: seeded random federated
//! data sets, permissive policies, and starting gateways on loopback.

pub mod fuzz;
pub mod pg;

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use council::federation::{FederationSpec, LocalFederation, PartySpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const USER: &str = "ana";
pub const PASSWORD: &str = "correct horse";

pub const CATALOG: &str = r#"
[tables.t]
columns = [
  { name = "id", type = "int" },
  { name = "g", type = "text", domain = ["a", "b", "c", "d"] },
  { name = "h", type = "int", domain = { min = 1, max = 3 } },
  { name = "flag", type = "bool", domain = [true, false] },
  { name = "x", type = "int" },
  { name = "d", type = "decimal(14,3)" },
  { name = "f", type = "float", scale = 4 },
  { name = "label", type = "text" },
  { name = "ts", type = "timestamp" },
]
"#;

/// A policy that allows every column in every role, for `parties`.
pub fn open_policy(party: &str, parties: &[String]) -> String {
    let allow: Vec<String> = parties.iter().map(|p| format!("\"{p}:*\"")).collect();
    let mut s = format!(
        "party = \"{party}\"\n[analysts]\nallow = [{}]\n[engines]\nhonest_majority = true\n[tables.t]\ncount_star = true\n",
        allow.join(", ")
    );
    for c in ["id", "g", "h", "flag", "x", "d", "f", "label", "ts"] {
        let group = matches!(c, "g" | "h" | "flag");
        let _ = writeln!(
            s,
            "[tables.t.columns.{c}]\nfilter = true\ngroup_by = {group}\naggregate = [\"count\", \"sum\", \"avg\", \"var\", \"stddev\", \"min\", \"max\"]"
        );
    }
    s
}

/// `open_policy`, except that `column` may not be used in WHERE.
pub fn policy_without_filter_on(party: &str, parties: &[String], column: &str) -> String {
    open_policy(party, parties).replace(
        &format!("[tables.t.columns.{column}]\nfilter = true"),
        &format!("[tables.t.columns.{column}]\nfilter = false"),
    )
}

/// How a random data set is shaped.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub seed: u64,
    /// Values of x near the bound where the sum over all parties still fits.
    pub large: bool,
}

/// Writes `dir/<party>/t.csv` for every party: empty parties, NULLs,
/// negative values, a group ("d") present at the first party only.
pub fn write_random_data(dir: &Path, parties: &[String], shape: Shape) -> anyhow::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(shape.seed);
    let n = parties.len();
    for (pi, p) in parties.iter().enumerate() {
        let d = dir.join(p);
        std::fs::create_dir_all(&d)?;
        let mut csv = String::from("id,g,h,flag,x,d,f,label,ts\n");
        // Every third data set leaves the last party empty.
        let rows = if shape.seed.is_multiple_of(3) && pi == n - 1 {
            0
        } else {
            rng.random_range(1..120)
        };
        let big = (i64::MAX as i128 / (n as i128 * 200)) as i64;
        for i in 0..rows {
            let groups: &[&str] = if pi == 0 {
                &["a", "b", "c", "d"]
            } else {
                &["a", "b", "c"]
            };
            let g = if rng.random_bool(0.05) {
                String::new()
            } else {
                groups[rng.random_range(0..groups.len())].to_string()
            };
            let h = if rng.random_bool(0.05) {
                String::new()
            } else {
                rng.random_range(1..=3).to_string()
            };
            let flag = rng.random_bool(0.4);
            let x = if rng.random_bool(0.1) {
                String::new()
            } else if shape.large {
                rng.random_range(-big..=big).to_string()
            } else {
                rng.random_range(-1000i64..=1000).to_string()
            };
            let dv = if rng.random_bool(0.08) {
                String::new()
            } else {
                let v: i64 = rng.random_range(-10_000_000_000i64..=10_000_000_000);
                let sign = if v < 0 { "-" } else { "" };
                format!(
                    "{sign}{}.{:03}",
                    v.unsigned_abs() / 1000,
                    v.unsigned_abs() % 1000
                )
            };
            let f = if rng.random_bool(0.08) {
                String::new()
            } else {
                let k: i64 = rng.random_range(-100_000_000..=100_000_000);
                format!("{}", k as f64 / 10_000.0)
            };
            let label = ["lime", "lemon", "plum", "kiwi"][rng.random_range(0..4)];
            let ts = if rng.random_bool(0.05) {
                String::new()
            } else {
                format!(
                    "2024-{:02}-{:02} {:02}:{:02}:{:02}",
                    rng.random_range(1..=12),
                    rng.random_range(1..=28),
                    rng.random_range(0..24),
                    rng.random_range(0..60),
                    rng.random_range(0..60)
                )
            };
            let _ = writeln!(
                csv,
                "{},{g},{h},{flag},{x},{dv},{f},{label},{ts}",
                pi * 100_000 + i
            );
        }
        std::fs::write(d.join("t.csv"), csv)?;
    }
    Ok(())
}

pub fn party_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("p{i}")).collect()
}

/// Starts `n` gateways over random data; returns the federation.
pub async fn start_random(
    dir: &Path,
    n: usize,
    shape: Shape,
    timeout: Duration,
) -> anyhow::Result<LocalFederation> {
    let (_, spec) = random_spec(dir, n, shape, timeout)?;
    LocalFederation::start(&spec, &dir.join("run")).await
}

/// `n` parties' random data under `dir` and their spec (open policies), for
/// a test to change before it starts them.
pub fn random_spec(
    dir: &Path,
    n: usize,
    shape: Shape,
    timeout: Duration,
) -> anyhow::Result<(Vec<String>, FederationSpec)> {
    let ids = party_ids(n);
    write_random_data(&dir.join("data"), &ids, shape)?;
    let spec = spec_for(dir, &ids, timeout);
    Ok((ids, spec))
}

pub fn spec_for(dir: &Path, ids: &[String], timeout: Duration) -> FederationSpec {
    FederationSpec {
        parties: ids
            .iter()
            .map(|p| {
                PartySpec::new(
                    p,
                    dir.join("data").join(p),
                    open_policy(p, ids),
                    vec![(USER.into(), PASSWORD.into(), vec!["analyst".into()])],
                )
            })
            .collect(),
        catalog_toml: CATALOG.to_string(),
        peer_timeout: timeout,
        extra_certs: Vec::new(),
    }
}

/// Queries over `t`, each with whether its rows come in a defined order.
pub const QUERIES: &[(&str, bool)] = &[
    ("SELECT COUNT(*) FROM t", true),
    ("SELECT g, COUNT(*), COUNT(x), SUM(x), AVG(x) FROM t GROUP BY g ORDER BY g", true),
    ("SELECT h, flag, SUM(d), AVG(d), VAR_SAMP(d), STDDEV_POP(d) FROM t GROUP BY h, flag ORDER BY h, flag", true),
    ("SELECT g, SUM(f), AVG(f), VAR_POP(x), STDDEV_SAMP(x) FROM t WHERE x > -500 GROUP BY g ORDER BY g", true),
    ("SELECT g, SUM(x) / COUNT(*) AS ratio, COUNT(*) AS n FROM t WHERE label LIKE 'l%' GROUP BY g HAVING COUNT(*) > 2 ORDER BY n DESC, g LIMIT 2", true),
    ("SELECT SUM(d) AS total, VAR_SAMP(f) AS vf, STDDEV_SAMP(d) FROM t WHERE flag", true),
    ("SELECT flag, COUNT(d), SUM(d) - SUM(x) AS diff FROM t GROUP BY flag", false),
    ("SELECT g AS grp, AVG(d) * 2 AS twice FROM t WHERE h = 2 AND d IS NOT NULL GROUP BY g ORDER BY twice", true),
    ("SELECT COUNT(*) AS n, h FROM t GROUP BY h ORDER BY h", true),
    ("SELECT g, ROUND(AVG(x), 2) AS r FROM t GROUP BY g ORDER BY g", true),
    ("SELECT h, SUM(x) FROM t WHERE g IS NULL OR x BETWEEN -10 AND 500 GROUP BY h ORDER BY h", true),
    ("SELECT SUM(d * 2) AS dd, AVG(x + 1) AS x1, COUNT(f) FROM t WHERE label IN ('lime', 'plum')", true),
    ("SELECT g, flag, h, COUNT(*) FROM t GROUP BY g, flag, h", false),
    ("SELECT h, COUNT(ts), SUM(x) FROM t WHERE ts >= TIMESTAMP '2024-06-15 12:00:00' GROUP BY h ORDER BY h", true),
    // One column under COUNT, SUM, AVG and VAR at once: the guarded and the
    // plain partials of one argument must not collide at a SQL source.
    ("SELECT g, COUNT(f), SUM(f), AVG(f), VAR_SAMP(f), COUNT(x), SUM(x), VAR_POP(x) FROM t GROUP BY g ORDER BY g", true),
];

/// Queries whose HAVING compares a COUNT or SUM with a constant, decided in
/// shares where three compute parties exist (upper and lower bounds,
/// reversed operands, a decimal SUM against a float, a float SUM, NULL
/// sums, conjuncts in shares beside one left to the post part, an
/// ungrouped answer): groups that fail reveal nothing, and the answer is
/// the same SQL's over the pooled rows.
pub const HAVING_QUERIES: &[(&str, bool)] = &[
    ("SELECT g, COUNT(*) AS n, SUM(x) FROM t GROUP BY g HAVING COUNT(*) >= 40 ORDER BY g", true),
    ("SELECT h, flag, SUM(d) FROM t GROUP BY h, flag HAVING SUM(d) > 1e6 AND COUNT(*) < 30 ORDER BY h, flag", true),
    ("SELECT g, h, AVG(x) FROM t GROUP BY g, h HAVING SUM(x) <= 0 ORDER BY g, h", true),
    ("SELECT g, h FROM t GROUP BY g, h HAVING 12 > COUNT(x) ORDER BY g, h", true),
    ("SELECT flag, MIN(x), MAX(d) FROM t GROUP BY flag HAVING SUM(x) > -100 AND AVG(d) > 0 ORDER BY flag", true),
    ("SELECT COUNT(*) AS n, SUM(x) FROM t WHERE x > 900 HAVING COUNT(*) >= 8", true),
    ("SELECT g, SUM(f) FROM t GROUP BY g HAVING SUM(f) > 100.5 ORDER BY g", true),
    ("SELECT h, COUNT(d) FROM t WHERE flag GROUP BY h HAVING COUNT(d) = 20 OR COUNT(d) > 25 ORDER BY h", true),
    ("SELECT g, SUM(x) FROM t GROUP BY g HAVING SUM(x) >= -2500 AND SUM(x) <= 2500 ORDER BY g", true),
    ("SELECT h, COUNT(*) FROM t GROUP BY h HAVING TRY_CAST(COUNT(*) AS TINYINT) > 5 ORDER BY h", true),
];

/// Queries with MIN and MAX (secure comparison, three parties): groups
/// present at one party, NULLs, all-NULL groups, empty filters, negative
/// values, extremes beside sums, arithmetic and HAVING on extremes.
pub const EXTREME_QUERIES: &[(&str, bool)] = &[
    ("SELECT g, MIN(x), MAX(x), COUNT(*) FROM t GROUP BY g ORDER BY g", true),
    ("SELECT h, flag, MIN(d), MAX(d), SUM(d), AVG(x) FROM t GROUP BY h, flag ORDER BY h, flag", true),
    ("SELECT MIN(x) AS lo, MAX(d) AS hi FROM t WHERE label = 'kiwi'", true),
    ("SELECT MIN(x), MAX(x), COUNT(*) FROM t WHERE x > 100000", true),
    ("SELECT g, MAX(x) - MIN(x) AS spread FROM t WHERE x > 0 GROUP BY g HAVING MAX(x) > 100 ORDER BY g", true),
    ("SELECT g, MIN(x * 2 + 1), MAX(h) FROM t GROUP BY g ORDER BY g", true),
    ("SELECT flag, MIN(CASE WHEN x > 0 THEN NULL ELSE x END) AS m FROM t GROUP BY flag ORDER BY flag", true),
];
