//! `council demo`: three hospitals' gateways on loopback with real mutual
//! TLS, seeded sample data, real queries, each secure answer printed beside
//! the plaintext answer over the pooled data, and one policy refusal.
//! `--data DIR` runs the same over the user's own files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::compare::compare;
use crate::federation::{plaintext, FederationSpec, LocalFederation, PartySpec};
use gateway::output::{render, Format};

pub const DEMO_CATALOG: &str = r#"# The federated catalog: public schema and public group domains.
[tables.patients]
columns = [
  { name = "patient_id", type = "int" },
  { name = "age_band", type = "text", domain = ["0-17", "18-34", "35-49", "50-64", "65-79", "80+"] },
  { name = "sex", type = "text", domain = ["F", "M"] },
  { name = "diagnosis", type = "text" },
  { name = "cost", type = "decimal(10,2)" },
  { name = "length_of_stay", type = "int" },
  { name = "readmitted", type = "bool", domain = [true, false] },
]
"#;

/// hospital_c's differential-privacy settings in the demo: required for
/// analysts with the role `external`.
const DEMO_PRIVACY: &str = r#"
# Differential privacy for external analysts: pure ε-DP, 1 per query,
# at most 10 per analyst in any 30 days; one row per patient.
[privacy]
mechanism = "laplace"
epsilon_per_query = 1.0
budget = { epsilon = 10, period_days = 30 }

[tables.patients.privacy]
analysts = ["role:external"]
individual_id = "patient_id"
max_rows_per_individual = 1
"#;

/// A hospital's demo policy. `patient_id_filter` says whether its analysts'
/// queries may filter on patient ids (only hospital_a allows it);
/// hospital_c requires differential privacy for external analysts.
pub fn demo_policy(party: &str, patient_id_filter: bool) -> String {
    let privacy = if party == "hospital_c" {
        DEMO_PRIVACY
    } else {
        ""
    };
    // hospital_c's DP rule names a role, which only the analyst's own
    // gateway can check: hospital_c trusts the other hospitals' gateways to
    // state roles (without this, it would treat every analyst of theirs as
    // external).
    let trust = if party == "hospital_c" {
        "trust_identities_from = [\"hospital_a\", \"hospital_b\"]\n"
    } else {
        ""
    };
    format!(
        r#"# Demo policy of {party}: an allow-list; anything not listed is refused.
party = "{party}"

[analysts]
allow = ["hospital_a:*", "hospital_b:*", "hospital_c:*"]
{trust}
[results]
recipients = "querying_party"

[engines]
# MIN and MAX: secure comparison among three gateways, secure while every
# gateway follows the protocol (honest majority); off unless set.
honest_majority = true

[tables.patients]
count_star = true

[tables.patients.columns.patient_id]
filter = {patient_id_filter}
aggregate = ["count"]

[tables.patients.columns.age_band]
group_by = true
filter = true

[tables.patients.columns.sex]
group_by = true
filter = true

[tables.patients.columns.diagnosis]
filter = true

[tables.patients.columns.cost]
filter = true
aggregate = ["count", "sum", "avg", "var", "stddev", "min", "max"]
clamp = [0, 50000]

[tables.patients.columns.length_of_stay]
filter = true
aggregate = ["count", "sum", "avg", "var", "stddev"]
clamp = [0, 60]

[tables.patients.columns.readmitted]
group_by = true
filter = true
aggregate = ["count"]
{privacy}"#
    )
}

struct HospitalMix {
    id: &'static str,
    rows: usize,
    /// Weights of the age bands.
    ages: [u32; 6],
    /// (diagnosis, weight, mean cost, mean stay)
    diagnoses: &'static [(&'static str, u32, f64, f64)],
    readmit: f64,
}

