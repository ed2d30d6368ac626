//! Council's answers equal the same SQL run in plaintext by DataFusion over
//! the pooled data, for 2, 3 and 5 gateways on loopback with mutual TLS,
//! over seeded random data sets (empty parties, NULLs, negative values,
//! groups present at one party only, values near the overflow bound).

use std::time::Duration;

use council::compare::compare;
use council::federation::plaintext;
use council_tests::{start_random, Shape, EXTREME_QUERIES, PASSWORD, QUERIES, USER};

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
        for (qi, (sql, ordered)) in EXTREME_QUERIES.iter().chain(QUERIES).enumerate() {
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
