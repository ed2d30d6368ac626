//! The gRPC services of a gateway, both Arrow Flight:
//! - the peer service (mutual TLS; the caller is the party its certificate
//!   names): `do_action` propose/start/abort and `do_put` share batches;
//! - (the analysts' Flight SQL service is in `flightsql`; the credentials
//!   and error mapping it shares are here).

use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use base64::Engine as _;
use futures::{Stream, StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::gateway::{FailureKind, Gateway, QueryFailure};
use crate::net::ConnInfo;
use crate::peer::{Propose, PutHeader, QueryRef, Start};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Most bytes one peer message may take. The planner refuses a query whose
/// result share would come near it (`planner::plan::MAX_SHARE_BYTES`).
pub const MAX_MESSAGE: usize = 64 << 20;
/// Share streams a gateway reads at once (each may hold one message).
pub const MAX_PUTS: usize = 64;

fn caller_party<T>(req: &Request<T>) -> Result<String, Status> {
    req.extensions()
        .get::<ConnInfo>()
        .and_then(|c| c.party.clone())
        .ok_or_else(|| Status::unauthenticated("no verified party certificate on this connection"))
}

pub struct PeerService {
    pub gw: Arc<Gateway>,
    /// Bounds the share streams read at once.
    pub puts: Arc<tokio::sync::Semaphore>,
}

impl PeerService {
    pub fn new(gw: Arc<Gateway>) -> Self {
        PeerService {
            gw,
            puts: Arc::new(tokio::sync::Semaphore::new(MAX_PUTS)),
        }
    }
}

fn one_result(body: Vec<u8>) -> BoxStream<arrow_flight::Result> {
    Box::pin(futures::stream::iter(vec![Ok(arrow_flight::Result {
        body: body.into(),
    })]))
}

#[tonic::async_trait]
impl FlightService for PeerService {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoExchangeStream = BoxStream<FlightData>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let from = caller_party(&request)?;
        let action = request.into_inner();
        let bad = |e: serde_json::Error| {
            Status::invalid_argument(format!("malformed {} message: {e}", action.r#type))
        };
        match action.r#type.as_str() {
            "propose" => {
                let p: Propose = serde_json::from_slice(&action.body).map_err(bad)?;
                let v = self.gw.on_propose(&from, p).await;
                let body = serde_json::to_vec(&v).map_err(|e| Status::internal(e.to_string()))?;
                Ok(Response::new(one_result(body)))
            }
            "start" => {
                let r: Start = serde_json::from_slice(&action.body).map_err(bad)?;
                self.gw
                    .on_start(&from, r)
                    .map_err(Status::failed_precondition)?;
                Ok(Response::new(one_result(b"{}".to_vec())))
            }
            "abort" => {
                let r: QueryRef = serde_json::from_slice(&action.body).map_err(bad)?;
                self.gw.on_abort(&from, &r);
                Ok(Response::new(one_result(b"{}".to_vec())))
            }
            other => Err(Status::unimplemented(format!(
                "unknown peer action `{other}`"
            ))),
        }
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        let from = caller_party(&request)?;
        let _slot = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.puts.clone().acquire_owned(),
        )
        .await
        .map_err(|_| Status::resource_exhausted("too many share streams at once"))?
        .map_err(|_| Status::internal("share slots closed"))?;
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty share stream"))?;
        let header: PutHeader = first
            .flight_descriptor
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("share stream without a descriptor"))
            .and_then(|d| {
                serde_json::from_slice(&d.cmd)
                    .map_err(|e| Status::invalid_argument(format!("malformed share header: {e}")))
            })?;
        let all = futures::stream::once(async { Ok(first) })
            .chain(stream)
            .map_err(|s| FlightError::Tonic(Box::new(s)));
        let mut batches = FlightRecordBatchStream::new_from_flight_data(all);
        let batch = match batches.next().await {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                return Err(Status::invalid_argument(format!(
                    "unreadable share batch: {e}"
                )))
            }
            None => return Err(Status::invalid_argument("share stream without a batch")),
        };
        if batches.next().await.is_some() {
            return Err(Status::invalid_argument(
                "a share stream carries exactly one batch",
            ));
        }
        self.gw
            .on_put(&from, &header.leader, &header.query_id, header.round, batch)
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(Box::pin(futures::stream::iter(vec![Ok(
            PutResult::default(),
        )]))))
    }

    async fn handshake(
        &self,
        _r: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented(
            "peers authenticate with certificates",
        ))
    }
    async fn list_flights(
        &self,
        _r: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        Err(Status::unimplemented("list_flights"))
    }
    async fn get_flight_info(
        &self,
        _r: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented("get_flight_info"))
    }
    async fn poll_flight_info(
        &self,
        _r: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("poll_flight_info"))
    }
    async fn get_schema(
        &self,
        _r: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(Status::unimplemented("get_schema"))
    }
    async fn do_get(&self, _r: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        Err(Status::unimplemented("peers never fetch results"))
    }
    async fn do_exchange(
        &self,
        _r: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("do_exchange"))
    }
    async fn list_actions(
        &self,
        _r: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Err(Status::unimplemented("list_actions"))
    }
}

pub fn failure_status(f: &QueryFailure) -> Status {
    match f.kind {
        FailureKind::Invalid => Status::invalid_argument(f.message.clone()),
        FailureKind::Refused => Status::permission_denied(f.message.clone()),
        FailureKind::Unavailable => Status::unavailable(f.message.clone()),
        FailureKind::Aborted => Status::aborted(f.message.clone()),
        FailureKind::Unauthenticated => Status::unauthenticated(f.message.clone()),
        FailureKind::Internal => Status::internal(f.message.clone()),
    }
}

/// Reads `authorization: Basic base64(user:password)` (padded or not).
pub fn basic_credentials(md: &tonic::metadata::MetadataMap) -> Result<(String, String), Status> {
    let missing = || {
        Status::unauthenticated(
            "missing credentials: send `authorization: Basic base64(user:password)`",
        )
    };
    let v = md
        .get("authorization")
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let b64 = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
        .ok_or_else(missing)?
        .trim();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .or_else(|_| {
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64.trim_end_matches('='))
        })
        .map_err(|_| Status::unauthenticated("credentials are not valid base64"))?;
    let text =
        String::from_utf8(raw).map_err(|_| Status::unauthenticated("credentials are not UTF-8"))?;
    let (u, p) = text
        .split_once(':')
        .ok_or_else(|| Status::unauthenticated("credentials must be user:password"))?;
    Ok((u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(v: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("authorization", v.parse().unwrap());
        m
    }

    #[test]
    fn basic_credentials_padded_or_not() {
        // "alice:pw" is YWxpY2U6cHc= padded.
        assert_eq!(
            basic_credentials(&md("Basic YWxpY2U6cHc=")).unwrap(),
            ("alice".into(), "pw".into())
        );
        assert_eq!(
            basic_credentials(&md("Basic YWxpY2U6cHc")).unwrap(),
            ("alice".into(), "pw".into())
        );
        assert!(basic_credentials(&md("Bearer abc")).is_err());
        assert!(basic_credentials(&md("Basic !!!")).is_err());
        assert!(basic_credentials(&tonic::metadata::MetadataMap::new())
            .unwrap_err()
            .message()
            .contains("missing credentials"));
    }
}
