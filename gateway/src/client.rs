//! The analyst's side: connect to one's own gateway over TLS, speak Flight
//! SQL to it (handshake with user name and password for a Bearer token,
//! then `GetFlightInfo` + `DoGet` per statement), get Arrow batches back.
//! Built on the raw Flight client so that gRPC codes reach the caller.

use anyhow::{anyhow, Context, Result};
use arrow::array::{Array, RecordBatch, StringArray};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
use arrow_flight::{FlightDescriptor, HandshakeRequest};
use base64::Engine as _;
use futures::TryStreamExt;
use prost::Message;
use tonic::transport::{Channel, Endpoint};

use crate::net::{server_name_for, TlsDialer};

pub struct AnalystClient {
    client: FlightServiceClient<Channel>,
    /// `Basic ...` until the first handshake, then `Bearer <token>`.
    auth: tokio::sync::Mutex<Option<String>>,
    basic: String,
    gateway: String,
}

/// An error from the gateway, with its gRPC code and message.
#[derive(Debug)]
pub struct GatewayError {
    pub code: tonic::Code,
    pub message: String,
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for GatewayError {}

impl AnalystClient {
    /// `gateway` is host:port; `ca_pem` the federation CA the gateway's
    /// certificate must chain to.
    pub async fn connect(gateway: &str, ca_pem: &str, user: &str, password: &str) -> Result<Self> {
        Self::connect_named(gateway, None, ca_pem, user, password).await
    }

    /// `connect`, verifying that the gateway's certificate names `party`
    /// (instead of its host name) where one is given.
    pub async fn connect_named(
        gateway: &str,
        party: Option<&str>,
        ca_pem: &str,
        user: &str,
        password: &str,
    ) -> Result<Self> {
        let channel = tls_channel_named(gateway, party, ca_pem).await?;
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        Ok(AnalystClient {
            client: FlightServiceClient::new(channel).max_decoding_message_size(256 << 20),
            auth: tokio::sync::Mutex::new(None),
            basic,
            gateway: gateway.to_string(),
        })
    }

    fn with_auth<T>(&self, msg: T, auth: &str) -> Result<tonic::Request<T>, GatewayError> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(
            "authorization",
            auth.parse().map_err(|_| GatewayError {
                code: tonic::Code::InvalidArgument,
                message: "user name or password has characters that cannot be sent".into(),
            })?,
        );
        Ok(r)
    }

    /// The `authorization` header: a Bearer token, from a handshake the
    /// first time.
    async fn authorization(&self) -> Result<String, GatewayError> {
        let mut auth = self.auth.lock().await;
        if let Some(a) = auth.as_ref() {
            return Ok(a.clone());
        }
        let hello = futures::stream::iter(vec![HandshakeRequest::default()]);
        let req = self.with_auth(hello, &self.basic)?;
        let resp = self
            .client
            .clone()
            .handshake(req)
            .await
            .map_err(|s| self.status(s))?;
        let bearer = resp
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.starts_with("Bearer "))
            .map(str::to_string)
            .ok_or_else(|| GatewayError {
                code: tonic::Code::Unauthenticated,
                message: format!(
                    "gateway {} sent no Bearer token after the handshake",
                    self.gateway
                ),
            })?;
        *auth = Some(bearer.clone());
        Ok(bearer)
    }

    /// Runs one statement (SQL or EXPLAIN) and fetches its answer.
    async fn statement(&self, sql: &str) -> Result<Vec<RecordBatch>, GatewayError> {
        let auth = self.authorization().await?;
        let cmd = CommandStatementQuery {
            query: sql.to_string(),
            transaction_id: None,
        };
        let descriptor = FlightDescriptor::new_cmd(cmd.as_any().encode_to_vec());
        let mut c = self.client.clone();
        let info = c
            .get_flight_info(self.with_auth(descriptor, &auth)?)
            .await
            .map_err(|s| self.status(s))?
            .into_inner();
        let mut out = Vec::new();
        for ep in info.endpoint {
            let Some(ticket) = ep.ticket else { continue };
            let stream = c
                .do_get(self.with_auth(ticket, &auth)?)
                .await
                .map_err(|s| self.status(s))?
                .into_inner();
            let batches = FlightRecordBatchStream::new_from_flight_data(
                stream.map_err(|s| FlightError::Tonic(Box::new(s))),
            );
            let mut got: Vec<RecordBatch> = batches.try_collect().await.map_err(|e| match e {
                FlightError::Tonic(s) => self.status(*s),
                other => GatewayError {
                    code: tonic::Code::Internal,
                    message: other.to_string(),
                },
            })?;
            out.append(&mut got);
        }
        Ok(out)
    }

    fn status(&self, s: tonic::Status) -> GatewayError {
        let message = if s.message().is_empty() {
            format!("gateway {} failed: {:?}", self.gateway, s.code())
        } else {
            s.message().to_string()
        };
        GatewayError {
            code: s.code(),
            message,
        }
    }

    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>, GatewayError> {
        self.statement(sql).await
    }

    pub async fn explain(&self, sql: &str) -> Result<String, GatewayError> {
        let (_, inner) = planner::split_explain(sql);
        let batches = self.statement(&format!("EXPLAIN {inner}")).await?;
        let mut out = String::new();
        for b in batches {
            if let Some(col) = b.column(0).as_any().downcast_ref::<StringArray>() {
                for i in 0..col.len() {
                    out.push_str(col.value(i));
                    out.push('\n');
                }
            }
        }
        Ok(out)
    }
}

/// A TLS channel to a gateway's analyst port (`host:port`), verifying its
/// certificate against the federation CA: for Flight SQL clients too.
pub async fn tls_channel(gateway: &str, ca_pem: &str) -> Result<Channel> {
    tls_channel_named(gateway, None, ca_pem).await
}

/// `tls_channel`, verifying the certificate against `party` where given.
pub async fn tls_channel_named(
    gateway: &str,
    party: Option<&str>,
    ca_pem: &str,
) -> Result<Channel> {
    crate::tls::install_provider();
    let server_name = match party {
        Some(p) => rustls_pki_types::ServerName::try_from(p.to_string())
            .map_err(|e| anyhow!("`{p}` is not a valid party id: {e}"))?,
        None => server_name_for(gateway)?,
    };
    let dialer = TlsDialer {
        addr: gateway.to_string(),
        server_name,
        config: crate::tls::analyst_client_config(ca_pem)?,
    };
    Endpoint::from_shared("http://gateway.council".to_string())?
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect_with_connector(dialer)
        .await
        .map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            anyhow!("cannot reach gateway {gateway}: {msg}")
        })
}

/// Reads the CA certificate file named by `path`.
pub fn read_ca(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading CA certificate {}", path.display()))
}
