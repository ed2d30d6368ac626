//! Where a party's data lives. A [`LocalSource`] runs a plan's local part
//! (filter, then per-group partial aggregates) on the party's own rows and
//! returns only the per-group partials; raw rows never leave it.
//!
//! Sources: CSV and Parquet files through DataFusion (the embedded
//! default), and SQL databases (PostgreSQL, SQLite) that run the local part
//! themselves ([`database`]). [`Sources`] routes each federated table to the
//! source that holds it.
#![forbid(unsafe_code)]

pub mod database;
pub mod files;
pub mod flight_sql;
pub mod postgres;
pub mod sql;
pub mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use database::{Database, DatabaseSource};
pub use files::{FileFormat, FileSource, TableFile};
pub use sql::SqlTable;

use datafusion::arrow::array::RecordBatch;
use datafusion::common::Column;
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::Expr;
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
    /// How `part` is computed, for EXPLAIN: what is sent where.
    async fn explain(&self, part: &LocalPart) -> Vec<String>;
    /// Runs `part`; the batches hold the group columns, then `p0..pk`.
    async fn run(&self, part: &LocalPart) -> Result<Vec<RecordBatch>, SourceError>;
}

/// The local part over `df` (the federated table's rows), with `filter` in
/// place of the part's own (the part of it a database did not apply).
pub fn apply_local_part(
    df: DataFrame,
    part: &LocalPart,
    filter: Option<Expr>,
) -> datafusion::error::Result<DataFrame> {
    let df = match filter {
        Some(f) => df.filter(f)?,
        None => df,
    };
    // Differential privacy's contribution bound: at most k rows per
    // individual, and none without an id. Which k is deterministic (ordered
    // by the columns the part uses; rows equal on them are interchangeable),
    // so a rerun bounds the same rows whatever order the source returns.
    let df = match &part.bound {
        Some((id, k)) => {
            use datafusion::logical_expr::{col, lit, ExprFunctionExt};
            let id = Expr::Column(Column::new_unqualified(id.clone()));
            let mut order: Vec<Expr> = part
                .group_columns
                .iter()
                .map(|g| Expr::Column(Column::new_unqualified(g.clone())))
                .collect();
            for p in &part.partials {
                if let Some(a) = &p.arg {
                    if !order.contains(a) {
                        order.push(a.clone());
                    }
                }
            }
            if order.is_empty() {
                // COUNT(*) alone uses no column: any k rows of an
                // individual are interchangeable, but the window still
                // needs an order.
                order.push(id.clone());
            }
            let rn = datafusion::functions_window::expr_fn::row_number()
                .partition_by(vec![id.clone()])
                .order_by(order.into_iter().map(|e| e.sort(true, true)).collect())
                .build()?
                .alias("__council_rn");
            df.filter(id.is_not_null())?
                .window(vec![rn])?
                .filter(col("__council_rn").lt_eq(lit(*k)))?
        }
        None => df,
    };
    let groups: Vec<Expr> = part
        .group_columns
        .iter()
        .map(|g| Expr::Column(Column::new_unqualified(g.clone())))
        .collect();
    df.aggregate(groups, part.aggregate_exprs())
}

/// Each federated table at the source that holds it.
#[derive(Default)]
pub struct Sources {
    by_table: BTreeMap<String, Arc<dyn LocalSource>>,
    all: Vec<Arc<dyn LocalSource>>,
}

impl Sources {
    /// Adds `source`, holding `tables`.
    pub fn add(&mut self, source: Arc<dyn LocalSource>, tables: impl IntoIterator<Item = String>) {
        for t in tables {
            self.by_table.insert(t, source.clone());
        }
        self.all.push(source);
    }

    fn of(&self, part: &LocalPart) -> Result<&Arc<dyn LocalSource>, SourceError> {
        self.by_table
            .get(&part.table)
            .ok_or_else(|| SourceError::Table {
                table: part.table.clone(),
                reason: "this party has no source for it".into(),
            })
    }
}

#[async_trait::async_trait]
impl LocalSource for Sources {
    fn describe(&self) -> Vec<String> {
        self.all.iter().flat_map(|s| s.describe()).collect()
    }

    async fn explain(&self, part: &LocalPart) -> Vec<String> {
        match self.of(part) {
            Ok(s) => s.explain(part).await,
            Err(e) => vec![e.to_string()],
        }
    }

    async fn run(&self, part: &LocalPart) -> Result<Vec<RecordBatch>, SourceError> {
        self.of(part)?.run(part).await
    }
}