const MIXES: [HospitalMix; 3] = [
    HospitalMix {
        id: "hospital_a",
        rows: 1200,
        ages: [2, 8, 12, 20, 30, 28],
        diagnoses: &[
            ("E11", 30, 4200.0, 4.0),
            ("I10", 25, 2100.0, 2.0),
            ("N18", 15, 9800.0, 7.0),
            ("F32", 10, 3100.0, 9.0),
            ("J45", 8, 1500.0, 2.0),
            ("I21", 12, 18500.0, 6.0),
        ],
        readmit: 0.14,
    },
    HospitalMix {
        id: "hospital_b",
        rows: 800,
        ages: [35, 20, 15, 12, 10, 8],
        diagnoses: &[
            ("J45", 35, 1400.0, 2.0),
            ("E11", 15, 3900.0, 3.0),
            ("F32", 20, 2900.0, 8.0),
            ("I10", 10, 2000.0, 2.0),
            ("C50", 5, 24000.0, 5.0),
        ],
        readmit: 0.09,
    },
    HospitalMix {
        id: "hospital_c",
        rows: 450,
        ages: [0, 4, 10, 26, 34, 26],
        diagnoses: &[
            ("I21", 40, 21000.0, 7.0),
            ("I10", 30, 2300.0, 2.0),
            ("E11", 20, 4600.0, 4.0),
            ("N18", 10, 10400.0, 8.0),
        ],
        readmit: 0.18,
    },
];

const AGE_BANDS: [&str; 6] = ["0-17", "18-34", "35-49", "50-64", "65-79", "80+"];

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T], weight: impl Fn(&T) -> u32) -> &'a T {
    let total: u32 = items.iter().map(&weight).sum();
    let mut x = rng.random_range(0..total.max(1));
    for it in items {
        let w = weight(it);
        if x < w {
            return it;
        }
        x -= w;
    }
    &items[items.len() - 1]
}

/// Writes `DIR/<hospital>/patients.csv` for the three demo hospitals.
pub fn write_demo_data(dir: &Path, seed: u64) -> Result<Vec<(String, PathBuf)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (h, mix) in MIXES.iter().enumerate() {
        let d = dir.join(mix.id);
        std::fs::create_dir_all(&d)?;
        let mut csv =
            String::from("patient_id,age_band,sex,diagnosis,cost,length_of_stay,readmitted\n");
        for i in 0..mix.rows {
            let id = (h as i64 + 1) * 1_000_000 + i as i64;
            let ages: Vec<(usize, u32)> = mix.ages.iter().copied().enumerate().collect();
            let age = AGE_BANDS[pick(&mut rng, &ages, |a| a.1).0];
            let sex = if rng.random_bool(0.52) { "F" } else { "M" };
            let (dx, _, mean_cost, mean_stay) = *pick(&mut rng, mix.diagnoses, |d| d.1);
            let factor: f64 = rng.random_range(0.4..1.9);
            let cost_cents = (mean_cost * factor * 100.0).round() as i64;
            let cost = if rng.random_bool(0.02) {
                String::new()
            } else {
                format!("{}.{:02}", cost_cents / 100, cost_cents % 100)
            };
            let stay = ((mean_stay * rng.random_range(0.3..1.8)).round() as i64).max(0);
            let readmitted = rng.random_bool(mix.readmit);
            let _ = writeln!(csv, "{id},{age},{sex},{dx},{cost},{stay},{readmitted}");
        }
        std::fs::write(d.join("patients.csv"), csv)?;
        out.push((mix.id.to_string(), d));
    }
    Ok(out)
}

