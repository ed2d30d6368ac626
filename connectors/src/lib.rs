//! Where a party's data lives. A [`LocalSource`] runs a plan's local part
//! (filter, then per-group partial aggregates) on the party's own rows and
//! returns only the per-group partials; raw rows never leave it.
//!
//! So far: CSV and Parquet files through DataFusion (the embedded default).
#![forbid(unsafe_code)]

pub mod files;

pub use files::{FileFormat, FileSource, TableFile};

use datafusion::arrow::array::RecordBatch;
use planner::LocalPart;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("local table `{table}`: {reason}")]
    Table { table: String, reason: String },
    #[error("running the local part failed: {0}")]
    Run(String),
    /// Every way the local data differs from the federated catalog, found
    /// at startup, one line each.
    #[error("the local data does not match the federated catalog ({} problem(s)):\n  {}", .0.len(), .0.join("\n  "))]
    Mismatch(Vec<String>),
}

/// A party's data, able to run a local part.
#[async_trait::async_trait]
pub trait LocalSource: Send + Sync {
    /// One line per table, for EXPLAIN and startup logs.
    fn describe(&self) -> Vec<String>;
    /// Runs `part`; the batches hold the group columns, then `p0..pk`.
    async fn run(&self, part: &LocalPart) -> Result<Vec<RecordBatch>, SourceError>;
}
