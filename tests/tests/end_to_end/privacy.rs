//! Differential privacy end to end: noised answers lie within the 95%
//! intervals the answers themselves declare (Flight SQL field metadata) at
//! the stated rate, against the same SQL in plaintext over the pooled rows;
//! budgets are charged at every party that requires DP, refused when spent
//! (also after a restart), and refunded when a query aborts before the
//! reveal.

use std::collections::HashMap;
use std::time::Duration;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::Schema;
use council::federation::{plaintext, FederationSpec, LocalFederation};
use council_tests::{open_policy, party_ids, spec_for, write_random_data, Shape, PASSWORD, USER};

/// A federation spec over seeded random data, with open policies.
fn random_spec(
    dir: &std::path::Path,
    ids: &[String],
    seed: u64,
    timeout: Duration,
) -> FederationSpec {
    write_random_data(&dir.join("data"), ids, Shape { seed, large: false }).unwrap();
    spec_for(dir, ids, timeout)
}

/// `[privacy]` and the table's privacy section added to the open policy.
pub(crate) fn dp_policy(party: &str, ids: &[String], privacy: &str, budget: &str) -> String {
    let mut p = open_policy(party, ids);
    p = p.replace(
        "[tables.t.columns.x]\n",
        "[tables.t.columns.x]\nclamp = [-1000, 1000]\n",
    );
    p = p.replace(
        "[tables.t.columns.d]\n",
        "[tables.t.columns.d]\nclamp = [\"-10000000\", \"10000000\"]\n",
    );
    p.push_str(&format!(
        "[tables.t.privacy]\nindividual_id = \"id\"\nmax_rows_per_individual = 1\n[privacy]\n{privacy}\nbudget = {budget}\n"
    ));
    p
}

/// Values of a column as f64 by group key (`None` key: ungrouped or NULL).
fn by_group(
    batches: &[RecordBatch],
    key: Option<usize>,
    col: usize,
) -> HashMap<Option<String>, f64> {
    let mut out = HashMap::new();
    for b in batches {
        for r in 0..b.num_rows() {
            let k = key.and_then(|k| {
                let a = b.column(k);
                (!a.is_null(r))
                    .then(|| arrow::util::display::array_value_to_string(a, r).unwrap_or_default())
            });
            let c =
                arrow::compute::cast(b.column(col), &arrow::datatypes::DataType::Float64).unwrap();
            let c = c
                .as_any()
                .downcast_ref::<arrow::array::Float64Array>()
                .unwrap();
            let v = if c.is_null(r) { 0.0 } else { c.value(r) };
            out.insert(k, v);
        }
    }
    out
}

fn ci95(schema: &Schema, col: usize) -> f64 {
    schema
        .field(col)
        .metadata()
        .get(gateway::dp::CI95_KEY)
        .unwrap_or_else(|| panic!("column {col} carries no interval: {schema:?}"))
        .parse()
        .unwrap()
}