/// The demo's queries: (title, SQL).
pub const DEMO_QUERIES: &[(&str, &str)] = &[
    (
        "Diabetes (E11) patients by age band: how many, and their mean cost",
        "SELECT age_band, COUNT(*) AS patients, AVG(cost) AS mean_cost FROM patients WHERE diagnosis = 'E11' GROUP BY age_band ORDER BY age_band",
    ),
    (
        "Admissions and total cost by sex",
        "SELECT sex, COUNT(*) AS admissions, SUM(cost) AS total_cost, COUNT(cost) AS costed FROM patients GROUP BY sex ORDER BY sex",
    ),
    (
        "Length of stay of readmitted vs not readmitted patients",
        "SELECT readmitted, COUNT(*) AS patients, AVG(length_of_stay) AS mean_stay, STDDEV_SAMP(length_of_stay) AS sd_stay FROM patients GROUP BY readmitted ORDER BY readmitted",
    ),
    (
        "The three age bands with the highest cost per long-stay patient (HAVING, ORDER BY, LIMIT)",
        "SELECT age_band, SUM(cost) / COUNT(cost) AS cost_per_patient, VAR_POP(cost) AS cost_variance FROM patients WHERE length_of_stay > 3 GROUP BY age_band HAVING COUNT(*) >= 20 ORDER BY cost_per_patient DESC LIMIT 3",
    ),
    (
        "Cheapest and dearest admission by age band (MIN/MAX: secure comparison among the three gateways)",
        "SELECT age_band, MIN(cost) AS cheapest, MAX(cost) AS dearest, COUNT(*) AS admissions FROM patients GROUP BY age_band ORDER BY age_band",
    ),
    (
        "Cardiovascular admissions (I10, I21) across all hospitals",
        "SELECT COUNT(*) AS admissions, AVG(cost) AS mean_cost, VAR_SAMP(length_of_stay) AS stay_variance FROM patients WHERE diagnosis IN ('I10', 'I21')",
    ),
];

pub const DEMO_REFUSED: (&str, &str) = (
    "A query that singles out patients by id: hospital_a allows it, hospital_b's policy does not",
    "SELECT sex, COUNT(*) FROM patients WHERE patient_id < 1000100 GROUP BY sex",
);

pub const DEMO_UNSUPPORTED: (&str, &str) = (
    "A construct Council does not compute yet",
    "SELECT age_band, MEDIAN(cost) FROM patients GROUP BY age_band",
);

const ANALYST: (&str, &str) = ("alice", "demo-password-not-secret");
/// An external analyst at hospital_a: hospital_c answers them only with
/// differential privacy.
const VISITOR: (&str, &str) = ("victor", "demo-password-not-secret");
const DEMO_DP: &str =
    "SELECT age_band, COUNT(*) AS patients, SUM(length_of_stay) AS bed_days FROM patients GROUP BY age_band ORDER BY age_band";

/// `council demo --serve`: how to connect, then serve until Ctrl-C.
async fn serve(fed: LocalFederation, spec: &FederationSpec, work: &std::path::Path) -> Result<()> {
    let ca = std::env::current_dir()?.join("council-demo-ca.pem");
    std::fs::write(&ca, &fed.ca_pem).with_context(|| format!("writing {}", ca.display()))?;
    println!(
        "Council demo gateways are running (Ctrl-C stops them). Data and audit logs: {}",
        work.display()
    );
    println!("CA certificate (trust it in your client): {}", ca.display());
    println!(
        "Analyst at every gateway: user {}, password {}\n",
        ANALYST.0, ANALYST.1
    );
    for p in &spec.parties {
        let Some(g) = fed.gateway(&p.id) else {
            continue;
        };
        println!("{}:", p.id);
        println!("  Flight SQL  grpc+tls://{}", g.analyst_addr);
        if let Some(pg) = g.pg_addr {
            println!(
                "  PostgreSQL  postgresql://{}:{}@{}/council?sslmode=verify-full&sslrootcert={}",
                ANALYST.0,
                ANALYST.1,
                pg,
                ca.display()
            );
        }
    }
    let first = spec.parties.first().and_then(|p| fed.gateway(&p.id));
    if let Some(pg) = first.and_then(|g| g.pg_addr) {
        println!(
            "\nTry: psql \"postgresql://{}:{}@{pg}/council?sslmode=verify-full&sslrootcert={}\" -c \"SELECT age_band, COUNT(*), AVG(cost) FROM patients GROUP BY age_band ORDER BY age_band\"",
            ANALYST.0,
            ANALYST.1,
            ca.display()
        );
    }
    tokio::signal::ctrl_c().await?;
    println!("stopping the demo gateways");
    fed.stop().await;
    Ok(())
}

/// Options of `council demo`.
pub struct DemoOptions {
    pub data: Option<PathBuf>,
    pub sql: Option<String>,
    pub format: Format,
    pub seed: u64,
    /// Keep serving until interrupted instead of running the queries.
    pub serve: bool,
}

