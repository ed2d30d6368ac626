//! Fault injection at each step of the protocol: a party paused before its
//! verdict, killed right after `start`, silent after its input round,
//! sending a garbage result share, or slow. Each failure ends every party's
//! session with nothing revealed, and every budget is settled: charged
//! exactly where a party's local part ran (from then on how a query ends may
//! depend on its rows), refunded or never charged before that.

use std::time::Duration;

use council::federation::LocalFederation;
use council_tests::{PASSWORD, USER};
use gateway::config::Fault;

const SQL: &str = "SELECT COUNT(*), SUM(x) FROM t";

async fn run_with(fault: Fault) -> (tempfile::TempDir, LocalFederation, Result<(), String>) {
    let (dir, fed) = super::adversary::start(3, 80, |spec, ids| {
        spec.peer_timeout = Duration::from_secs(2);
        for p in [0, 1] {
            spec.parties[p].policy_toml = super::privacy::dp_policy(
                &ids[p],
                ids,
                "mechanism = \"laplace\"\nepsilon_per_query = 1",
                "{ epsilon = 10, period_days = 30 }",
            );
        }
        spec.parties[2].fault = Some(fault);
    })
    .await;
    let c = fed.client("p0", USER, PASSWORD).await.unwrap();
    let r = c.query(SQL).await.map(|_| ()).map_err(|e| e.message);
    (dir, fed, r)
}

/// Waits until p0 and p1 hold no session and no charge is left `charged`;
/// returns their charges' states.
async fn settled(fed: &LocalFederation) -> Vec<Vec<String>> {
    let ledgers: Vec<policies::Ledger> = ["p0", "p1"]
        .iter()
        .map(|p| {
            policies::Ledger::open(&fed.work_dir.join(format!("audit/{p}-budget.sqlite"))).unwrap()
        })
        .collect();
    let mut states = Vec::new();
    for _ in 0..100 {
        states = ledgers
            .iter()
            .map(|l| {
                l.charges(None)
                    .unwrap()
                    .into_iter()
                    .map(|c| c.state)
                    .collect::<Vec<_>>()
            })
            .collect();
        let open: usize = ["p0", "p1"]
            .iter()
            .map(|p| fed.gateway(p).unwrap().gateway.open_sessions())
            .sum();
        if open == 0 && states.iter().flatten().all(|s| s != "charged") {
            return states;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not settled: {states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fault_at_any_step_reveals_nothing_and_settles_every_budget() {
    for (fault, expect) in [
        // Before its verdict: nobody started, nothing charged.
        (Fault::SilentBeforeVerdict, Vec::<&str>::new()),
        // After `start`, after the input round, or a garbage result: the
        // honest parties' local parts ran, so their charges are kept.
        (Fault::SilentAfterStart, vec!["spent"]),
        (Fault::SilentAfterInput, vec!["spent"]),
        (Fault::GarbageResult, vec!["spent"]),
    ] {
        let (_d, fed, r) = run_with(fault).await;
        let e = r.expect_err("a faulty party must stop the query");
        assert!(
            e.contains("nothing was revealed") || e.contains("peer p2"),
            "{fault:?}: {e}"
        );
        let states = settled(&fed).await;
        for s in &states {
            assert_eq!(s, &expect, "{fault:?}: {states:?}");
        }
        // The audit logs record the end of the query, never a reveal.
        let log = std::fs::read_to_string(fed.work_dir.join("audit/p0.log")).unwrap();
        assert!(!log.contains("revealed to analyst"), "{fault:?}");
        fed.stop().await;
    }
    // A slow peer (300 ms per message, within the 2 s timeout) is only slow.
    let (_d, fed, r) = run_with(Fault::Slow).await;
    assert!(r.is_ok(), "{r:?}");
    // The positive control of the audit check above.
    let log = std::fs::read_to_string(fed.work_dir.join("audit/p0.log")).unwrap();
    assert!(log.contains("revealed to analyst"));
    let states = settled(&fed).await;
    assert_eq!(
        states,
        vec![vec!["spent".to_string()], vec!["spent".to_string()]]
    );
    fed.stop().await;
}

/// A compute party that dies in the middle of a comparison (MIN/MAX on the
/// replicated engine) ends the query at every party with nothing revealed,
/// whichever party leads; the same query answers once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compute_party_dying_mid_comparison_reveals_nothing() {
    let sql = "SELECT g, MIN(x), MAX(d), COUNT(*) FROM t GROUP BY g";
    let (_dir, fed) = super::adversary::start(3, 81, |spec, _| {
        spec.peer_timeout = Duration::from_secs(2);
        spec.parties[2].fault = Some(Fault::SilentMidComparison);
    })
    .await;
    for leader in ["p0", "p1"] {
        let c = fed.client(leader, USER, PASSWORD).await.unwrap();
        let e = c.query(sql).await.unwrap_err().message;
        assert!(e.contains("nothing was revealed"), "{leader}: {e}");
        // Sums alone never reach a tenth round: the fault is in the comparison.
        c.query("SELECT g, COUNT(*) FROM t GROUP BY g")
            .await
            .unwrap();
    }
    for p in ["p0", "p1"] {
        let log = std::fs::read_to_string(fed.work_dir.join(format!("audit/{p}.log"))).unwrap();
        let extremes: Vec<&str> = log.lines().filter(|l| l.contains("MIN(x)")).collect();
        assert!(!extremes.is_empty(), "{p}: the query is on record");
        assert!(
            extremes.iter().all(|l| !l.contains("revealed to analyst")),
            "{p}: {extremes:?}"
        );
    }
    for _ in 0..100 {
        let open: usize = ["p0", "p1"]
            .iter()
            .map(|p| fed.gateway(p).unwrap().gateway.open_sessions())
            .sum();
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in ["p0", "p1"] {
        assert_eq!(fed.gateway(p).unwrap().gateway.open_sessions(), 0, "{p}");
    }
    fed.stop().await;
}
