//! SQLite database files (rusqlite, with SQLite compiled in), opened read
//! only. Each query opens its own connection on a blocking thread and
//! streams batches back; a query that is dropped stops reading.

use std::path::{Path, PathBuf};
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use futures::stream::BoxStream;
use futures::StreamExt;
use planner::ColumnType;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};

use crate::database::Database;
use crate::sql::{BatchWriter, Dialect, OutColumn, SqlTable, Value};
use crate::SourceError;

pub struct SqliteDatabase {
    path: PathBuf,
}

impl SqliteDatabase {
    /// The file must exist; it is never written.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let db = SqliteDatabase {
            path: path.to_path_buf(),
        };
        db.connect()?;
        Ok(db)
    }

    fn connect(&self) -> Result<Connection, SourceError> {
        if !self.path.is_file() {
            return Err(SourceError::Run(format!(
                "SQLite database {} does not exist",
                self.path.display()
            )));
        }
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| self.error(e))?;
        c.busy_timeout(Duration::from_secs(10))
            .map_err(|e| self.error(e))?;
        Ok(c)
    }

    fn error(&self, e: rusqlite::Error) -> SourceError {
        SourceError::Run(format!("SQLite {}: {e}", self.path.display()))
    }
}

/// Whether a file is a SQLite database by its name (`*.sqlite`, `*.db`).
pub fn is_sqlite_file(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "sqlite" | "sqlite3" | "db"))
}

/// The SQLite files of a folder, sorted.
pub fn sqlite_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_sqlite_file(p))
        .collect();
    v.sort();
    v
}

/// The first SQLite file of `dir` that holds a table or view `table`.
pub fn file_holding(dir: &Path, table: &str) -> Option<PathBuf> {
    sqlite_files(dir).into_iter().find(|f| {
        SqliteDatabase::open(f)
            .and_then(|db| db.tables())
            .is_ok_and(|ts| ts.iter().any(|(n, _)| n.eq_ignore_ascii_case(table)))
    })
}

/// Every row of `table` in a SQLite file, for plaintext references only.
pub async fn read_rows_for_reference(
    path: &Path,
    table: &planner::TableDef,
) -> Result<Vec<RecordBatch>, SourceError> {
    let db = std::sync::Arc::new(SqliteDatabase::open(path)?);
    let t = SqlTable {
        table: table.clone(),
        local: table.name.clone(),
        renames: Default::default(),
    };
    crate::DatabaseSource::open(db, vec![t], Some(1))
        .await?
        .read_rows_for_reference(&table.name)
        .await
}

/// A table's columns: (name, declared type).
pub type Columns = Vec<(String, String)>;

impl SqliteDatabase {
    /// The tables and views of the file, each with its columns and their
    /// declared types, sorted by name.
    pub fn tables(&self) -> Result<Vec<(String, Columns)>, SourceError> {
        let c = self.connect()?;
        let mut stmt = c
            .prepare(
                "SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') \
                 AND name NOT LIKE 'sqlite_%' ORDER BY name",
            )
            .map_err(|e| self.error(e))?;
        let names: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.error(e))?;
        let mut cols = c
            .prepare("SELECT name, type FROM pragma_table_xinfo(?1)")
            .map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        for n in names {
            let found: Vec<(String, String)> = cols
                .query_map([&n], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|rows| rows.collect())
                .map_err(|e| self.error(e))?;
            out.push((n, found));
        }
        Ok(out)
    }
}

/// The federated type a SQLite column's declared type suggests (for
/// inferring a demo catalog), or None.
pub fn suggested_type(declared: &str) -> Option<&'static str> {
    let t = declared.to_ascii_uppercase();
    if t.contains("BOOL") {
        return Some("bool");
    }
    if t.contains("TIME") {
        return Some("timestamp");
    }
    if t.contains("DATE") {
        return Some("date");
    }
    match affinity(declared) {
        "INTEGER" => Some("int"),
        "REAL" => Some("float"),
        "TEXT" => Some("text"),
        _ => None,
    }
}

/// SQLite's type affinity of a declared column type (its documented rules).
fn affinity(declared: &str) -> &'static str {
    let t = declared.to_ascii_uppercase();
    if t.contains("INT") {
        "INTEGER"
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        "TEXT"
    } else if t.contains("BLOB") || t.is_empty() {
        "BLOB"
    } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
        "REAL"
    } else {
        "NUMERIC"
    }
}

