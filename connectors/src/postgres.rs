//! PostgreSQL servers (tokio-postgres; TLS through rustls). The connection
//! string comes from the gateway config's `url_env` or `url_file`, never from
//! the config itself. Connections are pooled; a broken one is replaced.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::RecordBatch;
use futures::stream::BoxStream;
use futures::{pin_mut, TryStreamExt};
use planner::ColumnType;
use rustls_pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Config, NoTls, Row};

use crate::database::Database;
use crate::sql::{days_since_epoch, BatchWriter, Dialect, OutColumn, SqlTable, Value};
use crate::sqlite::tokio_stream_from;
use crate::SourceError;

/// How to reach a PostgreSQL server.
#[derive(Clone)]
pub struct PgConnect {
    /// A libpq-style connection string or `postgresql://` URL (with its
    /// password, if any: keep it out of logs).
    pub url: String,
    /// PEM file of the CA that signs the server's certificate; with it the
    /// connection uses TLS and verifies the server.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for PgConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnect")
            .field("url", &"<secret>")
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

pub struct PostgresDatabase {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    idle: Mutex<Vec<Client>>,
    described: String,
}

const MAX_IDLE: usize = 8;

impl PostgresDatabase {
    /// Parses the connection string, sets up TLS and connects once.
    pub async fn connect(c: &PgConnect) -> Result<Self, SourceError> {
        let config: Config = c.url.parse().map_err(|e| {
            SourceError::Run(format!(
                "the PostgreSQL connection string is not valid ({e}); use postgresql://USER@HOST:PORT/DB or host=… user=… dbname=…"
            ))
        })?;
        let described = describe(&config);
        let tls = match &c.ca_file {
            Some(path) => Some(tls_connector(path)?),
            None if config.get_ssl_mode() == SslMode::Require => {
                return Err(SourceError::Run(format!(
                    "PostgreSQL {described}: sslmode=require needs `ca_file` (the CA that signs the server's certificate) in the source's config"
                )))
            }
            None => None,
        };
        let db = PostgresDatabase {
            inner: Arc::new(Inner {
                config,
                tls,
                idle: Mutex::new(Vec::new()),
                described,
            }),
        };
        let client = db.inner.client().await?;
        db.inner.give_back(client);
        Ok(db)
    }
}

fn describe(config: &Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        config.get_user().unwrap_or("?"),
        config.get_dbname().unwrap_or("?")
    )
}

fn tls_connector(
    ca: &std::path::Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, SourceError> {
    let bad = |why: String| SourceError::Run(format!("PostgreSQL ca_file {}: {why}", ca.display()));
    let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl Inner {
    fn error(&self, e: tokio_postgres::Error) -> SourceError {
        // The server's own message (e.g. "numeric field overflow") is the
        // useful part; tokio-postgres's Display says only "db error".
        let detail = match (e.as_db_error(), std::error::Error::source(&e)) {
            (Some(d), _) => d.message().to_string(),
            (None, Some(cause)) => format!("{e}: {cause}"),
            (None, None) => e.to_string(),
        };
        SourceError::Run(format!("PostgreSQL {}: {detail}", self.described))
    }

    async fn client(&self) -> Result<Client, SourceError> {
        loop {
            let c = self.idle.lock().ok().and_then(|mut v| v.pop());
            match c {
                Some(c) if !c.is_closed() => return Ok(c),
                Some(_) => continue,
                None => break,
            }
        }
        // The connection task runs until the client is dropped.
        let client = match &self.tls {
            Some(tls) => {
                let (c, conn) = self
                    .config
                    .connect(tls.clone())
                    .await
                    .map_err(|e| self.error(e))?;
                tokio::spawn(conn);
                c
            }
            None => {
                let (c, conn) = self
                    .config
                    .connect(NoTls)
                    .await
                    .map_err(|e| self.error(e))?;
                tokio::spawn(conn);
                c
            }
        };
        Ok(client)
    }

    fn give_back(&self, c: Client) {
        if c.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE {
                idle.push(c);
            }
        }
    }
}

/// Why a column of PostgreSQL type `found` cannot hold `want` exactly.
fn mismatch(
    want: &ColumnType,
    found: &str,
    precision: Option<i32>,
    scale: Option<i32>,
) -> Option<String> {
    let int_digits = match found {
        "smallint" => Some(5),
        "integer" => Some(10),
        "bigint" => Some(19),
        _ => None,
    };
    let ok = match want {
        ColumnType::Int => int_digits.is_some(),
        ColumnType::Decimal { precision: p, scale: s } => match (found, precision, scale) {
            ("numeric", Some(np), Some(ns)) => ns <= *s as i32 && np - ns <= *p as i32 - *s as i32,
            ("numeric", _, _) => {
                return Some(
                    "found numeric without precision and scale, whose values could be rounded at the declared scale; \
                     declare the column numeric(P,S) or expose a view that casts it"
                        .into(),
                )
            }
            _ => int_digits.is_some_and(|d| d <= *p as i32 - *s as i32),
        },
        ColumnType::Float { .. } => matches!(found, "double precision" | "real" | "smallint" | "integer"),
        ColumnType::Text => matches!(found, "text" | "character varying"),
        ColumnType::Bool => found == "boolean",
        ColumnType::Date => found == "date",
        ColumnType::Timestamp => match found {
            "timestamp without time zone" | "date" => true,
            "timestamp with time zone" => {
                return Some(
                    "found timestamp with time zone, an instant that has no date and time without a zone; \
                     expose a view with `col AT TIME ZONE 'UTC'` (or the zone you mean)"
                        .into(),
                )
            }
            _ => false,
        },
    };
    (!ok).then(|| match (found, precision, scale) {
        ("numeric", Some(p), Some(s)) => format!("found numeric({p},{s})"),
        _ => format!("found {found}"),
    })
}

fn value(row: &Row, i: usize) -> Result<Value, String> {
    let ty = row
        .columns()
        .get(i)
        .ok_or_else(|| format!("no column {i} in the row"))?
        .type_()
        .clone();
    let e = |e: tokio_postgres::Error| e.to_string();
    Ok(match ty {
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)
            .map_err(e)?
            .map(|v| Value::Int(v as i64)),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)
            .map_err(e)?
            .map(|v| Value::Int(v as i64)),
        Type::INT8 => row.try_get::<_, Option<i64>>(i).map_err(e)?.map(Value::Int),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(i)
            .map_err(e)?
            .map(|v| Value::Float(v as f64)),
        Type::FLOAT8 => row
            .try_get::<_, Option<f64>>(i)
            .map_err(e)?
            .map(Value::Float),
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)
            .map_err(e)?
            .map(Value::Bool),
        Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR | Type::UNKNOWN => row
            .try_get::<_, Option<String>>(i)
            .map_err(e)?
            .map(Value::Text),
        Type::DATE => row
            .try_get::<_, Option<chrono::NaiveDate>>(i)
            .map_err(e)?
            .map(|d| Value::Date(days_since_epoch(d))),
        Type::TIMESTAMP => row
            .try_get::<_, Option<chrono::NaiveDateTime>>(i)
            .map_err(e)?
            .map(|t| Value::Timestamp(t.and_utc().timestamp_micros())),
        other => return Err(format!("PostgreSQL type {other}")),
    }
    .unwrap_or(Value::Null))
}

