//! Failure is clean: refusals name the party and the rule; impostor peers
//! are refused; a peer that is down or falls silent mid-query makes every
//! party abort with nothing revealed; concurrent queries do not mix; the
//! audit logs hold every decision and verify.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use council::compare::compare;
use council::federation::{plaintext, LocalFederation};
use council_tests::{
    party_ids, policy_without_filter_on, spec_for, write_random_data, Shape, PASSWORD, QUERIES,
    USER,
};
use gateway::config::Fault;
use gateway::network::PeerNetwork as _;
use gateway::peer::PeerClients;
use gateway::tls::TlsMaterial;

async fn federation(
    n: usize,
    seed: u64,
    timeout: Duration,
    tweak: impl FnOnce(&mut council::federation::FederationSpec),
) -> (tempfile::TempDir, LocalFederation) {
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(n);
    write_random_data(&dir.path().join("data"), &ids, Shape { seed, large: false }).unwrap();
    let mut spec = spec_for(dir.path(), &ids, timeout);
    tweak(&mut spec);
    let fed = LocalFederation::start(&spec, &dir.path().join("run"))
        .await
        .unwrap();
    (dir, fed)
}

fn audit_text(fed: &LocalFederation, party: &str) -> String {
    std::fs::read_to_string(fed.work_dir.join("audit").join(format!("{party}.log")))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_names_the_party_and_the_rule_and_moves_no_data() {
    let (_d, fed) = federation(3, 1, Duration::from_secs(10), |spec| {
        let ids = party_ids(3);
        spec.parties[1].policy_toml = policy_without_filter_on("p1", &ids, "label");
    })
    .await;
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    let e = c
        .query("SELECT g, COUNT(*) FROM t WHERE label = 'kiwi' GROUP BY g")
        .await
        .unwrap_err();
    assert_eq!(e.code, tonic::Code::PermissionDenied);
    assert_eq!(
        e.message,
        "p1 refused: column label may not be used in WHERE (policy: tables.t.columns.label)"
    );
    let log = audit_text(&fed, "p1");
    assert!(
        log.contains("\"decision\":\"deny\"") && log.contains("tables.t.columns.label"),
        "{log}"
    );
    // Nobody started computing: no party logged shares being sent.
    for p in ["p0", "p1", "p2"] {
        assert!(
            !audit_text(&fed, p).contains("shares sent"),
            "{p} computed after a refusal"
        );
    }
    // The same analyst's other queries still run.
    assert!(c.query("SELECT COUNT(*) FROM t").await.is_ok());
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn different_catalogs_give_different_fingerprints_and_stop_the_query() {
    let (_d, fed) = federation(2, 2, Duration::from_secs(10), |spec| {
        spec.parties[1].catalog_override = Some(council_tests::CATALOG.replace(
            "\"a\", \"b\", \"c\", \"d\"",
            "\"a\", \"b\", \"c\", \"d\", \"e\"",
        ));
    })
    .await;
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    let e = c
        .query("SELECT g, COUNT(*) FROM t GROUP BY g")
        .await
        .unwrap_err();
    assert!(
        e.message.starts_with("p1 computed a different plan"),
        "{}",
        e.message
    );
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsupported_sql_and_wrong_passwords_get_clear_errors() {
    let (_d, fed) = federation(2, 3, Duration::from_secs(10), |_| {}).await;
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    let e = c.query("SELECT MEDIAN(x) FROM t").await.unwrap_err();
    assert_eq!(e.code, tonic::Code::InvalidArgument);
    assert!(
        e.message
            .starts_with("not supported yet: aggregate MEDIAN at line 1, column 8"),
        "{}",
        e.message
    );
    let e = c.query("SELECT x FROM t").await.unwrap_err();
    assert!(e.message.contains("raw rows"), "{}", e.message);
    let e = c
        .query("SELECT COUNT(*) FROM t JOIN t u ON t.id = u.id")
        .await
        .unwrap_err();
    assert!(
        e.message.contains("JOIN at line 1, column 29"),
        "{}",
        e.message
    );
    let e = c.query("SELECT COUNT(nope) FROM t").await.unwrap_err();
    assert!(e.message.contains("nope"), "{}", e.message);
    let plan = c
        .query("EXPLAIN SELECT g, SUM(x) FROM t GROUP BY g")
        .await
        .unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&plan)
        .unwrap()
        .to_string();
    assert!(
        text.contains("Local part") && text.contains("p1: allow (same plan)"),
        "{text}"
    );
    let e = c
        .query("EXPLAIN ANALYZE SELECT COUNT(*) FROM t")
        .await
        .unwrap_err();
    assert!(
        e.message.contains("not permitted: EXPLAIN statement"),
        "{}",
        e.message
    );
    let bad = fed.client("p0", USER, "wrong").await.unwrap();
    let e = bad.query("SELECT COUNT(*) FROM t").await.unwrap_err();
    assert_eq!(e.code, tonic::Code::Unauthenticated);
    assert!(
        e.message.contains("wrong user name or password"),
        "{}",
        e.message
    );
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn impostor_peers_are_refused() {
    let (_d, fed) = federation(2, 4, Duration::from_secs(5), |spec| {
        spec.extra_certs = vec!["mallory".into()]
    })
    .await;
    let p0 = fed.gateway("p0").unwrap().peer_addr.to_string();
    let propose = serde_json::to_vec(&serde_json::json!({
        "query_id": "q", "sql": "SELECT COUNT(*) FROM t", "options": {},
        "analyst": { "party": "mallory", "name": "m", "roles": [] }, "explain_only": false
    }))
    .unwrap();

    // A certificate from the federation's CA, but for a party p0 does not know.
    let (id, cert, key) = fed.extra[0].clone();
    assert_eq!(id, "mallory");
    let tls = TlsMaterial::from_pem(&fed.ca_pem, &cert, &key).unwrap();
    let peers = BTreeMap::from([("p0".to_string(), p0.clone())]);
    let clients = PeerClients::new(
        &peers,
        tls.peer_client_config().unwrap(),
        Duration::from_secs(3),
    )
    .unwrap();
    assert!(
        clients
            .action("p0", "propose", propose.clone())
            .await
            .is_err(),
        "an unknown party was admitted"
    );

    // A valid-looking p1 certificate from another CA.
    let other = gateway::certs::make_federation("Rogue CA", &["p1".to_string()], &[]).unwrap();
    let (_, cert, key) = &other.parties[0];
    let rogue = TlsMaterial::from_pem(&other.ca_cert, cert, key).unwrap();
    let clients = PeerClients::new(
        &peers,
        rogue.peer_client_config().unwrap(),
        Duration::from_secs(3),
    )
    .unwrap();
    let e = clients
        .action("p0", "propose", propose.clone())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("p0"), "{e}");

    // Dialling p0 while expecting p1: p0's certificate does not name p1.
    let fed_tls = TlsMaterial::from_pem(&fed.ca_pem, &fed.extra[0].1, &fed.extra[0].2).unwrap();
    let wrong = BTreeMap::from([("p1".to_string(), p0.clone())]);
    let clients = PeerClients::new(
        &wrong,
        fed_tls.peer_client_config().unwrap(),
        Duration::from_secs(3),
    )
    .unwrap();
    assert!(
        clients.action("p1", "propose", propose).await.is_err(),
        "a server with the wrong name was trusted"
    );

    assert!(
        !audit_text(&fed, "p0").contains("\"query_id\":\"q\""),
        "an impostor reached the policy check"
    );
    // The federation still works.
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    assert!(c.query("SELECT COUNT(*) FROM t").await.is_ok());
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_sends_garbage_gets_an_error_and_crashes_nothing() {
    let (_d, fed) = federation(2, 5, Duration::from_secs(5), |spec| {
        spec.extra_certs = vec!["p1".into()]
    })
    .await;
    // Re-issue p1's identity from the same CA (the extra certificate for p1).
    let (_, cert, key) = fed.extra[0].clone();
    let tls = TlsMaterial::from_pem(&fed.ca_pem, &cert, &key).unwrap();
    let p0 = fed.gateway("p0").unwrap().peer_addr.to_string();
    let clients = PeerClients::new(
        &BTreeMap::from([("p0".to_string(), p0)]),
        tls.peer_client_config().unwrap(),
        Duration::from_secs(3),
    )
    .unwrap();
    let e = clients
        .action("p0", "propose", b"\x00\xffnot json".to_vec())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("malformed propose message"), "{e}");
    let e = clients
        .action("p0", "start", br#"{"query_id":"nope"}"#.to_vec())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no agreed query"), "{e}");
    let e = clients
        .action("p0", "launch", Vec::new())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown peer action"), "{e}");
    // Shares for a query that does not exist.
    let batch = executor::SharedTable::zeros(vec![], &[executor::Width::Z64], 1)
        .to_batch()
        .unwrap();
    let header = gateway::peer::PutHeader {
        leader: "p1".into(),
        query_id: "nope".into(),
        step: executor::additive::SEEDS,
    };
    assert!(clients
        .put("p0", &header, executor::Outbound::one(batch))
        .await
        .is_err());
    // A forged analyst of another party is refused by policy, not trusted.
    let forged = serde_json::to_vec(&serde_json::json!({
        "query_id": "f1", "sql": "SELECT COUNT(*) FROM t", "options": {},
        "analyst": { "party": "p0", "name": "ana", "roles": [] }, "explain_only": false
    }))
    .unwrap();
    let v = clients.action("p0", "propose", forged).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
    assert_eq!(v["deny"]["rule"], "analysts", "{v}");

    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    assert!(c.query("SELECT COUNT(*) FROM t").await.is_ok());
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_is_down_fails_the_query_in_time_naming_it() {
    let timeout = Duration::from_secs(2);
    let (_d, mut fed) = federation(3, 6, timeout, |_| {}).await;
    fed.stop_party("p2").await;
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    let t = Instant::now();
    let e = c.query("SELECT COUNT(*) FROM t").await.unwrap_err();
    assert!(
        t.elapsed() < timeout * 3 + Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(e.code, tonic::Code::Unavailable, "{}", e.message);
    assert!(e.message.contains("peer p2"), "{}", e.message);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_dies_mid_query_makes_every_party_abort_and_reveals_nothing() {
    let (_d, fed) = federation(3, 7, Duration::from_secs(2), |spec| {
        spec.parties[2].fault = Some(Fault::SilentBeforeShares)
    })
    .await;
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    let e = c
        .query("SELECT g, SUM(x) FROM t GROUP BY g")
        .await
        .unwrap_err();
    assert!(e.message.contains("p2"), "{}", e.message);
    assert!(e.message.contains("nothing was revealed"), "{}", e.message);
    // p2 had agreed (it planned and allowed), then fell silent.
    assert!(audit_text(&fed, "p2").contains("\"decision\":\"allow\""));
    // Both live parties record the abort; the leader revealed nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for p in ["p0", "p1"] {
        let log = audit_text(&fed, p);
        assert!(log.contains("aborted"), "{p}: {log}");
        assert!(!log.contains("revealed to analyst"), "{p}: {log}");
    }
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_queries_from_several_leaders_do_not_mix() {
    let (_d, fed) = federation(3, 8, Duration::from_secs(20), |_| {}).await;
    let pooled = fed.pooled_context().await.unwrap();
    let fed = Arc::new(fed);
    let mut tasks = Vec::new();
    for (i, (sql, ordered)) in QUERIES.iter().chain(QUERIES.iter()).enumerate() {
        let fed = fed.clone();
        let leader = format!("p{}", i % 3);
        tasks.push(tokio::spawn(async move {
            let c = fed.client(&leader, USER, PASSWORD).await.unwrap();
            (sql, *ordered, c.query(sql).await)
        }));
    }
    for t in tasks {
        let (sql, ordered, r) = t.await.unwrap();
        let secure = r.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let plain = plaintext(&pooled, sql).await.unwrap();
        compare(&secure, &plain, ordered).unwrap_or_else(|d| panic!("{sql}: {d}"));
    }
    for p in ["p0", "p1", "p2"] {
        let path = fed.work_dir.join("audit").join(format!("{p}.log"));
        let (n, _) = policies::audit::verify(&path).unwrap();
        assert!(n >= 2 * QUERIES.len() as u64, "{p} logged {n} entries");
    }
    if let Ok(fed) = Arc::try_unwrap(fed) {
        fed.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn values_too_large_to_encode_and_undeclared_keys_do_not_abort() {
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(2);
    write_random_data(
        &dir.path().join("data"),
        &ids,
        Shape {
            seed: 9,
            large: false,
        },
    )
    .unwrap();
    // p0's sum of x is 1.2e19: each value fits in i64, the sum does not
    // fit i64. Sums are shared in Z_2^128, so it is combined exactly and
    // only the revealed total is found too large for SUM's Int64 (a
    // failure that depends on the revealed aggregate alone).
    let mut rows = "id,g,h,flag,x,d,f,label,ts\n1,a,1,true,4000000000000000000,1.0,1,lime,\n2,a,1,true,4000000000000000000,1.0,1,lime,\n3,a,1,true,4000000000000000000,1.0,1,lime,\n".to_string();
    // And 18 floats of 1e33 (1e37 at scale 4): their 128-bit local sum
    // would wrap (18e37 > 2^127). Each is past the 10^26 units a summand
    // keeps (`planner::plan::SUM_DIGITS`), so each counts as NULL.
    for i in 0..18 {
        rows.push_str(&format!("{},b,2,false,0,1.0,1e33,lime,\n", 10 + i));
    }
    // And 200 rows of group c whose squares are near 10^36 units: x of
    // 18 nines (a BIGINT below 10^18), f of 9.9e13 (9.9e17 units at scale
    // 4). A 128-bit sum of their whole squares would wrap; before squares
    // were summed in limbs, a local check (count · max|x|²) aborted VAR
    // here, and whether it did depended on one row's value.
    for i in 0..200 {
        let x = if i % 2 == 0 {
            "999999999999999999"
        } else {
            "-999999999999999998"
        };
        let f = if i % 3 == 0 {
            "9.9e13".to_string()
        } else {
            format!("-{i}.5")
        };
        rows.push_str(&format!("{},c,3,true,{x},1.0,{f},lime,\n", 100 + i));
    }
    std::fs::write(dir.path().join("data/p0/t.csv"), rows).unwrap();
    // p1 holds a group key outside the declared domain.
    let odd = "id,g,h,flag,x,d,f,label,ts\n7,secret-key,1,true,1,1.0,1,lime,\n";
    std::fs::write(dir.path().join("data/p1/t.csv"), odd).unwrap();
    let spec = spec_for(dir.path(), &ids, Duration::from_secs(5));
    let fed = LocalFederation::start(&spec, &dir.path().join("run"))
        .await
        .unwrap();
    let c = fed.client("p1", USER, PASSWORD).await.unwrap();
    let e = c
        .query("SELECT SUM(x) FROM t WHERE g = 'a'")
        .await
        .unwrap_err();
    assert!(
        e.message.contains("does not fit its result type") && !e.message.contains("p0"),
        "{}",
        e.message
    );
    assert!(
        !e.message.contains("4000000000000000000"),
        "a party's value leaked: {}",
        e.message
    );

    let pooled = fed.pooled_context().await.unwrap();
    for (sql, reference) in [
        (
            "SELECT SUM(f) AS s, AVG(f) AS a FROM t",
            "SELECT SUM(CASE WHEN abs(f) < 1e22 THEN f END) AS s, AVG(CASE WHEN abs(f) < 1e22 THEN f END) AS a FROM t",
        ),
        (
            "SELECT g, VAR_SAMP(f) AS v FROM t GROUP BY g",
            "SELECT g, VAR_SAMP(CASE WHEN abs(f) < 1e14 THEN f END) AS v FROM t \
             WHERE g IN ('a', 'b', 'c', 'd') OR g IS NULL GROUP BY g",
        ),
        (
            // (No AVG(x) here: DataFusion averages BIGINTs in f64, which
            // gives 0 for group c's exact 0.5.)
            "SELECT g, VAR_POP(x) AS v, STDDEV_SAMP(x) AS s FROM t GROUP BY g",
            "SELECT g, VAR_POP(CASE WHEN abs(x) < 1000000000000000000 THEN x END) AS v, \
             STDDEV_SAMP(CASE WHEN abs(x) < 1000000000000000000 THEN x END) AS s FROM t \
             WHERE g IN ('a', 'b', 'c', 'd') OR g IS NULL GROUP BY g",
        ),
    ] {
        let secure = c.query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let plain = plaintext(&pooled, reference).await.unwrap();
        compare(&secure, &plain, false).unwrap_or_else(|d| panic!("{sql}: {d}"));
    }

    // A group key outside the declared domain is left out, never an abort:
    // an abort would be a bit about one row (`WHERE id = 7` decides whether
    // the undeclared key takes part). The answer equals plaintext over the
    // rows that keep the catalog, whether or not the filter selects the row.
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    let pooled = fed.pooled_context().await.unwrap();
    let in_domain = "(g IN ('a', 'b', 'c', 'd') OR g IS NULL)";
    for filter in ["TRUE", "id = 7", "id = 8", "id < 100"] {
        let sql = format!("SELECT g, COUNT(*) FROM t WHERE {filter} GROUP BY g");
        let secure = c.query(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let plain = plaintext(
            &pooled,
            &format!("SELECT g, COUNT(*) FROM t WHERE {filter} AND {in_domain} GROUP BY g"),
        )
        .await
        .unwrap();
        compare(&secure, &plain, false).unwrap_or_else(|d| panic!("{sql}: {d}"));
    }
    // Queries that do not touch the bad values still work.
    assert!(c.query("SELECT COUNT(*) FROM t WHERE h = 1").await.is_ok());
    fed.stop().await;
}

/// A `start` that arrives after the query ended at a peer (another party
/// aborted it first) is answered with why it ended, not "no agreed query".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_start_learns_why_the_query_ended() {
    use gateway::peer::{Propose, QueryRef, Start, Verdict};
    let dir = tempfile::tempdir().unwrap();
    let fed = council_tests::start_random(
        dir.path(),
        3,
        council_tests::Shape {
            seed: 2,
            large: false,
        },
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    let p1 = fed.gateway("p1").unwrap().gateway.clone();
    let query_id = "0123456789abcdef0123456789abcdef".to_string();
    let v = p1
        .on_propose(
            "p0",
            Propose {
                query_id: query_id.clone(),
                sql: "SELECT COUNT(*) FROM t".into(),
                options: Default::default(),
                analyst: policies::Analyst {
                    party: "p0".into(),
                    name: council_tests::USER.into(),
                    roles: vec![],
                },
                explain_only: false,
            },
        )
        .await;
    assert!(matches!(v, Verdict::Allow { .. }), "{v:?}");
    let reason = executor::AbortReason::new(
        executor::AbortKind::Data,
        "p2",
        "its local part failed (details in its gateway log)",
    );
    p1.on_abort(
        "p2",
        &QueryRef {
            query_id: query_id.clone(),
            reason: reason.clone(),
            leader: "p0".into(),
        },
    );
    let e = p1
        .on_start(
            "p0",
            Start {
                query_id: query_id.clone(),
                privacy: None,
                fingerprint: None,
                threshold: 0,
            },
        )
        .unwrap_err();
    // The reason itself, typed, which the leader adopts as p2's.
    assert_eq!(e, gateway::gateway::PeerRefusal::Ended(reason));
    assert!(
        e.to_string()
            .contains("a party aborted: its local part failed"),
        "{e}"
    );
    // A query it never heard of is still "no agreed query".
    let e = p1
        .on_start(
            "p0",
            Start {
                query_id: "f".repeat(32),
                privacy: None,
                fingerprint: None,
                threshold: 0,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("has no agreed query"), "{e}");
    fed.stop().await;
}
