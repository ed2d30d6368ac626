//! Any Flight SQL server as a source (arrow-flight's `FlightSqlServiceClient`
//! over tonic): the route to warehouses and distributed engines. The local
//! part is sent as one statement; results arrive as Arrow and are cast to the
//! federated types only where the cast is exact.
//!
//! Dialect: the server must speak DataFusion's SQL (DataFusion-based servers
//! such as `datafusion-flight-sql-server`, Ballista, and the engines built on
//! them); the statement is then exactly the local part the gateway would run
//! itself. Other engines need their own dialect rules (see ARCHITECTURE.md).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::FlightInfo;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::Schema;
use futures::stream::BoxStream;
use futures::TryStreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::database::Database;
use crate::sql::{Dialect, OutColumn, SqlTable};
use crate::sqlite::tokio_stream_from;
use crate::SourceError;

/// How to reach a Flight SQL server. Secrets come from the gateway config's
/// `*_env` / `*_file` keys, never from the config itself.
#[derive(Clone, Default)]
pub struct FlightSqlConnect {
    /// `grpc+tls://host:port` (TLS, verified against `ca_file`) or
    /// `grpc://host:port` (plaintext: loopback or a trusted network only).
    pub uri: String,
    pub ca_file: Option<PathBuf>,
    /// Basic credentials for the handshake, if the server wants them.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Or a preset Bearer token.
    pub token: Option<String>,
}

impl std::fmt::Debug for FlightSqlConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightSqlConnect")
            .field("uri", &self.uri)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<secret>"))
            .field("token", &self.token.as_ref().map(|_| "<secret>"))
            .finish()
    }
}

pub struct FlightSqlDatabase {
    connect: FlightSqlConnect,
    channel: Channel,
    token: Mutex<Option<String>>,
}

fn run_err(uri: &str, what: impl std::fmt::Display) -> SourceError {
    SourceError::Run(format!("Flight SQL {uri}: {what}"))
}

/// A tonic channel to `uri` (`grpc://` or `grpc+tls://`).
async fn channel(uri: &str, ca_file: Option<&PathBuf>) -> Result<Channel, SourceError> {
    let (tls, rest) = if let Some(r) = uri.strip_prefix("grpc+tls://") {
        (true, r)
    } else if let Some(r) = uri
        .strip_prefix("grpc://")
        .or_else(|| uri.strip_prefix("grpc+tcp://"))
    {
        (false, r)
    } else {
        return Err(run_err(
            uri,
            "the URI must start with grpc+tls:// (TLS) or grpc:// (plaintext)",
        ));
    };
    let scheme = if tls { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{rest}"))
        .map_err(|e| run_err(uri, e))?
        .connect_timeout(Duration::from_secs(10));
    if tls {
        let ca = ca_file.ok_or_else(|| {
            run_err(
                uri,
                "grpc+tls needs `ca_file` (the CA that signs the server's certificate)",
            )
        })?;
        let pem = std::fs::read(ca)
            .map_err(|e| run_err(uri, format!("ca_file {}: {e}", ca.display())))?;
        let host = rest
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(rest)
            .trim_start_matches('[')
            .trim_end_matches(']');
        ep = ep
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem))
                    .domain_name(host),
            )
            .map_err(|e| run_err(uri, e))?;
    }
    ep.connect().await.map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        run_err(uri, format!("cannot connect: {msg}"))
    })
}

impl FlightSqlDatabase {
    /// Connects and, with credentials, authenticates once.
    pub async fn connect(c: &FlightSqlConnect) -> Result<Self, SourceError> {
        let db = FlightSqlDatabase {
            channel: channel(&c.uri, c.ca_file.as_ref()).await?,
            connect: c.clone(),
            token: Mutex::new(c.token.clone()),
        };
        db.handshake().await?;
        Ok(db)
    }

    async fn handshake(&self) -> Result<(), SourceError> {
        let (Some(user), Some(pw)) = (&self.connect.username, &self.connect.password) else {
            return Ok(());
        };
        let mut client = FlightSqlServiceClient::new(self.channel.clone());
        client.handshake(user, pw).await.map_err(|e| {
            run_err(
                &self.connect.uri,
                format!("handshake as {user} failed: {e}"),
            )
        })?;
        if let Ok(mut t) = self.token.lock() {
            *t = client.token().cloned();
        }
        Ok(())
    }

    fn client(&self) -> FlightSqlServiceClient<Channel> {
        let mut c = FlightSqlServiceClient::new(self.channel.clone());
        if let Some(t) = self.token.lock().ok().and_then(|t| t.clone()) {
            c.set_token(t);
        }
        c
    }

