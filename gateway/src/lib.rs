//! The `council` gateway: configuration, TLS, the peer and analyst services,
//! the query's life cycle and the analyst client. The `council`
//! command, the demo and the benchmarks are in the `council` crate.
#![forbid(unsafe_code)]

pub mod certs;
pub mod client;
pub mod config;
pub mod dp;
pub mod flightsql;
pub mod gateway;
pub mod net;
pub mod network;
pub mod output;
pub mod peer;
pub mod pg;
pub mod server;
pub mod service;
pub mod session;
pub mod tls;
