//! Both paths of a query's life cycle, over the in-memory network: real
//! gateways (their planner, policy, sources, sessions, engine and peer
//! service), without sockets or TLS, so that each case runs in well under a
//! second. A test plays any party through the hub: it watches what was
//! sent, loses a party's messages, takes a party off the network, or sends
//! what no honest gateway would.
//!
//! The reference for every answer is DataFusion over the pooled rows.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use executor::additive::{RESULT_SHARES, SEEDS};
use executor::{AbortKind, AbortReason, Outbound, Step, TransportError};
use policies::Analyst;

use super::{FailureKind, Gateway, QueryFailure};
use crate::config::GatewayConfig;
use crate::network::{Fate, MemoryHub, PeerNetwork, Sent, What};
use crate::peer::{action, PeerAction, Propose, PutHeader, QueryRef, Start, Verdict};
use crate::service::PeerService;

const PARTIES: [&str; 3] = ["p0", "p1", "p2"];

const CATALOG: &str = r#"
[tables.t]
columns = [
  { name = "g", type = "text", domain = ["a", "b", "c"] },
  { name = "h", type = "int", domain = { min = 1, max = 4 } },
  { name = "x", type = "int" },
]
"#;

const SQL: &str = "SELECT g, COUNT(*) AS n, SUM(x) AS s FROM t GROUP BY g";

/// Every column in every role, for every party's analysts; `sum` on `x`
/// only where `sum_x`.
fn policy(party: &str, sum_x: bool) -> String {
    let aggregates = if sum_x {
        r#"["count", "sum", "avg"]"#
    } else {
        r#"["count"]"#
    };
    format!(
        r#"party = "{party}"
[analysts]
allow = ["p0:*", "p1:*", "p2:*"]
[tables.t]
count_star = true
[tables.t.columns.g]
filter = true
group_by = true
aggregate = ["count"]
[tables.t.columns.h]
filter = true
group_by = true
aggregate = ["count"]
[tables.t.columns.x]
filter = true
group_by = false
aggregate = {aggregates}
"#
    )
}

/// Party `i`'s rows: every party has groups a and b, only p0 has c;
/// negative values, a NULL, and (in `h`) keys outside the declared range
/// 1..=4 and NULL keys.
fn rows(i: usize) -> String {
    let mut csv = String::from("g,h,x\n");
    for j in 0..(12 + 5 * i) {
        let g = if i == 0 {
            ["a", "b", "c"][j % 3]
        } else {
            ["a", "b"][j % 2]
        };
        let x = (j as i64 * 7 + i as i64 * 13) % 41 - 20;
        let h = match (j + i) % 7 {
            6 => String::new(),
            k => k.to_string(),
        };
        if j == 3 {
            csv.push_str(&format!("{g},{h},\n"));
        } else {
            csv.push_str(&format!("{g},{h},{x}\n"));
        }
    }
    csv
}

struct Federation {
    dir: tempfile::TempDir,
    hub: Arc<MemoryHub>,
    gateways: Vec<Arc<Gateway>>,
    /// Held here: the hub keeps only weak references.
    _services: Vec<Arc<PeerService>>,
}

struct Setup {
    /// Which parties allow SUM(x).
    sum_allowed: [bool; 3],
    session_ttl: Duration,
    timeout: Duration,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            sum_allowed: [true; 3],
            session_ttl: crate::session::SESSION_TTL,
            timeout: Duration::from_secs(5),
        }
    }
}