pub async fn run(opts: DemoOptions) -> Result<()> {
    let work = tempfile::tempdir().context("making a temporary folder")?;
    let (spec, queries, notes) = match &opts.data {
        None => {
            let parties = write_demo_data(&work.path().join("data"), opts.seed)?;
            let parties = parties
                .into_iter()
                .map(|(id, dir)| {
                    let policy = demo_policy(&id, id == "hospital_a");
                    let mut analysts = vec![(
                        ANALYST.0.into(),
                        ANALYST.1.into(),
                        vec!["researcher".into()],
                    )];
                    if id == "hospital_a" {
                        analysts.push((
                            VISITOR.0.into(),
                            VISITOR.1.into(),
                            vec!["external".into()],
                        ));
                    }
                    PartySpec::new(&id, dir, policy, analysts)
                })
                .collect();
            let spec = FederationSpec {
                parties,
                catalog_toml: DEMO_CATALOG.to_string(),
                peer_timeout: Duration::from_secs(10),
                extra_certs: Vec::new(),
            };
            (
                spec,
                DEMO_QUERIES
                    .iter()
                    .map(|(t, q)| (t.to_string(), q.to_string()))
                    .collect::<Vec<_>>(),
                Vec::new(),
            )
        }
        Some(dir) => user_federation(dir).await?,
    };
    let single = opts.sql.clone();
    if opts.data.is_none() && single.is_none() {
        println!("Council demo: three hospitals, three gateways on 127.0.0.1 with mutual TLS.");
        println!(
            "Each hospital keeps its own patients table; only secret shares of per-group partial"
        );
        println!("aggregates cross the network, and only the final aggregates are revealed, to the querying gateway.\n");
    }
    for n in &notes {
        eprintln!("note: {n}");
    }
    let started = Instant::now();
    let fed = LocalFederation::start(&spec, work.path()).await?;
    if opts.serve {
        return serve(fed, &spec, work.path()).await;
    }
    let leader = spec.parties[0].id.clone();
    let client = fed.client(&leader, ANALYST.0, ANALYST.1).await?;
    let pooled = fed.pooled_context().await?;
    if single.is_none() {
        let sizes: Vec<String> = spec.parties.iter().map(|p| p.id.clone()).collect();
        println!(
            "Started {} gateways ({}) in {:.1} s; the analyst `{}` queries {}'s gateway.\n",
            fed.gateways.len(),
            sizes.join(", "),
            started.elapsed().as_secs_f64(),
            ANALYST.0,
            leader
        );
    }

    let mut all_ok = true;
    if let Some(sql) = single {
        let t = Instant::now();
        let secure = client.query(&sql).await.map_err(|e| anyhow!("{e}"))?;
        let elapsed = t.elapsed();
        print!("{}", render(&secure, opts.format)?);
        match plaintext(&pooled, &sql).await {
            Ok(plain) => match compare(&secure, &plain, has_order_by(&sql)) {
                Ok(()) => eprintln!(
                    "checked: equals the plaintext answer over the pooled data ({:.0} ms)",
                    elapsed.as_secs_f64() * 1e3
                ),
                Err(d) => {
                    eprintln!("MISMATCH with the plaintext answer: {d}");
                    all_ok = false;
                }
            },
            Err(e) => eprintln!("(plaintext reference failed: {e})"),
        }
    } else {
        for (i, (title, sql)) in queries.iter().enumerate() {
            println!("── {}. {title}", i + 1);
            println!("   {sql}");
            let t = Instant::now();
            let secure = match client.query(sql).await {
                Ok(s) => s,
                Err(e) => {
                    println!("   error: {e}\n");
                    all_ok = false;
                    continue;
                }
            };
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let plain = plaintext(&pooled, sql).await?;
            let verdict = compare(&secure, &plain, has_order_by(sql));
            println!(
                "{}",
                side_by_side(
                    &render(&secure, Format::Table)?,
                    &render(&plain, Format::Table)?,
                    "Council (secret-shared)",
                    "Plaintext over pooled data"
                )
            );
            match verdict {
                Ok(()) => println!("   ✓ same answer ({ms:.0} ms through the gateways)\n"),
                Err(d) => {
                    println!("   ✗ DIFFERENT: {d}\n");
                    all_ok = false;
                }
            }
        }
        if opts.data.is_none() {
            for (title, sql) in [DEMO_REFUSED, DEMO_UNSUPPORTED] {
                println!("── {title}");
                println!("   {sql}");
                match client.query(sql).await {
                    Ok(_) => {
                        println!("   ✗ unexpectedly answered\n");
                        all_ok = false;
                    }
                    Err(e) => println!("   refused, nothing computed: {e}\n"),
                }
            }
            println!("── Differential privacy: hospital_c requires it for external analysts");
            println!("   {DEMO_DP}   (asked by `{}`, role external)", VISITOR.0);
            let visitor = fed.client(&leader, VISITOR.0, VISITOR.1).await?;
            match visitor.query(DEMO_DP).await {
                Ok(noised) => {
                    let plain = plaintext(&pooled, DEMO_DP).await?;
                    println!(
                        "{}",
                        side_by_side(
                            &render(&noised, Format::Table)?,
                            &render(&plain, Format::Table)?,
                            "Council (noised at every hospital)",
                            "Exact, over pooled data"
                        )
                    );
                    if let Some(f) = noised
                        .first()
                        .and_then(|b| gateway::dp::footer(&b.schema()))
                    {
                        for l in f.lines() {
                            println!("   {l}");
                        }
                    }
                    println!(
                        "   No gateway knows the total noise; hospital_c charged ε = 1 to hospital_a:{} in its budget ledger.\n",
                        VISITOR.0
                    );
                }
                Err(e) => {
                    println!("   error: {e}\n");
                    all_ok = false;
                }
            }
            println!("── EXPLAIN of the first query: what runs where, and who learns what");
            match client.explain(DEMO_QUERIES[0].1).await {
                Ok(text) => {
                    for l in text.lines() {
                        println!("   {l}");
                    }
                }
                Err(e) => println!("   error: {e}"),
            }
            println!();
            println!(
                "Every gateway appended each decision and outcome to its hash-chained audit log."
            );
        }
    }
    fed.stop().await;
    if !all_ok {
        bail!("some secure answers did not match the plaintext answers");
    }
    Ok(())
}

