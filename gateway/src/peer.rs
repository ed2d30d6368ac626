//! The peer protocol between gateways, over Arrow Flight on the mTLS
//! channel:
//!
//! - `propose` (action): the SQL text, options and analyst; the receiving
//!   gateway plans it itself, checks its own policy and answers with its
//!   plan fingerprint or a refusal naming the rule.
//! - `start` (action): all verdicts agreed; run the local part and share.
//! - `abort` (action): stop the query, with a typed
//!   [`executor::AbortReason`]; nothing further is revealed. A `start` or
//!   share for a query that already ended is answered with its reason (a
//!   gRPC `aborted` status carrying the reason as JSON).
//! - `do_put` with a [`PutHeader`]: one message of one step of the query's
//!   engine (`executor::Step`), which the engine says may be sent
//!   (`executor::Engine::expects`) before a byte of it is decoded.
//!
//! The sender of every message is the party named by its TLS certificate.
//! Every request carries [`VERSION_HEADER`]; a gateway refuses another
//! [`PROTOCOL_VERSION`] before it reads anything else. Actions are decoded
//! in one place, [`PeerAction::decode`], and encoded in one,
//! [`PeerAction::encode`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{Action, FlightDescriptor};
use executor::additive::RESULT_SHARES;
use executor::transport::Mailbox;
use executor::{Inbound, Outbound, Step, Transport, TransportError};
use futures::StreamExt;
use planner::QueryOptions;
use policies::Analyst;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::net::TlsDialer;
use crate::network::PeerNetwork;

/// The peer protocol's version. Two gateways speak only if they agree on
/// it; raise it with any change to a message's meaning or encoding.
pub const PROTOCOL_VERSION: &str = "3";

/// The gRPC metadata key that carries [`PROTOCOL_VERSION`].
pub const VERSION_HEADER: &str = "council-protocol";

/// Action names, shared by client and server.
pub mod action {
    pub const PROPOSE: &str = "propose";
    pub const START: &str = "start";
    pub const ABORT: &str = "abort";
}

/// One peer action, as sent and as received.
#[derive(Debug, Clone)]
pub enum PeerAction {
    Propose(Propose),
    Start(Start),
    Abort(QueryRef),
}

impl PeerAction {
    /// Decodes an action of type `kind`: the one place a peer's action
    /// body is parsed. The error names the action and what is wrong.
    pub fn decode(kind: &str, body: &[u8]) -> Result<Self, DecodeError> {
        let bad =
            |e: serde_json::Error| DecodeError::Malformed(format!("malformed {kind} message: {e}"));
        match kind {
            action::PROPOSE => serde_json::from_slice(body)
                .map(PeerAction::Propose)
                .map_err(bad),
            action::START => serde_json::from_slice(body)
                .map(PeerAction::Start)
                .map_err(bad),
            action::ABORT => serde_json::from_slice::<QueryRef>(body)
                .map(|mut a| {
                    a.reason = a.reason.bounded();
                    PeerAction::Abort(a)
                })
                .map_err(bad),
            other => Err(DecodeError::Unknown(format!(
                "unknown peer action `{}`",
                other.chars().take(64).collect::<String>()
            ))),
        }
    }

    /// The action's type and body.
    pub fn encode(&self) -> (&'static str, Vec<u8>) {
        let (kind, body) = match self {
            PeerAction::Propose(p) => (action::PROPOSE, serde_json::to_vec(p)),
            PeerAction::Start(s) => (action::START, serde_json::to_vec(s)),
            PeerAction::Abort(a) => (action::ABORT, serde_json::to_vec(a)),
        };
        // Serialising these plain structs cannot fail.
        (kind, body.unwrap_or_default())
    }
}

/// Why an action could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// No such action in this protocol version.
    Unknown(String),
    /// A known action whose body does not parse.
    Malformed(String),
}

impl DecodeError {
    pub fn to_status(&self) -> tonic::Status {
        match self {
            DecodeError::Unknown(m) => tonic::Status::unimplemented(m.clone()),
            DecodeError::Malformed(m) => tonic::Status::invalid_argument(m.clone()),
        }
    }
}