impl Federation {
    async fn start(setup: Setup) -> Federation {
        crate::tls::install_provider();
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = PARTIES.iter().map(|p| p.to_string()).collect();
        let certs = crate::certs::make_federation("memory test CA", &ids, &[]).unwrap();
        let catalog = planner::Catalog::from_toml(CATALOG, "catalog").unwrap();
        let hub = MemoryHub::new(setup.timeout);
        let mut gateways = Vec::new();
        let mut services = Vec::new();
        for (i, (party, cert, key)) in certs.parties.iter().enumerate() {
            let data = dir.path().join(party);
            std::fs::create_dir_all(&data).unwrap();
            std::fs::write(data.join("t.csv"), rows(i)).unwrap();
            let table = catalog.tables().get("t").unwrap();
            let file = connectors::files::find_table_file(&data, table).unwrap();
            let cfg = GatewayConfig {
                party: party.clone(),
                peer_listen: String::new(),
                analyst_listen: String::new(),
                pg_listen: None,
                peers: ids
                    .iter()
                    .filter(|p| *p != party)
                    .map(|p| (p.clone(), format!("memory:{p}")))
                    .collect(),
                helpers: Vec::new(),
                catalog: catalog.clone(),
                policy: policies::Policy::parse(
                    &policy(party, setup.sum_allowed[i]),
                    Some(&catalog),
                )
                .unwrap(),
                tables: vec![file],
                databases: Default::default(),
                db_tables: Vec::new(),
                analysts: Vec::new(),
                tls: crate::tls::TlsMaterial::from_pem(&certs.ca_cert, cert, key).unwrap(),
                audit_log: data.join("audit.jsonl"),
                budget_ledger: data.join("budget.sqlite"),
                peer_timeout: setup.timeout,
                local_partitions: Some(1),
                log_queries: false,
                fault: None,
            };
            let gw = Gateway::build(&cfg, hub.network(party), setup.session_ttl)
                .await
                .unwrap();
            let service = Arc::new(PeerService::new(gw.clone()));
            hub.join(party, &service);
            gateways.push(gw);
            services.push(service);
        }
        Federation {
            dir,
            hub,
            gateways,
            _services: services,
        }
    }

    fn gateway(&self, party: &str) -> &Arc<Gateway> {
        &self.gateways[PARTIES.iter().position(|p| *p == party).unwrap()]
    }

    /// The plaintext reference: `sql` over every party's rows pooled.
    async fn plaintext(&self, sql: &str) -> Vec<String> {
        let ctx = datafusion::prelude::SessionContext::new();
        let pooled = self.dir.path().join("pooled");
        std::fs::create_dir_all(&pooled).unwrap();
        for p in PARTIES {
            std::fs::copy(
                self.dir.path().join(p).join("t.csv"),
                pooled.join(format!("{p}.csv")),
            )
            .unwrap();
        }
        ctx.register_csv(
            "t",
            pooled.to_str().unwrap(),
            datafusion::prelude::CsvReadOptions::new(),
        )
        .await
        .unwrap();
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        cells(&batches)
    }

    /// Waits until no party holds a session (a peer's task ends its query
    /// just after its last message), and says whether that happened.
    async fn all_closed(&self) -> bool {
        for _ in 0..500 {
            if self.gateways.iter().all(|g| g.open_sessions() == 0) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// The audit log's events at `party`: (event, decision, outcome),
    /// once its last entry is a query's outcome (a query's task writes it
    /// just after the query leaves the session table).
    async fn audit(&self, party: &str) -> Vec<(String, String, String)> {
        let path = self.dir.path().join(party).join("audit.jsonl");
        let mut entries = Vec::new();
        for _ in 0..500 {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // Whole lines only: an entry may be being written.
            let whole = text.rfind('\n').map_or("", |i| &text[..i]);
            entries = whole
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                    (s("event"), s("decision"), s("outcome"))
                })
                .collect::<Vec<_>>();
            if entries.last().is_some_and(|e| e.0 == "outcome") {
                return entries;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{party}'s audit log never ended with an outcome: {entries:?}");
    }
}

/// Every row as text, sorted: the answer compared without regard to its
/// order or Arrow types.
fn cells(batches: &[RecordBatch]) -> Vec<String> {
    let mut rows = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            let row: Vec<String> = b
                .columns()
                .iter()
                .map(|c| arrow::util::display::array_value_to_string(c, r).unwrap())
                .collect();
            rows.push(row.join("|"));
        }
    }
    rows.sort();
    rows
}

fn alice() -> Analyst {
    Analyst {
        party: "p0".into(),
        name: "alice".into(),
        roles: Vec::new(),
    }
}

async fn run(fed: &Federation, sql: &str) -> Result<Vec<String>, QueryFailure> {
    let gw = fed.gateway("p0").clone();
    let answer = gw
        .run_query(&alice(), sql, &planner::QueryOptions::default())
        .await?;
    Ok(cells(&answer.batches))
}

/// A forged `propose` from `leader` (the hub plays it) for query `id`.
fn propose(id: &str) -> PeerAction {
    PeerAction::Propose(Propose {
        query_id: id.into(),
        sql: SQL.into(),
        options: planner::QueryOptions::default(),
        analyst: alice(),
        explain_only: false,
    })
}

fn start(id: &str) -> PeerAction {
    PeerAction::Start(Start {
        query_id: id.into(),
        privacy: None,
        fingerprint: None,
        threshold: 0,
    })
}