    /// Plans `sql` on the server; one retry after a new handshake if the
    /// token expired.
    async fn execute(
        &self,
        sql: &str,
    ) -> Result<(FlightSqlServiceClient<Channel>, FlightInfo), SourceError> {
        let mut client = self.client();
        match client.execute(sql.to_string(), None).await {
            Ok(info) => Ok((client, info)),
            Err(e)
                if e.to_string().contains("Unauthenticated") && self.connect.username.is_some() =>
            {
                self.handshake().await?;
                let mut client = self.client();
                let info = client
                    .execute(sql.to_string(), None)
                    .await
                    .map_err(|e| run_err(&self.connect.uri, e))?;
                Ok((client, info))
            }
            Err(e) => Err(run_err(&self.connect.uri, e)),
        }
    }
}

/// `batch` with the columns of `columns`, each cast only where exact.
fn conform(
    batch: &RecordBatch,
    columns: &[OutColumn],
    uri: &str,
) -> Result<RecordBatch, SourceError> {
    if batch.num_columns() != columns.len() {
        return Err(run_err(
            uri,
            format!(
                "returned {} columns where {} were expected",
                batch.num_columns(),
                columns.len()
            ),
        ));
    }
    let mut arrays = Vec::with_capacity(columns.len());
    let mut fields = Vec::with_capacity(columns.len());
    for (a, c) in batch.columns().iter().zip(columns) {
        let want = c.field.data_type();
        let a = if a.data_type() == want {
            a.clone()
        } else if crate::files::exact_cast(a.data_type(), want) {
            cast(a, want).map_err(|e| run_err(uri, e))?
        } else {
            return Err(run_err(
                uri,
                format!(
                    "returned {} for column {}, which cannot be read exactly as {want}",
                    a.data_type(),
                    c.field.name()
                ),
            ));
        };
        fields.push(c.field.as_ref().clone().with_nullable(true));
        arrays.push(a);
    }
    RecordBatch::try_new(std::sync::Arc::new(Schema::new(fields)), arrays)
        .map_err(|e| run_err(uri, e))
}

#[async_trait::async_trait]
impl Database for FlightSqlDatabase {
    fn dialect(&self) -> Dialect {
        Dialect::DataFusion
    }

    fn describe(&self) -> String {
        self.connect.uri.clone()
    }

    async fn check(&self, t: &SqlTable) -> Result<Vec<String>, SourceError> {
        let sql = format!("SELECT * FROM {} LIMIT 0", t.from_clause());
        let info = match self.execute(&sql).await {
            Ok((_, info)) => info,
            Err(e) => {
                return Ok(vec![format!(
                    "table {}: cannot read `{}` from Flight SQL {} ({e})",
                    t.table.name, t.local, self.connect.uri
                )])
            }
        };
        let schema = info
            .try_decode_schema()
            .map_err(|e| run_err(&self.connect.uri, format!("unreadable schema: {e}")))?;
        let place = format!("Flight SQL {} `{}`", self.connect.uri, t.local);
        Ok(crate::sql::column_problems(t, &place, |local, want| {
            let f = schema.fields().iter().find(|f| f.name() == local)?;
            let want = want.arrow_type();
            Some(
                (!crate::files::exact_cast(f.data_type(), &want))
                    .then(|| format!("found {}", f.data_type())),
            )
        }))
    }

    fn query(
        &self,
        sql: String,
        columns: Vec<OutColumn>,
    ) -> BoxStream<'static, Result<RecordBatch, SourceError>> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<RecordBatch, SourceError>>(4);
        let uri = self.connect.uri.clone();
        let ca = self.connect.ca_file.clone();
        let token = self.token.lock().ok().and_then(|t| t.clone());
        let planned = {
            // Plan on the server before spawning, so that `self` need not be 'static.
            let this = FlightSqlDatabase {
                connect: self.connect.clone(),
                channel: self.channel.clone(),
                token: Mutex::new(token.clone()),
            };
            async move { this.execute(&sql).await }
        };
        tokio::spawn(async move {
            let result = async {
                let (mut client, info) = planned.await?;
                for ep in info.endpoint {
                    let ticket = ep
                        .ticket
                        .ok_or_else(|| run_err(&uri, "an endpoint without a ticket"))?;
                    // An endpoint elsewhere (a distributed engine's worker):
                    // same TLS settings and token there.
                    let elsewhere = ep.location.iter().map(|l| l.uri.as_str()).find(|l| {
                        !l.is_empty() && !l.starts_with("arrow-flight-reuse-connection:")
                    });
                    let mut stream = match elsewhere {
                        Some(loc) => {
                            let mut c =
                                FlightSqlServiceClient::new(channel(loc, ca.as_ref()).await?);
                            if let Some(t) = &token {
                                c.set_token(t.clone());
                            }
                            c.do_get(ticket).await
                        }
                        None => client.do_get(ticket).await,
                    }
                    .map_err(|e| run_err(&uri, e))?;
                    while let Some(b) = stream.try_next().await.map_err(|e| run_err(&uri, e))? {
                        let b = conform(&b, &columns, &uri)?;
                        if tx.send(Ok(b)).await.is_err() {
                            return Ok(()); // the query was dropped
                        }
                    }
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