fn has_order_by(sql: &str) -> bool {
    sql.to_ascii_lowercase().contains("order by")
}

fn side_by_side(a: &str, b: &str, ta: &str, tb: &str) -> String {
    let al: Vec<&str> = a.lines().collect();
    let bl: Vec<&str> = b.lines().collect();
    let wa = al
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0)
        .max(ta.len());
    let wb = bl.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    if wa + wb + 6 > 150 {
        return format!("   {ta}\n{}\n   {tb}\n{}", indent(a), indent(b));
    }
    let mut s = format!("   {ta:<wa$}   {tb}\n");
    for i in 0..al.len().max(bl.len()) {
        let x = al.get(i).copied().unwrap_or("");
        let y = bl.get(i).copied().unwrap_or("");
        let pad = wa - x.chars().count();
        let _ = writeln!(s, "   {x}{}   {y}", " ".repeat(pad));
    }
    s.trim_end().to_string()
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("   {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `--data DIR`: one folder per party, files named after the tables, an
/// optional catalog.toml (else inferred, with domains derived and said so).
async fn user_federation(
    dir: &Path,
) -> Result<(FederationSpec, Vec<(String, String)>, Vec<String>)> {
    let mut parties: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    parties.sort();
    if parties.len() < 2 {
        bail!(
            "{} must hold one folder per party (at least two), each with files named after the tables, \
             such as hospital_a/patients.csv",
            dir.display()
        );
    }
    let mut notes = Vec::new();
    let cat_path = dir.join("catalog.toml");
    let catalog_toml = if cat_path.exists() {
        std::fs::read_to_string(&cat_path)?
    } else {
        let (text, n) = infer_catalog(&parties).await?;
        notes.extend(n);
        text
    };
    let catalog = planner::Catalog::from_toml(&catalog_toml, &cat_path.display().to_string())?;
    let ids: Vec<String> = parties
        .iter()
        .map(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("party")
                .to_ascii_lowercase()
                .replace([' ', '.'], "_")
        })
        .collect();
    for id in &ids {
        gateway::certs::check_party_id(id)
            .with_context(|| format!("folder names become party ids in {}", dir.display()))?;
    }
    let allow: Vec<String> = ids.iter().map(|i| format!("\"{i}:*\"")).collect();
    let mut queries = Vec::new();
    let spec_parties = ids
        .iter()
        .zip(&parties)
        .map(|(id, d)| {
            let mut pol = format!(
                "party = \"{id}\"\n[analysts]\nallow = [{}]\n[engines]\nhonest_majority = true\n",
                allow.join(", ")
            );
            for t in catalog.tables().values() {
                let _ = writeln!(pol, "[tables.{}]\ncount_star = true", t.name);
                for c in &t.columns {
                    let _ = writeln!(
                        pol,
                        "[tables.{}.columns.{}]\nfilter = true\ngroup_by = {}\naggregate = [\"count\", \"sum\", \"avg\", \"var\", \"stddev\", \"min\", \"max\"]",
                        t.name,
                        c.name,
                        c.domain.is_some()
                    );
                }
            }
            let mut spec = PartySpec::new(id, d.clone(), pol, vec![(ANALYST.0.into(), ANALYST.1.into(), vec![])]);
            // Tables without a CSV or Parquet file may be in the party's
            // SQLite files (`*.sqlite`, `*.db`).
            for t in catalog.tables().values() {
                if connectors::files::find_table_file(d, t).is_some() {
                    continue;
                }
                if let Some(f) = connectors::sqlite::file_holding(d, &t.name) {
                    let source = f.file_name().and_then(|n| n.to_str()).unwrap_or("sqlite").to_string();
                    spec.databases
                        .insert(source.clone(), gateway::config::DatabaseConfig::Sqlite(f.clone()));
                    spec.db_tables.push(gateway::config::DbTable {
                        source,
                        table: connectors::SqlTable {
                            table: t.clone(),
                            local: t.name.clone(),
                            renames: Default::default(),
                        },
                    });
                }
            }
            spec
        })
        .collect();
    notes.push("demo policies for your data allow every column in every role; write real ones with `council policy check`".into());
    for t in catalog.tables().values() {
        queries.push((
            format!("Rows of {}", t.name),
            format!("SELECT COUNT(*) AS row_count FROM {}", t.name),
        ));
        let group = t.columns.iter().find(|c| c.domain.is_some());
        let num = t.columns.iter().find(|c| {
            matches!(
                c.ty,
                planner::ColumnType::Int
                    | planner::ColumnType::Decimal { .. }
                    | planner::ColumnType::Float { .. }
            ) && c.domain.is_none()
        });
        if let (Some(g), Some(x)) = (group, num) {
            queries.push((
                format!("{} by {}", x.name, g.name),
                format!(
                    "SELECT {g}, COUNT(*) AS n, SUM({x}) AS total, AVG({x}) AS mean FROM {t} GROUP BY {g} ORDER BY {g}",
                    g = g.name,
                    x = x.name,
                    t = t.name
                ),
            ));
        }
        if let Some(x) = num {
            queries.push((
                format!("Spread of {}", x.name),
                format!(
                    "SELECT COUNT({x}) AS n, AVG({x}) AS mean, STDDEV_SAMP({x}) AS sd FROM {t}",
                    x = x.name,
                    t = t.name
                ),
            ));
        }
    }
    Ok((
        FederationSpec {
            parties: spec_parties,
            catalog_toml,
            peer_timeout: Duration::from_secs(30),
            extra_certs: Vec::new(),
        },
        queries,
        notes,
    ))
}