fn abort(id: &str, leader: &str, reason: &AbortReason) -> PeerAction {
    PeerAction::Abort(QueryRef {
        query_id: id.into(),
        reason: reason.clone(),
        leader: leader.into(),
    })
}

/// A one-column batch of `rows` rows: the shape of no honest message.
fn junk(rows: usize) -> RecordBatch {
    let col: arrow::array::ArrayRef = Arc::new(arrow::array::Int64Array::from(vec![7; rows]));
    RecordBatch::try_from_iter([("v", col)]).unwrap()
}

fn header(leader: &str, id: &str, step: Step) -> PutHeader {
    PutHeader {
        leader: leader.into(),
        query_id: id.into(),
        step,
    }
}

fn actions(sent: &[Sent], kind: &str) -> Vec<(String, String)> {
    sent.iter()
        .filter(|s| s.action() == Some(kind))
        .map(|s| (s.from.clone(), s.to.clone()))
        .collect()
}

fn shares(sent: &[Sent]) -> Vec<(String, String, Step)> {
    sent.iter()
        .filter_map(|s| match &s.what {
            What::Share { step, .. } => Some((s.from.clone(), s.to.clone(), *step)),
            What::Action(_) => None,
        })
        .collect()
}

/// Every share `from` sends `to` is lost from now on.
fn lose_shares(hub: &MemoryHub, from: &'static str, to: &'static str) {
    hub.set_rule(Some(Box::new(move |s: &Sent| {
        if s.from == from && s.to == to && matches!(s.what, What::Share { .. }) {
            Fate::Lose
        } else {
            Fate::Deliver
        }
    })));
}

/// `SQL` for alice at p0, in a task of its own.
fn spawn_query(
    fed: &Federation,
) -> tokio::task::JoinHandle<Result<super::QueryAnswer, QueryFailure>> {
    let gw = fed.gateway("p0").clone();
    tokio::spawn(async move {
        gw.run_query(&alice(), SQL, &planner::QueryOptions::default())
            .await
    })
}

