//! The peer protocol between gateways, over Arrow Flight on the mTLS
//! channel:
//!
//! - `propose` (action): the SQL text, options and analyst; the receiving
//!   gateway plans it itself, checks its own policy and answers with its
//!   plan fingerprint or a refusal naming the rule.
//! - `start` (action): all verdicts agreed; run the local part and share.
//! - `abort` (action): stop the query; nothing further is revealed.
//! - `do_put` with a [`PutHeader`]: one batch of shares for one round.
//!
//! The sender of every message is the party named by its TLS certificate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{Action, FlightDescriptor};
use executor::transport::Mailbox;
use executor::{Round, Transport, TransportError};
use futures::StreamExt;
use planner::QueryOptions;
use policies::Analyst;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::net::TlsDialer;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Propose {
    pub query_id: String,
    pub sql: String,
    pub options: QueryOptions,
    pub analyst: Analyst,
    /// Plan and decide only; keep no state (EXPLAIN).
    pub explain_only: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow {
        fingerprint: String,
        /// For EXPLAIN only: how this party computes its local part (the
        /// SQL sent to its database, what stays in the gateway).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        source: Vec<String>,
        /// What this party's policy demands under differential privacy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        privacy: Option<planner::privacy::Requirement>,
    },
    Deny {
        rule: String,
        reason: String,
    },
    /// The gateway could not plan the query at all.
    Error {
        message: String,
    },
}

/// `start`: every party allowed; with DP, the merged parameters and the
/// fingerprint of the DP plan, which each party recomputes and compares.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Start {
    pub query_id: String,
    #[serde(default)]
    pub privacy: Option<planner::privacy::DpParams>,
    #[serde(default)]
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryRef {
    pub query_id: String,
    #[serde(default)]
    pub reason: String,
    /// The querying gateway (the session key at the receiver).
    #[serde(default)]
    pub leader: String,
}

/// Names the query and round of a `do_put` stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutHeader {
    pub leader: String,
    pub query_id: String,
    pub round: Round,
}

/// Long-lived, lazily connected channels to every peer, reused by queries.
pub struct PeerClients {
    clients: BTreeMap<String, (String, FlightServiceClient<Channel>)>,
    pub timeout: Duration,
}

fn unreachable(peer: &str, addr: &str, s: &tonic::Status) -> TransportError {
    let msg = s.message();
    let reason = if msg.is_empty() {
        format!("{:?}", s.code())
    } else {
        msg.to_string()
    };
    TransportError::Unreachable {
        peer: peer.to_string(),
        reason: format!("{reason} (at {addr})"),
    }
}

impl PeerClients {
    pub fn new(
        peers: &BTreeMap<String, String>,
        tls: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut clients = BTreeMap::new();
        for (id, addr) in peers {
            let dialer = TlsDialer {
                addr: addr.clone(),
                server_name: ServerName::try_from(id.clone()).map_err(|e| {
                    anyhow::anyhow!("peer id `{id}` is not usable as a TLS name: {e}")
                })?,
                config: tls.clone(),
            };
            let channel = Endpoint::from_shared(format!("http://{id}.council"))?
                .connect_timeout(timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .connect_with_connector_lazy(dialer);
            let client = FlightServiceClient::new(channel)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20);
            clients.insert(id.clone(), (addr.clone(), client));
        }
        Ok(PeerClients { clients, timeout })
    }

    fn client(&self, peer: &str) -> Result<(&str, FlightServiceClient<Channel>), TransportError> {
        self.clients
            .get(peer)
            .map(|(a, c)| (a.as_str(), c.clone()))
            .ok_or_else(|| TransportError::Unreachable {
                peer: peer.into(),
                reason: "not a configured peer".into(),
            })
    }

