//! `council bench`: TPC-H `lineitem` (tpchgen) split across N parties, Q1 and
//! Q6 run in plaintext DataFusion over the pooled files and through N
//! `council serve` processes on loopback with mutual TLS, alternating, with
//! medians, the secure/plaintext ratio, peak memory, and an exact check that
//! the secure answers equal the plaintext ones.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::parquet::arrow::ArrowWriter;
use tpchgen::generators::LineItemGenerator;
use tpchgen_arrow::LineItemArrow;

use crate::compare::compare;
use crate::federation::plaintext;
use gateway::client::AnalystClient;

pub const LINEITEM_CATALOG: &str = r#"[tables.lineitem]
columns = [
  { name = "l_orderkey", type = "int" },
  { name = "l_quantity", type = "decimal(15,2)" },
  { name = "l_extendedprice", type = "decimal(15,2)" },
  { name = "l_discount", type = "decimal(15,2)" },
  { name = "l_tax", type = "decimal(15,2)" },
  { name = "l_returnflag", type = "text", domain = ["A", "N", "R"] },
  { name = "l_linestatus", type = "text", domain = ["F", "O"] },
  { name = "l_shipdate", type = "date" },
]
"#;

const COLUMNS: [&str; 8] = [
    "l_orderkey",
    "l_quantity",
    "l_extendedprice",
    "l_discount",
    "l_tax",
    "l_returnflag",
    "l_linestatus",
    "l_shipdate",
];

pub const Q1: &str = "SELECT l_returnflag, l_linestatus, SUM(l_quantity) AS sum_qty, SUM(l_extendedprice) AS sum_base_price, \
SUM(l_extendedprice * (1 - l_discount)) AS sum_disc_price, SUM(l_extendedprice * (1 - l_discount) * (1 + l_tax)) AS sum_charge, \
AVG(l_quantity) AS avg_qty, AVG(l_extendedprice) AS avg_price, AVG(l_discount) AS avg_disc, COUNT(*) AS count_order \
FROM lineitem WHERE l_shipdate <= DATE '1998-12-01' - INTERVAL '90' DAY \
GROUP BY l_returnflag, l_linestatus ORDER BY l_returnflag, l_linestatus";

/// Q1 with MIN and MAX (issue 13): the comparisons run on the replicated
/// engine beside Q1's sums on the additive one (three parties or more).
pub const Q1X: &str = "SELECT l_returnflag, l_linestatus, SUM(l_quantity) AS sum_qty, SUM(l_extendedprice) AS sum_base_price, \
SUM(l_extendedprice * (1 - l_discount)) AS sum_disc_price, SUM(l_extendedprice * (1 - l_discount) * (1 + l_tax)) AS sum_charge, \
AVG(l_quantity) AS avg_qty, AVG(l_extendedprice) AS avg_price, AVG(l_discount) AS avg_disc, COUNT(*) AS count_order, \
MIN(l_extendedprice) AS min_price, MAX(l_discount) AS max_disc \
FROM lineitem WHERE l_shipdate <= DATE '1998-12-01' - INTERVAL '90' DAY \
GROUP BY l_returnflag, l_linestatus ORDER BY l_returnflag, l_linestatus";

pub const Q6: &str = "SELECT SUM(l_extendedprice * l_discount) AS revenue FROM lineitem \
WHERE l_shipdate >= DATE '1994-01-01' AND l_shipdate < DATE '1995-01-01' \
AND l_discount BETWEEN 0.05 AND 0.07 AND l_quantity < 24";

pub struct BenchOptions {
    pub scale_factors: Vec<f64>,
    pub parties: Vec<usize>,
    /// Domain sizes of the group sweep (empty: no sweep).
    pub groups: Vec<usize>,
    pub reps: usize,
    pub json: Option<PathBuf>,
    pub keep: Option<PathBuf>,
}

/// One measured query.
#[derive(serde::Serialize)]
pub struct Figure {
    pub query: String,
    pub scale_factor: f64,
    pub parties: usize,
    pub rows: usize,
    pub plaintext_ms: f64,
    /// DataFusion's target partitions for the baseline: the fastest of the
    /// candidates tried at warm-up.
    pub plaintext_partitions: usize,
    pub secure_ms: f64,
    pub ratio: f64,
    pub plaintext_peak_mib: f64,
    pub gateway_peak_mib: f64,
    pub equal: bool,
}

