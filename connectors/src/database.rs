//! A SQL database as a [`LocalSource`]: the local part is planned with
//! [`crate::sql::plan_source`] and run inside the database; whatever could
//! not be sent is computed here, streaming, over the rows it returns.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::datasource::MemTable;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::stream::BoxStream;
use futures::StreamExt;
use planner::LocalPart;

use crate::sql::{plan_source, Dialect, OutColumn, SourcePlan, SqlTable};
use crate::{apply_local_part, LocalSource, SourceError};

/// What a database connector provides.
#[async_trait::async_trait]
pub trait Database: Send + Sync {
    fn dialect(&self) -> Dialect;
    /// Where the data is, without secrets: for EXPLAIN and the logs.
    fn describe(&self) -> String;
    /// Every way `table` differs from the federated catalog (empty: none).
    async fn check(&self, table: &SqlTable) -> Result<Vec<String>, SourceError>;
    /// Runs `sql` and streams its rows as batches of `columns`.
    fn query(
        &self,
        sql: String,
        columns: Vec<OutColumn>,
    ) -> BoxStream<'static, Result<RecordBatch, SourceError>>;
}

pub struct DatabaseSource {
    db: Arc<dyn Database>,
    tables: BTreeMap<String, SqlTable>,
    /// The federated tables, empty: for the local part's schemas.
    shapes: SessionContext,
    partitions: Option<usize>,
}

impl DatabaseSource {
    /// Checks every table against the catalog and reports every mismatch at
    /// once.
    pub async fn open(
        db: Arc<dyn Database>,
        tables: Vec<SqlTable>,
        partitions: Option<usize>,
    ) -> Result<Self, SourceError> {
        let shapes = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
        let mut problems = Vec::new();
        let mut by_name = BTreeMap::new();
        for t in tables {
            for k in t.renames.keys() {
                if t.table.column(k).is_none() {
                    problems.push(format!(
                        "table {}: `columns` renames `{k}`, which is not a column of the federated table",
                        t.table.name
                    ));
                }
            }
            problems.extend(db.check(&t).await?);
            let empty = MemTable::try_new(t.table.schema(), vec![vec![]])
                .map_err(|e| SourceError::Run(e.to_string()))?;
            shapes
                .register_table(t.table.name.as_str(), Arc::new(empty))
                .map_err(|e| SourceError::Run(e.to_string()))?;
            by_name.insert(t.table.name.clone(), t);
        }
        if !problems.is_empty() {
            return Err(SourceError::Mismatch(problems));
        }
        Ok(DatabaseSource {
            db,
            tables: by_name,
            shapes,
            partitions,
        })
    }

    /// What the database runs for `part`, and what is left to the gateway.
    pub async fn plan(&self, part: &LocalPart) -> Result<(SourcePlan, SchemaRef), SourceError> {
        let run = |e: datafusion::error::DataFusionError| {
            SourceError::Run(planner::plan::clean_df_error(&e.to_string()))
        };
        let table = self.tables.get(&part.table).ok_or_else(|| SourceError::Table {
            table: part.table.clone(),
            reason: format!("not held by {}", self.db.describe()),
        })?;
        let df = self.shapes.table(part.table.as_str()).await.map_err(run)?;
        let input = df.schema().clone();
        let output = apply_local_part(df, part, part.filter.clone()).map_err(run)?;
        let output: SchemaRef = Arc::new(output.schema().as_arrow().clone());
        Ok((
            plan_source(self.db.dialect(), table, part, &input, &output),
            output,
        ))
    }
}

#[async_trait::async_trait]
impl LocalSource for DatabaseSource {
    fn describe(&self) -> Vec<String> {
        self.tables
            .values()
            .map(|t| format!("{}: {} {} in {}", t.table.name, self.db.dialect().name(), t.local, self.db.describe()))
            .collect()
    }

    async fn explain(&self, part: &LocalPart) -> Vec<String> {
        match self.plan(part).await {
            Ok((plan, _)) => plan.explain(self.db.dialect(), &self.db.describe()),
            Err(e) => vec![format!("cannot plan for {}: {e}", self.db.describe())],
        }
    }

    async fn run(&self, part: &LocalPart) -> Result<Vec<RecordBatch>, SourceError> {
        let (plan, output) = self.plan(part).await?;
        let rows = self.db.query(plan.sql.clone(), plan.columns.clone());
        let Some(residual) = plan.residual else {
            // The partials themselves: a few rows per group.
            let batches: Vec<RecordBatch> = rows.collect::<Vec<_>>().await.into_iter().collect::<Result<_, _>>()?;
            return batches
                .into_iter()
                .map(|b| {
                    RecordBatch::try_new(output.clone(), b.columns().to_vec())
                        .map_err(|e| SourceError::Run(format!("{} returned an unexpected result: {e}", self.db.describe())))
                })
                .collect();
        };
        // Rows: computed here, streaming, by DataFusion.
        let schema = crate::sql::BatchWriter::new(&plan.columns, "")?.schema();
        let table = StreamingTable::try_new(
            schema.clone(),
            vec![Arc::new(OneShot {
                schema,
                rows: Mutex::new(Some(rows)),
            })],
        )
        .map_err(|e| SourceError::Run(e.to_string()))?;
        let mut config = SessionConfig::new();
        if let Some(k) = self.partitions {
            config = config.with_target_partitions(k.max(1));
        }
        let ctx = SessionContext::new_with_config(config);
        let run = |e: datafusion::error::DataFusionError| {
            SourceError::Run(planner::plan::clean_df_error(&e.to_string()))
        };
        let df = ctx.read_table(Arc::new(table)).map_err(run)?;
        let df = apply_local_part(df, part, residual.filter).map_err(run)?;
        df.collect().await.map_err(run)
    }
}

/// A stream of rows, read once.
struct OneShot {
    schema: SchemaRef,
    rows: Mutex<Option<BoxStream<'static, Result<RecordBatch, SourceError>>>>,
}

impl std::fmt::Debug for OneShot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OneShot")
    }
}

impl PartitionStream for OneShot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let rows = self.rows.lock().ok().and_then(|mut r| r.take());
        let stream = match rows {
            Some(rows) => rows
                .map(|r| r.map_err(|e| datafusion::error::DataFusionError::External(Box::new(e))))
                .boxed(),
            None => futures::stream::once(async {
                Err(datafusion::error::DataFusionError::Internal(
                    "the source's rows were already read".into(),
                ))
            })
            .boxed(),
        };
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}
