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
pub mod gate;
pub mod groups;
pub mod noise;
pub mod pipeline;
pub mod program;
pub mod rep3;
pub mod replicated;
pub mod ring;
pub mod shares;
pub mod transport;

pub use additive::AdditiveEngine;
pub use groups::GroupIndex;
pub use pipeline::Pipeline;
pub use program::{Bound, Op, Program, Roles, Stage};
pub use replicated::ReplicatedEngine;
pub use shares::{ShareColumn, SharedTable, Width};
pub use transport::{
    AbortKind, AbortReason, InMemoryNetwork, Inbound, Outbound, Step, Transport, TransportError,
};

/// An MPC engine: runs a query's [`Program`] over a [`Transport`] whose
/// messages are the engine's numbered [`Step`]s. The gateway picks one per
/// query from the plan's options, asks it what each step's messages may be
/// before it decodes a byte of them, and hands it this party's encoded
/// input; adding an engine or a step touches the planner and the executor,
/// and the gateway only where a new kind of message is needed.
///
/// Three parties sum one value each; only the leader, `a`, learns the sum:
///
/// ```
/// use arrow::datatypes::i256;
/// use executor::{AdditiveEngine, Engine, InMemoryNetwork, Program, SharedTable, Width};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let parties: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
/// let program = Program::sum_and_reveal(&parties, "a");
/// let net = InMemoryNetwork::connect(&parties, std::time::Duration::from_secs(5));
/// let runs = net.into_iter().zip([5i128, -2, 40]).zip(&parties).map(|((t, x), me)| {
///     let engine = AdditiveEngine::for_program(&program, me).unwrap();
///     // Each party's input, within the engine's bound for its ring.
///     let columns = engine.encode(&[vec![i256::from_i128(x)]], &[Width::Z128]).unwrap();
///     let input = SharedTable { keys: vec![], columns, rows: 1 };
///     async move { engine.run(&t, &input).await.unwrap() }
/// });
/// let out = futures::future::join_all(runs).await;
/// assert_eq!(out[0], Some(vec![vec![i256::from_i128(43)]]));
/// assert_eq!((&out[1], &out[2]), (&None, &None));
/// # }
/// ```
#[async_trait::async_trait]
pub trait Engine: Send + Sync {
    /// The engine's name, as EXPLAIN shows it.
    fn name(&self) -> &'static str;

    /// Whether this engine runs `program`; the error names the operator or
    /// role it does not support.
    fn supports(&self, program: &Program) -> Result<(), String>;

    /// This party's input as ring elements: each shared column in its
    /// ring, every value within the bound that keeps the engine's sums
    /// from wrapping. `Err` names the first value that does not fit.
    fn encode(
        &self,
        values: &[Vec<arrow::datatypes::i256>],
        widths: &[Width],
    ) -> Result<Vec<ShareColumn>, encode::OutOfRange>;

    /// What this engine's input holds for a group that a minimum group size
    /// left out ([`crate::gate`]): the encoded value that contributes
    /// nothing (zero for a sum).
    fn neutral(&self) -> u64 {
        0
    }

    /// The message `from` may send this party at `step` of a query whose
    /// input has `shape`, known before it is decoded; `None`: the protocol
    /// has no such message.
    fn expects(&self, from: &str, step: Step, shape: &TableShape) -> Option<MessageShape>;

    /// Runs the program on this party's encoded `input` (its partials for
    /// every group, with the public keys). Returns the revealed totals at a
    /// result party, `None` at every other.
    async fn run(
        &self,
        transport: &dyn Transport,
        input: &SharedTable,
    ) -> Result<Option<Vec<Vec<arrow::datatypes::i256>>>, ExecError>;
}

/// The public shape of a query's shared input: what every party knows
/// from the plan before any share exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    /// One row per group of the public domain (one without GROUP BY).
    pub rows: usize,
    /// The ring of each shared column.
    pub widths: Vec<Width>,
    /// Columns of public group keys that travel with a share.
    pub key_columns: usize,
    /// Bytes of text the group keys take.
    pub key_bytes: u64,
}

/// What one step's message from one party may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageShape {
    pub rows: usize,
    pub max_cols: usize,
    /// Bytes of key text it may carry.
    pub key_bytes: u64,
    /// It may arrive before this party received `start` (a peer that
    /// started first sends it at once); otherwise it is refused until then.
    pub before_start: bool,
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