/// ` , domain = [...]` for a low-cardinality text, bool or int column of
/// the union of every party's rows (registered as `p0..`), or nothing.
async fn derived_domain(
    ctx: &datafusion::prelude::SessionContext,
    union: &[String],
    table: &str,
    column: &str,
    ty: &str,
    notes: &mut Vec<String>,
) -> Result<String> {
    if !matches!(ty, "text" | "bool" | "int") || union.is_empty() {
        return Ok(String::new());
    }
    let q = format!(
        "SELECT DISTINCT \"{column}\" AS v FROM ({}) WHERE \"{column}\" IS NOT NULL ORDER BY v LIMIT 51",
        union.join(" UNION ALL ")
    );
    let vals: Vec<RecordBatch> = ctx.sql(&q).await?.collect().await?;
    let n: usize = vals.iter().map(|b| b.num_rows()).sum();
    let limit = if ty == "int" { 20 } else { 50 };
    if n == 0 || n > limit {
        return Ok(String::new());
    }
    let mut items = Vec::new();
    for b in &vals {
        for r in 0..b.num_rows() {
            let v = arrow::util::display::array_value_to_string(b.column(0), r)?;
            items.push(if ty == "text" { format!("{v:?}") } else { v });
        }
    }
    notes.push(format!(
        "derived the domain of {table}.{} from the data ({n} values); this reveals which values occur. \
         Declare it in catalog.toml to fix it in advance",
        column.to_ascii_lowercase()
    ));
    Ok(format!(", domain = [{}]", items.join(", ")))
}

