//! Clients this project did not write, against gateways on loopback: the
//! ADBC Flight SQL driver from Python (pyarrow, adbc-driver-flightsql).
//! `tests/run.sh` installs them into `target/py`; set COUNCIL_TEST_PYTHON
//! to use another interpreter that has them.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use council_tests::{open_policy, party_ids, spec_for, write_random_data, Shape, PASSWORD, USER};
use gateway::compare::compare;
use gateway::federation::{plaintext, LocalFederation};

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
        .args(["-c", "import adbc_driver_flightsql, adbc_driver_manager, pyarrow"])
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adbc_flight_sql_driver_from_python() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(3);
    write_random_data(&dir.path().join("data"), &ids, Shape { seed: 31, large: false }).unwrap();
    let mut spec = spec_for(dir.path(), &ids, Duration::from_secs(10));
    spec.parties[2].policy_toml = open_policy("p2", &ids).replace(
        "[tables.t.columns.h]\nfilter = true",
        "[tables.t.columns.h]\nfilter = false",
    );
    let fed = LocalFederation::start(&spec, &dir.path().join("run")).await.unwrap();
    let pooled = fed.pooled_context().await.unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &fed.ca_pem).unwrap();
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
        refused.contains("p2 refused: column h may not be used in WHERE (policy: tables.t.columns.h)"),
        "{refused}"
    );
    let wrong = report["wrong_password_error"].as_str().unwrap_or("(no error)");
    assert!(wrong.contains("wrong user name or password"), "{wrong}");
    fed.stop().await;
}
