//! Three real `council serve` processes on loopback (ephemeral ports),
//! queried with the `council query` command: answers equal plaintext over
//! the pooled data, and a killed gateway makes queries fail naming it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use council::federation::{plaintext, pooled_context};
use gateway::output::{render, Format};

const COUNCIL: &str = env!("CARGO_BIN_EXE_council");
const PARTIES: [&str; 3] = ["hospital_a", "hospital_b", "hospital_c"];

/// Bad logins in the flood test.
const N_FLOOD: usize = 80;
fn free_port() -> u16 {
    council::bench::free_port().unwrap()
}

fn council(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(COUNCIL)
        .current_dir(dir)
        .args(args)
        .env("COUNCIL_PASSWORD", "pw-for-tests")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn query(dir: &Path, port: u16, sql: &str) -> std::process::Output {
    let gw = format!("127.0.0.1:{port}");
    council(
        dir,
        &[
            "query",
            "--gateway",
            &gw,
            "--user",
            "alice",
            "--ca",
            "certs/ca.pem",
            "--format",
            "csv",
            sql,
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_answer_like_plaintext_and_name_a_dead_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    council::demo::write_demo_data(&dir.join("data"), 7).unwrap();
    std::fs::write(dir.join("catalog.toml"), council::demo::DEMO_CATALOG).unwrap();
    let out = council(
        dir,
        &[
            "certs",
            "--parties",
            "hospital_a,hospital_b,hospital_c",
            "--out",
            "certs",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = gateway::config::hash_password("pw-for-tests").unwrap();
    let peer_ports: Vec<u16> = PARTIES.iter().map(|_| free_port()).collect();
    let analyst_ports: Vec<u16> = PARTIES.iter().map(|_| free_port()).collect();
    for (i, p) in PARTIES.iter().enumerate() {
        std::fs::write(
            dir.join(format!("{p}.policy.toml")),
            council::demo::demo_policy(p, i == 0),
        )
        .unwrap();
        let mut cfg = format!(
            "party = \"{p}\"\npeer_listen = \"127.0.0.1:{}\"\nanalyst_listen = \"127.0.0.1:{}\"\ncatalog = \"catalog.toml\"\n\
             policy = \"{p}.policy.toml\"\naudit_log = \"audit/{p}.log\"\npeer_timeout_ms = 3000\n\
             [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{p}.pem\"\nkey = \"certs/{p}.key\"\n\
             [tables.patients]\npath = \"data/{p}/patients.csv\"\n\
             [[analysts]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n",
            peer_ports[i], analyst_ports[i]
        );
        for (j, q) in PARTIES.iter().enumerate() {
            if i != j {
                cfg.push_str(&format!(
                    "[[peers]]\nid = \"{q}\"\naddress = \"127.0.0.1:{}\"\n",
                    peer_ports[j]
                ));
            }
        }
        std::fs::write(dir.join(format!("{p}.toml")), cfg).unwrap();
    }
    let mut gws = council::bench::Processes(Vec::new());
    for p in PARTIES {
        let log = std::fs::File::create(dir.join(format!("{p}.out"))).unwrap();
        let child = Command::new(COUNCIL)
            .current_dir(dir)
            .args(["serve", "--config", &format!("{p}.toml")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        gws.0.push(child);
    }
    // Wait until every gateway answers.
    let start = Instant::now();
    loop {
        let ok = analyst_ports.iter().all(|&port| {
            query(dir, port, "SELECT COUNT(*) FROM patients")
                .status
                .success()
        });
        if ok {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "gateways did not start: {}",
            std::fs::read_to_string(dir.join("hospital_a.out")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let catalog = planner::Catalog::from_toml(council::demo::DEMO_CATALOG, "c").unwrap();
    let tables = std::collections::BTreeMap::from([(
        "patients".to_string(),
        PARTIES
            .iter()
            .map(|p| dir.join("data").join(p).join("patients.csv"))
            .collect::<Vec<_>>(),
    )]);
    let pooled = pooled_context(&catalog, &tables).await.unwrap();
    for (i, sql) in [
        "SELECT age_band, COUNT(*) AS patients, AVG(cost) AS mean_cost FROM patients WHERE diagnosis = 'E11' GROUP BY age_band ORDER BY age_band",
        "SELECT sex, SUM(cost) AS total, COUNT(cost) AS n FROM patients GROUP BY sex ORDER BY sex",
        "SELECT readmitted, SUM(length_of_stay) AS days FROM patients WHERE age_band IN ('65-79', '80+') GROUP BY readmitted ORDER BY readmitted",
    ]
    .iter()
    .enumerate()
    {
        let out = query(dir, analyst_ports[i % 3], sql);
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        let expected = render(&plaintext(&pooled, sql).await.unwrap(), Format::Csv).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected, "{sql}");
    }

    // The refusal reaches the CLI with the party and the rule.
    let out = query(
        dir,
        analyst_ports[0],
        "SELECT COUNT(*) FROM patients WHERE patient_id < 1000100",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hospital_b refused: column patient_id may not be used in WHERE (policy: tables.patients.columns.patient_id)"), "{err}");

    // A flood of bad logins (wrong passwords, unknown names) at hospital_b:
    // every one is refused, the gateway's peak memory grows by at most a few
    // password checks (two threads, each reusing one 19 MiB argon2 memory;
    // unbounded, 80 at once would take 1.5 GiB), and its analysts are still
    // answered.
    let pid = gws.0[1].id();
    let peak_kib = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    let before = peak_kib();
    let ca = std::fs::read_to_string(dir.join("certs/ca.pem")).unwrap();
    let addr = format!("127.0.0.1:{}", analyst_ports[1]);
    let flood: Vec<_> = (0..N_FLOOD)
        .map(|i| {
            let (addr, ca) = (addr.clone(), ca.clone());
            tokio::spawn(async move {
                let user = if i % 2 == 0 {
                    "alice".to_string()
                } else {
                    format!("nobody{i}")
                };
                match gateway::client::AnalystClient::connect(&addr, &ca, &user, "wrong").await {
                    Err(_) => true,
                    Ok(c) => c.query("SELECT COUNT(*) FROM patients").await.is_err(),
                }
            })
        })
        .collect();
    for f in flood {
        assert!(f.await.unwrap(), "a wrong password was accepted");
    }
    let grown = peak_kib().saturating_sub(before);
    assert!(before > 0, "no VmHWM for the gateway process");
    assert!(
        grown < 64 * 1024,
        "a login flood grew the gateway's peak memory by {grown} KiB"
    );
    assert!(
        query(dir, analyst_ports[1], "SELECT COUNT(*) FROM patients")
            .status
            .success()
    );

    // With --party the CLI checks the gateway's certificate names that party
    // (127.0.0.1 is in every party's certificate).
    let gw = format!("127.0.0.1:{}", analyst_ports[0]);
    let as_party = |party: &str| {
        council(
            dir,
            &[
                "query",
                "--gateway",
                &gw,
                "--party",
                party,
                "--user",
                "alice",
                "--ca",
                "certs/ca.pem",
                "SELECT COUNT(*) FROM patients",
            ],
        )
    };
    assert!(as_party("hospital_a").status.success());
    let out = as_party("hospital_b");
    assert!(
        !out.status.success(),
        "hospital_a's gateway passed for hospital_b"
    );

    // Kill hospital_c outright; hospital_a's queries fail, naming it.
    let mut c = gws.0.pop().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    let out = query(dir, analyst_ports[0], "SELECT COUNT(*) FROM patients");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("peer hospital_c"), "{err}");

    for p in PARTIES {
        let out = council(dir, &["audit", "verify", &format!("audit/{p}.log")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `--data` with one party's table in a SQLite file instead of a CSV: the
/// answer equals plaintext over the original CSVs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_data_accepts_a_party_whose_table_is_in_sqlite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("parties");
    council::demo::write_demo_data(&dir, 5).unwrap();
    let csv_b = tmp.path().join("hospital_b_patients.csv");
    std::fs::rename(dir.join("hospital_b/patients.csv"), &csv_b).unwrap();
    let db = rusqlite::Connection::open(dir.join("hospital_b/records.db")).unwrap();
    db.execute_batch(
        "CREATE TABLE patients (patient_id INTEGER, age_band TEXT, sex TEXT, diagnosis TEXT, \
         cost REAL, length_of_stay INTEGER, readmitted BOOLEAN)",
    )
    .unwrap();
    let text = std::fs::read_to_string(&csv_b).unwrap();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let cost: Option<f64> = f[4].parse().ok();
        db.execute(
            "INSERT INTO patients VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            rusqlite::params![
                f[0].parse::<i64>().unwrap(),
                f[1],
                f[2],
                f[3],
                cost,
                f[5].parse::<i64>().unwrap(),
                f[6] == "true"
            ],
        )
        .unwrap();
    }
    drop(db);
    let sql = "SELECT diagnosis, COUNT(*) AS n, SUM(cost) AS total, AVG(length_of_stay) AS stay FROM patients \
               WHERE readmitted GROUP BY diagnosis ORDER BY diagnosis";
    let out = Command::new(COUNCIL)
        .args([
            "demo",
            "--data",
            dir.to_str().unwrap(),
            "--sql",
            sql,
            "--format",
            "csv",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("equals the plaintext answer"), "{stderr}");

    let ctx = datafusion::prelude::SessionContext::new();
    for (p, path) in [
        ("hospital_a", dir.join("hospital_a/patients.csv")),
        ("hospital_b", csv_b),
        ("hospital_c", dir.join("hospital_c/patients.csv")),
    ] {
        ctx.register_csv(
            p,
            path.to_str().unwrap(),
            datafusion::prelude::CsvReadOptions::new(),
        )
        .await
        .unwrap();
    }
    ctx.sql("CREATE VIEW patients AS SELECT * FROM hospital_a UNION ALL SELECT * FROM hospital_b UNION ALL SELECT * FROM hospital_c")
        .await
        .unwrap();
    let expected = render(
        &ctx.sql(sql).await.unwrap().collect().await.unwrap(),
        Format::Csv,
    )
    .unwrap();
    // Same rows; float sums within 1e-9 relative (plaintext adds in f64,
    // Council in fixed point at the declared scale).
    let got = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        got.lines().count(),
        expected.lines().count(),
        "{got}\n{expected}"
    );
    assert!(got.lines().count() > 2, "{got}");
    for (a, b) in got.lines().zip(expected.lines()) {
        for (x, y) in a.split(',').zip(b.split(',')) {
            match (x.parse::<f64>(), y.parse::<f64>()) {
                (Ok(x), Ok(y)) => assert!((x - y).abs() <= 1e-9 * y.abs().max(1.0), "{a} vs {b}"),
                _ => assert_eq!(x, y, "{a} vs {b}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_over_the_users_own_files_infers_the_catalog_and_answers_one_query() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    council::demo::write_demo_data(dir, 3).unwrap();
    let sql = "SELECT age_band, COUNT(*) AS n, SUM(length_of_stay) AS days FROM patients WHERE sex = 'F' GROUP BY age_band ORDER BY age_band";
    let out = Command::new(COUNCIL)
        .args([
            "demo",
            "--data",
            dir.to_str().unwrap(),
            "--sql",
            sql,
            "--format",
            "csv",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("derived the domain of patients.age_band"),
        "{stderr}"
    );
    assert!(stderr.contains("equals the plaintext answer"), "{stderr}");

    let ctx = datafusion::prelude::SessionContext::new();
    for p in PARTIES {
        let path = dir.join(p).join("patients.csv");
        ctx.register_csv(
            p,
            path.to_str().unwrap(),
            datafusion::prelude::CsvReadOptions::new(),
        )
        .await
        .unwrap();
    }
    ctx.sql("CREATE VIEW patients AS SELECT * FROM hospital_a UNION ALL SELECT * FROM hospital_b UNION ALL SELECT * FROM hospital_c")
        .await
        .unwrap();
    let expected = render(
        &ctx.sql(sql).await.unwrap().collect().await.unwrap(),
        Format::Csv,
    )
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

#[test]
fn bench_checks_tpch_q1_and_q6_answers_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("figures.json");
    let out = Command::new(COUNCIL)
        .args([
            "bench",
            "--sf",
            "0.002",
            "--parties",
            "3",
            "--reps",
            "1",
            "--groups",
            "5000",
            "--json",
        ])
        .arg(&json)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Q1, Q6, Q1 with MIN and MAX, and the group sweep's one size.
    assert_eq!(stdout.matches("answers equal").count(), 4, "{stdout}");
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(figures["tpch"].as_array().map(|a| a.len()), Some(3));
    assert!(figures["tpch"][0]["rows"].as_u64().unwrap() > 10_000);
    assert_eq!(figures["groups"][0]["groups"].as_u64(), Some(5000));
    assert_eq!(figures["groups"][0]["equal"].as_bool(), Some(true));
}

/// `council demo --serve` prints how to connect; psql connects with exactly
/// the printed connection string and gets the same answer as `council demo
/// --sql` over the same data; SIGINT stops it.
#[test]
fn demo_serve_prints_connection_strings_that_psql_can_use() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(COUNCIL)
        .args(["demo", "--serve"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let guard_pid = child.id();
    // Keep draining stdout so that the demo can print while it stops.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    let mut url = None;
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(120)) {
        printed.push(line.clone());
        if let Some(u) = line.trim().strip_prefix("PostgreSQL  ") {
            url.get_or_insert(u.to_string());
        }
        if line.starts_with("Try: psql") {
            break;
        }
    }
    let text = printed.join("\n");
    assert!(text.contains("Flight SQL  grpc+tls://127.0.0.1:"), "{text}");
    assert!(
        text.contains("user alice, password demo-password-not-secret"),
        "{text}"
    );
    assert!(dir.path().join("council-demo-ca.pem").exists(), "{text}");
    let url = url.unwrap_or_else(|| panic!("no PostgreSQL line:\n{text}"));
    let sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex ORDER BY sex";
    let out = std::process::Command::new("psql")
        .arg(&url)
        .args(["-X", "--csv", "-c", sql])
        .current_dir(dir.path())
        .output()
        .expect("psql is installed (tests/run.sh installs it)");
    let _ = std::process::Command::new("kill")
        .args(["-INT", &guard_pid.to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        status.success(),
        "demo --serve did not stop cleanly on SIGINT"
    );
    // The same data through `council demo --sql` (plaintext-checked there).
    let reference = council(dir.path(), &["demo", "--sql", sql, "--format", "csv"]);
    assert!(reference.status.success());
    let got = String::from_utf8_lossy(&out.stdout).replace("count(*)", "n");
    let want = String::from_utf8_lossy(&reference.stdout);
    for line in got.lines().skip(1) {
        assert!(want.contains(line), "psql row {line} not in:\n{want}");
    }
    assert!(got.lines().count() > 1, "{got}");
}