/// A request with the protocol version attached.
fn versioned<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        VERSION_HEADER,
        tonic::metadata::MetadataValue::from_static(PROTOCOL_VERSION),
    );
    r
}

/// The server's check, before anything else: `Err` names both versions.
pub fn check_version(metadata: &tonic::metadata::MetadataMap) -> Result<(), String> {
    match metadata.get(VERSION_HEADER).map(|v| v.to_str()) {
        Some(Ok(v)) if v == PROTOCOL_VERSION => Ok(()),
        Some(Ok(v)) => Err(format!(
            "this gateway speaks peer protocol version {PROTOCOL_VERSION} and the caller speaks {}; \
             run the same Council release at every party",
            v.chars().take(16).collect::<String>()
        )),
        _ => Err(format!(
            "the caller did not say which peer protocol it speaks (this gateway speaks version \
             {PROTOCOL_VERSION}); run the same Council release at every party"
        )),
    }
}

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
        /// The minimum group size this party's policy requires (0: none).
        #[serde(default, skip_serializing_if = "is_zero")]
        min_group_size: u64,
    },
    Deny {
        rule: String,
        reason: String,
    },
    /// The gateway could not plan the query at all.
    Error {
        message: String,
    },
    /// The leader's own record that a peer did not answer (never sent).
    #[serde(skip)]
    Unreachable {
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
    /// The minimum group size enforced in shares without DP (0: none):
    /// every party's requirement, the largest.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub threshold: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryRef {
    pub query_id: String,
    pub reason: executor::AbortReason,
    /// The querying gateway (the session key at the receiver).
    #[serde(default)]
    pub leader: String,
}

/// Names the query and the engine's step of a `do_put` stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutHeader {
    pub leader: String,
    pub query_id: String,
    pub step: Step,
}

/// Long-lived, lazily connected channels to every peer, reused by queries.
/// The [`PeerNetwork`] of `council serve`.
pub struct PeerClients {
    clients: BTreeMap<String, (String, FlightServiceClient<Channel>)>,
    timeout: Duration,
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
}