/// Writes each party's tpchgen part of `lineitem` as Parquet: party i of N
/// gets part i+1 of N, tpchgen's own split.
pub fn write_lineitem(dir: &Path, sf: f64, parties: usize) -> Result<usize> {
    let mut total = 0;
    for i in 0..parties {
        let d = dir.join(format!("p{i}"));
        std::fs::create_dir_all(&d)?;
        let gen = LineItemGenerator::new(sf, i as i32 + 1, parties as i32);
        let lines = LineItemArrow::new(gen).with_batch_size(65_536);
        let full = arrow::array::RecordBatchReader::schema(&lines);
        let idx: Vec<usize> = COLUMNS
            .iter()
            .map(|c| full.index_of(c).map_err(|e| anyhow!(e)))
            .collect::<Result<_>>()?;
        let fields: Vec<Field> = idx
            .iter()
            .map(|&j| {
                let f = full.field(j);
                let dt = match f.data_type() {
                    DataType::Utf8View => DataType::Utf8,
                    other => other.clone(),
                };
                Field::new(f.name(), dt, true)
            })
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let file = std::fs::File::create(d.join("lineitem.parquet"))?;
        let mut w = ArrowWriter::try_new(file, schema.clone(), None)?;
        for b in lines {
            let b = b?;
            let cols = idx
                .iter()
                .zip(schema.fields())
                .map(|(&j, f)| arrow::compute::cast(b.column(j), f.data_type()))
                .collect::<Result<Vec<_>, _>>()?;
            let b = RecordBatch::try_new(schema.clone(), cols)?;
            total += b.num_rows();
            w.write(&b)?;
        }
        w.close()?;
    }
    Ok(total)
}

