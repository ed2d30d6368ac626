//! Runs Council's fuzz targets by hand (the test suite runs a seeded slice):
//!
//!     cargo run --release -p council-tests --bin fuzz -- --iterations 1000000
//!     cargo run --release -p council-tests --bin fuzz -- --target sql --iterations 1000000 --seed 7
//!
//! Prints, per target, the inputs tried, how many the code accepted and how
//! many made it panic (with the first few such inputs); exits non-zero on
//! any panic.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut iterations: u64 = 1_000_000;
    let mut seed: u64 = 1;
    let mut targets: Vec<String> = council_tests::fuzz::TARGETS
        .iter()
        .map(|t| t.to_string())
        .collect();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next();
        match (a.as_str(), value) {
            ("--iterations", Some(v)) => iterations = v.parse().unwrap_or(iterations),
            ("--seed", Some(v)) => seed = v.parse().unwrap_or(seed),
            ("--target", Some(v)) => targets = vec![v],
            _ => {
                eprintln!(
                    "usage: fuzz [--iterations N] [--seed S] [--target {}]",
                    council_tests::fuzz::TARGETS.join("|")
                );
                return ExitCode::FAILURE;
            }
        }
    }
    gateway::tls::install_provider();
    let _quiet = council_tests::fuzz::quiet_panics();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for t in &targets {
        let started = std::time::Instant::now();
        let r = rt.block_on(council_tests::fuzz::run(t, iterations, seed));
        println!("{r}  ({:.1} s)", started.elapsed().as_secs_f64());
        for e in &r.examples {
            println!("    panicked on: {e:?}");
        }
        failed |= r.panics > 0;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