#[async_trait::async_trait]
impl PeerNetwork for PeerClients {
    fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn action(
        &self,
        peer: &str,
        kind: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError> {
        let (addr, mut c) = self.client(peer)?;
        let call = async {
            let mut stream = c
                .do_action(versioned(Action {
                    r#type: kind.to_string(),
                    body: body.into(),
                }))
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

    async fn put(
        &self,
        peer: &str,
        header: &PutHeader,
        message: Outbound,
    ) -> Result<(), TransportError> {
        let (addr, mut c) = self.client(peer)?;
        let (flight, failed) = share_flight(header, message)?;
        let call = async {
            let mut resp = c
                .do_put(versioned(flight))
                .await
                .map_err(|s| status_error(peer, addr, s))?
                .into_inner();
            while let Some(r) = resp.next().await {
                r.map_err(|s| status_error(peer, addr, s))?;
            }
            Ok(())
        };
        match tokio::time::timeout(self.timeout, unless_encoding_fails(peer, call, failed)).await {
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

/// One message of a step as the Arrow Flight messages of a `do_put`, the
/// header in the first one's descriptor, each batch encoded as it is sent
/// (a large share is never encoded whole). If a batch cannot be encoded,
/// the stream stops without ending and the returned receiver says why: the
/// caller then drops the call, so that the peer sees a stream that broke
/// off rather than a well-formed short share.
pub(crate) fn share_flight(
    header: &PutHeader,
    message: Outbound,
) -> Result<
    (
        impl futures::Stream<Item = arrow_flight::FlightData> + Send + 'static,
        tokio::sync::oneshot::Receiver<String>,
    ),
    TransportError,
> {
    let cmd = serde_json::to_vec(header).map_err(|e| {
        TransportError::Local(format!("the share header could not be written: {e}"))
    })?;
    let batches = futures::stream::iter(message.map(|b| b.map_err(FlightError::from)));
    let encoded = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_cmd(cmd)))
        .build(batches)
        .boxed();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let flight = futures::stream::unfold((encoded, Some(tx)), |(mut encoded, mut tx)| async move {
        match encoded.next().await {
            Some(Ok(d)) => Some((d, (encoded, tx))),
            Some(Err(e)) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(e.to_string());
                }
                std::future::pending().await
            }
            None => None,
        }
    });
    Ok((flight, rx))
}

/// `call` (a put of [`share_flight`]'s stream), ended at once if a batch
/// could not be encoded: dropping the call makes the peer see its stream
/// break off, not a well-formed short share.
pub(crate) async fn unless_encoding_fails(
    peer: &str,
    call: impl std::future::Future<Output = Result<(), TransportError>>,
    failed: tokio::sync::oneshot::Receiver<String>,
) -> Result<(), TransportError> {
    tokio::select! {
        r = call => r,
        Ok(reason) = failed => Err(TransportError::Local(format!(
            "its share for {peer} could not be encoded: {reason}"
        ))),
    }
}

/// A refusal as the caller reads it: the one place that maps a gRPC status
/// from a peer to a [`TransportError`] (the in-memory network uses it too).
pub(crate) fn status_error(peer: &str, addr: &str, s: tonic::Status) -> TransportError {
    match s.code() {
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Cancelled
        | tonic::Code::DeadlineExceeded => unreachable(peer, addr, &s),
        // The peer ended the query: its reason, as the one place that reads
        // it (`gateway::PeerRefusal::to_status` writes it).
        tonic::Code::Aborted => match serde_json::from_str::<executor::AbortReason>(s.message()) {
            Ok(reason) => TransportError::Aborted(reason.bounded()),
            Err(_) => TransportError::Protocol {
                peer: peer.to_string(),
                reason: "it ended the query without a readable reason".into(),
            },
        },
        _ => TransportError::Protocol {
            peer: peer.to_string(),
            reason: s.message().to_string(),
        },
    }
}

/// One query's transport: sends through the [`PeerNetwork`], receives from this
/// party's mailbox for the query.
pub struct QueryTransport {
    pub me: String,
    pub header_leader: String,
    pub query_id: String,
    pub clients: Arc<dyn PeerNetwork>,
    pub mailbox: Arc<Mailbox>,
    /// Tests only: a fault to play (`config::Fault`).
    pub fault: Option<crate::config::Fault>,
}

#[async_trait::async_trait]
impl Transport for QueryTransport {
    async fn send(&self, to: &str, step: Step, message: Outbound) -> Result<(), TransportError> {
        if let Some(r) = self.mailbox.aborted() {
            return Err(TransportError::Aborted(r));
        }
        use crate::config::Fault;
        let mut message = message;
        match (self.fault, step) {
            (Some(Fault::SilentAfterInput), RESULT_SHARES) => std::future::pending::<()>().await,
            (Some(Fault::SilentMidComparison), s)
                if (10..executor::pipeline::STAGE_STEPS).contains(&s.0) =>
            {
                std::future::pending::<()>().await
            }
            (Some(Fault::Slow), _) => {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await
            }
            (Some(Fault::GarbageResult), RESULT_SHARES) if to != self.me => {
                // One row more than the groups: refused on delivery.
                let rows = message.rows + 1;
                let batch = executor::SharedTable::zeros(Vec::new(), &[executor::Width::Z64], rows)
                    .to_batch()
                    .map_err(|e| TransportError::Protocol {
                        peer: self.me.clone(),
                        reason: e.to_string(),
                    })?;
                message = Outbound::one(batch);
            }
            _ => {}
        }
        if to == self.me {
            return self.mailbox.deliver_all(&self.me, step, message).await;
        }
        let header = PutHeader {
            leader: self.header_leader.clone(),
            query_id: self.query_id.clone(),
            step,
        };
        // An abort stops a send at once: the query is over, and waiting for
        // a peer that does not answer would hold it open until the timeout.
        tokio::select! {
            r = self.clients.put(to, &header, message) => r,
            r = self.mailbox.until_aborted() => Err(TransportError::Aborted(r)),
        }
    }

    async fn recv(&self, from: &str, step: Step) -> Result<Inbound, TransportError> {
        self.mailbox.take(from, step).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_decodes_what_it_encodes_and_nothing_else() {
        let start = PeerAction::Start(Start {
            query_id: "q".into(),
            privacy: None,
            fingerprint: Some("f".into()),
            threshold: 0,
        });
        let (kind, body) = start.encode();
        assert_eq!(kind, action::START);
        assert!(matches!(
            PeerAction::decode(kind, &body),
            Ok(PeerAction::Start(s)) if s.query_id == "q" && s.fingerprint.as_deref() == Some("f")
        ));
        let reason = executor::AbortReason::new(executor::AbortKind::Cancelled, "l", "gone");
        let abort = PeerAction::Abort(QueryRef {
            query_id: "q".into(),
            reason: reason.clone(),
            leader: "l".into(),
        });
        let (kind, body) = abort.encode();
        assert!(matches!(
            PeerAction::decode(kind, &body),
            Ok(PeerAction::Abort(a)) if a.leader == "l" && a.reason == reason
        ));
        // A peer's reason is cut on receipt, before it is kept or forwarded.
        let long = executor::AbortReason {
            kind: executor::AbortKind::Data,
            party: "p".repeat(10_000),
            detail: "d".repeat(100_000),
        };
        let (kind, body) = PeerAction::Abort(QueryRef {
            query_id: "q".into(),
            reason: long,
            leader: "l".into(),
        })
        .encode();
        let Ok(PeerAction::Abort(a)) = PeerAction::decode(kind, &body) else {
            panic!("an abort with a long reason decodes");
        };
        assert!(a.reason.detail.chars().count() <= executor::transport::MAX_REASON_CHARS + 1);
        assert!(a.reason.party.chars().count() <= executor::transport::MAX_REASON_CHARS + 1);
        // An abort without a typed reason is malformed (protocol 2).
        assert!(matches!(
            PeerAction::decode(kind, br#"{"query_id":"q","reason":"text","leader":"l"}"#),
            Err(DecodeError::Malformed(_))
        ));
        // The reason an ended query is answered with is decoded, not read.
        let status = crate::gateway::PeerRefusal::Ended(reason.clone()).to_status();
        assert_eq!(
            status_error("p", "a", status),
            TransportError::Aborted(reason)
        );
        let garbled = tonic::Status::aborted("not json");
        assert!(matches!(
            status_error("p", "a", garbled),
            TransportError::Protocol { .. }
        ));
        // A start's body is not a proposal; an unknown name is not malformed.
        assert!(matches!(
            PeerAction::decode(action::PROPOSE, b"{\"query_id\":\"q\"}"),
            Err(DecodeError::Malformed(m)) if m.starts_with("malformed propose message")
        ));
        assert!(matches!(
            PeerAction::decode("drop_table", b"{}"),
            Err(DecodeError::Unknown(_))
        ));
        assert_eq!(
            PeerAction::decode("x", b"").unwrap_err().to_status().code(),
            tonic::Code::Unimplemented
        );
    }

    #[test]
    fn another_protocol_version_is_refused_naming_both() {
        let ok = versioned(());
        assert!(check_version(ok.metadata()).is_ok());
        let mut other = tonic::Request::new(());
        other.metadata_mut().insert(
            VERSION_HEADER,
            tonic::metadata::MetadataValue::from_static("0"),
        );
        let e = check_version(other.metadata()).unwrap_err();
        assert!(
            e.contains(&format!("version {PROTOCOL_VERSION}")) && e.contains("speaks 0"),
            "{e}"
        );
        let e = check_version(tonic::Request::new(()).metadata()).unwrap_err();
        assert!(e.contains("did not say"), "{e}");
    }
}
