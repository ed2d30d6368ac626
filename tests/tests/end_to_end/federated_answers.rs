//! Council's answers equal the same SQL run in plaintext by DataFusion over
//! the pooled data, for 2, 3 and 5 gateways on loopback with mutual TLS,
//! over seeded random data sets (empty parties, NULLs, negative values,
//! groups present at one party only, values near the overflow bound).

use std::time::Duration;

use council_tests::{start_random, Shape, PASSWORD, QUERIES, USER};
use gateway::compare::compare;
use gateway::federation::plaintext;

async fn check(n: usize, shape: Shape) {
    let dir = tempfile::tempdir().unwrap();
    let fed = start_random(dir.path(), n, shape, Duration::from_secs(20))
        .await
        .unwrap();
    let pooled = fed.pooled_context().await.unwrap();
    // Every party's gateway can lead.
    for (qi, (sql, ordered)) in QUERIES.iter().enumerate() {
        let leader = format!("p{}", qi % n);
        let client = fed.client(&leader, USER, PASSWORD).await.unwrap();
        let secure = client
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("{n} parties, {shape:?}, {sql}: {e}"));
        let plain = plaintext(&pooled, sql).await.unwrap();
        if qi == 0 {
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
