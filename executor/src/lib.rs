//! Council's executor: the ring, the encodings, secret sharing and the MPC
//! engines, over Arrow batches.
//!
//! Invariants:
//! - Nothing here trusts what a peer sends: every batch is checked for shape,
//!   types and public companions before use, and errors name the peer.
//! - Engines take and return [`SharedTable`]s (shares with their public group
//!   keys), so an engine is a choice per query, not a fork of the code.
//! - The executor knows nothing of gateways, SQL or policies; it talks to
//!   peers only through the [`Transport`] trait.
#![forbid(unsafe_code)]

pub mod additive;
pub mod encode;
pub mod groups;
pub mod noise;
pub mod ring;
pub mod shares;
pub mod transport;

pub use additive::AdditiveEngine;
pub use groups::GroupIndex;
pub use shares::{ShareColumn, SharedTable, Width};
pub use transport::{AbortKind, AbortReason, InMemoryNetwork, Round, Transport, TransportError};

/// An engine's first operator: every party contributes a table of
/// per-group values; the designated party learns the per-group sums and no
/// party learns anything else. Engines differ in how (additive N-party
/// sharing now; replicated 3-party sharing with comparisons next), so the
/// gateway picks one per query from the plan's options.
#[async_trait::async_trait]
pub trait SecureSum: Send + Sync {
    async fn sum_and_reveal(
        &self,
        transport: &dyn Transport,
        input: &SharedTable,
    ) -> Result<Option<Vec<Vec<arrow::datatypes::i256>>>, ExecError>;
}

/// Why a secure computation could not finish. Nothing is revealed after any
/// of these.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("peer {peer} sent a malformed share batch: {reason}")]
    Malformed { peer: String, reason: String },
    #[error("{0}")]
    Encode(String),
}
