//! CSV and Parquet files, read by DataFusion with the federated schema.

use std::path::{Path, PathBuf};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::Column;
use datafusion::logical_expr::{cast, Expr};
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionConfig, SessionContext};
use planner::{LocalPart, TableDef};

use crate::{LocalSource, SourceError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Csv,
    Parquet,
}

impl FileFormat {
    pub fn from_path(p: &Path) -> Option<Self> {
        match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "csv" => Some(FileFormat::Csv),
            "parquet" | "pq" => Some(FileFormat::Parquet),
            _ => None,
        }
    }
}

/// One federated table backed by a file (or a directory of files).
#[derive(Debug, Clone)]
pub struct TableFile {
    pub table: TableDef,
    pub path: PathBuf,
    pub format: FileFormat,
    /// Federated column name → the local file's column name, where they
    /// differ.
    pub renames: std::collections::BTreeMap<String, String>,
}

pub struct FileSource {
    ctx: SessionContext,
    described: Vec<String>,
}

impl FileSource {
    /// Registers every table, checking that its columns can be read exactly
    /// as the catalog declares them. A mismatch is refused here, at startup.
    /// `partitions`: DataFusion's target partitions for the local part
    /// (None: the number of cores).
    pub async fn open(
        tables: Vec<TableFile>,
        partitions: Option<usize>,
    ) -> Result<Self, SourceError> {
        let mut config = SessionConfig::new().with_information_schema(false);
        if let Some(k) = partitions {
            config = config.with_target_partitions(k.max(1));
        }
        let ctx = SessionContext::new_with_config(config);
        let mut described = Vec::new();
        // Every mismatch, reported at once.
        let mut problems = Vec::new();
        for t in tables {
            let name = t.table.name.clone();
            let err = |reason: String| SourceError::Table {
                table: name.clone(),
                reason,
            };
            let path = t
                .path
                .to_str()
                .ok_or_else(|| err(format!("path {} is not UTF-8", t.path.display())))?;
            if !t.path.exists() {
                problems.push(format!(
                    "table {name}: file {} does not exist",
                    t.path.display()
                ));
                continue;
            }
            for k in t.renames.keys() {
                if t.table.column(k).is_none() {
                    problems.push(format!(
                        "table {name}: `columns` renames `{k}`, which is not a column of the federated table"
                    ));
                }
            }
            let local_name = |c: &str| t.renames.get(c).cloned().unwrap_or_else(|| c.to_string());
            let catalog_schema = t.table.schema();
            let raw = format!("__raw_{name}");
            match t.format {
                FileFormat::Csv => {
                    // CSV columns are read by position, named as locally.
                    let fields: Vec<_> = catalog_schema
                        .fields()
                        .iter()
                        .map(|f| f.as_ref().clone().with_name(local_name(f.name())))
                        .collect();
                    let schema = arrow::datatypes::Schema::new(fields);
                    let ext = extension_of(&t.path, ".csv");
                    let opts = CsvReadOptions::new()
                        .has_header(true)
                        .schema(&schema)
                        .file_extension(&ext);
                    ctx.register_csv(&raw, path, opts)
                        .await
                        .map_err(|e| err(e.to_string()))?;
                }
                FileFormat::Parquet => {
                    let ext = extension_of(&t.path, ".parquet");
                    let opts = ParquetReadOptions::default().file_extension(&ext);
                    ctx.register_parquet(&raw, path, opts)
                        .await
                        .map_err(|e| err(e.to_string()))?;
                }
            }
            let df = ctx.table(&raw).await.map_err(|e| err(e.to_string()))?;
            let local = df.schema().clone();
            let mut exprs = Vec::new();
            for c in &t.table.columns {
                let want = c.ty.arrow_type();
                let lc = local_name(&c.name);
                let Some(field) = local.fields().iter().find(|f| f.name() == &lc) else {
                    problems.push(format!(
                        "table {name}, column {}: expected {}, found no column `{lc}` in {}",
                        c.name,
                        c.ty,
                        t.path.display()
                    ));
                    continue;
                };
                if !exact_cast(field.data_type(), &want) {
                    problems.push(format!(
                        "table {name}, column {}: expected {}, found {} in {}; it cannot be read exactly",
                        c.name,
                        c.ty,
                        field.data_type(),
                        t.path.display()
                    ));
                    continue;
                }
                let e = Expr::Column(Column::new_unqualified(lc));
                let e = if field.data_type() == &want {
                    e
                } else {
                    cast(e, want)
                };
                exprs.push(e.alias(c.name.clone()));
            }
            if exprs.len() != t.table.columns.len() {
                continue;
            }
            let view = df
                .select(exprs)
                .map_err(|e| err(e.to_string()))?
                .into_view();
            ctx.register_table(name.as_str(), view)
                .map_err(|e| err(e.to_string()))?;
            described.push(format!("{name}: {:?} {}", t.format, t.path.display()));
        }
        if !problems.is_empty() {
            return Err(SourceError::Mismatch(problems));
        }
        Ok(FileSource { ctx, described })
    }
}

