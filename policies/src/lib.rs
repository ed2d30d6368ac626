//! Governance: each party's allow-list policy, the checker that decides a
//! plan against it, and the hash-chained audit log.
//!
//! Invariants: the checker sees only the plan this gateway computed itself
//! and the analyst identity; it allows only what the policy lists (anything
//! unlisted is denied), and every denial names the rule.
#![forbid(unsafe_code)]

pub mod audit;
pub mod ledger;
pub mod policy;

pub use audit::{AuditEntry, AuditLog};
pub use ledger::{Ledger, LedgerError};
pub use policy::{Analyst, Budget, Decision, Policy, PrivacyPolicy};