/// Child processes that are killed when this is dropped.
pub struct Processes(pub Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port the OS had free on 127.0.0.1 a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Resets a process's peak-memory mark (Linux: write 5 to clear_refs).
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

const PASSWORD: &str = "bench-password";

/// The machine's cores, as DataFusion counts them.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Partitions each gateway's local part uses: the N gateways share this
/// machine's cores as N machines would each have their own, so each gets
/// its share (at least one).
fn gateway_partitions(n: usize) -> usize {
    (cores() / n).max(1)
}

/// A table the bench's gateways serve: its name, columns and group
/// columns; each party's rows are at `data/p{i}/{name}.parquet`.
struct BenchTable {
    name: String,
    columns: Vec<&'static str>,
    group_by: Vec<&'static str>,
}

fn lineitem_table() -> BenchTable {
    BenchTable {
        name: "lineitem".into(),
        columns: COLUMNS.to_vec(),
        group_by: vec!["l_returnflag", "l_linestatus"],
    }
}

/// Writes certificates and configs for `n` gateways serving `tables` (as
/// `catalog` declares them) and starts them as `council serve` processes.
/// Returns the processes and analyst addresses.
fn start_gateways(
    dir: &Path,
    n: usize,
    catalog: &str,
    tables: &[BenchTable],
) -> Result<(Processes, Vec<String>)> {
    let ids: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
    let fed = gateway::certs::make_federation("Council bench CA", &ids, &[])?;
    gateway::certs::write_federation(&fed, &dir.join("certs"))?;
    std::fs::write(dir.join("catalog.toml"), catalog)?;
    let hash = gateway::config::hash_password(PASSWORD)?;
    let peer: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_>>()?;
    let analyst: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_>>()?;
    let allow: Vec<String> = ids.iter().map(|i| format!("\"{i}:*\"")).collect();
    let mut policy = format!(
        "[analysts]\nallow = [{}]\n[engines]\nhonest_majority = true\n",
        allow.join(", ")
    );
    for t in tables {
        let _ = writeln!(policy, "[tables.{}]\ncount_star = true", t.name);
        for c in &t.columns {
            let group = t.group_by.contains(c);
            let _ = writeln!(
                policy,
                "[tables.{}.columns.{c}]\nfilter = true\ngroup_by = {group}\naggregate = [\"count\", \"sum\", \"avg\", \"var\", \"stddev\", \"min\", \"max\"]",
                t.name
            );
        }
    }
    std::fs::write(dir.join("policy.toml"), policy)?;
    let exe = std::env::current_exe().context("locating the council binary")?;
    let mut procs = Processes(Vec::new());
    for (i, p) in ids.iter().enumerate() {
        let mut cfg = format!(
            "party = \"{p}\"\npeer_listen = \"127.0.0.1:{}\"\nanalyst_listen = \"127.0.0.1:{}\"\ncatalog = \"catalog.toml\"\n\
             policy = \"policy.toml\"\naudit_log = \"audit/{p}.log\"\npeer_timeout_ms = 600000\nlocal_partitions = {}\n\
             [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{p}.pem\"\nkey = \"certs/{p}.key\"\n\
             [[analysts]]\nname = \"bench\"\npassword_hash = \"{hash}\"\n",
            peer[i],
            analyst[i],
            gateway_partitions(n)
        );
        for t in tables {
            let _ = writeln!(cfg, "[tables.{0}]\npath = \"data/{p}/{0}.parquet\"", t.name);
        }
        for (j, q) in ids.iter().enumerate() {
            if i != j {
                let _ = writeln!(
                    cfg,
                    "[[peers]]\nid = \"{q}\"\naddress = \"127.0.0.1:{}\"",
                    peer[j]
                );
            }
        }
        let path = dir.join(format!("{p}.toml"));
        std::fs::write(&path, cfg)?;
        let log = std::fs::File::create(dir.join(format!("{p}.out")))?;
        let child = Command::new(&exe)
            .args(["serve", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting council serve")?;
        procs.0.push(child);
    }
    Ok((
        procs,
        analyst.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
    ))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub async fn run(opts: BenchOptions) -> Result<()> {
    let mut figures = Vec::new();
    println!("council bench: TPC-H lineitem (tpchgen), plaintext DataFusion over the pooled files vs Council over");
    println!("N `council serve` processes on 127.0.0.1 with mutual TLS; {} repetitions after a warm-up, alternating.", opts.reps);
    println!(
        "All on this machine's {} cores: each gateway's local part gets {{cores / N}} DataFusion partitions (at least 1), \
         as N machines would each bring their own;\nthe plaintext baseline gets the whole machine with the fastest of \
         target_partitions {{cores, N, cores x N}}, chosen at warm-up.",
        cores()
    );
    println!(
        "(Build with --release for meaningful figures; this binary is {}.)\n",
        if cfg!(debug_assertions) {
            "a DEBUG build"
        } else {
            "a release build"
        }
    );
    for &sf in &opts.scale_factors {
        for &n in &opts.parties {
            let tmp = tempfile::tempdir()?;
            let dir = match &opts.keep {
                Some(k) => k.join(format!("sf{sf}-n{n}")),
                None => tmp.path().to_path_buf(),
            };
            std::fs::create_dir_all(&dir)?;
            let t = Instant::now();
            let rows = write_lineitem(&dir.join("data"), sf, n)?;
            println!(
                "SF {sf}, {n} parties: {rows} lineitem rows generated in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            figures.extend(run_one(&dir, sf, n, rows, opts.reps).await?);
        }
    }
    let mut group_figures = Vec::new();
    if !opts.groups.is_empty() {
        let n = opts.parties.first().copied().unwrap_or(3);
        println!(
            "Group sweep, {n} parties: SELECT k, COUNT(*), SUM(v) … GROUP BY k over G groups (G − 1 declared \
             integers and NULL), G rows per party; every share carries all G groups."
        );
        let tmp = tempfile::tempdir()?;
        let dir = match &opts.keep {
            Some(k) => k.join("groups"),
            None => tmp.path().to_path_buf(),
        };
        std::fs::create_dir_all(&dir)?;
        group_figures = run_groups(&dir, n, &opts.groups, opts.reps).await?;
    }
    if let Some(path) = &opts.json {
        let all = serde_json::json!({ "tpch": figures, "groups": group_figures });
        std::fs::write(path, serde_json::to_string_pretty(&all)?)?;
        println!("figures written to {}", path.display());
    }
    if figures.iter().any(|f| !f.equal) || group_figures.iter().any(|f| !f.equal) {
        bail!("a secure answer differed from the plaintext answer");
    }
    Ok(())
}

async fn run_one(dir: &Path, sf: f64, n: usize, rows: usize, reps: usize) -> Result<Vec<Figure>> {
    let (procs, addrs) = start_gateways(dir, n, LINEITEM_CATALOG, &[lineitem_table()])?;
    let client = connect_when_up(
        dir,
        &addrs[0],
        "SELECT COUNT(*) FROM lineitem WHERE l_orderkey < 0",
    )
    .await?;
    let mut out = Vec::new();
    // MIN and MAX need three compute parties.
    let queries = [("Q1", Q1), ("Q6", Q6), ("Q1x", Q1X)];
    for (name, sql) in queries.into_iter().filter(|(q, _)| *q != "Q1x" || n >= 3) {
        // The fastest plaintext configuration, best of two runs each.
        let mut candidates = vec![cores(), n, cores() * n];
        candidates.sort_unstable();
        candidates.dedup();
        let mut best: Option<(f64, usize, datafusion::prelude::SessionContext)> = None;
        let mut tried = Vec::new();
        for k in candidates {
            let ctx = pooled_parquet(dir, n, k, &["lineitem"]).await?;
            let mut fastest = f64::INFINITY;
            for _ in 0..2 {
                let t = Instant::now();
                plaintext(&ctx, sql).await?;
                fastest = fastest.min(t.elapsed().as_secs_f64() * 1e3);
            }
            tried.push(format!("{k}: {fastest:.1} ms"));
            if best.as_ref().is_none_or(|b| fastest < b.0) {
                best = Some((fastest, k, ctx));
            }
        }
        let Some((_, partitions, pooled)) = best else {
            bail!("no plaintext configuration to try");
        };
        println!(
            "  {name} warm-up, plaintext by target_partitions: {}",
            tried.join(", ")
        );
        let m = measure(
            &client,
            &pooled,
            sql,
            &format!("{name} at SF {sf} with {n} parties"),
            &procs,
            reps,
        )
        .await?;
        let (equal, mut tp, mut ts) = (m.equal, m.plaintext_ms, m.secure_ms);
        let plaintext_peak = plaintext_peak_in_child(dir, n, name, reps, partitions)?;
        let gateway_peak = procs.0.iter().map(|c| peak_mib(c.id())).fold(0.0, f64::max);
        let (p, s) = (median(&mut tp), median(&mut ts));
        println!(
            "  {name}: plaintext {p:8.1} ms ({partitions} partitions)   secure {s:8.1} ms   ratio {:5.2}   peak memory: plaintext process {plaintext_peak:.0} MiB, largest gateway {gateway_peak:.0} MiB   answers {}",
            s / p,
            if equal { "equal" } else { "DIFFER" }
        );
        out.push(Figure {
            query: name.into(),
            scale_factor: sf,
            parties: n,
            rows,
            plaintext_ms: p,
            plaintext_partitions: partitions,
            secure_ms: s,
            ratio: s / p,
            plaintext_peak_mib: plaintext_peak,
            gateway_peak_mib: gateway_peak,
            equal,
        });
    }
    drop(procs);
    Ok(out)
}

/// One query measured: equal to plaintext (checked at the warm-up), and
/// each side's times in ms, alternating, after the peaks were reset.
struct Measured {
    equal: bool,
    plaintext_ms: Vec<f64>,
    secure_ms: Vec<f64>,
}

async fn measure(
    client: &AnalystClient,
    pooled: &datafusion::prelude::SessionContext,
    sql: &str,
    what: &str,
    procs: &Processes,
    reps: usize,
) -> Result<Measured> {
    // Warm-up, and the exact-equality check.
    let plain = plaintext(pooled, sql).await?;
    let secure = client
        .query(sql)
        .await
        .map_err(|e| anyhow!("{what}: {e}"))?;
    let equal = match compare(&secure, &plain, true) {
        Ok(()) => true,
        Err(d) => {
            eprintln!("{what}: SECURE ANSWER DIFFERS: {d}");
            false
        }
    };
    for c in &procs.0 {
        reset_peak(c.id());
    }
    let (mut tp, mut ts) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        plaintext(pooled, sql).await?;
        tp.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        client
            .query(sql)
            .await
            .map_err(|e| anyhow!("{what}: {e}"))?;
        ts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Measured {
        equal,
        plaintext_ms: tp,
        secure_ms: ts,
    })
}

/// Waits until the gateway at `addr` answers `probe` (two minutes at most).
async fn connect_when_up(dir: &Path, addr: &str, probe: &str) -> Result<AnalystClient> {
    let ca = std::fs::read_to_string(dir.join("certs/ca.pem"))?;
    let start = Instant::now();
    loop {
        match AnalystClient::connect(addr, &ca, "bench", PASSWORD).await {
            Ok(c) if c.query(probe).await.is_ok() => return Ok(c),
            _ if start.elapsed() > Duration::from_secs(120) => {
                bail!("the gateways did not come up; see {}", dir.display())
            }
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// The plaintext baseline: one DataFusion table per name over every
/// party's Parquet file (hard-linked into one folder), read as the gateways
/// read theirs.
async fn pooled_parquet(
    dir: &Path,
    n: usize,
    partitions: usize,
    tables: &[&str],
) -> Result<datafusion::prelude::SessionContext> {
    // Strings as Utf8, as the catalog declares them (not Utf8View).
    let config = datafusion::prelude::SessionConfig::new()
        .set_bool(
            "datafusion.execution.parquet.schema_force_view_types",
            false,
        )
        .with_target_partitions(partitions);
    let ctx = datafusion::prelude::SessionContext::new_with_config(config);
    for table in tables {
        let pooled = dir.join("pooled").join(table);
        std::fs::create_dir_all(&pooled)?;
        for i in 0..n {
            let link = pooled.join(format!("p{i}.parquet"));
            let file = dir.join(format!("data/p{i}/{table}.parquet"));
            if !link.exists() {
                std::fs::hard_link(&file, &link)
                    .or_else(|_| std::fs::copy(&file, &link).map(|_| ()))?;
            }
        }
        let path = pooled
            .to_str()
            .ok_or_else(|| anyhow!("path is not UTF-8"))?;
        ctx.register_parquet(
            *table,
            path,
            datafusion::prelude::ParquetReadOptions::default(),
        )
        .await?;
    }
    Ok(ctx)
}

/// One point of the group sweep.
#[derive(serde::Serialize)]
pub struct GroupFigure {
    pub groups: usize,
    pub parties: usize,
    pub rows: usize,
    pub plaintext_ms: f64,
    pub secure_ms: f64,
    pub ratio: f64,
    pub gateway_peak_mib: f64,
    pub equal: bool,
}

/// The group sweep: `SELECT k, COUNT(*), SUM(v) … GROUP BY k` over G
/// groups (G − 1 declared integers and NULL), each party holding G rows with keys
/// spread over the domain. The secure part then carries G groups per share
/// (many Arrow batches), whatever the data: the cost of a large public
/// domain, against plaintext DataFusion over the pooled files.
async fn run_groups(
    dir: &Path,
    n: usize,
    sizes: &[usize],
    reps: usize,
) -> Result<Vec<GroupFigure>> {
    let mut catalog = String::new();
    let mut tables = Vec::new();
    for &g in sizes {
        let name = format!("groups{g}");
        let _ = writeln!(
            catalog,
            "[tables.{name}]\ncolumns = [\n  {{ name = \"k\", type = \"int\", domain = {{ min = 0, max = {} }} }},\n  {{ name = \"v\", type = \"int\" }},\n]",
            g.saturating_sub(2)
        );
        for i in 0..n {
            let d = dir.join(format!("data/p{i}"));
            std::fs::create_dir_all(&d)?;
            let schema = Arc::new(Schema::new(vec![
                Field::new("k", DataType::Int64, true),
                Field::new("v", DataType::Int64, true),
            ]));
            // Keys spread over the G − 1 declared values (NULL is the G-th
            // group) by a multiplicative hash.
            let values_declared = g.saturating_sub(1).max(1) as u64;
            let keys: Vec<i64> = (0..g as u64)
                .map(|j| ((j * 2_654_435_761 + i as u64 * 40_503) % values_declared) as i64)
                .collect();
            let values: Vec<i64> = (0..g as i64).map(|j| (j * 7919) % 2001 - 1000).collect();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(arrow::array::Int64Array::from(keys)),
                    Arc::new(arrow::array::Int64Array::from(values)),
                ],
            )?;
            let file = std::fs::File::create(d.join(format!("{name}.parquet")))?;
            let mut w = ArrowWriter::try_new(file, schema, None)?;
            w.write(&batch)?;
            w.close()?;
        }
        tables.push(BenchTable {
            name,
            columns: vec!["k", "v"],
            group_by: vec!["k"],
        });
    }
    let (procs, addrs) = start_gateways(dir, n, &catalog, &tables)?;
    let probe = format!("SELECT COUNT(*) FROM {} WHERE v < -5000", tables[0].name);
    let client = connect_when_up(dir, &addrs[0], &probe).await?;
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let pooled = pooled_parquet(dir, n, cores(), &names).await?;
    let mut out = Vec::new();
    for (&g, name) in sizes.iter().zip(&names) {
        let sql = format!("SELECT k, COUNT(*) AS n, SUM(v) AS s FROM {name} GROUP BY k ORDER BY k");
        let m = measure(&client, &pooled, &sql, &format!("{g} groups"), &procs, reps).await?;
        let (equal, mut tp, mut ts) = (m.equal, m.plaintext_ms, m.secure_ms);
        let gateway_peak = procs.0.iter().map(|c| peak_mib(c.id())).fold(0.0, f64::max);
        let (p, s) = (median(&mut tp), median(&mut ts));
        println!(
            "  {g:>8} groups: plaintext {p:8.1} ms   secure {s:8.1} ms   ratio {:6.2}   largest gateway {gateway_peak:.0} MiB   answers {}",
            s / p,
            if equal { "equal" } else { "DIFFER" }
        );
        out.push(GroupFigure {
            groups: g,
            parties: n,
            rows: g * n,
            plaintext_ms: p,
            secure_ms: s,
            ratio: s / p,
            gateway_peak_mib: gateway_peak,
            equal,
        });
    }
    drop(procs);
    Ok(out)
}

/// Peak memory of plaintext DataFusion alone: a child process opens the
/// pooled files and runs the query `reps` times (`council bench-plaintext`).
fn plaintext_peak_in_child(
    dir: &Path,
    n: usize,
    query: &str,
    reps: usize,
    partitions: usize,
) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args([
            "bench-plaintext",
            "--query",
            query,
            "--parties",
            &n.to_string(),
            "--reps",
            &reps.to_string(),
            "--partitions",
            &partitions.to_string(),
            "--dir",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "plaintext child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .map_err(|e| anyhow!("plaintext child: {e}"))
}

/// The child side: run `query` over the pooled files, print peak MiB.
pub async fn plaintext_child(
    dir: &Path,
    n: usize,
    query: &str,
    reps: usize,
    partitions: usize,
) -> Result<()> {
    let sql = match query {
        "Q1" => Q1,
        "Q6" => Q6,
        "Q1x" => Q1X,
        other => bail!("unknown query {other}"),
    };
    let pooled = pooled_parquet(dir, n, partitions, &["lineitem"]).await?;
    for _ in 0..=reps {
        plaintext(&pooled, sql).await?;
    }
    println!("{:.1}", peak_mib(std::process::id()));
    Ok(())
}

/// The shortest of five runs of `f`, in seconds.
fn best_of_5(f: &mut dyn FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// `council bench --micro`: executor throughput in elements per second,
/// against a plain summation of the same number of i64 in the same run.
pub fn micro(elements: usize) -> Result<()> {
    use executor::encode::to_ring;
    use executor::{SharedTable, Width};
    let values: Vec<arrow::datatypes::i256> = (0..elements as i128)
        .map(|i| arrow::datatypes::i256::from_i128((i * 7919) % 1_000_003 - 500_000))
        .collect();
    let time = best_of_5;
    let plain: Vec<i64> = values.iter().map(|&v| v.as_i128() as i64).collect();
    let mut sink = 0i64;
    let base =
        time(&mut || sink = sink.wrapping_add(plain.iter().fold(0i64, |a, &b| a.wrapping_add(b))));
    let mut rows = Vec::new();
    let mut enc = Vec::new();
    rows.push((
        "encode (i256 -> Z_2^64, bound check)",
        time(&mut || {
            enc = to_ring(std::slice::from_ref(&values), &[Width::Z64], 3).unwrap_or_default()
        }),
    ));
    let table = SharedTable {
        keys: vec![],
        columns: enc.clone(),
        rows: elements,
    };
    let mut share = table.clone();
    rows.push((
        "share (expand a ChaCha20 seed, subtract)",
        time(&mut || {
            share.sub_assign(&SharedTable::from_seed(
                &[],
                &[Width::Z64],
                elements,
                [7; 32],
            ))
        }),
    ));
    let mut acc = table.clone();
    rows.push((
        "combine (add a share)",
        time(&mut || acc.add_assign(&table)),
    ));
    let mut out = Vec::new();
    rows.push((
        "reveal (decode to signed)",
        time(&mut || out = acc.columns[0].decode()),
    ));
    let mut batch = None;
    rows.push((
        "to Arrow batch (UInt64 column)",
        time(&mut || batch = table.to_batch().ok()),
    ));
    // DP noise, one draw per revealed total: measured on fewer draws (the
    // Gaussian at large σ² uses arbitrary precision), reported per element.
    let draws = elements.min(200_000);
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(1);
    let mut noise_rows = Vec::new();
    for (name, d) in [
        (
            "DP noise: discrete Laplace, scale 4000",
            executor::noise::Distribution::Laplace { num: 4000, den: 1 },
        ),
        (
            "DP noise: discrete Gaussian, σ² = 1e9",
            executor::noise::Distribution::Gaussian {
                sigma2: 1_000_000_000,
            },
        ),
        (
            "DP noise: discrete Gaussian, σ² = 1e21, bigint",
            executor::noise::Distribution::Gaussian {
                sigma2: 1_000_000_000_000_000_000_000,
            },
        ),
    ] {
        let spec = executor::noise::NoiseSpec {
            distribution: d,
            bound: u128::MAX,
        };
        let mut acc = 0i128;
        let secs = time(&mut || {
            for _ in 0..draws {
                acc = acc.wrapping_add(spec.draw(&mut rng).unwrap_or(0));
            }
        });
        std::hint::black_box(acc);
        // Scaled to `elements` for the comparison with the baseline.
        noise_rows.push((name, secs * elements as f64 / draws as f64));
    }
    rows.extend(noise_rows);
    println!(
        "executor micro-benchmarks, {elements} elements, best of 5 ({}):",
        if cfg!(debug_assertions) {
            "DEBUG build"
        } else {
            "release build"
        }
    );
    println!(
        "  {:<44} {:>10.0} M elements/s  (baseline)",
        "plain i64 sum",
        elements as f64 / base / 1e6
    );
    for (name, secs) in rows {
        println!(
            "  {name:<44} {:>10.0} M elements/s  {:>6.1}x the baseline's time",
            elements as f64 / secs / 1e6,
            secs / base
        );
    }
    std::hint::black_box((sink, out, batch, share));
    Ok(())
}

/// `council bench --micro`, the secure part: 64-bit multiplications and
/// comparisons per second of the replicated engine (three parties, each a
/// task of this process, over the in-memory transport: no TLS or sockets,
/// so this is the protocol's own cost), beside the additive engine's
/// secure sum and plaintext products and comparisons of the same values in
/// the same run. Each figure is the wall time from a common start until
/// all three parties finish, best of `reps`.
pub async fn micro_mpc(sizes: &[usize]) -> Result<()> {
    use executor::rep3::Rep3;
    use executor::transport::Step;
    use executor::{AdditiveEngine, Engine, InMemoryNetwork, SharedTable};
    use rand::Rng;

    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Mul,
        Compare,
        Sum,
    }
    let names: [String; 3] = ["p0", "p1", "p2"].map(String::from);
    async fn run3(names: &[String; 3], n: usize, kind: Kind) -> Result<f64> {
        let net = InMemoryNetwork::connect(names, Duration::from_secs(600));
        let barrier = Arc::new(tokio::sync::Barrier::new(3));
        let mut tasks = Vec::new();
        for (i, t) in net.into_iter().enumerate() {
            let names = names.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                // Below 2^61 in magnitude: within the comparison's bound.
                let mine: Vec<u64> = {
                    let mut rng = rand::rng();
                    (0..n).map(|_| (rng.random::<i64>() >> 3) as u64).collect()
                };
                if kind == Kind::Sum {
                    let engine =
                        AdditiveEngine::new(names.to_vec(), names[i].clone(), names[0].clone());
                    let input = SharedTable {
                        keys: vec![],
                        columns: vec![executor::ShareColumn::Z64(mine)],
                        rows: n,
                    };
                    barrier.wait().await;
                    let t0 = Instant::now();
                    engine.run(&t, &input).await.map_err(|e| anyhow!("{e}"))?;
                    return Ok::<f64, anyhow::Error>(t0.elapsed().as_secs_f64());
                }
                let mut r = Rep3::setup(&t, names.clone(), &names[i], Step(0))
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                let x = r
                    .input(0, (i == 0).then_some(&mine[..]), n)
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                let y = r
                    .input(1, (i == 1).then_some(&mine[..]), n)
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                barrier.wait().await;
                let t0 = Instant::now();
                match kind {
                    Kind::Mul => {
                        std::hint::black_box(r.mul(&x, &y).await.map_err(|e| anyhow!("{e}"))?);
                    }
                    _ => {
                        std::hint::black_box(
                            r.less_than(&x, &y).await.map_err(|e| anyhow!("{e}"))?,
                        );
                    }
                }
                Ok(t0.elapsed().as_secs_f64())
            }));
        }
        let mut worst: f64 = 0.0;
        for t in tasks {
            worst = worst.max(t.await.map_err(|e| anyhow!("{e}"))??);
        }
        Ok(worst)
    }
    println!(
        "secure part micro-benchmarks, three parties in one process over the in-memory transport \
         (no TLS), wall time until all three finish ({}):",
        if cfg!(debug_assertions) {
            "DEBUG build"
        } else {
            "release build"
        }
    );
    for &n in sizes {
        let reps = if n <= 1 << 20 { 3 } else { 1 };
        let mut rng = rand::rng();
        let a: Vec<i64> = (0..n).map(|_| rng.random::<i64>() >> 3).collect();
        let b: Vec<i64> = (0..n).map(|_| rng.random::<i64>() >> 3).collect();
        let best = best_of_5;
        let mut sink = 0u64;
        let plain_mul = best(&mut || {
            sink = sink.wrapping_add(
                a.iter()
                    .zip(&b)
                    .fold(0i64, |s, (x, y)| s.wrapping_add(x.wrapping_mul(*y)))
                    as u64,
            )
        });
        let plain_lt = best(&mut || {
            sink = sink.wrapping_add(a.iter().zip(&b).filter(|(x, y)| x < y).count() as u64)
        });
        std::hint::black_box(sink);
        println!("  n = 2^{} values:", n.trailing_zeros());
        for (label, kind, plain) in [
            (
                "multiplications (replicated, 1 round)",
                Kind::Mul,
                plain_mul,
            ),
            (
                "comparisons (replicated, 8 rounds)",
                Kind::Compare,
                plain_lt,
            ),
            (
                "additive secure sum (3 parties, for scale)",
                Kind::Sum,
                plain_mul,
            ),
        ] {
            let mut secs = f64::INFINITY;
            for _ in 0..reps {
                secs = secs.min(run3(&names, n, kind).await?);
            }
            println!(
                "    {label:<44} {:>8.1} M/s   plaintext {:>8.0} M/s   {:>7.0}x plaintext's time",
                n as f64 / secs / 1e6,
                n as f64 / plain / 1e6,
                secs / plain
            );
        }
    }
    Ok(())
}
