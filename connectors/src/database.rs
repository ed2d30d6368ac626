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
    /// Whether the database computes the partial aggregates (default) or
    /// only filters, returning rows (for measuring what pushdown saves).
    aggregate: bool,
}

impl DatabaseSource {
    /// Checks every table against the catalog and reports every mismatch at
    /// once.
    pub async fn open(
        db: Arc<dyn Database>,
        tables: Vec<SqlTable>,
        partitions: Option<usize>,
    ) -> Result<Self, SourceError> {
        let shapes =
            SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
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
            aggregate: true,
        })
    }

    /// The database only filters; the gateway aggregates the rows it
    /// returns. For benchmarks: pushdown is always better where it applies.
    pub fn without_aggregate_pushdown(mut self) -> Self {
        self.aggregate = false;
        self
    }

    /// Every row of a table, for the plaintext reference of the demo and the
    /// tests only. The gateway never calls this: raw rows never leave a party.
    pub async fn read_rows_for_reference(
        &self,
        table: &str,
    ) -> Result<Vec<RecordBatch>, SourceError> {
        let t = self.tables.get(table).ok_or_else(|| SourceError::Table {
            table: table.to_string(),
            reason: format!("not held by {}", self.db.describe()),
        })?;
        let (sql, columns) = crate::sql::select_columns(self.db.dialect(), t, None);
        self.db
            .query(sql, columns)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// What the database runs for `part`, and what is left to the gateway.
    pub async fn plan(&self, part: &LocalPart) -> Result<(SourcePlan, SchemaRef), SourceError> {
        let run = |e: datafusion::error::DataFusionError| {
            SourceError::Run(planner::plan::clean_df_error(&e.to_string()))
        };
        let table = self
            .tables
            .get(&part.table)
            .ok_or_else(|| SourceError::Table {
                table: part.table.clone(),
                reason: format!("not held by {}", self.db.describe()),
            })?;
        let df = self.shapes.table(part.table.as_str()).await.map_err(run)?;
        let input = df.schema().clone();
        let output = apply_local_part(df, part, part.filter.clone()).map_err(run)?;
        let output: SchemaRef = Arc::new(output.schema().as_arrow().clone());
        Ok((
            plan_source(
                self.db.dialect(),
                table,
                part,
                &input,
                &output,
                self.aggregate,
            ),
            output,
        ))
    }
}