/// Runs `sql` `runs` times; returns (checks, covered).
async fn coverage(
    fed: &LocalFederation,
    sql: &str,
    key: Option<usize>,
    cols: &[usize],
    runs: usize,
) -> (usize, usize) {
    let pooled = fed.pooled_context().await.unwrap();
    let plain = plaintext(&pooled, sql).await.unwrap();
    let mut checks = 0;
    let mut covered = 0;
    for i in 0..runs {
        let leader = format!("p{}", i % 3);
        let client = fed.client(&leader, USER, PASSWORD).await.unwrap();
        let got = client
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let schema = got[0].schema();
        assert!(
            schema.metadata().get(gateway::dp::PRIVACY_KEY).is_some(),
            "{sql}: the answer does not say it is noised"
        );
        for &c in cols {
            let w = ci95(&schema, c);
            let truth = by_group(&plain, key, c);
            let noisy = by_group(&got, key, c);
            if key.is_some() {
                // Every group of the domain is released (a, b, c, d, NULL).
                assert_eq!(noisy.len(), 5, "{sql}: {noisy:?}");
            }
            for (k, v) in noisy {
                // A group with no rows is absent in plaintext: its true
                // count and sum are 0.
                let t = truth.get(&k).copied().unwrap_or(0.0);
                checks += 1;
                if (v - t).abs() <= w + 1e-9 {
                    covered += 1;
                }
            }
        }
    }
    (checks, covered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn noised_answers_lie_within_their_stated_intervals_at_the_stated_rate() {
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(3);
    let mut spec = random_spec(dir.path(), &ids, 7, Duration::from_secs(20));
    // p0 and p1 require pure ε-DP (p1 is stricter: the query runs at ε = 0.5);
    // p2 requires nothing.
    let budget = "{ epsilon = 1000, period_days = 30 }";
    spec.parties[0].policy_toml = dp_policy(
        "p0",
        &ids,
        "mechanism = \"laplace\"\nepsilon_per_query = 1.0",
        budget,
    );
    spec.parties[1].policy_toml = dp_policy(
        "p1",
        &ids,
        "mechanism = \"laplace\"\nepsilon_per_query = 0.5",
        budget,
    );
    let fed = LocalFederation::start(&spec, &dir.path().join("run"))
        .await
        .unwrap();

    let sql = "SELECT g, COUNT(*), SUM(x) FROM t GROUP BY g ORDER BY g";
    let client = fed.client("p2", USER, PASSWORD).await.unwrap();
    let explain = client.explain(sql).await.unwrap();
    for want in [
        "Differential privacy (required by p0, p1): laplace mechanism, ε = 0.5",
        "at most 1 row(s) per id at each party (enforced)",
        "x to [-1000, 1000]",
        "discrete Laplace of scale 4.000",
        "discrete Laplace of scale 4000.0",
        "p0: allow (same plan); requires DP: laplace, ε ≤ 1 per query",
    ] {
        assert!(explain.contains(want), "EXPLAIN lacks `{want}`:\n{explain}");
    }
    let (checks, covered) = coverage(&fed, sql, Some(0), &[1, 2], 60).await;
    let rate = covered as f64 / checks as f64;
    // 600 independent checks: 4 standard deviations below 95% is 0.914.
    assert!(
        (0.914..=0.995).contains(&rate),
        "{covered} of {checks} noised values within their 95% interval ({rate:.3})"
    );
    eprintln!("laplace: {covered} of {checks} within the stated 95% interval ({rate:.3})");
    for p in ["p0", "p1"] {
        let ledger = policies::Ledger::open(
            &dir.path()
                .join("run/audit")
                .join(format!("{p}-budget.sqlite")),
        )
        .unwrap();
        let charges = ledger.charges(None).unwrap();
        assert_eq!(charges.len(), 60, "{p}: one charge per query");
        assert!(
            charges
                .iter()
                .all(|c| c.state == "spent" && c.epsilon_micro == 500_000),
            "{p}: {charges:?}"
        );
    }
    assert!(
        !dir.path().join("run/audit/p2-budget.sqlite").exists(),
        "p2 keeps no ledger"
    );
    // Under DP a BIGINT's squares are summed whole (its clamp bounds them),
    // one noised total, not three limbs each with a share of ε.
    let var = "SELECT g, VAR_SAMP(x) AS v, STDDEV_POP(x) AS s FROM t GROUP BY g";
    let explain = client.explain(var).await.unwrap();
    assert!(
        explain.contains("SUM((CLAMP(x, -1000, 1000))^2) at scale 0") && !explain.contains("limb"),
        "{explain}"
    );
    client
        .query(var)
        .await
        .unwrap_or_else(|e| panic!("{var}: {e}"));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gaussian_answers_lie_within_their_stated_intervals() {
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(3);
    let mut spec = random_spec(dir.path(), &ids, 8, Duration::from_secs(20));
    spec.parties[2].policy_toml = dp_policy(
        "p2",
        &ids,
        "mechanism = \"gaussian\"\nepsilon_per_query = 1.0\ndelta_per_query = 1e-6",
        "{ epsilon = 1000, delta = 1e-3, period_days = 30 }",
    );
    let fed = LocalFederation::start(&spec, &dir.path().join("run"))
        .await
        .unwrap();
    let sql = "SELECT h, COUNT(*), SUM(d), AVG(d) FROM t GROUP BY h ORDER BY h";
    let (checks, covered) = {
        // h has 3 declared values + NULL: 4 groups, not 5.
        let pooled = fed.pooled_context().await.unwrap();
        let plain = plaintext(&pooled, sql).await.unwrap();
        let mut checks = 0;
        let mut covered = 0;
        for i in 0..40 {
            let client = fed
                .client(&format!("p{}", i % 3), USER, PASSWORD)
                .await
                .unwrap();
            let got = client.query(sql).await.unwrap();
            let schema = got[0].schema();
            assert!(
                schema
                    .field(3)
                    .metadata()
                    .get(gateway::dp::CI95_KEY)
                    .is_none(),
                "AVG has no fixed interval"
            );
            assert!(schema
                .field(3)
                .metadata()
                .get(gateway::dp::NOTE_KEY)
                .is_some());
            for c in [1, 2] {
                let w = ci95(&schema, c);
                let truth = by_group(&plain, Some(0), c);
                for (k, v) in by_group(&got, Some(0), c) {
                    checks += 1;
                    if (v - truth.get(&k).copied().unwrap_or(0.0)).abs() <= w + 1e-9 {
                        covered += 1;
                    }
                }
            }
        }
        (checks, covered)
    };
    let rate = covered as f64 / checks as f64;
    // 320 checks: 4 standard deviations below 95% is 0.902.
    assert!(
        (0.902..=0.995).contains(&rate),
        "{covered} of {checks} ({rate:.3})"
    );
    eprintln!("gaussian: {covered} of {checks} within the stated 95% interval ({rate:.3})");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budgets_are_refused_when_spent_also_after_a_restart_and_refunded_on_abort() {
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(3);
    let mut spec = random_spec(dir.path(), &ids, 5, Duration::from_secs(20));
    spec.parties[1].policy_toml = dp_policy(
        "p1",
        &ids,
        "mechanism = \"laplace\"\nepsilon_per_query = 0.5",
        "{ epsilon = 1.2, period_days = 30 }",
    );
    let run = dir.path().join("run");
    let sql = "SELECT COUNT(*), SUM(x) FROM t";
    let fed = LocalFederation::start(&spec, &run).await.unwrap();
    let client = fed.client("p0", USER, PASSWORD).await.unwrap();
    client.query(sql).await.unwrap();
    client.query(sql).await.unwrap();
    let e = client.query(sql).await.unwrap_err().to_string();
    assert!(e.contains("p1 refused"), "{e}");
    assert!(e.contains("ε = 0.2 left of 1.2"), "{e}");
    assert!(e.contains("privacy.budget"), "{e}");
    fed.stop().await;

    // After a restart the ledger still holds both charges.
    let fed = LocalFederation::start(&spec, &run).await.unwrap();
    let client = fed.client("p0", USER, PASSWORD).await.unwrap();
    let e = client.query(sql).await.unwrap_err().to_string();
    assert!(e.contains("ε = 0.2 left of 1.2"), "after a restart: {e}");
    // Another party's analyst has a budget of their own at p1.
    let other = fed.client("p2", USER, PASSWORD).await.unwrap();
    other.query(sql).await.unwrap();
    fed.stop().await;
    // What `council budget show` prints for p1.
    let policy = policies::Policy::parse(&spec.parties[1].policy_toml, None).unwrap();
    let ledger = run.join("audit/p1-budget.sqlite");
    let now = policies::ledger::now_unix();
    let all =
        gateway::dp::budget_report("p1", policy.privacy.as_ref(), &ledger, None, now).unwrap();
    let words = all.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "ε = 1.2 per analyst per rolling 30-day period",
        "p0:ana 1 0.2 2 0",
        "p2:ana 0.5 0.7 1 0",
        "p0:ana ε = 0.5 spent SELECT COUNT(*), SUM(x) FROM t",
    ] {
        assert!(words.contains(want), "budget show lacks `{want}`:\n{all}");
    }
    let one =
        gateway::dp::budget_report("p1", policy.privacy.as_ref(), &ledger, Some("p2:ana"), now)
            .unwrap();
    assert!(!one.contains("p0:ana"), "{one}");

    // A party falls silent after the charges: the query aborts before the
    // reveal, but after the parties' local parts ran (how a query ends may
    // then depend on their rows), so the charges are kept, never refunded.
    let dir2 = tempfile::tempdir().unwrap();
    let mut spec = random_spec(dir2.path(), &ids, 5, Duration::from_secs(2));
    let budget = "{ epsilon = 10, period_days = 30 }";
    spec.parties[0].policy_toml = dp_policy(
        "p0",
        &ids,
        "mechanism = \"laplace\"\nepsilon_per_query = 1",
        budget,
    );
    spec.parties[1].policy_toml = dp_policy(
        "p1",
        &ids,
        "mechanism = \"laplace\"\nepsilon_per_query = 1",
        budget,
    );
    spec.parties[2].fault = Some(gateway::config::Fault::SilentBeforeShares);
    let run2 = dir2.path().join("run");
    let fed = LocalFederation::start(&spec, &run2).await.unwrap();
    let client = fed.client("p0", USER, PASSWORD).await.unwrap();
    let e = client.query(sql).await.unwrap_err().to_string();
    assert!(e.contains("nothing was revealed"), "{e}");
    // The peers end their part on their own time; wait for p1's outcome.
    let ledger1 = policies::Ledger::open(&run2.join("audit/p1-budget.sqlite")).unwrap();
    let ledger0 = policies::Ledger::open(&run2.join("audit/p0-budget.sqlite")).unwrap();
    let mut states = (String::new(), String::new());
    for _ in 0..100 {
        let s0 = ledger0.charges(None).unwrap();
        let s1 = ledger1.charges(None).unwrap();
        assert_eq!((s0.len(), s1.len()), (1, 1), "each party charged once");
        states = (s0[0].state.clone(), s1[0].state.clone());
        if states.0 != "charged" && states.1 != "charged" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(states, ("spent".to_string(), "spent".to_string()));
    fed.stop().await;
}

/// A leader is not trusted with the privacy parameters: a party that
/// requires DP refuses a `start` without them, with looser ones, or with
/// nonsense, and charges nothing for any of these.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_party_refuses_a_leader_that_drops_or_loosens_its_privacy() {
    use gateway::peer::{Propose, Start, Verdict};
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(2);
    let mut spec = random_spec(dir.path(), &ids, 4, Duration::from_secs(5));
    spec.parties[1].policy_toml = dp_policy(
        "p1",
        &ids,
        "mechanism = \"laplace\"\nepsilon_per_query = 0.5",
        "{ epsilon = 10, period_days = 30 }",
    );
    let run = dir.path().join("run");
    let fed = LocalFederation::start(&spec, &run).await.unwrap();
    let p1 = fed.gateway("p1").unwrap().gateway.clone();
    let analyst = policies::Analyst {
        party: "p0".into(),
        name: USER.into(),
        roles: vec![],
    };
    let mut asked = 0;
    let mut propose = |p1: std::sync::Arc<gateway::gateway::Gateway>| {
        asked += 1;
        let id = format!("{asked:032x}");
        let analyst = analyst.clone();
        async move {
            let v = p1
                .on_propose(
                    "p0",
                    Propose {
                        query_id: id.clone(),
                        sql: "SELECT COUNT(*), SUM(x) FROM t".into(),
                        options: Default::default(),
                        analyst,
                        explain_only: false,
                    },
                )
                .await;
            let Verdict::Allow {
                privacy: Some(req), ..
            } = v
            else {
                panic!("p1 should allow, requiring DP: {v:?}");
            };
            (id, req)
        }
    };
    // No parameters at all.
    let (id, _) = propose(p1.clone()).await;
    let e = p1
        .on_start(
            "p0",
            Start {
                query_id: id,
                privacy: None,
                fingerprint: None,
                threshold: 0,
            },
        )
        .unwrap_err();
    let e = e.to_string();
    assert!(e.contains("requires differential privacy"), "{e}");
    // Looser than p1's requirement.
    let (id, req) = propose(p1.clone()).await;
    let mut params = planner::privacy::DpParams::merge(&[req], 2)
        .unwrap()
        .unwrap();
    params.epsilon_micro = 5_000_000;
    let e = p1
        .on_start(
            "p0",
            Start {
                query_id: id,
                privacy: Some(params.clone()),
                fingerprint: None,
                threshold: 0,
            },
        )
        .unwrap_err();
    let e = e.to_string();
    assert!(e.contains("fall short") && e.contains("ε = 5"), "{e}");
    // Nonsense (ε = 0 would divide by zero) and a wrong fingerprint.
    let (id, _) = propose(p1.clone()).await;
    params.epsilon_micro = 0;
    assert!(p1
        .on_start(
            "p0",
            Start {
                query_id: id,
                privacy: Some(params.clone()),
                fingerprint: None,
                threshold: 0,
            }
        )
        .is_err());
    let (id, req) = propose(p1.clone()).await;
    let params = planner::privacy::DpParams::merge(&[req], 2)
        .unwrap()
        .unwrap();
    let e = p1
        .on_start(
            "p0",
            Start {
                query_id: id,
                privacy: Some(params),
                fingerprint: Some("0".repeat(64)),
                threshold: 0,
            },
        )
        .unwrap_err();
    let e = e.to_string();
    assert!(e.contains("differs"), "{e}");
    // Nothing was charged for any of them.
    let ledger = policies::Ledger::open(&run.join("audit/p1-budget.sqlite")).unwrap();
    assert!(ledger.charges(None).unwrap().is_empty());
    fed.stop().await;
}

/// Under DP a minimum group size is enforced on the noised row counts:
/// groups below it are left out, an ungrouped answer below it is NULL, and
/// every released group's noised count is at least the threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_minimum_group_size_is_enforced_on_noised_counts() {
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(2);
    let mut spec = random_spec(dir.path(), &ids, 10, Duration::from_secs(20));
    let budget = "{ epsilon = 1000, period_days = 30 }";
    spec.parties[0].policy_toml = dp_policy(
        "p0",
        &ids,
        "mechanism = \"laplace\"\nepsilon_per_query = 2",
        budget,
    )
    .replace(
        "[tables.t]\n",
        "[results]\nmin_group_size = 30\n[tables.t]\n",
    );
    let fed = LocalFederation::start(&spec, &dir.path().join("run"))
        .await
        .unwrap();
    let pooled = fed.pooled_context().await.unwrap();
    let client = fed.client("p1", USER, PASSWORD).await.unwrap();
    // g has a, b, c at both parties and d at p0 only, plus NULL (5%).
    let sql = "SELECT g, COUNT(*) AS n, SUM(x) FROM t GROUP BY g ORDER BY g";
    let plain = by_group(&plaintext(&pooled, sql).await.unwrap(), Some(0), 1);
    let mut seen_small = false;
    for _ in 0..10 {
        let got = client.query(sql).await.unwrap();
        let noisy = by_group(&got, Some(0), 1);
        assert!(noisy.values().all(|&n| n >= 30.0), "{noisy:?}");
        // A group far above the threshold is always there; one far below never.
        for (k, &n) in &plain {
            if n >= 60.0 {
                assert!(noisy.contains_key(k), "{k:?} ({n} rows) left out");
            }
            if n <= 10.0 {
                seen_small = true;
                assert!(!noisy.contains_key(k), "{k:?} ({n} rows) released");
            }
        }
        // Groups with no rows at all (none here) would be left out too.
        assert!(noisy.len() <= 5);
    }
    assert!(
        seen_small,
        "the data set should have a small group: {plain:?}"
    );
    // Ungrouped, below the threshold: one row of NULLs.
    let got = client
        .query("SELECT COUNT(*), SUM(x) FROM t WHERE g IS NULL AND x > 900")
        .await
        .unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&got)
        .unwrap()
        .to_string();
    assert_eq!(got.iter().map(|b| b.num_rows()).sum::<usize>(), 1, "{text}");
    assert!(
        got[0].column(0).is_null(0) && got[0].column(1).is_null(0),
        "{text}"
    );
    let explain = client.explain(sql).await.unwrap();
    assert!(
        explain.contains("noised row count is below 30 are left out"),
        "{explain}"
    );
    fed.stop().await;
}
