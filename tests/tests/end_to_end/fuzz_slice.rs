//! A seeded slice of the fuzz targets (`council_tests::fuzz`): every input
//! that crosses a socket or comes from a user, none may panic. The full run
//! (10^6 inputs per target) is `cargo run --release -p council-tests --bin
//! fuzz -- --iterations 1000000`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fuzzed_input_panics() {
    let seed = std::env::var("COUNCIL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261201);
    for target in council_tests::fuzz::TARGETS {
        let n = match *target {
            // Planning runs DataFusion's planner on a thread per input.
            "sql" => 1_500,
            _ => 5_000,
        };
        let r = council_tests::fuzz::run(target, n, seed).await;
        assert_eq!(r.inputs, n);
        assert_eq!(r.panics, 0, "{r}: {:?}", r.examples);
        // The generators reach past the parsers.
        assert!(r.accepted > 0, "{r}: nothing was accepted");
    }
}
