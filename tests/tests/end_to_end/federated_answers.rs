//! Council's answers equal the same SQL run in plaintext by DataFusion over
//! the pooled data, for 2, 3 and 5 gateways on loopback with mutual TLS,
//! over seeded random data sets (empty parties, NULLs, negative values,
//! groups present at one party only, values near the overflow bound).

use std::time::Duration;

use council::compare::compare;
use council::federation::plaintext;
use council_tests::{
    start_random, Shape, EXTREME_QUERIES, HAVING_QUERIES, PASSWORD, QUERIES, USER,
};

async fn check(n: usize, shape: Shape) {
    check_queries(n, shape, QUERIES).await
}

async fn check_queries(n: usize, shape: Shape, queries: &[(&str, bool)]) {
    let dir = tempfile::tempdir().unwrap();
    let fed = start_random(dir.path(), n, shape, Duration::from_secs(20))
        .await
        .unwrap();
    let pooled = fed.pooled_context().await.unwrap();
    // Every party's gateway can lead.
    for (qi, (sql, ordered)) in queries.iter().enumerate() {
        let leader = format!("p{}", qi % n);
        let client = fed.client(&leader, USER, PASSWORD).await.unwrap();
        let secure = client
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("{n} parties, {shape:?}, {sql}: {e}"));
        let plain = plaintext(&pooled, sql).await.unwrap();
        if qi == 0 && queries == QUERIES {
            // The total row count is a real, non-trivial answer.
            let rows: usize = secure.iter().map(|b| b.num_rows()).sum();
            assert_eq!(rows, 1, "{sql}");
            let text = arrow::util::pretty::pretty_format_batches(&secure)
                .unwrap()
                .to_string();
            assert!(!text.contains("| 0 "), "every data set has rows: {text}");
        }
        if let Err(d) = compare(&secure, &plain, *ordered) {
            panic!(
                "{n} parties, {shape:?}, leader {leader}: {sql}\n{d}\nsecure:\n{}\nplain:\n{}",
                arrow::util::pretty::pretty_format_batches(&secure).unwrap(),
                arrow::util::pretty::pretty_format_batches(&plain).unwrap()
            );
        }
    }
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_agree_with_plaintext() {
    for seed in [1, 2, 3] {
        check(2, Shape { seed, large: false }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_agree_with_plaintext() {
    for seed in [10, 11, 12, 14, 15, 16] {
        check(3, Shape { seed, large: false }).await;
    }
    check(
        3,
        Shape {
            seed: 13,
            large: true,
        },
    )
    .await;
}

/// MIN and MAX by secure comparison among three gateways (the replicated
/// engine), beside sums (the additive engine) in the same query: equal to
/// plaintext over many data sets, values near the bound included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_agree_on_min_and_max() {
    for seed in [30, 31, 32, 33] {
        check_queries(3, Shape { seed, large: false }, EXTREME_QUERIES).await;
    }
    check_queries(
        3,
        Shape {
            seed: 34,
            large: true,
        },
        EXTREME_QUERIES,
    )
    .await;
}

/// HAVING over a COUNT or SUM against a constant, decided in shares (the
/// gate): equal to plaintext with three parties and five, over data sets
/// with an empty party, NULLs and one-row groups; the post part keeps what
/// the gate cannot decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn having_in_shares_agrees_with_plaintext() {
    for seed in [41, 42, 44] {
        check_queries(3, Shape { seed, large: false }, HAVING_QUERIES).await;
    }
    check_queries(
        5,
        Shape {
            seed: 43,
            large: false,
        },
        HAVING_QUERIES,
    )
    .await;
    // Values beyond the gate's exact range: their conditions pass in the
    // gate and the post part decides, so the answer is still exact.
    check_queries(
        3,
        Shape {
            seed: 45,
            large: true,
        },
        HAVING_QUERIES,
    )
    .await;
    // The queries exercise both outcomes of the gate, and EXPLAIN names it.
    let dir = tempfile::tempdir().unwrap();
    let fed = start_random(
        dir.path(),
        3,
        Shape {
            seed: 41,
            large: false,
        },
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let pooled = fed.pooled_context().await.unwrap();
    let (mut kept, mut removed) = (0, 0);
    let rows = |b: &[arrow::array::RecordBatch]| b.iter().map(|b| b.num_rows()).sum::<usize>();
    for (sql, _) in HAVING_QUERIES {
        let without = sql.split(" HAVING ").next().unwrap();
        let with = rows(&plaintext(&pooled, sql).await.unwrap());
        kept += with;
        removed += rows(&plaintext(&pooled, without).await.unwrap()) - with;
    }
    assert!(kept > 0 && removed > 0, "kept {kept}, removed {removed}");
    let client = fed.client("p1", USER, PASSWORD).await.unwrap();
    // A count that only HAVING uses, decided in the gate, is never
    // revealed: the program is the gate alone.
    let text = client.explain(HAVING_QUERIES[3].0).await.unwrap();
    assert!(
        text.contains("Gate in shares")
            && !text.contains("Secure step (additive")
            && text.contains("(not their row counts)"),
        "{text}"
    );
    let text = client.explain(HAVING_QUERIES[1].0).await.unwrap();
    assert!(
        text.contains("Gate in shares")
            && text.contains("HAVING")
            && text.contains("at least 1000000001"),
        "{text}"
    );
    fed.stop().await;
    // A party that does not accept the honest-majority model refuses a
    // HAVING its federation decides in shares, and one that does not accept
    // p1 as a compute party refuses every comparison on it, each naming its
    // rule; sums without HAVING still run.
    use council_tests::open_policy;
    for (replacement, rule, refused) in [
        (
            "honest_majority = false\n",
            "engines.honest_majority",
            HAVING_QUERIES[0].0,
        ),
        (
            "honest_majority = true\nrefuse_compute = [\"p1\"]\n",
            "engines.refuse_compute",
            "SELECT g, MIN(x) FROM t GROUP BY g",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let shape = Shape {
            seed: 46,
            large: false,
        };
        let (ids, mut spec) =
            council_tests::random_spec(dir.path(), 3, shape, Duration::from_secs(20)).unwrap();
        spec.parties[2].policy_toml =
            open_policy("p2", &ids).replace("honest_majority = true\n", replacement);
        let fed = council::federation::LocalFederation::start(&spec, &dir.path().join("run"))
            .await
            .unwrap();
        let client = fed.client("p0", USER, PASSWORD).await.unwrap();
        let e = client.query(refused).await.unwrap_err().to_string();
        assert!(e.contains(rule) && e.contains("p2"), "{rule}: {e}");
        let pooled = fed.pooled_context().await.unwrap();
        let sums = "SELECT g, SUM(x) FROM t GROUP BY g ORDER BY g";
        let secure = client.query(sums).await.unwrap();
        compare(&secure, &plaintext(&pooled, sums).await.unwrap(), true).unwrap();
        fed.stop().await;
    }
}

/// Five parties: the first three compute the comparison and the other two
/// send them shares; every party leads in turn, including those outside
/// the three.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_gateways_agree_on_min_and_max() {
    for seed in [36, 37] {
        check_queries(5, Shape { seed, large: false }, EXTREME_QUERIES).await;
    }
}

/// Two hospitals and a data-less helper gateway (no tables): the helper
/// completes the three compute parties of each comparison, takes no part
/// in the sums, cannot lead, and the answers equal plaintext over the two
/// hospitals' rows. Without the helper, two parties are refused with the
/// reason and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_parties_and_a_helper_agree_on_min_and_max() {
    use council::federation::{LocalFederation, PartySpec};
    use council_tests::{open_policy, party_ids, spec_for, write_random_data};
    for seed in [38, 39, 40] {
        let dir = tempfile::tempdir().unwrap();
        let data = party_ids(2);
        write_random_data(
            &dir.path().join("data"),
            &data,
            Shape {
                seed,
                large: seed == 40,
            },
        )
        .unwrap();
        let mut spec = spec_for(dir.path(), &data, Duration::from_secs(20));
        let mut all = data.clone();
        all.push("helper".into());
        for p in &mut spec.parties {
            p.policy_toml = open_policy(&p.id, &all);
        }
        let empty = dir.path().join("data").join("helper");
        std::fs::create_dir_all(&empty).unwrap();
        let mut helper = PartySpec::new(
            "helper",
            empty,
            open_policy("helper", &all),
            vec![(USER.into(), PASSWORD.into(), vec![])],
        );
        helper.helper = true;
        spec.parties.push(helper);
        let fed = LocalFederation::start(&spec, &dir.path().join("run"))
            .await
            .unwrap();
        let pooled = fed.pooled_context().await.unwrap();
        for (qi, (sql, ordered)) in EXTREME_QUERIES
            .iter()
            .chain(QUERIES)
            .chain(HAVING_QUERIES)
            .enumerate()
        {
            let leader = format!("p{}", qi % 2);
            let client = fed.client(&leader, USER, PASSWORD).await.unwrap();
            let secure = client
                .query(sql)
                .await
                .unwrap_or_else(|e| panic!("2 + helper, seed {seed}, {sql}: {e}"));
            let plain = plaintext(&pooled, sql).await.unwrap();
            if let Err(d) = compare(&secure, &plain, *ordered) {
                panic!("2 + helper, seed {seed}, leader {leader}: {sql}\n{d}");
            }
        }
        let at_helper = fed.client("helper", USER, PASSWORD).await.unwrap();
        let e = at_helper
            .query("SELECT MIN(x) FROM t")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("helper party") && e.contains("does not lead"),
            "{e}"
        );
        fed.stop().await;
    }
    // Two parties alone.
    let dir = tempfile::tempdir().unwrap();
    let fed = start_random(
        dir.path(),
        2,
        Shape {
            seed: 35,
            large: false,
        },
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let client = fed.client("p0", USER, PASSWORD).await.unwrap();
    let e = client
        .query("SELECT g, MIN(x) FROM t GROUP BY g")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("MIN in a federation of 2 data parties and 0 helpers")
            && e.contains("helper party"),
        "{e}"
    );
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_gateways_agree_with_plaintext() {
    for seed in [20, 21] {
        check(5, Shape { seed, large: false }).await;
    }
    check(
        5,
        Shape {
            seed: 24,
            large: true,
        },
    )
    .await;
}

/// A share over a large public domain spans many Arrow batches (arrow-flight
/// splits a batch above 2 MiB): a GROUP BY over a million declared values
/// is answered and equals plaintext. Before, a domain of some 70,000 values
/// failed with "a share stream carries exactly one batch".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_group_domain_streams_its_shares() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let ids = council_tests::party_ids(3);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(77);
    for p in &ids {
        let d = dir.path().join("data").join(p);
        std::fs::create_dir_all(&d).unwrap();
        let mut csv = String::from("id,g,h,flag,x,d,f,label,ts\n");
        for i in 0..400 {
            // Some keys shared between parties, most not; the domain's edges.
            let h: u32 = match i {
                0 => 0,
                1 => 999_998,
                _ if i % 5 == 0 => rng.random_range(0..50),
                _ => rng.random_range(0..999_999),
            };
            let x: i64 = rng.random_range(-1000..1000);
            csv.push_str(&format!("{i},a,{h},true,{x},1.0,1.5,lime,\n"));
        }
        std::fs::write(d.join("t.csv"), csv).unwrap();
    }
    let mut spec = council_tests::spec_for(dir.path(), &ids, Duration::from_secs(60));
    spec.catalog_toml = council_tests::CATALOG.replace(
        "domain = { min = 1, max = 3 }",
        // 999,999 values and NULL: the largest domain a query may group by.
        "domain = { min = 0, max = 999998 }",
    );
    let fed = council::federation::LocalFederation::start(&spec, &dir.path().join("run"))
        .await
        .unwrap();
    let pooled = fed.pooled_context().await.unwrap();
    let client = fed.client("p1", USER, PASSWORD).await.unwrap();
    let sql = "SELECT h, COUNT(*) AS n, SUM(x) AS s FROM t GROUP BY h ORDER BY h";
    let secure = client
        .query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let plain = plaintext(&pooled, sql).await.unwrap();
    let rows: usize = secure.iter().map(|b| b.num_rows()).sum();
    assert!(rows > 1000, "{rows} groups");
    compare(&secure, &plain, true).unwrap_or_else(|d| panic!("{sql}: {d}"));
    fed.stop().await;
}

