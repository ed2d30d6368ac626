//! What the `council` command runs besides a gateway, and what the tests
//! share with it: the demo (`demo`), the benchmarks (`bench`), several
//! gateways in one process with the pooled plaintext reference
//! (`federation`), and the comparison of two answers (`compare`).
//! The gateway library (`gateway`) depends on none of this.
#![forbid(unsafe_code)]

pub mod bench;
pub mod compare;
pub mod demo;
pub mod federation;
