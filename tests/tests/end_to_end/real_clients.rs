//! Clients this project did not write, against gateways on loopback: the
//! ADBC Flight SQL driver from Python (pyarrow, adbc-driver-flightsql),
//! psql, and psycopg 3 over the extended query protocol (text and binary).
//! `tests/run.sh` installs them into `target/py`; set COUNCIL_TEST_PYTHON
//! to use another interpreter that has them.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use council::compare::compare;
use council::federation::{plaintext, LocalFederation};
use council_tests::{
    party_ids, policy_without_filter_on, spec_for, write_random_data, Shape, PASSWORD, USER,
};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// A Python that has the ADBC Flight SQL driver, or a panic that says how
/// to get one (never a silent skip).
fn python() -> String {
    let candidate = std::env::var("COUNCIL_TEST_PYTHON").unwrap_or_else(|_| {
        workspace()
            .join("target/py/bin/python")
            .to_string_lossy()
            .into_owned()
    });
    let ok = Command::new(&candidate)
        .args([
            "-c",
            "import adbc_driver_flightsql, adbc_driver_manager, pyarrow, psycopg",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{candidate} cannot import the ADBC Flight SQL driver; run the tests with `bash tests/run.sh`, \
         which installs it into target/py, or set COUNCIL_TEST_PYTHON"
    );
    candidate
}

const QUERIES: [&str; 3] = [
    "SELECT g, COUNT(*) AS n, SUM(x) AS sx, AVG(d) AS ad FROM t GROUP BY g ORDER BY g",
    "SELECT h, flag, VAR_SAMP(d) AS v, STDDEV_POP(f) AS s FROM t GROUP BY h, flag ORDER BY h, flag",
    "SELECT SUM(d) AS total, COUNT(f) AS nf FROM t WHERE flag",
];

/// Three gateways over seeded random data, where party `refuser` does not
/// allow filtering on `h`; returns the folder (with `ca.pem`), the
/// federation and the plaintext context over the pooled data.
async fn federation(
    seed: u64,
    refuser: usize,
) -> (
    tempfile::TempDir,
    LocalFederation,
    datafusion::prelude::SessionContext,
    PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(3);
    write_random_data(&dir.path().join("data"), &ids, Shape { seed, large: false }).unwrap();
    let mut spec = spec_for(dir.path(), &ids, Duration::from_secs(10));
    spec.parties[refuser].policy_toml = policy_without_filter_on(&ids[refuser], &ids, "h");
    let fed = LocalFederation::start(&spec, &dir.path().join("run"))
        .await
        .unwrap();
    let pooled = fed.pooled_context().await.unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &fed.ca_pem).unwrap();
    (dir, fed, pooled, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adbc_flight_sql_driver_from_python() {
    let py = python();
    let (dir, fed, pooled, ca) = federation(31, 2).await;
    let out = dir.path().join("answers");
    std::fs::create_dir_all(&out).unwrap();
    let uri = format!("grpc+tls://{}", fed.gateway("p0").unwrap().analyst_addr);

    let script = workspace().join("tests/python/adbc_client.py");
    let run = tokio::process::Command::new(&py)
        .arg(&script)
        .arg(&uri)
        .arg(&ca)
        .args([USER, PASSWORD])
        .arg(&out)
        .arg(serde_json::to_string(&QUERIES).unwrap())
        .arg("SELECT COUNT(*) FROM t WHERE h = 1")
        .output()
        .await
        .unwrap();
    assert!(
        run.status.success(),
        "the ADBC client failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();

    for (i, sql) in QUERIES.iter().enumerate() {
        let file = std::fs::File::open(out.join(format!("q{i}.arrow"))).unwrap();
        let reader = arrow::ipc::reader::FileReader::try_new(file, None).unwrap();
        let secure: Vec<_> = reader.map(|b| b.unwrap()).collect();
        let plain = plaintext(&pooled, sql).await.unwrap();
        compare(&secure, &plain, true).unwrap_or_else(|d| panic!("ADBC, {sql}: {d}"));
    }
    let plain_rows: usize = plaintext(&pooled, QUERIES[0])
        .await
        .unwrap()
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(report["prepared_rows"], serde_json::json!(plain_rows));
    assert_eq!(report["tables"], serde_json::json!(["council.public.t"]));
    let refused = report["refused_error"].as_str().unwrap_or("(no error)");
    assert!(
        refused
            .contains("p2 refused: column h may not be used in WHERE (policy: tables.t.columns.h)"),
        "{refused}"
    );
    let wrong = report["wrong_password_error"]
        .as_str()
        .unwrap_or("(no error)");
    assert!(wrong.contains("wrong user name or password"), "{wrong}");
    fed.stop().await;
}

/// psql, or a panic that says how to get it (never a silent skip).
pub(crate) fn psql() -> String {
    let ok = Command::new("psql")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "psql is not installed; run the tests with `bash tests/run.sh` (it installs Debian's postgresql-client when run as root) \
         or install postgresql-client"
    );
    "psql".into()
}

/// Runs psql against a gateway; returns (success, stdout, stderr).
pub(crate) async fn run_psql(
    port: u16,
    ca: &std::path::Path,
    password: &str,
    args: &[&str],
) -> (bool, String, String) {
    let conn = format!(
        "host=127.0.0.1 port={port} user={USER} dbname=council sslmode=verify-full sslrootcert={}",
        ca.display()
    );
    let out = tokio::process::Command::new(psql())
        .arg(conn)
        .args(["-X", "--no-psqlrc", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The plaintext answer as CSV cells (Arrow's display of each value).
fn cells(batches: &[arrow::record_batch::RecordBatch]) -> Vec<Vec<String>> {
    let opts = arrow::util::display::FormatOptions::default();
    let mut rows = Vec::new();
    for b in batches {
        let f: Vec<_> = b
            .columns()
            .iter()
            .map(|c| arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
            .collect();
        for r in 0..b.num_rows() {
            rows.push(
                (0..b.num_columns())
                    .map(|c| {
                        if b.column(c).is_null(r) {
                            String::new()
                        } else {
                            f[c].value(r).to_string()
                        }
                    })
                    .collect(),
            );
        }
    }
    rows
}

fn same_cell(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1e-300),
        _ => matches!((a, b), ("t", "true") | ("f", "false")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psql_queries_lists_tables_and_is_refused_clearly() {
    let (_dir, fed, pooled, ca) = federation(41, 1).await;
    let port = fed.gateway("p0").unwrap().pg_addr.unwrap().port();

    for sql in QUERIES {
        let (ok, out, err) = run_psql(port, &ca, PASSWORD, &["--csv", "-c", sql]).await;
        assert!(ok, "psql {sql}: {err}");
        let mut lines = out.lines();
        let header = lines.next().unwrap_or_default();
        let got: Vec<Vec<String>> = lines
            .map(|l| {
                l.split(',')
                    .map(|c| c.trim_matches('"').to_string())
                    .collect()
            })
            .collect();
        let plain = plaintext(&pooled, sql).await.unwrap();
        let want = cells(&plain);
        let names: Vec<String> = plain[0]
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(header, names.join(","), "{sql}");
        assert_eq!(got.len(), want.len(), "{sql}\n{out}");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                g.len() == w.len() && g.iter().zip(w).all(|(a, b)| same_cell(a, b)),
                "{sql}: psql row {g:?}, plaintext row {w:?}"
            );
        }
    }
    // The extended protocol (prepared statements), text and binary
    // results, through psycopg 3.
    let sql = "SELECT g, COUNT(*) AS n, SUM(d) AS sd, AVG(x) AS ax FROM t GROUP BY g ORDER BY g";
    let conninfo = format!(
        "host=127.0.0.1 port={port} user={USER} password='{PASSWORD}' dbname=council sslmode=verify-full sslrootcert={}",
        ca.display()
    );
    let run = tokio::process::Command::new(python())
        .arg(workspace().join("tests/python/psycopg_client.py"))
        .arg(&conninfo)
        .arg(sql)
        .output()
        .await
        .unwrap();
    assert!(
        run.status.success(),
        "psycopg: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let want = cells(&plaintext(&pooled, sql).await.unwrap());
    for format in ["text", "binary"] {
        let rows = report[format].as_array().unwrap();
        assert_eq!(rows.len(), want.len(), "{format}");
        for (g, w) in rows.iter().zip(&want) {
            let g: Vec<String> = g
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap_or("").to_string())
                .collect();
            assert!(
                g.iter().zip(w).all(|(a, b)| same_cell(a, b)),
                "{format}: psycopg row {g:?}, plaintext row {w:?}"
            );
        }
    }

    // \dt lists the federated table.
    let (ok, out, err) = run_psql(port, &ca, PASSWORD, &["--csv", "-c", "\\dt"]).await;
    assert!(ok, "\\dt: {err}");
    assert!(out.contains("public,t,table"), "{out}");

    // EXPLAIN through psql: the plan and every party's verdict.
    let (ok, out, err) = run_psql(
        port,
        &ca,
        PASSWORD,
        &[
            "-A",
            "-t",
            "-c",
            "EXPLAIN SELECT g, AVG(x) FROM t GROUP BY g",
        ],
    )
    .await;
    assert!(ok, "EXPLAIN: {err}");
    assert!(
        out.contains("Local part") && out.contains("p2: allow"),
        "{out}"
    );

    // A refusal names the party and the rule.
    let (ok, _, err) = run_psql(
        port,
        &ca,
        PASSWORD,
        &["-c", "SELECT COUNT(*) FROM t WHERE h = 1"],
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("p1 refused: column h may not be used in WHERE (policy: tables.t.columns.h)"),
        "{err}"
    );
    // A wrong password is refused.
    let (ok, _, err) = run_psql(port, &ca, "wrong", &["-c", "SELECT 1"]).await;
    assert!(!ok);
    assert!(
        err.to_lowercase()
            .contains("password authentication failed"),
        "{err}"
    );
    // Without TLS, nothing is answered.
    let out = tokio::process::Command::new(psql())
        .arg(format!(
            "host=127.0.0.1 port={port} user={USER} dbname=council sslmode=disable"
        ))
        .args(["-X", "-c", "SELECT COUNT(*) FROM t"])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("over TLS only"),
        "{err}"
    );

    // Garbage on the PostgreSQL port crashes nothing.
    for junk in [
        &b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        &[0xffu8; 64][..],
    ] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let _ = sock.write_all(junk).await;
        let mut buf = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf)).await;
    }
    let (ok, _, err) = run_psql(port, &ca, PASSWORD, &["-c", "SELECT COUNT(*) FROM t"]).await;
    assert!(ok, "after garbage: {err}");
    fed.stop().await;
}
