//! The `council` gateway: configuration, TLS, the peer and analyst services,
//! the query coordinator, the analyst client and the demo.
#![forbid(unsafe_code)]

pub mod bench;
pub mod certs;
pub mod client;
pub mod compare;
pub mod config;
pub mod demo;
pub mod dp;
pub mod federation;
pub mod flightsql;
pub mod gateway;
pub mod net;
pub mod output;
pub mod peer;
pub mod pg;
pub mod server;
pub mod service;
pub mod session;
pub mod tls;
