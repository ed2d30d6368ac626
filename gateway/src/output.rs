//! Printing answers: a readable table, CSV or JSON.

use anyhow::{anyhow, Result};
use arrow::array::RecordBatch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

pub fn render(batches: &[RecordBatch], format: Format) -> Result<String> {
    match format {
        Format::Table => {
            if batches.iter().all(|b| b.num_rows() == 0) {
                let cols: Vec<String> = batches
                    .first()
                    .map(|b| {
                        b.schema()
                            .fields()
                            .iter()
                            .map(|f| f.name().clone())
                            .collect()
                    })
                    .unwrap_or_default();
                return Ok(format!(
                    "(no rows{})\n",
                    if cols.is_empty() {
                        String::new()
                    } else {
                        format!("; columns: {}", cols.join(", "))
                    }
                ));
            }
            Ok(format!(
                "{}\n",
                arrow::util::pretty::pretty_format_batches(batches)?
            ))
        }
        Format::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf);
                for b in batches {
                    w.write(b)?;
                }
            }
            String::from_utf8(buf).map_err(|e| anyhow!(e))
        }
        Format::Json => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::json::ArrayWriter::new(&mut buf);
                for b in batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
            if buf.is_empty() {
                buf.extend_from_slice(b"[]");
            }
            let mut s = String::from_utf8(buf).map_err(|e| anyhow!(e))?;
            s.push('\n');
            Ok(s)
        }
    }
}