fn extension_of(path: &Path, default: &str) -> String {
    if path.is_dir() {
        return default.to_string();
    }
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| format!(".{e}"))
        .unwrap_or_default()
}

/// Whether every value of `from` is represented exactly in `to`.
pub(crate) fn exact_cast(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    match (from, to) {
        (a, b) if a == b => true,
        (Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32, Int64) => true,
        (Float16 | Float32, Float64) => true,
        (Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32, Float64) => false,
        (Decimal128(p, s), Decimal128(tp, ts)) => {
            s <= ts && (*p as i16 - *s as i16) <= (*tp as i16 - *ts as i16)
        }
        (Int8 | Int16 | Int32 | UInt8 | UInt16, Decimal128(tp, ts)) => {
            *tp as i16 - *ts as i16 >= 10
        }
        (Int64 | UInt32, Decimal128(tp, ts)) => *tp as i16 - *ts as i16 >= 19,
        (Utf8 | LargeUtf8 | Utf8View, Utf8) => true,
        (Date32, Date32) => true,
        (
            Timestamp(TimeUnit::Second | TimeUnit::Millisecond | TimeUnit::Microsecond, None),
            Timestamp(TimeUnit::Microsecond, None),
        ) => true,
        _ => false,
    }
}

#[async_trait::async_trait]
impl LocalSource for FileSource {
    fn describe(&self) -> Vec<String> {
        self.described.clone()
    }

    async fn explain(&self, part: &LocalPart) -> Vec<String> {
        // What other parties see: the table and the file format, never the
        // local path (it says how this party's host is laid out).
        let format = self
            .described
            .iter()
            .find(|d| d.starts_with(&format!("{}:", part.table)))
            .and_then(|d| d.split_whitespace().nth(1))
            .unwrap_or("files");
        vec![format!(
            "computed in the gateway by DataFusion over {}: {format} files",
            part.table
        )]
    }

    async fn run(&self, part: &LocalPart) -> Result<Vec<RecordBatch>, SourceError> {
        let run = |e: datafusion::error::DataFusionError| {
            SourceError::Run(planner::plan::clean_df_error(&e.to_string()))
        };
        let df = self.ctx.table(part.table.as_str()).await.map_err(run)?;
        crate::apply_local_part(df, part, part.filter.clone())
            .map_err(run)?
            .collect()
            .await
            .map_err(run)
    }
}

/// A table's files in a party folder: `<dir>/<table>.csv`, `.parquet`, or a
/// folder `<dir>/<table>/` of such files.
pub fn find_table_file(dir: &Path, table: &TableDef) -> Option<TableFile> {
    for (ext, format) in [("csv", FileFormat::Csv), ("parquet", FileFormat::Parquet)] {
        let p = dir.join(format!("{}.{ext}", table.name));
        if p.is_file() {
            return Some(TableFile {
                table: table.clone(),
                path: p,
                format,
                renames: Default::default(),
            });
        }
    }
    let d = dir.join(&table.name);
    if d.is_dir() {
        let entries: Vec<PathBuf> = std::fs::read_dir(&d)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let format = entries.iter().find_map(|p| FileFormat::from_path(p))?;
        return Some(TableFile {
            table: table.clone(),
            path: d,
            format,
            renames: Default::default(),
        });
    }
    None
}