#[async_trait::async_trait]
impl Database for PostgresDatabase {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn describe(&self) -> String {
        self.inner.described.clone()
    }

    async fn check(&self, t: &SqlTable) -> Result<Vec<String>, SourceError> {
        let inner = &self.inner;
        let client = inner.client().await?;
        let (schema, name) = t.schema_and_name();
        let rows = client
            .query(
                "SELECT column_name::text, data_type::text, numeric_precision::int4, numeric_scale::int4 \
                 FROM information_schema.columns \
                 WHERE table_schema = COALESCE($1::text, current_schema()) AND table_name = $2::text",
                &[&schema, &name],
            )
            .await
            .map_err(|e| inner.error(e))?;
        inner.give_back(client);
        let fed = &t.table.name;
        let place = format!("PostgreSQL {} `{}`", inner.described, t.local);
        if rows.is_empty() {
            return Ok(vec![format!(
                "table {fed}: no table or view `{}` in PostgreSQL {} (or this user may not read it)",
                t.local, inner.described
            )]);
        }
        let problems = crate::sql::column_problems(t, &place, |local, want| {
            let r = rows
                .iter()
                .find(|r| r.try_get::<_, String>(0).is_ok_and(|n| n == local))?;
            let ty: String = r.try_get(1).unwrap_or_default();
            let (p, s) = (r.try_get(2).ok().flatten(), r.try_get(3).ok().flatten());
            Some(mismatch(want, &ty, p, s))
        });
        Ok(problems)
    }

    fn query(
        &self,
        sql: String,
        columns: Vec<OutColumn>,
    ) -> BoxStream<'static, Result<RecordBatch, SourceError>> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<RecordBatch, SourceError>>(4);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let result = async {
                let client = inner.client().await?;
                let mut w = BatchWriter::new(&columns, &format!("PostgreSQL {}", inner.described))?;
                let rows = client
                    .query_raw(sql.as_str(), Vec::<String>::new())
                    .await
                    .map_err(|e| inner.error(e))?;
                pin_mut!(rows);
                while let Some(row) = rows.try_next().await.map_err(|e| inner.error(e))? {
                    if let Some(b) = w.push_row(|i| value(&row, i))? {
                        if tx.send(Ok(b)).await.is_err() {
                            // Dropped mid-query: this connection may still
                            // be streaming rows; do not reuse it.
                            return Ok(());
                        }
                    }
                }
                inner.give_back(client);
                if w.pending() > 0 || columns.is_empty() {
                    let _ = tx.send(Ok(w.flush()?)).await;
                }
                Ok::<(), SourceError>(())
            }
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
        tokio_stream_from(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_map_exactly_or_are_refused() {
        let dec = |p, s| ColumnType::Decimal {
            precision: p,
            scale: s,
        };
        assert!(mismatch(&dec(10, 2), "numeric", Some(8), Some(2)).is_none());
        assert!(mismatch(&dec(10, 2), "numeric", Some(12), Some(2)).is_some());
        assert!(mismatch(&dec(10, 2), "numeric", Some(10), Some(3)).is_some());
        let open = mismatch(&dec(10, 2), "numeric", None, None).unwrap_or_default();
        assert!(open.contains("without precision and scale"), "{open}");
        assert!(mismatch(&dec(14, 2), "integer", Some(32), Some(0)).is_none());
        assert!(mismatch(&dec(14, 2), "bigint", Some(64), Some(0)).is_some());
        assert!(mismatch(&ColumnType::Int, "integer", None, None).is_none());
        assert!(mismatch(&ColumnType::Int, "numeric", Some(10), Some(0)).is_some());
        assert!(mismatch(&ColumnType::Text, "character", None, None).is_some());
        assert!(mismatch(&ColumnType::Date, "timestamp without time zone", None, None).is_some());
    }
}