#[async_trait::async_trait]
impl LocalSource for DatabaseSource {
    fn describe(&self) -> Vec<String> {
        self.tables
            .values()
            .map(|t| {
                format!(
                    "{}: {} {} in {}",
                    t.table.name,
                    self.db.dialect().name(),
                    t.local,
                    self.db.describe()
                )
            })
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
            let batches: Vec<RecordBatch> = rows
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
            return batches
                .into_iter()
                .map(|b| {
                    RecordBatch::try_new(output.clone(), b.columns().to_vec()).map_err(|e| {
                        SourceError::Run(format!(
                            "{} returned an unexpected result: {e}",
                            self.db.describe()
                        ))
                    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteDatabase;
    use crate::{FileFormat, FileSource, TableFile};
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use planner::{Catalog, QueryOptions};

    const CATALOG: &str = r#"[tables.t]
columns = [
  { name = "g", type = "text", domain = ["a", "b", "c"] },
  { name = "h", type = "int", domain = { min = 1, max = 3 } },
  { name = "flag", type = "bool", domain = [true, false] },
  { name = "x", type = "int" },
  { name = "f", type = "float", scale = 2 },
  { name = "day", type = "date" },
  { name = "label", type = "text" },
]"#;

    type Row = (
        Option<&'static str>,
        Option<i64>,
        Option<bool>,
        Option<i64>,
        Option<f64>,
        Option<&'static str>,
        Option<&'static str>,
    );

    /// The same rows as CSV (read by DataFusion) and as a SQLite table with
    /// other column names.
    fn write_both(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let rows: Vec<Row> = vec![
            (
                Some("a"),
                Some(1),
                Some(true),
                Some(10),
                Some(1.25),
                Some("2024-01-05"),
                Some("Ab"),
            ),
            (
                Some("a"),
                Some(2),
                Some(false),
                Some(-3),
                None,
                Some("2024-02-01"),
                Some("ab"),
            ),
            (Some("b"), Some(1), None, None, Some(-0.5), None, None),
            (
                None,
                Some(3),
                Some(true),
                Some(7),
                Some(2.75),
                Some("2023-12-31"),
                Some("abc"),
            ),
            (
                Some("c"),
                None,
                Some(false),
                Some(1 << 40),
                Some(100.0),
                Some("2024-03-03"),
                Some("x"),
            ),
            (
                Some("b"),
                Some(2),
                Some(true),
                Some(0),
                Some(0.01),
                Some("2024-01-01"),
                Some("AB"),
            ),
        ];
        let csv_path = dir.join("t.csv");
        let mut csv = String::from("g,h,flag,x,f,day,label\n");
        let o = |v: Option<String>| v.unwrap_or_default();
        for r in &rows {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{}\n",
                o(r.0.map(str::to_string)),
                o(r.1.map(|v| v.to_string())),
                o(r.2.map(|v| v.to_string())),
                o(r.3.map(|v| v.to_string())),
                o(r.4.map(|v| v.to_string())),
                o(r.5.map(str::to_string)),
                o(r.6.map(str::to_string)),
            ));
        }
        std::fs::write(&csv_path, csv).unwrap();
        let db_path = dir.join("party.db");
        let c = rusqlite::Connection::open(&db_path).unwrap();
        c.execute_batch(
            "CREATE TABLE visits (grp TEXT, h INTEGER, flag BOOLEAN, x INTEGER, f REAL, day DATE, label TEXT);",
        )
        .unwrap();
        for r in &rows {
            c.execute(
                "INSERT INTO visits VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                rusqlite::params![r.0, r.1, r.2, r.3, r.4, r.5, r.6],
            )
            .unwrap();
        }
        (csv_path, db_path)
    }

    fn sorted(batches: &[RecordBatch]) -> Vec<String> {
        let text = pretty_format_batches(batches).unwrap().to_string();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with('|'))
            .skip(1)
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    }

    #[tokio::test]
    async fn sqlite_answers_equal_datafusion_pushed_down_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let (csv, db) = write_both(dir.path());
        let cat = Catalog::from_toml(CATALOG, "c").unwrap();
        let def = cat.table("t").unwrap().clone();
        let files = FileSource::open(
            vec![TableFile {
                table: def.clone(),
                path: csv,
                format: FileFormat::Csv,
                renames: Default::default(),
            }],
            None,
        )
        .await
        .unwrap();
        let sqlite = DatabaseSource::open(
            Arc::new(SqliteDatabase::open(&db).unwrap()),
            vec![SqlTable {
                table: def,
                local: "visits".into(),
                renames: [("g".to_string(), "grp".to_string())].into_iter().collect(),
            }],
            None,
        )
        .await
        .unwrap();
        // (query, pushed down entirely?)
        let queries = [
            // Float sums and squares are computed in the gateway (SQLite
            // clamps, overflows or turns them into REAL).
            ("SELECT g, COUNT(*), SUM(x), AVG(f) FROM t GROUP BY g", false),
            ("SELECT h, flag, COUNT(x), SUM(f), VAR_SAMP(x) FROM t WHERE x > -5 AND g IN ('a', 'b') GROUP BY h, flag", false),
            ("SELECT g, COUNT(*), SUM(x), AVG(x) FROM t GROUP BY g", true),
            ("SELECT COUNT(*), SUM(x) FROM t WHERE label IS NOT NULL AND NOT flag", true),
            ("SELECT g, COUNT(*) FROM t WHERE label LIKE 'a%' GROUP BY g", false),
            ("SELECT g, SUM(x) FROM t WHERE day >= DATE '2024-01-01' GROUP BY g", false),
            ("SELECT COUNT(*) FROM t WHERE x / 2 > 1", false),
            ("SELECT COUNT(*), SUM(x) FROM t WHERE g = 'zzz'", true),
        ];
        for (sql, pushed) in queries {
            let plan = planner::plan_query(sql, &cat, &["p".into()], &QueryOptions::default())
                .await
                .unwrap();
            let (sp, _) = sqlite.plan(&plan.local).await.unwrap();
            assert_eq!(sp.residual.is_none(), pushed, "{sql}: {sp:?}");
            let explained = sqlite.explain(&plan.local).await.join("\n");
            assert!(explained.contains("sent to SQLite"), "{explained}");
            if !pushed {
                assert!(explained.contains("not pushed down"), "{explained}");
            }
            eprintln!("{sql}\n  {explained}");
            let want = files.run(&plan.local).await.unwrap();
            let got = sqlite.run(&plan.local).await.unwrap();
            assert_eq!(sorted(&got), sorted(&want), "{sql}\n{}", sp.sql);
            assert_eq!(got[0].schema(), want[0].schema(), "{sql}");
        }
        // Under differential privacy: clamped arguments and at most 2 rows
        // per value of h, computed in the gateway over the rows SQLite
        // returns; the same rows are kept whatever order they come in.
        let dp = planner::privacy::DpParams {
            mechanism: planner::privacy::Mechanism::Laplace,
            epsilon_micro: 1_000_000,
            delta: 0.0,
            colluders: 0,
            clamps: [(
                "x".to_string(),
                planner::privacy::Clamp {
                    lo: "-3".into(),
                    hi: "3".into(),
                },
            )]
            .into_iter()
            .collect(),
            individual_id: Some("h".into()),
            max_rows: 2,
            min_group_size: 0,
            required_by: vec!["p".into()],
        };
        let sql = "SELECT g, COUNT(*), SUM(x) FROM t WHERE x > -50 GROUP BY g";
        let plan = planner::plan_query(sql, &cat, &["p".into()], &QueryOptions::default())
            .await
            .unwrap()
            .with_privacy(dp)
            .unwrap();
        let explained = sqlite.explain(&plan.local).await.join("\n");
        assert!(
            explained.contains("keeps at most 2 row(s) per h"),
            "{explained}"
        );
        let want = files.run(&plan.local).await.unwrap();
        let got = sqlite.run(&plan.local).await.unwrap();
        assert_eq!(sorted(&got), sorted(&want), "{explained}");
        // At most 2 rows for each of h = 1, 2, 3 (NULL ids dropped).
        let rows: i64 = got
            .iter()
            .map(|b| {
                arrow::compute::sum(
                    b.column(1)
                        .as_any()
                        .downcast_ref::<arrow::array::Int64Array>()
                        .unwrap(),
                )
                .unwrap_or(0)
            })
            .sum();
        assert!(rows <= 6, "{rows} rows kept");
    }

    #[tokio::test]
    async fn sqlite_mismatches_are_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (_, db) = write_both(dir.path());
        let cat = Catalog::from_toml(
            "[tables.t]\ncolumns = [{name = \"g\", type = \"int\"}, {name = \"x\", type = \"decimal(10,2)\"}, {name = \"nope\", type = \"int\"}]",
            "c",
        )
        .unwrap();
        let table = |local: &str| SqlTable {
            table: cat.table("t").unwrap().clone(),
            local: local.into(),
            renames: [("g".to_string(), "grp".to_string())].into_iter().collect(),
        };
        let db = Arc::new(SqliteDatabase::open(&db).unwrap());
        let Err(e) = DatabaseSource::open(db.clone(), vec![table("visits")], None).await else {
            panic!("accepted a mismatching table");
        };
        let text = e.to_string();
        assert!(text.contains("(3 problem(s))"), "{text}");
        assert!(
            text.contains("table t, column g: expected int, found TEXT"),
            "{text}"
        );
        assert!(text.contains("no exact decimal type"), "{text}");
        assert!(text.contains("found no column `nope`"), "{text}");
        let Err(e) = DatabaseSource::open(db, vec![table("missing")], None).await else {
            panic!("accepted a missing table");
        };
        assert!(e.to_string().contains("no table or view `missing`"), "{e}");
    }
}