impl FileSource {
    /// Every row of a table, for the plaintext reference of the demo and the
    /// tests only. The gateway never calls this: raw rows never leave a party.
    pub async fn read_rows_for_reference(
        &self,
        table: &str,
    ) -> Result<Vec<RecordBatch>, SourceError> {
        let run = |e: datafusion::error::DataFusionError| SourceError::Run(e.to_string());
        self.ctx
            .table(table)
            .await
            .map_err(run)?
            .collect()
            .await
            .map_err(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use planner::{Catalog, QueryOptions};

    #[tokio::test]
    async fn runs_the_local_part_over_csv() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.csv"), "g,x\na,1.50\nb,2.25\na,\n,4\n").unwrap();
        let cat = Catalog::from_toml(
            "[tables.t]\ncolumns = [{name = \"g\", type = \"text\", domain = [\"a\", \"b\"]}, {name = \"x\", type = \"decimal(5,2)\"}]",
            "c",
        )
        .unwrap();
        let table = cat.table("t").unwrap().clone();
        let src = FileSource::open(vec![find_table_file(dir.path(), &table).unwrap()], None)
            .await
            .unwrap();
        let plan = planner::plan_query(
            "SELECT g, SUM(x) FROM t WHERE x > 1 GROUP BY g",
            &cat,
            &["p".into()],
            &QueryOptions::default(),
        )
        .await
        .unwrap();
        let out = src.run(&plan.local).await.unwrap();
        let text = pretty_format_batches(&out).unwrap().to_string();
        assert!(text.contains("| a | 1  | 1  | 1.50 |"), "{text}");
        let rows: usize = out.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 3, "{text}");
    }

    fn write_parquet(path: &Path) {
        use arrow::array::{Float64Array, Int64Array, StringArray};
        let batch = RecordBatch::try_from_iter(vec![
            (
                "grp",
                std::sync::Arc::new(StringArray::from(vec!["a", "b", "a"])) as _,
            ),
            (
                "amount",
                std::sync::Arc::new(Float64Array::from(vec![1.5, 2.0, 3.0])) as _,
            ),
            (
                "n",
                std::sync::Arc::new(Int64Array::from(vec![1, 2, 3])) as _,
            ),
        ])
        .unwrap();
        let f = std::fs::File::create(path).unwrap();
        let mut w =
            datafusion::parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[tokio::test]
    async fn renames_columns_and_reports_every_mismatch_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("local_t.parquet");
        write_parquet(&path);
        let bad = Catalog::from_toml(
            "[tables.t]\ncolumns = [{name = \"g\", type = \"text\", domain = [\"a\", \"b\"]}, \
             {name = \"x\", type = \"decimal(5,2)\"}, {name = \"n\", type = \"int\"}, {name = \"z\", type = \"int\"}]",
            "c",
        )
        .unwrap();
        let renames = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let file = |cat: &Catalog, r| TableFile {
            table: cat.table("t").unwrap().clone(),
            path: path.clone(),
            format: FileFormat::Parquet,
            renames: r,
        };
        let Err(e) = FileSource::open(
            vec![file(
                &bad,
                renames(&[("g", "grp"), ("x", "amount"), ("w", "nope")]),
            )],
            None,
        )
        .await
        else {
            panic!("a mismatching file was accepted");
        };
        let text = e.to_string();
        assert!(text.contains("(3 problem(s))"), "{text}");
        assert!(
            text.contains("renames `w`, which is not a column"),
            "{text}"
        );
        assert!(
            text.contains("table t, column x: expected decimal(5,2), found Float64"),
            "{text}"
        );
        assert!(
            text.contains("table t, column z: expected int, found no column `z`"),
            "{text}"
        );

        let good = Catalog::from_toml(
            "[tables.t]\ncolumns = [{name = \"g\", type = \"text\", domain = [\"a\", \"b\"]}, {name = \"n\", type = \"int\"}]",
            "c",
        )
        .unwrap();
        let src = FileSource::open(vec![file(&good, renames(&[("g", "grp")]))], None)
            .await
            .unwrap();
        let plan = planner::plan_query(
            "SELECT g, SUM(n) FROM t GROUP BY g",
            &good,
            &["p".into()],
            &QueryOptions::default(),
        )
        .await
        .unwrap();
        let text = pretty_format_batches(&src.run(&plan.local).await.unwrap())
            .unwrap()
            .to_string();
        assert!(text.contains("| a | 2  | 2  | 4  |"), "{text}");
    }
}