async fn wait_for(hub: &MemoryHub, what: impl Fn(&[Sent]) -> bool) {
    for _ in 0..2000 {
        if what(&hub.sent()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never sent: {:?}", hub.sent());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_equals_plaintext_and_its_messages_follow_the_protocol() {
    let fed = Federation::start(Setup::default()).await;
    // An integer range domain: keys 0, 5 and 6 are outside 1..=4 and left
    // out, as `WHERE h BETWEEN 1 AND 4 OR h IS NULL` would.
    let by_range = "SELECT h, COUNT(*) AS n, SUM(x) AS s FROM t GROUP BY h";
    let reference = "SELECT h, COUNT(*) AS n, SUM(x) AS s FROM t \
                     WHERE h BETWEEN 1 AND 4 OR h IS NULL GROUP BY h";
    assert_eq!(
        run(&fed, by_range).await.unwrap(),
        fed.plaintext(reference).await
    );
    assert!(fed.all_closed().await);
    fed.hub.clear_sent();

    let answer = run(&fed, SQL).await.unwrap();
    assert_eq!(answer, fed.plaintext(SQL).await);
    assert!(fed.all_closed().await, "every party ended the query");

    let sent = fed.hub.sent();
    let peers = [
        ("p0".to_string(), "p1".to_string()),
        ("p0".into(), "p2".into()),
    ];
    assert_eq!(actions(&sent, action::PROPOSE), peers);
    assert_eq!(actions(&sent, action::START), peers);
    assert!(actions(&sent, action::ABORT).is_empty(), "{sent:?}");
    // Every party's seeds to every other, then each peer's result share
    // to the leader alone; nothing else.
    let mut got = shares(&sent);
    got.sort();
    let mut want = Vec::new();
    for from in PARTIES {
        for to in PARTIES.iter().filter(|t| **t != from) {
            want.push((from.to_string(), to.to_string(), SEEDS));
        }
        if from != "p0" {
            want.push((from.to_string(), "p0".to_string(), RESULT_SHARES));
        }
    }
    want.sort();
    assert_eq!(got, want);
    // `start` only after every peer answered `propose`, and no share
    // before the first `start`.
    let first_start = sent
        .iter()
        .position(|s| s.action() == Some(action::START))
        .unwrap();
    let last_propose = sent
        .iter()
        .rposition(|s| s.action() == Some(action::PROPOSE))
        .unwrap();
    assert!(last_propose < first_start, "{sent:?}");
    assert!(
        sent[..first_start]
            .iter()
            .all(|s| !matches!(s.what, What::Share { .. })),
        "{sent:?}"
    );
    for p in ["p1", "p2"] {
        let audit = fed.audit(p).await;
        assert_eq!(audit[0].0, "decision");
        assert_eq!(audit[0].1, "allow");
        assert!(
            audit.last().unwrap().2.starts_with("shares sent"),
            "{audit:?}"
        );
    }
    assert!(fed
        .audit("p0")
        .await
        .last()
        .unwrap()
        .2
        .starts_with("revealed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_refusal_names_its_rule_and_nothing_starts_anywhere() {
    let fed = Federation::start(Setup {
        sum_allowed: [true, true, false],
        ..Setup::default()
    })
    .await;
    let e = run(&fed, SQL).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::Refused, "{e}");
    assert!(e.message.contains("p2"), "{e}");
    assert!(e.message.contains("tables.t.columns.x"), "{e}");
    let sent = fed.hub.sent();
    assert!(actions(&sent, action::START).is_empty(), "{sent:?}");
    assert!(
        shares(&sent).is_empty(),
        "no party shares before start: {sent:?}"
    );
    assert!(fed.all_closed().await);
    // The same query without the refused sum runs.
    let sql = "SELECT g, COUNT(*) AS n FROM t GROUP BY g";
    assert_eq!(run(&fed, sql).await.unwrap(), fed.plaintext(sql).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_out_of_their_state_are_refused() {
    let fed = Federation::start(Setup::default()).await;
    // The test plays p0 as a dishonest leader, and p2 as a peer that sends
    // what the engine has no place for. p1 is the real gateway.
    let p0 = fed.hub.network("p0");
    let p2 = fed.hub.network("p2");
    fed.hub.leave("p0");
    fed.hub.leave("p2");

    // Before any proposal: a start, a share and an abort name no query.
    assert!(matches!(
        p0.send("p1", &start("q1")).await,
        Err(TransportError::Protocol { .. })
    ));
    let e = p2
        .put("p1", &header("p0", "q1", SEEDS), Outbound::one(junk(1)))
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Protocol { .. }), "{e}");

    let v: Verdict = serde_json::from_slice(&p0.send("p1", &propose("q1")).await.unwrap()).unwrap();
    assert!(matches!(v, Verdict::Allow { .. }), "{v:?}");
    assert_eq!(fed.gateway("p1").open_sessions(), 1);
    // Agreed, not started: a result share is no message of this engine
    // from p2 to p1 (result shares go to the leader alone), and a step the
    // engine does not have is refused by number.
    for step in [RESULT_SHARES, Step(7)] {
        let e = p2
            .put("p1", &header("p0", "q1", step), Outbound::one(junk(1)))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("no {step} message from p2 to p1")),
            "{e}"
        );
    }
    // A proposal with the same id is refused; the agreed query stays.
    let v: Verdict = serde_json::from_slice(&p0.send("p1", &propose("q1")).await.unwrap()).unwrap();
    assert!(
        matches!(&v, Verdict::Error { message } if message.contains("already in use")),
        "{v:?}"
    );
    // A party that is not the leader cannot start it (the key names the
    // sender as leader: p2 leads no query q1).
    assert!(p2.send("p1", &start("q1")).await.is_err());
    assert_eq!(fed.gateway("p1").open_sessions(), 1);

    // Started once; the second start finds no agreed query to take.
    p0.send("p1", &start("q1")).await.unwrap();
    let e = p0.send("p1", &start("q1")).await.unwrap_err();
    assert!(
        matches!(&e, TransportError::Protocol { reason, .. } if reason.contains("already started"))
            || matches!(&e, TransportError::Aborted(_)),
        "{e}"
    );
    // p1 now waits for p0's and p2's seeds (which never come: they are
    // off the network and p1's own seeds cannot reach them), and fails;
    // a message after the end is answered with why the query ended.
    assert!(
        fed.all_closed().await,
        "p1 ended the query it could not run"
    );
    let e = p2
        .put("p1", &header("p0", "q1", SEEDS), Outbound::one(junk(1)))
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Aborted(_)), "{e}");
    let e = p0.send("p1", &start("q1")).await.unwrap_err();
    assert!(matches!(e, TransportError::Aborted(_)), "{e}");
    let audit = fed.audit("p1").await;
    assert!(audit.last().unwrap().2.starts_with("aborted"), "{audit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_ends_an_agreed_query_and_a_running_one() {
    let fed = Federation::start(Setup::default()).await;
    let p0 = fed.hub.network("p0");
    let reason = AbortReason::new(AbortKind::Cancelled, "p0", "the analyst cancelled");

    // Agreed: the abort ends it at once; its late start learns why.
    let _ = p0.send("p1", &propose("agreed")).await.unwrap();
    assert_eq!(fed.gateway("p1").open_sessions(), 1);
    p0.send("p1", &abort("agreed", "p0", &reason))
        .await
        .unwrap();
    assert_eq!(fed.gateway("p1").open_sessions(), 0);
    assert_eq!(
        p0.send("p1", &start("agreed")).await.unwrap_err(),
        TransportError::Aborted(reason.clone())
    );
    // An abort from a party that is not in the federation, or for an id no
    // query can have, changes nothing.
    let _ = p0.send("p1", &propose("kept")).await.unwrap();
    let outsider = fed.hub.network("mallory");
    outsider
        .send("p1", &abort("kept", "p0", &reason))
        .await
        .unwrap();
    p0.send("p1", &abort(&"k".repeat(65), "p0", &reason))
        .await
        .unwrap();
    assert_eq!(fed.gateway("p1").open_sessions(), 1);
    p0.send("p1", &abort("kept", "p0", &reason)).await.unwrap();

    // Running: p2's seeds to the leader are lost; p2 then aborts. The
    // leader's query fails with p2's reason, before any reveal, and every
    // party ends it.
    lose_shares(&fed.hub, "p2", "p0");
    let query = spawn_query(&fed);
    wait_for(&fed.hub, |sent| {
        sent.iter()
            .any(|s| s.from == "p2" && s.to == "p0" && matches!(s.what, What::Share { .. }))
    })
    .await;
    let (leader, id) = fed
        .hub
        .sent()
        .iter()
        .find_map(|s| match &s.what {
            What::Share {
                leader, query_id, ..
            } => Some((leader.clone(), query_id.clone())),
            _ => None,
        })
        .unwrap();
    let p2_reason = AbortReason::new(AbortKind::Data, "p2", "its source failed");
    let p2 = fed.hub.network("p2");
    for to in ["p0", "p1"] {
        p2.send(to, &abort(&id, &leader, &p2_reason)).await.unwrap();
    }
    let e = query.await.unwrap().err().unwrap();
    assert_eq!(e.kind, FailureKind::Aborted, "{e}");
    assert!(e.message.contains("its source failed"), "{e}");
    assert!(fed.all_closed().await);
    for p in PARTIES {
        let audit = fed.audit(p).await;
        let last = &audit.last().unwrap().2;
        assert!(!last.starts_with("revealed"), "{p}: {audit:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agreed_query_never_started_expires() {
    let fed = Federation::start(Setup {
        session_ttl: Duration::from_millis(1500),
        ..Setup::default()
    })
    .await;
    let p0 = fed.hub.network("p0");
    let _ = p0.send("p1", &propose("late")).await.unwrap();
    assert_eq!(fed.gateway("p1").open_sessions(), 1);
    // The expiry timer ends it without any further message.
    assert!(fed.all_closed().await);
    let e = p0.send("p1", &start("late")).await.unwrap_err();
    assert!(
        matches!(&e, TransportError::Aborted(r) if r.detail.contains("not started within")),
        "{e}"
    );
    assert!(fed
        .audit("p1")
        .await
        .last()
        .unwrap()
        .2
        .contains("not started within"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analyst_who_disconnects_ends_the_query_at_every_party() {
    let fed = Federation::start(Setup::default()).await;
    // The query hangs on p2's lost seeds to the leader...
    lose_shares(&fed.hub, "p2", "p0");
    let query = spawn_query(&fed);
    wait_for(&fed.hub, |sent| {
        sent.iter()
            .any(|s| s.from == "p2" && matches!(s.what, What::Share { .. }))
    })
    .await;
    // ...and the analyst goes away: the request's future is dropped.
    query.abort();
    assert!(query.await.err().unwrap().is_cancelled());
    fed.hub.set_rule(None);
    wait_for(&fed.hub, |sent| actions(sent, action::ABORT).len() >= 2).await;
    let aborts = actions(&fed.hub.sent(), action::ABORT);
    assert!(aborts.contains(&("p0".into(), "p1".into())), "{aborts:?}");
    assert!(aborts.contains(&("p0".into(), "p2".into())), "{aborts:?}");
    assert!(fed.all_closed().await);
    let audit = fed.audit("p0").await;
    assert!(audit.last().unwrap().2.contains("cancelled"), "{audit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_off_the_network_or_silent_fails_the_query_with_nothing_revealed() {
    let fed = Federation::start(Setup {
        timeout: Duration::from_secs(2),
        ..Setup::default()
    })
    .await;
    fed.hub.leave("p2");
    let e = run(&fed, SQL).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::Unavailable, "{e}");
    assert!(e.message.contains("p2"), "{e}");
    assert!(actions(&fed.hub.sent(), action::START).is_empty());
    assert!(fed.all_closed().await, "the leader told p1 to drop it");

    // A peer whose result share is lost: the leader times out and aborts.
    let fed = Federation::start(Setup {
        timeout: Duration::from_secs(2),
        ..Setup::default()
    })
    .await;
    fed.hub.set_rule(Some(Box::new(|s: &Sent| match s.what {
        What::Share { step, .. } if step == RESULT_SHARES && s.from == "p1" => Fate::Lose,
        _ => Fate::Deliver,
    })));
    let e = run(&fed, SQL).await.unwrap_err();
    assert!(
        matches!(e.kind, FailureKind::Unavailable | FailureKind::Aborted),
        "{e}"
    );
    assert!(e.message.contains("p1"), "{e}");
    assert!(fed.all_closed().await);
    assert!(!fed
        .audit("p0")
        .await
        .last()
        .unwrap()
        .2
        .starts_with("revealed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_share_ends_an_agreed_query_at_once() {
    let fed = Federation::start(Setup::default()).await;
    let p0 = fed.hub.network("p0");
    let p2 = fed.hub.network("p2");
    let _ = p0.send("p1", &propose("m")).await.unwrap();
    // Seeds may come before start, but not of this shape.
    let e = p2
        .put("p1", &header("p0", "m", SEEDS), Outbound::one(junk(1000)))
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Protocol { .. }), "{e}");
    assert_eq!(fed.gateway("p1").open_sessions(), 0);
    let e = p0.send("p1", &start("m")).await.unwrap_err();
    assert!(
        matches!(&e, TransportError::Aborted(r) if r.kind == AbortKind::Protocol),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_analyst_has_a_bounded_number_of_statements_running() {
    // The held queries must outlast the test: a long timeout.
    let fed = Federation::start(Setup {
        timeout: Duration::from_secs(120),
        ..Setup::default()
    })
    .await;
    lose_shares(&fed.hub, "p2", "p0");
    let mut hanging = Vec::new();
    for _ in 0..super::MAX_STATEMENTS_PER_ANALYST {
        let gw = fed.gateway("p0").clone();
        hanging.push(tokio::spawn(async move {
            gw.answer(&alice(), SQL).await.map(|_| ())
        }));
    }
    let n = super::MAX_STATEMENTS_PER_ANALYST;
    wait_for(&fed.hub, |sent| actions(sent, action::START).len() == 2 * n).await;
    let gw = fed.gateway("p0").clone();
    let e = gw.answer(&alice(), SQL).await.err().unwrap();
    assert_eq!(e.kind, FailureKind::Busy, "{e}");
    assert!(e.message.contains("wait for one to finish"), "{e}");
    // Refused before anything was asked of a peer.
    assert_eq!(actions(&fed.hub.sent(), action::PROPOSE).len(), 2 * n);
    // Another analyst of the same party is not held up by alice's.
    let bob = Analyst {
        name: "bob".into(),
        ..alice()
    };
    let explained = gw.answer(&bob, &format!("EXPLAIN {SQL}")).await;
    assert!(explained.is_ok(), "{:?}", explained.err());
    for h in &hanging {
        h.abort();
    }
    for h in hanging {
        let _ = h.await;
    }
    fed.hub.set_rule(None);
    assert!(fed.all_closed().await);
    let a = gw.answer(&alice(), SQL).await.unwrap();
    assert_eq!(cells(&a.batches), fed.plaintext(SQL).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_peer_within_the_timeout_changes_nothing() {
    let fed = Federation::start(Setup::default()).await;
    fed.hub.set_rule(Some(Box::new(|s: &Sent| {
        if s.from == "p1" {
            Fate::Delay(Duration::from_millis(150))
        } else {
            Fate::Deliver
        }
    })));
    assert_eq!(run(&fed, SQL).await.unwrap(), fed.plaintext(SQL).await);
    assert!(fed.all_closed().await);
}