    /// Sends an action and returns the body of its single reply.
    pub async fn action(
        &self,
        peer: &str,
        kind: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError> {
        let (addr, mut c) = self.client(peer)?;
        let call = async {
            let mut stream = c
                .do_action(Action {
                    r#type: kind.to_string(),
                    body: body.into(),
                })
                .await
                .map_err(|s| status_error(peer, addr, s))?
                .into_inner();
            match stream.next().await {
                Some(Ok(r)) => Ok(r.body.to_vec()),
                Some(Err(s)) => Err(status_error(peer, addr, s)),
                None => Ok(Vec::new()),
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Unreachable {
                peer: peer.into(),
                reason: format!(
                    "no answer within {:.1} s (at {addr})",
                    self.timeout.as_secs_f64()
                ),
            }),
        }
    }

    /// Streams one batch to `peer` under `header`.
    pub async fn put(
        &self,
        peer: &str,
        header: &PutHeader,
        batch: RecordBatch,
    ) -> Result<(), TransportError> {
        let (addr, mut c) = self.client(peer)?;
        let cmd = serde_json::to_vec(header).map_err(|e| TransportError::Aborted(e.to_string()))?;
        let input = futures::stream::iter(vec![Ok(batch)]);
        let flight = FlightDataEncoderBuilder::new()
            .with_flight_descriptor(Some(FlightDescriptor::new_cmd(cmd)))
            .build(input)
            .filter_map(|r| async move { r.ok() });
        let call = async {
            let mut resp = c
                .do_put(flight)
                .await
                .map_err(|s| status_error(peer, addr, s))?
                .into_inner();
            while let Some(r) = resp.next().await {
                r.map_err(|s| status_error(peer, addr, s))?;
            }
            Ok(())
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Unreachable {
                peer: peer.into(),
                reason: format!(
                    "did not take our shares within {:.1} s (at {addr})",
                    self.timeout.as_secs_f64()
                ),
            }),
        }
    }
}

fn status_error(peer: &str, addr: &str, s: tonic::Status) -> TransportError {
    match s.code() {
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Cancelled
        | tonic::Code::DeadlineExceeded => unreachable(peer, addr, &s),
        tonic::Code::Aborted => TransportError::Aborted(s.message().to_string()),
        _ => TransportError::Protocol {
            peer: peer.to_string(),
            reason: s.message().to_string(),
        },
    }
}

/// One query's transport: sends through [`PeerClients`], receives from this
/// party's mailbox for the query.
pub struct QueryTransport {
    pub me: String,
    pub header_leader: String,
    pub query_id: String,
    pub clients: Arc<PeerClients>,
    pub mailbox: Arc<Mailbox>,
    /// Tests only: a fault to play (`config::Fault`).
    pub fault: Option<crate::config::Fault>,
}

#[async_trait::async_trait]
impl Transport for QueryTransport {
    async fn send(&self, to: &str, round: Round, batch: RecordBatch) -> Result<(), TransportError> {
        if let Some(r) = self.mailbox.aborted() {
            return Err(TransportError::Aborted(r));
        }
        use crate::config::Fault;
        let mut batch = batch;
        match (self.fault, round) {
            (Some(Fault::SilentAfterInput), Round::Result) => std::future::pending::<()>().await,
            (Some(Fault::Slow), _) => {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await
            }
            (Some(Fault::GarbageResult), Round::Result) if to != self.me => {
                // One row more than the groups: refused on delivery.
                let rows = batch.num_rows() + 1;
                batch = executor::SharedTable::zeros(Vec::new(), &[executor::Width::Z64], rows)
                    .to_batch()
                    .map_err(|e| TransportError::Protocol {
                        peer: self.me.clone(),
                        reason: e.to_string(),
                    })?;
            }
            _ => {}
        }
        if to == self.me {
            return self.mailbox.deliver(&self.me, round, batch);
        }
        let header = PutHeader {
            leader: self.header_leader.clone(),
            query_id: self.query_id.clone(),
            round,
        };
        self.clients.put(to, &header, batch).await
    }

    async fn recv(&self, from: &str, round: Round) -> Result<RecordBatch, TransportError> {
        self.mailbox.take(from, round).await
    }
}
