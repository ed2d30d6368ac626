//! The analyst's side: connect to one's own gateway over TLS, authenticate,
//! run a query or EXPLAIN, get Arrow batches back.

use anyhow::{anyhow, Context, Result};
use arrow::array::{Array, RecordBatch, StringArray};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::Ticket;
use base64::Engine as _;
use futures::TryStreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::net::{server_name_for, TlsDialer};
use crate::service::AnalystRequest;

pub struct AnalystClient {
    client: FlightServiceClient<Channel>,
    auth: String,
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
        crate::tls::install_provider();
        let dialer = TlsDialer {
            addr: gateway.to_string(),
            server_name: server_name_for(gateway)?,
            config: crate::tls::analyst_client_config(ca_pem)?,
        };
        let channel = Endpoint::from_shared("http://gateway.council".to_string())?
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
            })?;
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        Ok(AnalystClient {
            client: FlightServiceClient::new(channel).max_decoding_message_size(256 << 20),
            auth,
            gateway: gateway.to_string(),
        })
    }

    async fn get(&self, req: &AnalystRequest) -> Result<Vec<RecordBatch>, GatewayError> {
        let ticket = Ticket {
            ticket: serde_json::to_vec(req)
                .map_err(|e| GatewayError {
                    code: tonic::Code::Internal,
                    message: e.to_string(),
                })?
                .into(),
        };
        let mut r = tonic::Request::new(ticket);
        r.metadata_mut().insert(
            "authorization",
            self.auth.parse().map_err(|_| GatewayError {
                code: tonic::Code::InvalidArgument,
                message: "user name or password has characters that cannot be sent".into(),
            })?,
        );
        let mut c = self.client.clone();
        let stream = c.do_get(r).await.map_err(|s| self.status(s))?.into_inner();
        let batches = FlightRecordBatchStream::new_from_flight_data(
            stream.map_err(|s| FlightError::Tonic(Box::new(s))),
        );
        batches.try_collect().await.map_err(|e| match e {
            FlightError::Tonic(s) => self.status(*s),
            other => GatewayError {
                code: tonic::Code::Internal,
                message: other.to_string(),
            },
        })
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
        self.get(&AnalystRequest {
            sql: sql.to_string(),
            explain: false,
            options: Default::default(),
        })
        .await
    }

    pub async fn explain(&self, sql: &str) -> Result<String, GatewayError> {
        let batches = self
            .get(&AnalystRequest {
                sql: sql.to_string(),
                explain: true,
                options: Default::default(),
            })
            .await?;
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

/// Reads the CA certificate file named by `path`.
pub fn read_ca(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading CA certificate {}", path.display()))
}
