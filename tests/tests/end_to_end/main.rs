//! Council's end-to-end tests, linked into one test binary: every binary
//! links all of DataFusion, so one binary instead of four saves three links
//! and about 3 GiB of disk in a debug build (CI ran out of disk with four).

mod adversary;
mod failures;
mod faults;
mod federated_answers;
mod flight_sql;
mod fuzz_slice;
mod privacy;
mod real_clients;
mod sources;