/// Registers as `p{i}` the rows of `table` of each party `i` in `which`
/// that holds it in a SQLite file.
async fn register_sqlite_parties(
    ctx: &datafusion::prelude::SessionContext,
    parties: &[PathBuf],
    which: impl Iterator<Item = usize>,
    table: &planner::TableDef,
    union: &mut Vec<String>,
) -> Result<()> {
    for i in which {
        if let Some(f) = connectors::sqlite::file_holding(&parties[i], &table.name) {
            let rows = connectors::sqlite::read_rows_for_reference(&f, table).await?;
            let mem = datafusion::catalog::MemTable::try_new(table.schema(), vec![rows])?;
            ctx.register_table(format!("p{i}").as_str(), std::sync::Arc::new(mem))?;
            union.push(format!("SELECT * FROM p{i}"));
        }
    }
    Ok(())
}

/// A SQLite table's catalog entry: types from the declared column types,
/// domains derived from every party's rows as for files.
async fn infer_sqlite_table(
    parties: &[PathBuf],
    first_file: &Path,
    name: &str,
    cols: &[(String, String)],
    notes: &mut Vec<String>,
) -> Result<String> {
    let mut plain = format!("[tables.{}]\ncolumns = [\n", name.to_ascii_lowercase());
    for (c, declared) in cols {
        let ty = connectors::sqlite::suggested_type(declared).ok_or_else(|| {
            anyhow!(
                "column {c} of {name} in {} is declared `{declared}`, which gives no exact type; \
                 declare it INTEGER, REAL, TEXT, BOOLEAN or DATE, or write catalog.toml yourself",
                first_file.display()
            )
        })?;
        let _ = writeln!(
            plain,
            "  {{ name = \"{}\", type = \"{ty}\" }},",
            c.to_ascii_lowercase()
        );
    }
    plain.push_str("]\n");
    let cat = planner::Catalog::from_toml(&plain, "inferred")?;
    let t = cat
        .tables()
        .values()
        .next()
        .ok_or_else(|| anyhow!("no table inferred for {name}"))?;
    let ctx = datafusion::prelude::SessionContext::new();
    let mut union = Vec::new();
    register_sqlite_parties(&ctx, parties, 0..parties.len(), t, &mut union).await?;
    let mut text = format!("[tables.{}]\ncolumns = [\n", t.name);
    for c in &t.columns {
        let ty = c.ty.to_string();
        let domain = derived_domain(&ctx, &union, &t.name, &c.name, &ty, notes).await?;
        let ty = match &c.ty {
            planner::ColumnType::Float { .. } => "float".to_string(),
            _ => ty,
        };
        let _ = writeln!(
            text,
            "  {{ name = \"{}\", type = \"{ty}\"{domain} }},",
            c.name
        );
    }
    text.push_str("]\n");
    Ok(text)
}

