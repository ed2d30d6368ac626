//! CSV and Parquet files, read by DataFusion with the federated schema.

use std::path::{Path, PathBuf};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::DataType;
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
    pub async fn open(tables: Vec<TableFile>, partitions: Option<usize>) -> Result<Self, SourceError> {
        let mut config = SessionConfig::new().with_information_schema(false);
        if let Some(k) = partitions {
            config = config.with_target_partitions(k.max(1));
        }
        let ctx = SessionContext::new_with_config(config);
        let mut described = Vec::new();
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
                return Err(err(format!("file {} does not exist", t.path.display())));
            }
            let schema = t.table.schema();
            let raw = format!("__raw_{name}");
            match t.format {
                FileFormat::Csv => {
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
                let field = local
                    .fields()
                    .iter()
                    .find(|f| f.name() == &c.name)
                    .ok_or_else(|| {
                        err(format!(
                            "column `{}` is missing from {}",
                            c.name,
                            t.path.display()
                        ))
                    })?;
                if !exact_cast(field.data_type(), &want) {
                    return Err(err(format!(
                        "column `{}` is {} in {} but the catalog declares {}; it cannot be read exactly",
                        c.name,
                        field.data_type(),
                        t.path.display(),
                        c.ty
                    )));
                }
                let e = Expr::Column(Column::new_unqualified(c.name.clone()));
                let e = if field.data_type() == &want {
                    e
                } else {
                    cast(e, want)
                };
                exprs.push(e.alias(c.name.clone()));
            }
            let view = df
                .select(exprs)
                .map_err(|e| err(e.to_string()))?
                .into_view();
            ctx.register_table(name.as_str(), view)
                .map_err(|e| err(e.to_string()))?;
            described.push(format!("{name}: {:?} {}", t.format, t.path.display()));
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
fn exact_cast(from: &DataType, to: &DataType) -> bool {
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
        _ => false,
    }
}

#[async_trait::async_trait]
impl LocalSource for FileSource {
    fn describe(&self) -> Vec<String> {
        self.described.clone()
    }

    async fn run(&self, part: &LocalPart) -> Result<Vec<RecordBatch>, SourceError> {
        let run = |e: datafusion::error::DataFusionError| {
            SourceError::Run(planner::plan::clean_df_error(&e.to_string()))
        };
        let mut df = self.ctx.table(part.table.as_str()).await.map_err(run)?;
        if let Some(f) = &part.filter {
            df = df.filter(f.clone()).map_err(run)?;
        }
        let groups: Vec<Expr> = part
            .group_columns
            .iter()
            .map(|g| Expr::Column(Column::new_unqualified(g.clone())))
            .collect();
        df = df.aggregate(groups, part.aggregate_exprs()).map_err(run)?;
        df.collect().await.map_err(run)
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
}
