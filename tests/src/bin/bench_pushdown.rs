//! Pushdown against pulling rows, on a real PostgreSQL (a throwaway cluster
//! on loopback, TLS + SCRAM, as in the tests):
//!
//!   cargo run --release -p council-tests --bin bench-pushdown -- [ROWS] [REPS]
//!
//! Loads ROWS (default 10^6) seeded random rows, then for each query runs,
//! alternating, REPS times (default 5) after a warm-up:
//! - direct: the pushed-down statement through a plain client (the
//!   database's own time: the plaintext floor);
//! - pushdown: a party's local part through the PostgreSQL source;
//! - pull: the same local part with aggregate pushdown off (the database
//!   filters and returns the used columns; the gateway aggregates).
//!
//! Bytes are counted by a TCP relay between the gateway side and the server
//! (server → client, TLS records included). Pushdown and pull answers must be
//! equal, or the run fails.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use connectors::postgres::{PgConnect, PostgresDatabase};
use connectors::{Database, DatabaseSource, LocalSource, SqlTable};
use council_tests::pg::PgServer;
use planner::{Catalog, QueryOptions};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const QUERIES: &[&str] = &[
    "SELECT g, COUNT(*), SUM(x), AVG(d) FROM t GROUP BY g",
    "SELECT h, flag, COUNT(x), SUM(f), VAR_SAMP(x) FROM t WHERE x > 0 AND g IN ('a', 'b') GROUP BY h, flag",
    "SELECT COUNT(*), SUM(d) FROM t WHERE label = 'lime'",
];

/// A TCP relay to `to` that counts the bytes flowing back to the client.
async fn counting_relay(to: u16, counter: Arc<AtomicU64>) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    let _ = sw.shutdown().await;
                };
                let down = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    Ok(port)
}

fn csv_rows(n: usize) -> String {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut s = String::with_capacity(n * 64);
    s.push_str("id,g,h,flag,x,d,f,label,ts\n");
    for i in 0..n {
        let g = ["a", "b", "c", "d"][rng.random_range(0..4)];
        let h = rng.random_range(1..=3);
        let flag = rng.random_bool(0.4);
        let x: i64 = rng.random_range(-1000..=1000);
        let d: i64 = rng.random_range(-10_000_000..=10_000_000);
        let sign = if d < 0 { "-" } else { "" };
        let k: i64 = rng.random_range(-100_000_000..=100_000_000);
        let label = ["lime", "lemon", "plum", "kiwi"][rng.random_range(0..4)];
        s.push_str(&format!(
            "{i},{g},{h},{flag},{x},{sign}{}.{:03},{},{label},2024-{:02}-{:02} 12:00:00\n",
            d.unsigned_abs() / 1000,
            d.unsigned_abs() % 1000,
            k as f64 / 10_000.0,
            rng.random_range(1..=12),
            rng.random_range(1..=28)
        ));
    }
    s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args
        .get(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let reps: usize = args
        .get(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(5)
        .max(1);
    let _ = rustls::crypto::ring::default_provider().install_default();

    let pg = PgServer::start().context("starting PostgreSQL")?;
    pg.execute(
        "CREATE TABLE visits (id bigint, g text, h integer, flag boolean, x bigint, \
         d numeric(14,3), f double precision, label text, ts timestamp)",
    )
    .await?;
    let t = Instant::now();
    let loaded = pg
        .copy_csv(
            "visits",
            "id, g, h, flag, x, d, f, label, ts",
            &csv_rows(rows),
        )
        .await?;
    pg.execute("ANALYZE visits").await?;
    eprintln!(
        "loaded {loaded} rows into PostgreSQL in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let bytes = Arc::new(AtomicU64::new(0));
    let relay = counting_relay(pg.port, bytes.clone()).await?;
    let url = pg
        .url()
        .replace(&format!(":{}/", pg.port), &format!(":{relay}/"));
    let connect = PgConnect {
        url: url.clone(),
        ca_file: Some(pg.ca_file.clone()),
    };
    let catalog = Catalog::from_toml(council_tests::CATALOG, "catalog")?;
    let table = SqlTable {
        table: catalog.table("t").context("catalog")?.clone(),
        local: "visits".into(),
        renames: Default::default(),
    };
    let db: Arc<dyn Database> = Arc::new(PostgresDatabase::connect(&connect).await?);
    let push = DatabaseSource::open(db.clone(), vec![table.clone()], None).await?;
    let pull = DatabaseSource::open(db.clone(), vec![table], None)
        .await?
        .without_aggregate_pushdown();

    println!("PostgreSQL {rows} rows, {reps} reps, medians (this machine: see BENCHMARKS.md)");
    println!(
        "{:<4} {:>10} {:>10} {:>10} {:>9} {:>9} {:>12} {:>12}",
        "q", "direct ms", "push ms", "pull ms", "push/dir", "pull/push", "push bytes", "pull bytes"
    );
    for (qi, sql) in QUERIES.iter().enumerate() {
        let plan =
            planner::plan_query(sql, &catalog, &["p0".into()], &QueryOptions::default()).await?;
        let (pushed, _) = push.plan(&plan.local).await?;
        if pushed.residual.is_some() {
            bail!(
                "Q{} was not pushed down entirely: {:?}",
                qi + 1,
                pushed.residual
            );
        }
        let direct = || async {
            let rows = db.query(pushed.sql.clone(), pushed.columns.clone());
            futures::TryStreamExt::try_collect::<Vec<_>>(rows).await
        };
        // Warm-up, and the answers must agree.
        let a = push.run(&plan.local).await?;
        let b = pull.run(&plan.local).await?;
        direct().await?;
        let show = |x: &[arrow::array::RecordBatch]| -> Result<Vec<String>> {
            let text = arrow::util::pretty::pretty_format_batches(x)?.to_string();
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            Ok(lines)
        };
        if show(&a)? != show(&b)? {
            bail!("Q{}: pushdown and pull disagree", qi + 1);
        }
        let (mut td, mut tp, mut tl) = (Vec::new(), Vec::new(), Vec::new());
        let (mut bp, mut bl) = (0, 0);
        // The three take turns going first, so that none pays for another's
        // after-effects more often.
        for r in 0..reps {
            for k in 0..3 {
                let before = bytes.load(Ordering::Relaxed);
                let t = Instant::now();
                match (r + k) % 3 {
                    0 => {
                        direct().await?;
                    }
                    1 => {
                        push.run(&plan.local).await?;
                    }
                    _ => {
                        pull.run(&plan.local).await?;
                    }
                }
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let moved = bytes.load(Ordering::Relaxed) - before;
                match (r + k) % 3 {
                    0 => td.push(ms),
                    1 => {
                        tp.push(ms);
                        bp = moved;
                    }
                    _ => {
                        tl.push(ms);
                        bl = moved;
                    }
                }
            }
        }
        let (d, p, l) = (median(td), median(tp), median(tl));
        println!(
            "Q{:<3} {d:>10.1} {p:>10.1} {l:>10.1} {:>9.2} {:>9.2} {bp:>12} {bl:>12}",
            qi + 1,
            p / d,
            l / p
        );
    }
    for (i, q) in QUERIES.iter().enumerate() {
        println!("Q{}: {q}", i + 1);
    }
    Ok(())
}