/// A minimum group size without differential privacy, decided in shares:
/// with `min_group_size = 15` at one party the answer equals plaintext
/// with `HAVING` the rows of the parties other than the leader `>= 15`
/// (the leader's own rows do not count; an ungrouped answer below it is one
/// row of NULLs), for three parties, five, and two with a helper; a party
/// that does not accept the honest-majority model refuses, naming the
/// rule; two parties without a helper are refused with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_minimum_group_size_without_dp_leaves_small_groups_out() {
    use council::federation::{LocalFederation, PartySpec};
    use council_tests::{open_policy, party_ids, spec_for, write_random_data};
    const K: u64 = 15;
    let cases: &[(&str, &str)] = &[
        (
            "SELECT g, flag, h, COUNT(*) AS n, SUM(x), AVG(d) FROM t GROUP BY g, flag, h ORDER BY g, flag, h",
            "SELECT g, flag, h, COUNT(*) AS n, SUM(x), AVG(d) FROM t GROUP BY g, flag, h HAVING COUNT(*) >= 15 ORDER BY g, flag, h",
        ),
        (
            "SELECT h, flag, MIN(x), MAX(d), SUM(d) FROM t GROUP BY h, flag ORDER BY h, flag",
            "SELECT h, flag, MIN(x), MAX(d), SUM(d) FROM t GROUP BY h, flag HAVING COUNT(*) >= 15 ORDER BY h, flag",
        ),
        (
            "SELECT g, COUNT(x) FROM t WHERE x > 0 GROUP BY g ORDER BY g",
            "SELECT g, COUNT(x) FROM t WHERE x > 0 GROUP BY g HAVING COUNT(*) >= 15 ORDER BY g",
        ),
        // Nothing but the gate: no total is revealed at all.
        (
            "SELECT g, h FROM t GROUP BY g, h ORDER BY g, h",
            "SELECT g, h FROM t GROUP BY g, h HAVING COUNT(*) >= 15 ORDER BY g, h",
        ),
        // A minimum group size and HAVING in one gate.
        (
            "SELECT h, SUM(x) FROM t GROUP BY h HAVING SUM(x) > 0 ORDER BY h",
            "SELECT h, SUM(x) FROM t GROUP BY h HAVING COUNT(*) >= 15 AND SUM(x) > 0 ORDER BY h",
        ),
    ];
    let ungrouped = "SELECT COUNT(*) AS n, SUM(x) FROM t WHERE x > 950";
    let with_k = |p: &str, all: &[String]| {
        open_policy(p, all).replace(
            "[engines]\n",
            &format!("[results]\nmin_group_size = {K}\n[engines]\n"),
        )
    };
    for (n, helper) in [(3usize, false), (5, false), (2, true)] {
        let dir = tempfile::tempdir().unwrap();
        let data = party_ids(n);
        write_random_data(
            &dir.path().join("data"),
            &data,
            Shape {
                seed: 50 + n as u64,
                large: false,
            },
        )
        .unwrap();
        let mut spec = spec_for(dir.path(), &data, Duration::from_secs(20));
        let mut all = data.clone();
        if helper {
            all.push("helper".into());
        }
        for p in &mut spec.parties {
            p.policy_toml = if p.id == "p1" {
                with_k(&p.id, &all)
            } else {
                open_policy(&p.id, &all)
            };
        }
        if helper {
            let empty = dir.path().join("data").join("helper");
            std::fs::create_dir_all(&empty).unwrap();
            let mut h = PartySpec::new("helper", empty, open_policy("helper", &all), vec![]);
            h.helper = true;
            spec.parties.push(h);
        }
        let fed = LocalFederation::start(&spec, &dir.path().join("run"))
            .await
            .unwrap();
        let pooled = fed.pooled_context().await.unwrap();
        let mut left_out = 0;
        for (qi, (sql, reference)) in cases.iter().enumerate() {
            let leader = format!("p{}", qi % n);
            let client = fed.client(&leader, USER, PASSWORD).await.unwrap();
            let secure = client
                .query(sql)
                .await
                .unwrap_or_else(|e| panic!("{n} parties: {sql}: {e}"));
            // The leader's own rows do not count towards the minimum
            // (executor::gate); a row's party is its id / 100000.
            let reference = reference.replace(
                "HAVING COUNT(*) >= 15",
                &format!(
                    "HAVING SUM(CASE WHEN id / 100000 = {} THEN 0 ELSE 1 END) >= 15",
                    qi % n
                ),
            );
            let plain = plaintext(&pooled, &reference).await.unwrap();
            let all_groups = plaintext(&pooled, sql).await.unwrap();
            let rows =
                |b: &[arrow::array::RecordBatch]| b.iter().map(|b| b.num_rows()).sum::<usize>();
            left_out += rows(&all_groups) - rows(&plain);
            if let Err(d) = compare(&secure, &plain, true) {
                panic!(
                    "{n} parties, leader {leader}: {sql}\n{d}\nsecure:\n{}\nplain:\n{}",
                    arrow::util::pretty::pretty_format_batches(&secure).unwrap(),
                    arrow::util::pretty::pretty_format_batches(&plain).unwrap()
                );
            }
        }
        assert!(left_out > 0, "{n} parties: the data must have small groups");
        // Ungrouped: all NULL below the threshold, the answer above it.
        let client = fed.client("p0", USER, PASSWORD).await.unwrap();
        let secure = client.query(ungrouped).await.unwrap();
        let plain = plaintext(&pooled, ungrouped).await.unwrap();
        let others = plaintext(
            &pooled,
            "SELECT COUNT(*) FROM t WHERE x > 950 AND id / 100000 <> 0",
        )
        .await
        .unwrap();
        let count = others[0]
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap()
            .value(0);
        if (count as u64) < K {
            assert!(secure[0].column(0).is_null(0) && secure[0].column(1).is_null(0));
        } else {
            compare(&secure, &plain, true).unwrap();
        }
        let explain = client.explain(cases[0].0).await.unwrap();
        assert!(
            explain.contains("Gate in shares")
                && explain.contains("at least 15 rows at the parties other than the querying one"),
            "{explain}"
        );
        assert!(
            explain.contains("requires groups of at least 15 rows"),
            "{explain}"
        );
        fed.stop().await;
    }
    // A party requiring a threshold without accepting the honest-majority
    // model, and two parties without a helper: refused, naming the rule.
    for (n, opt_in) in [(3usize, false), (2, true)] {
        let dir = tempfile::tempdir().unwrap();
        let ids = party_ids(n);
        write_random_data(
            &dir.path().join("data"),
            &ids,
            Shape {
                seed: 60,
                large: false,
            },
        )
        .unwrap();
        let mut spec = spec_for(dir.path(), &ids, Duration::from_secs(20));
        let mut pol = with_k("p1", &ids);
        if !opt_in {
            pol = pol.replace("honest_majority = true", "honest_majority = false");
        }
        spec.parties[1].policy_toml = pol;
        let fed = LocalFederation::start(&spec, &dir.path().join("run"))
            .await
            .unwrap();
        let client = fed.client("p0", USER, PASSWORD).await.unwrap();
        let e = client.query(cases[0].0).await.unwrap_err().to_string();
        let want = if opt_in {
            "helper"
        } else {
            "engines.honest_majority"
        };
        assert!(e.contains(want), "{n}: {e}");
        fed.stop().await;
    }
    // One party requires DP, another a minimum group size without it: the
    // threshold is not left to noised counts at the leader; refused.
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(3);
    write_random_data(
        &dir.path().join("data"),
        &ids,
        Shape {
            seed: 61,
            large: false,
        },
    )
    .unwrap();
    let mut spec = spec_for(dir.path(), &ids, Duration::from_secs(20));
    spec.parties[0].policy_toml = super::privacy::dp_policy(
        "p0",
        &ids,
        "mechanism = \"laplace\"\nepsilon_per_query = 1",
        "{ epsilon = 10, period_days = 30 }",
    );
    spec.parties[1].policy_toml = with_k("p1", &ids);
    let fed = LocalFederation::start(&spec, &dir.path().join("run"))
        .await
        .unwrap();
    let client = fed.client("p2", USER, PASSWORD).await.unwrap();
    let e = client
        .query("SELECT g, COUNT(*) FROM t GROUP BY g")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("results.min_group_size") && e.contains("differential privacy"),
        "{e}"
    );
    fed.stop().await;
}