/// Why a column of declared type `declared` cannot hold `want` exactly.
fn mismatch(want: &ColumnType, declared: &str) -> Option<String> {
    // No declared type: a view's computed column (`CASE ... END`,
    // `NULLIF(...)`). Its values are checked one by one as they are read
    // (a REAL where an exact decimal or an integer sum is due is an error),
    // so it is accepted here.
    if declared.trim().is_empty() {
        return None;
    }
    let a = affinity(declared);
    let ok = match want {
        ColumnType::Int => a == "INTEGER",
        // SQLite has no exact decimal type: exact decimals are kept as text
        // ('12.50'), read exactly, and summed in the gateway. Any other
        // affinity would store them as REAL, rounded.
        ColumnType::Decimal { scale, .. } if *scale > 0 => {
            if a == "TEXT" {
                return None;
            }
            return Some(format!(
                "found {declared} ({a} affinity): SQLite has no exact decimal type and would store these values \
                 rounded as REAL; keep them as text in a TEXT column ('12.50'), or declare the federated column `float`"
            ));
        }
        ColumnType::Decimal { .. } => a == "INTEGER",
        ColumnType::Float { .. } => a == "REAL" || a == "INTEGER",
        ColumnType::Text => a == "TEXT",
        ColumnType::Bool => a == "INTEGER" || a == "NUMERIC",
        ColumnType::Date | ColumnType::Timestamp => a == "TEXT" || a == "NUMERIC",
    };
    (!ok).then(|| {
        format!(
            "found {} ({a} affinity)",
            if declared.is_empty() {
                "no declared type"
            } else {
                declared
            }
        )
    })
}

#[async_trait::async_trait]
impl Database for SqliteDatabase {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    async fn check(&self, t: &SqlTable) -> Result<Vec<String>, SourceError> {
        let c = self.connect()?;
        let (schema, name) = t.schema_and_name();
        let mut stmt = c
            .prepare("SELECT name, type FROM pragma_table_xinfo(?1, ?2)")
            .map_err(|e| self.error(e))?;
        let found: Vec<(String, String)> = stmt
            .query_map([name, schema.unwrap_or("main")], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.error(e))?;
        let fed = &t.table.name;
        if found.is_empty() {
            return Ok(vec![format!(
                "table {fed}: no table or view `{}` in SQLite {}",
                t.local,
                self.path.display()
            )]);
        }
        let place = format!("SQLite {} `{}`", self.path.display(), t.local);
        let problems = crate::sql::column_problems(t, &place, |local, want| {
            let (_, declared) = found.iter().find(|(n, _)| n.eq_ignore_ascii_case(local))?;
            Some(mismatch(want, declared))
        });
        Ok(problems)
    }

    fn query(
        &self,
        sql: String,
        columns: Vec<OutColumn>,
    ) -> BoxStream<'static, Result<RecordBatch, SourceError>> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<RecordBatch, SourceError>>(4);
        let db = SqliteDatabase {
            path: self.path.clone(),
        };
        tokio::task::spawn_blocking(move || {
            let result = (|| -> Result<(), SourceError> {
                let c = db.connect()?;
                let mut w = BatchWriter::new(&columns, &format!("SQLite {}", db.path.display()))?;
                let mut stmt = c.prepare(&sql).map_err(|e| db.error(e))?;
                let mut rows = stmt.query([]).map_err(|e| db.error(e))?;
                while let Some(row) = rows.next().map_err(|e| db.error(e))? {
                    let batch = w.push_row(|i| {
                        Ok(match row.get_ref(i).map_err(|e| e.to_string())? {
                            ValueRef::Null => Value::Null,
                            ValueRef::Integer(v) => Value::Int(v),
                            ValueRef::Real(v) => Value::Float(v),
                            ValueRef::Text(t) => Value::Text(
                                std::str::from_utf8(t)
                                    .map_err(|_| "text that is not UTF-8".to_string())?
                                    .to_string(),
                            ),
                            ValueRef::Blob(_) => return Err("a BLOB".into()),
                        })
                    })?;
                    if let Some(b) = batch {
                        if tx.blocking_send(Ok(b)).is_err() {
                            return Ok(()); // the query was dropped
                        }
                    }
                }
                if w.pending() > 0 || columns.is_empty() {
                    let _ = tx.blocking_send(Ok(w.flush()?));
                }
                Ok(())
            })();
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(e));
            }
        });
        tokio_stream_from(rx)
    }
}

/// A receiver as a stream.
pub(crate) fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> BoxStream<'static, T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinities_follow_sqlite_rules() {
        assert_eq!(affinity("BIGINT"), "INTEGER");
        assert_eq!(affinity("varchar(20)"), "TEXT");
        assert_eq!(affinity("DOUBLE PRECISION"), "REAL");
        assert_eq!(affinity("DECIMAL(10,2)"), "NUMERIC");
        assert_eq!(affinity(""), "BLOB");
        assert!(
            mismatch(&ColumnType::Bool, "").is_none(),
            "a view's computed column"
        );
        assert!(mismatch(&ColumnType::Int, "INTEGER").is_none());
        assert!(mismatch(&ColumnType::Text, "INTEGER").is_some());
        let d = mismatch(
            &ColumnType::Decimal {
                precision: 10,
                scale: 2,
            },
            "DECIMAL(10,2)",
        )
        .unwrap_or_default();
        assert!(d.contains("no exact decimal type"), "{d}");
        let text = ColumnType::Decimal {
            precision: 10,
            scale: 2,
        };
        assert!(mismatch(&text, "TEXT").is_none());
    }
}
