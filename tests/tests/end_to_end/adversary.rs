//! The adversary's view: a curious analyst with one legal login and plain
//! SQL, a dishonest leader and a hostile peer, each trying the attacks of
//! the adversary issue (and variants). Every test states what must hold;
//! each failed on the code before the fix.

use std::collections::BTreeMap;
use std::time::Duration;

use council::federation::{FederationSpec, LocalFederation};
use council_tests::{
    open_policy, party_ids, policy_without_filter_on, spec_for, write_random_data, Shape, PASSWORD,
    USER,
};
use gateway::network::PeerNetwork as _;
use gateway::peer::PeerClients;
use gateway::tls::TlsMaterial;

pub(crate) async fn start(
    n: usize,
    seed: u64,
    tweak: impl FnOnce(&mut FederationSpec, &[String]),
) -> (tempfile::TempDir, LocalFederation) {
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(n);
    write_random_data(&dir.path().join("data"), &ids, Shape { seed, large: false }).unwrap();
    let mut spec = spec_for(dir.path(), &ids, Duration::from_secs(10));
    tweak(&mut spec, &ids);
    let fed = LocalFederation::start(&spec, &dir.path().join("run"))
        .await
        .unwrap();
    (dir, fed)
}

/// Peer clients that present the extra certificate `fed.extra[0]` (a
/// party identity issued by the federation's CA): a dishonest gateway.
fn impostor(fed: &LocalFederation, target: &str) -> PeerClients {
    let (_, cert, key) = fed.extra[0].clone();
    let tls = TlsMaterial::from_pem(&fed.ca_pem, &cert, &key).unwrap();
    let addr = fed.gateway(target).unwrap().peer_addr.to_string();
    PeerClients::new(
        &BTreeMap::from([(target.to_string(), addr)]),
        tls.peer_client_config().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap()
}

fn propose(query_id: &str, sql: &str, party: &str, name: &str, roles: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "query_id": query_id, "sql": sql, "options": {},
        "analyst": { "party": party, "name": name, "roles": roles }, "explain_only": false
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_condition_hidden_inside_an_aggregate_is_refused_like_where() {
    // p1 does not allow filtering on `id`; `x` is allowed everywhere.
    let (_d, fed) = start(3, 61, |spec, ids| {
        spec.parties[1].policy_toml = policy_without_filter_on("p1", ids, "id");
    })
    .await;
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    for sql in [
        "SELECT g, COUNT(CASE WHEN id < 100100 THEN 1 END) FROM t GROUP BY g",
        "SELECT h, COUNT(CASE WHEN id = 7 THEN 1 END) FROM t GROUP BY h",
        "SELECT SUM(CASE WHEN id > 4 THEN x ELSE 0 END) FROM t",
        "SELECT SUM(x + 0 * id) FROM t",
        "SELECT AVG(x * CAST(id = 7 AS INT)) FROM t",
        "SELECT COUNT(NULLIF(id, 5)) FROM t",
        "SELECT g, SUM(COALESCE(id, 0) - id + x) FROM t GROUP BY g",
    ] {
        let e = c.query(sql).await.expect_err(sql);
        assert_eq!(e.code, tonic::Code::PermissionDenied, "{sql}: {e}");
        assert!(
            e.message
                .starts_with("p1 refused: column id may not be used as a filter")
                && e.message.contains("(policy: tables.t.columns.id)"),
            "{sql}: {}",
            e.message
        );
    }
    // WHERE is refused as before; a plain aggregate of id is still allowed.
    let e = c
        .query("SELECT COUNT(*) FROM t WHERE id = 7")
        .await
        .unwrap_err();
    assert!(e.message.contains("may not be used in WHERE"), "{e}");
    assert!(c
        .query("SELECT g, COUNT(id) FROM t GROUP BY g")
        .await
        .is_ok());
    // EXPLAIN shows every use and how it was classed.
    let text = c
        .explain("SELECT SUM(CASE WHEN x > 4 THEN d ELSE 0 END) FROM t")
        .await
        .unwrap();
    assert!(
        text.contains("x: filter (inside the argument of SUM("),
        "{text}"
    );
    assert!(text.contains("d: aggregate:sum"), "{text}");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whether_a_query_fails_does_not_depend_on_any_row() {
    let (_d, fed) = start(3, 62, |_, _| {}).await;
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    // `id = 0` is p0's first row; `id = -1` exists nowhere. Before the fix
    // the first variant aborted and the second answered: one bit about one
    // row per query.
    let templates = [
        "SELECT COUNT(*) FROM t WHERE 1 / (CASE WHEN id = {v} THEN 0 ELSE 1 END) = 1",
        "SELECT COUNT(*) FROM t WHERE id = {v} AND CAST(label AS INT) = 1",
        "SELECT COUNT(*) FROM t WHERE id = {v} AND label ~ '('",
        "SELECT COUNT(*) FROM t WHERE id = {v} AND to_date(label) > DATE '2020-01-01'",
        "SELECT SUM(CASE WHEN id = {v} THEN x / (x - x) ELSE 0 END) FROM t",
        "SELECT COUNT(*) FROM t WHERE id = {v} AND x % (x - x) = 0",
        "SELECT COUNT(*) FROM t WHERE id = {v} AND CAST(label AS DATE) > DATE '2020-01-01'",
        "SELECT COUNT(*) FROM t WHERE id = {v} AND abs(x) > 0",
        "SELECT COUNT(*) FROM t WHERE id = {v} AND ts + INTERVAL '1000000 years' > ts",
        "SELECT COUNT(*) FROM t WHERE id = {v} AND substr(label, 1, x) = 'l'",
        "SELECT COUNT(*) FROM t WHERE id = {v} AND repeat(label, 1000000000) = ''",
    ];
    for t in templates {
        let hit = t.replace("{v}", "0");
        let miss = t.replace("{v}", "-1");
        let a = c.query(&hit).await.expect_err(&hit);
        let b = c.query(&miss).await.expect_err(&miss);
        assert_eq!(a.code, b.code, "{t}");
        assert_eq!(
            a.message.replace("-1", "0").replace("(- 1)", "0"),
            b.message.replace("-1", "0").replace("(- 1)", "0"),
            "{t}"
        );
        assert!(
            !a.message.contains("aborted"),
            "refused at plan time, not aborted: {t}: {}",
            a.message
        );
    }
    // A value too large for an exact encoding counts as NULL in every
    // partial of its aggregate, so the row it comes from changes nothing:
    // before, one row of `9e33` (at scale 4, past a party's share of the
    // ring) aborted, and one row of `1e16` made the squares' overflow
    // guard abort VAR.
    for (t, big) in [
        (
            "SELECT SUM(CASE WHEN id = {v} THEN {big} ELSE 0 END) AS s FROM t",
            "9e33",
        ),
        (
            "SELECT g, SUM(CASE WHEN id = {v} THEN {big} ELSE f END) AS s FROM t GROUP BY g",
            "9.9e33",
        ),
        (
            "SELECT VAR_SAMP(CASE WHEN id = {v} THEN {big} ELSE x END) AS v FROM t",
            "1e16",
        ),
        (
            "SELECT h, AVG(CASE WHEN id = {v} THEN {big} ELSE x END) AS a FROM t GROUP BY h",
            "1e300 * 1e300",
        ),
    ] {
        let hit = t.replace("{v}", "0").replace("{big}", big);
        let miss = t.replace("{v}", "-1").replace("{big}", big);
        let null = t
            .replace("{v}", "0")
            .replace("{big}", "CAST(NULL AS DOUBLE)");
        let a = c.query(&hit).await.unwrap_or_else(|e| panic!("{hit}: {e}"));
        c.query(&miss)
            .await
            .unwrap_or_else(|e| panic!("{miss}: {e}"));
        let n = c
            .query(&null)
            .await
            .unwrap_or_else(|e| panic!("{null}: {e}"));
        council::compare::compare(&a, &n, false)
            .unwrap_or_else(|d| panic!("{big} does not count as NULL: {t}: {d}"));
    }
    // What cannot fail still runs, and TRY_CAST is the way to convert.
    for sql in [
        "SELECT COUNT(*) FROM t WHERE TRY_CAST(label AS INT) IS NULL",
        "SELECT COUNT(*) FROM t WHERE x / 7 > 1 AND label LIKE 'l%' AND lower(label) <> 'kiwi'",
        "SELECT g, SUM(x * 2 + 1) FROM t WHERE ts >= TIMESTAMP '2024-06-15 12:00:00' GROUP BY g",
    ] {
        assert!(c.query(sql).await.is_ok(), "{sql}");
    }
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_postgres_door_is_read_only_and_bounded() {
    let (dir, fed) = start(2, 63, |_, _| {}).await;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &fed.ca_pem).unwrap();
    let port = fed.gateway("p0").unwrap().pg_addr.unwrap().port();
    let target = dir.path().join("written-by-an-analyst.csv");
    let t = target.display();
    for (sql, what) in [
        (format!("COPY (VALUES ('x')) TO '{t}'"), "COPY"),
        (
            format!("CREATE EXTERNAL TABLE e STORED AS CSV LOCATION '{t}'"),
            "CREATE",
        ),
        ("CREATE TABLE e (a INT)".to_string(), "CREATE"),
        ("DROP TABLE t".to_string(), "DROP"),
        ("INSERT INTO t (id) VALUES (1)".to_string(), "INSERT"),
        ("SELECT 1 INTO e".to_string(), "SELECT INTO"),
        ("CREATE VIEW v AS SELECT 1".to_string(), "CREATE"),
        (
            "SELECT COUNT(*) FROM t; DELETE FROM t".to_string(),
            "DELETE",
        ),
    ] {
        let (ok, _, err) = super::real_clients::run_psql(port, &ca, PASSWORD, &["-c", &sql]).await;
        assert!(!ok, "{sql} was accepted");
        assert!(
            err.contains("read-only") || err.contains("not permitted"),
            "{sql}: {err}"
        );
        assert!(
            err.contains(what) || err.contains("read-only"),
            "{sql}: {err}"
        );
    }
    assert!(
        !target.exists(),
        "an analyst wrote a file on the gateway's host"
    );
    // Catalog queries that would allocate without bound are refused.
    for sql in [
        "SELECT repeat('x', 1000000000)",
        "SELECT COUNT(*) FROM generate_series(1, 100000000000)",
        "SELECT COUNT(*) FROM range(1, 100000000000)",
    ] {
        let (ok, _, err) = super::real_clients::run_psql(port, &ca, PASSWORD, &["-c", sql]).await;
        assert!(!ok, "{sql} was answered: {err}");
        // A refusal from the server (the catalog context's bounds, or the
        // federated planner), not a dropped connection.
        assert!(
            err.contains("ERROR:") && !err.contains("server closed the connection"),
            "{sql}: {err}"
        );
    }
    // Session settings are acknowledged and change nothing.
    let (ok, _, err) = super::real_clients::run_psql(
        port,
        &ca,
        PASSWORD,
        &[
            "-c",
            "SET datafusion.execution.batch_size = 1",
            "-c",
            "SELECT COUNT(*) FROM t",
        ],
    )
    .await;
    assert!(ok, "{err}");
    fed.stop().await;
}

/// `length_of_stay <> 0 AND … ` with `n` terms, as a BI tool writes a long
/// filter list.
fn conjuncts(n: usize) -> String {
    let mut s = String::from("SELECT COUNT(*) FROM t WHERE x <> 0");
    for i in 1..n {
        s.push_str(&format!(" AND x <> {i}"));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_sql_takes_a_gateway_down() {
    let (_d, fed) = start(2, 64, |spec, _| spec.extra_certs = vec!["p1".into()]).await;
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    let sum = format!("SELECT SUM(x{}) FROM t", " + 1".repeat(3_000));
    let nested = format!(
        "SELECT COUNT(*) FROM t WHERE {}x{} > 0",
        "(".repeat(5_000),
        ")".repeat(5_000)
    );
    let in_list = format!(
        "SELECT COUNT(*) FROM t WHERE x IN ({})",
        (0..20_000)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let long = format!(
        "SELECT COUNT(*) FROM t WHERE label = '{}'",
        "x".repeat(300_000)
    );
    let cases = [
        conjuncts(3_000),
        sum,
        nested,
        in_list,
        long,
        conjuncts(15_000),
    ];
    for sql in &cases {
        let e = c.query(sql).await.expect_err("refused");
        assert!(
            e.message.contains("nested more than")
                || e.message.contains("IN list")
                || e.message.contains("bytes")
                || e.message.contains("recursion limit"),
            "{}: {}",
            &sql[..60],
            e.message
        );
    }
    // The same SQL from a peer (a dishonest leader) is refused too.
    let peer = impostor(&fed, "p0");
    let v = peer
        .action("p0", "propose", propose("deep", &cases[0], "p1", USER, &[]))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("nested more than"),
        "{v}"
    );
    // Within the limits, long filter lists are answered, and equal plaintext.
    let pooled = fed.pooled_context().await.unwrap();
    for sql in [
        conjuncts(495),
        format!(
            "SELECT COUNT(*) FROM t WHERE x NOT IN ({})",
            (0..5_000)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
    ] {
        let got = c.query(&sql).await.unwrap();
        let want = council::federation::plaintext(&pooled, &sql).await.unwrap();
        council::compare::compare(&got, &want, true).unwrap();
    }
    // Every gateway is still up.
    for p in ["p0", "p1"] {
        let c = fed.client(p, USER, PASSWORD).await.unwrap();
        assert!(c.query("SELECT COUNT(*) FROM t").await.is_ok(), "{p}");
    }
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dishonest_leader_cannot_drop_a_role_or_mint_analysts() {
    // p1 requires DP for role:external (which only p0's gateway can check)
    // and does not trust p0's gateway for identities.
    let (_d, fed) = start(2, 65, |spec, ids| {
        spec.extra_certs = vec!["p0".into()];
        spec.parties[0]
            .analysts
            .push(("bob".into(), PASSWORD.into(), vec![]));
        spec.parties[1].policy_toml = super::privacy::dp_policy(
            "p1",
            ids,
            "mechanism = \"laplace\"\nepsilon_per_query = 1",
            "{ epsilon = 2, period_days = 30 }",
        )
        .replace(
            "[tables.t.privacy]\n",
            "[tables.t.privacy]\nanalysts = [\"role:external\", \"p0:eve\"]\n",
        );
    })
    .await;
    let leader = impostor(&fed, "p1");
    // Without the role, under another name: p1 still requires DP.
    for (i, (name, roles)) in [("ana", vec![]), ("zed", vec!["researcher"])]
        .iter()
        .enumerate()
    {
        let v = leader
            .action(
                "p1",
                "propose",
                propose(
                    &format!("q{i}"),
                    "SELECT COUNT(*) FROM t",
                    "p0",
                    name,
                    roles,
                ),
            )
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert!(v["allow"]["privacy"].is_object(), "{name}: {v}");
    }
    // Invented names share one budget at p1 (2 ε per analyst, and, since
    // p1 cannot check p0's names, 2 ε for all of p0's analysts together).
    let ana = fed.client("p0", USER, PASSWORD).await.unwrap();
    let bob = fed.client("p0", "bob", PASSWORD).await.unwrap();
    assert!(ana.query("SELECT COUNT(*), SUM(x) FROM t").await.is_ok());
    assert!(bob.query("SELECT COUNT(*), SUM(x) FROM t").await.is_ok());
    let e = bob
        .query("SELECT COUNT(*), SUM(x) FROM t")
        .await
        .unwrap_err();
    assert!(e.message.contains("all analysts of p0 together"), "{e}");
    let party_left = {
        let ledger = policies::Ledger::open(&fed.work_dir.join("audit/p1-budget.sqlite")).unwrap();
        let policy = policies::Policy::parse(
            &super::privacy::dp_policy(
                "p1",
                &party_ids(2),
                "mechanism = \"laplace\"\nepsilon_per_query = 1",
                "{ epsilon = 2, period_days = 30 }",
            ),
            None,
        )
        .unwrap();
        let pb = policy.party_budget("p0").unwrap();
        ledger
            .remaining_for_party("p0", &pb, policies::ledger::now_unix())
            .unwrap()
    };
    assert_eq!(party_left.epsilon_micro, 0);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_peer_cannot_flood_sessions_or_oversize_shares() {
    let (_d, fed) = start(3, 66, |spec, _| spec.extra_certs = vec!["p1".into()]).await;
    let peer = impostor(&fed, "p0");
    let mut refused = 0;
    for i in 0..(gateway::gateway::MAX_SESSIONS_PER_LEADER + 5) {
        let v = peer
            .action(
                "p0",
                "propose",
                propose(
                    &format!("flood{i}"),
                    "SELECT COUNT(*) FROM t",
                    "p1",
                    USER,
                    &[],
                ),
            )
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
        if v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("too many open queries"))
        {
            refused += 1;
        }
    }
    assert_eq!(refused, 5);
    // A share of the wrong shape for a session that exists is refused on
    // delivery, before it is kept.
    let batch = executor::SharedTable::zeros(vec![], &[executor::Width::Z64], 7)
        .to_batch()
        .unwrap();
    let header = gateway::peer::PutHeader {
        leader: "p1".into(),
        query_id: "flood0".into(),
        step: executor::additive::SEEDS,
    };
    let e = peer
        .put("p0", &header, executor::Outbound::one(batch))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("rows"), "{e}");
    // Other leaders are not affected.
    let c = fed.client("p2", USER, PASSWORD).await.unwrap();
    assert!(c.query("SELECT COUNT(*) FROM t").await.is_ok());
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_counts_are_kept_from_the_leader_where_the_policy_says_so() {
    let (_d, fed) = start(2, 67, |spec, ids| {
        spec.parties[1].policy_toml =
            open_policy("p1", ids).replace("count_star = true", "count_star = false");
    })
    .await;
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    // Without DP every query reveals each group's row count to p0.
    for sql in [
        "SELECT g, SUM(x) FROM t GROUP BY g",
        "SELECT COUNT(*) FROM t",
    ] {
        let e = c.query(sql).await.unwrap_err();
        assert!(e.message.contains("tables.t.count_star"), "{sql}: {e}");
    }
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_shows_no_local_paths_and_dp_count_star_runs() {
    let (dir, fed) = start(2, 68, |spec, ids| {
        spec.parties[1].policy_toml = super::privacy::dp_policy(
            "p1",
            ids,
            "mechanism = \"laplace\"\nepsilon_per_query = 1",
            "{ epsilon = 100, period_days = 30 }",
        );
    })
    .await;
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    let text = c.explain("SELECT COUNT(*) FROM t").await.unwrap();
    let root = dir.path().display().to_string();
    assert!(!text.contains(&root), "{text}");
    // Under an individual id, the simplest DP query runs (it aborted with
    // "ORDER BY column cannot be empty").
    let got = c.query("SELECT COUNT(*) FROM t").await.unwrap();
    assert_eq!(got[0].num_rows(), 1);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_analyst_who_disconnects_ends_the_query_everywhere() {
    let (_d, fed) = start(3, 69, |spec, _| {
        spec.parties[2].fault = Some(gateway::config::Fault::SilentBeforeShares);
    })
    .await;
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    // Logged in first (an EXPLAIN moves no shares), so that what follows
    // does not depend on how long a password check takes.
    c.explain("SELECT COUNT(*) FROM t").await.unwrap();
    let log = |p: &str| {
        std::fs::read_to_string(fed.work_dir.join("audit").join(format!("{p}.log")))
            .unwrap_or_default()
    };
    // The query waits for the silent p2 (the peers would wait 10 s); once
    // p1 has agreed to it, the client goes away.
    let query = tokio::spawn(async move { c.query("SELECT COUNT(*) FROM t").await.is_ok() });
    let mut agreed = false;
    for _ in 0..200 {
        if log("p1").contains("\"event\":\"decision\"") {
            agreed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(agreed, "p1 never saw the query:\n{}", log("p1"));
    query.abort();
    assert!(query.await.is_err(), "the query was not cancelled");
    let mut ended = false;
    for _ in 0..100 {
        if log("p0").contains("cancelled by the analyst")
            && log("p1").contains("cancelled: the analyst disconnected")
        {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ended, "p0:\n{}\np1:\n{}", log("p0"), log("p1"));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_bad_logins_leaves_other_analysts_unaffected() {
    let (_d, fed) = start(2, 70, |_, _| {}).await;
    let good = fed.client("p0", USER, PASSWORD).await.unwrap();
    let addr = fed.gateway("p0").unwrap().analyst_addr.to_string();
    let ca = fed.ca_pem.clone();
    let flood: Vec<_> = (0..12)
        .map(|i| {
            let (addr, ca) = (addr.clone(), ca.clone());
            tokio::spawn(async move {
                let user = if i % 2 == 0 {
                    USER.to_string()
                } else {
                    format!("nobody{i}")
                };
                match gateway::client::AnalystClient::connect(&addr, &ca, &user, "wrong").await {
                    Err(e) => Some(e.to_string()),
                    Ok(c) => c
                        .query("SELECT COUNT(*) FROM t")
                        .await
                        .err()
                        .map(|e| e.message),
                }
            })
        })
        .collect();
    // A logged-in analyst keeps being answered while the flood is checked,
    // and a new login with the right password gets through.
    for _ in 0..3 {
        assert!(good.query("SELECT COUNT(*) FROM t").await.is_ok());
    }
    let fresh = fed.client("p0", USER, PASSWORD).await.unwrap();
    assert!(fresh.query("SELECT COUNT(*) FROM t").await.is_ok());
    for f in flood {
        let e = f.await.unwrap().expect("a wrong password was accepted");
        // The same refusal for a wrong password and an unknown name.
        assert!(e.contains("wrong user name or password"), "{e}");
    }
    // (The gateway's memory under such a flood is measured on a real
    // `council serve` process: gateway/tests/processes.rs.)
    assert!(fed.client("p0", USER, PASSWORD).await.is_ok());
    fed.stop().await;
}

/// How many queries the load test runs in all (50 analysts at once);
/// `COUNCIL_LOAD_QUERIES` sets another number for a run by hand.
fn load_queries() -> usize {
    std::env::var("COUNCIL_LOAD_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_analysts_get_plaintext_answers() {
    let (_d, fed) = start(3, 71, |_, _| {}).await;
    let pooled = fed.pooled_context().await.unwrap();
    let mut want = Vec::new();
    for (sql, _) in council_tests::QUERIES {
        want.push(council::federation::plaintext(&pooled, sql).await.unwrap());
    }
    let want = std::sync::Arc::new(want);
    let total = load_queries();
    let analysts = 50;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for a in 0..analysts {
        let client = fed
            .client(["p0", "p1", "p2"][a % 3], USER, PASSWORD)
            .await
            .unwrap();
        let want = want.clone();
        let mine = total / analysts + usize::from(a < total % analysts);
        tasks.push(tokio::spawn(async move {
            for k in 0..mine {
                let i = (a * 7 + k) % council_tests::QUERIES.len();
                let (sql, ordered) = council_tests::QUERIES[i];
                let got = client
                    .query(sql)
                    .await
                    .map_err(|e| format!("analyst {a}, {sql}: {e}"))?;
                council::compare::compare(&got, &want[i], ordered)
                    .map_err(|e| format!("analyst {a}, {sql}: {e}"))?;
            }
            Ok::<usize, String>(mine)
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap().unwrap();
    }
    assert_eq!(done, total);
    eprintln!(
        "load: {total} queries by {analysts} concurrent analysts over 3 gateways in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // No session is left behind at any party.
    for p in ["p0", "p1", "p2"] {
        assert_eq!(fed.gateway(p).unwrap().gateway.open_sessions(), 0, "{p}");
    }
    fed.stop().await;
}