/// Infers a catalog from the first party's files, deriving the domains of
/// low-cardinality text, bool and int columns from all parties' data.
async fn infer_catalog(parties: &[PathBuf]) -> Result<(String, Vec<String>)> {
    use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};
    let mut notes = Vec::new();
    let first = &parties[0];
    let mut files: Vec<PathBuf> = std::fs::read_dir(first)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| connectors::FileFormat::from_path(p).is_some())
        .collect();
    files.sort();
    let mut text = String::from("# Inferred by council demo from the data.\n");
    let file_tables: Vec<String> = files
        .iter()
        .filter_map(|f| f.file_stem().and_then(|s| s.to_str()))
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let mut sqlite_tables = 0;
    for f in connectors::sqlite::sqlite_files(first) {
        for (name, cols) in connectors::sqlite::SqliteDatabase::open(&f)?.tables()? {
            if file_tables.contains(&name.to_ascii_lowercase()) {
                continue;
            }
            text.push_str(&infer_sqlite_table(parties, &f, &name, &cols, &mut notes).await?);
            sqlite_tables += 1;
        }
    }
    if files.is_empty() && sqlite_tables == 0 {
        bail!(
            "{} has no .csv, .parquet or SQLite (.sqlite, .db) files",
            first.display()
        );
    }
    for f in files {
        let name = f
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| anyhow!("bad file name {}", f.display()))?
            .to_ascii_lowercase();
        let ctx = SessionContext::new();
        let mut union = Vec::new();
        let mut missing = Vec::new();
        for (i, p) in parties.iter().enumerate() {
            let path = p.join(f.file_name().unwrap_or_default());
            if !path.exists() {
                missing.push(i);
                continue;
            }
            let path_s = path.to_str().ok_or_else(|| anyhow!("path is not UTF-8"))?;
            let t = format!("p{i}");
            match connectors::FileFormat::from_path(&path) {
                Some(connectors::FileFormat::Parquet) => {
                    ctx.register_parquet(&t, path_s, ParquetReadOptions::default())
                        .await?
                }
                _ => ctx.register_csv(&t, path_s, CsvReadOptions::new()).await?,
            }
            union.push(format!("SELECT * FROM {t}"));
        }
        let df = ctx.sql("SELECT * FROM p0 LIMIT 0").await?;
        let schema = df.schema().clone();
        let mut cols = Vec::new();
        for field in schema.fields() {
            let col = field.name().to_ascii_lowercase();
            let ty = match field.data_type() {
                DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::UInt8
                | DataType::UInt16
                | DataType::UInt32 => "int".to_string(),
                DataType::Float16 | DataType::Float32 | DataType::Float64 => "float".to_string(),
                DataType::Decimal128(p, s) => format!("decimal({p},{s})"),
                DataType::Boolean => "bool".to_string(),
                DataType::Date32 => "date".to_string(),
                DataType::Timestamp(_, None) => "timestamp".to_string(),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".to_string(),
                other => {
                    bail!("column {col} of {name} has type {other}, which Council cannot read yet")
                }
            };
            cols.push((field.name().clone(), ty));
        }
        // Parties that hold this table in a SQLite file instead.
        if !missing.is_empty() {
            let mut plain = format!("[tables.{name}]\ncolumns = [\n");
            for (c, ty) in &cols {
                let _ = writeln!(
                    plain,
                    "  {{ name = \"{}\", type = \"{ty}\" }},",
                    c.to_ascii_lowercase()
                );
            }
            plain.push_str("]\n");
            let cat = planner::Catalog::from_toml(&plain, "inferred")?;
            if let Some(t) = cat.tables().values().next() {
                register_sqlite_parties(&ctx, parties, missing.into_iter(), t, &mut union).await?;
            }
        }
        let _ = writeln!(text, "[tables.{name}]\ncolumns = [");
        for (c, ty) in cols {
            let domain = derived_domain(&ctx, &union, &name, &c, &ty, &mut notes).await?;
            let _ = writeln!(
                text,
                "  {{ name = \"{}\", type = \"{ty}\"{domain} }},",
                c.to_ascii_lowercase()
            );
        }
        text.push_str("]\n");
    }
    Ok((text, notes))
}
