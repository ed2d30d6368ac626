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
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::gateway::{FailureKind, Gateway, QueryFailure, ShareShape};
use crate::net::ConnInfo;
use crate::peer::{check_version, PeerAction, PutHeader};
use crate::session::PeerRefusal;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Most bytes one peer message may take. The planner refuses a query whose
/// result share would come near it (`planner::plan::MAX_SHARE_BYTES`).
pub const MAX_MESSAGE: usize = 64 << 20;
/// Share streams a gateway reads at once from one peer (each bounded in
/// bytes and messages by the share's shape, `read_share_stream`): a peer
/// that opens streams and never finishes them blocks only its own.
pub const MAX_PUTS_PER_PEER: usize = 32;
/// The longest a share stream may take to arrive whole beyond the peer
/// timeout (a sender's put waits up to that timeout for this party's
/// query to read its batches, so the deadline here is the later one).
pub const PUT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

fn caller_party<T>(req: &Request<T>) -> Result<String, Status> {
    req.extensions()
        .get::<ConnInfo>()
        .and_then(|c| c.party.clone())
        .ok_or_else(|| Status::unauthenticated("no verified party certificate on this connection"))
}

pub struct PeerService {
    pub gw: Arc<Gateway>,
    /// Bounds the share streams read at once, per peer.
    puts: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl PeerService {
    pub fn new(gw: Arc<Gateway>) -> Self {
        PeerService {
            gw,
            puts: Default::default(),
        }
    }

    fn put_slots(&self, peer: &str) -> Arc<tokio::sync::Semaphore> {
        let mut m = self.puts.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(peer.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_PUTS_PER_PEER)))
            .clone()
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
        check_version(request.metadata()).map_err(Status::failed_precondition)?;
        let action = request.into_inner();
        let body = self
            .handle_action(&from, &action.r#type, &action.body)
            .await?;
        Ok(Response::new(one_result(body)))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        let from = caller_party(&request)?;
        check_version(request.metadata()).map_err(Status::failed_precondition)?;
        self.handle_put(&from, request.into_inner()).await?;
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

/// What the peer service does with a message once it knows its sender
/// (the party the TLS certificate names) and its protocol version: the same
/// for the gRPC server and for the in-memory network
/// (`crate::network::MemoryNetwork`).
impl PeerService {
    /// One action from `from`: decoded in one place, handled by the
    /// gateway; the body of its single reply.
    pub(crate) async fn handle_action(
        &self,
        from: &str,
        kind: &str,
        body: &[u8],
    ) -> Result<Vec<u8>, Status> {
        match PeerAction::decode(kind, body).map_err(|e| e.to_status())? {
            PeerAction::Propose(p) => {
                let v = self.gw.on_propose(from, p).await;
                serde_json::to_vec(&v).map_err(|e| Status::internal(e.to_string()))
            }
            PeerAction::Start(r) => {
                self.gw.on_start(from, r).map_err(|r| r.to_status())?;
                Ok(b"{}".to_vec())
            }
            PeerAction::Abort(r) => {
                self.gw.on_abort(from, &r);
                Ok(b"{}".to_vec())
            }
        }
    }

    /// One share stream from `from`, bounded in streams at once per peer
    /// and in time.
    pub(crate) async fn handle_put<S>(&self, from: &str, stream: S) -> Result<(), Status>
    where
        S: Stream<Item = Result<FlightData, Status>> + Send + Unpin + 'static,
    {
        if !self.gw.parties.iter().any(|p| p == from) {
            return Err(Status::permission_denied(format!(
                "{from} is not a party of this federation"
            )));
        }
        let _slot = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.put_slots(from).acquire_owned(),
        )
        .await
        .map_err(|_| Status::resource_exhausted("too many share streams at once from this peer"))?
        .map_err(|_| Status::internal("share slots closed"))?;
        tokio::time::timeout(self.gw.timeout + PUT_DEADLINE, self.read_put(from, stream))
            .await
            .map_err(|_| Status::deadline_exceeded("the share stream did not arrive in time"))?
    }

    async fn read_put<S>(&self, from: &str, mut stream: S) -> Result<(), Status>
    where
        S: Stream<Item = Result<FlightData, Status>> + Send + Unpin + 'static,
    {
        let first = stream
            .next()
            .await
            .transpose()?
            .ok_or_else(|| Status::invalid_argument("empty share stream"))?;
        let header: PutHeader = first
            .flight_descriptor
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("share stream without a descriptor"))
            .and_then(|d| {
                serde_json::from_slice(&d.cmd)
                    .map_err(|e| Status::invalid_argument(format!("malformed share header: {e}")))
            })?;
        // The message opens at this party only if the query's engine
        // expects it from `from` now; its shape is then known before a byte
        // of it is decoded.
        let (delivery, shape) = self
            .gw
            .open_share(from, &header.leader, &header.query_id, header.step)
            .map_err(|r| r.to_status())?;
        let all = futures::stream::iter([Ok(first)]).chain(stream);
        // Each batch goes to the query as it is decoded; this waits while
        // the query has a few batches of it still to read.
        let d = &delivery;
        let read = read_share_stream(all, shape, move |b| async move {
            d.push(b)
                .await
                .map_err(|e| PeerRefusal::from(e).to_status())
        })
        .await;
        match read {
            Ok(()) => delivery
                .finish()
                .await
                .map_err(|e| PeerRefusal::from(e).to_status()),
            // A malformed share (our own checks say `invalid_argument`)
            // ends the query at once (every party then aborts with nothing
            // revealed), not at the timeout. A stream that broke off (its
            // sender stopped it, on an abort of its own, or the connection
            // dropped) is not the sender's fault to record: the message
            // breaks off at this party too, and the query ends by that.
            Err(e) if e.code() != tonic::Code::InvalidArgument => Err(e),
            Err(e) => {
                // Aborted before the message breaks off, so that the
                // query's reader sees why.
                self.gw.reject_share(
                    &header.leader,
                    &header.query_id,
                    &format!("{from} sent a malformed share: {}", e.message()),
                );
                drop(delivery);
                Err(e)
            }
        }
    }
}

pub fn failure_status(f: &QueryFailure) -> Status {
    match f.kind {
        FailureKind::Invalid => Status::invalid_argument(f.message.clone()),
        FailureKind::Refused => Status::permission_denied(f.message.clone()),
        FailureKind::Unavailable => Status::unavailable(f.message.clone()),
        FailureKind::Busy => Status::resource_exhausted(f.message.clone()),
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

/// Decodes one share stream: a schema message, then record batches of at
/// most `max_cols` columns whose rows add up to exactly `rows` (a sender
/// streams a share over a large domain as many batches, and arrow-flight
/// splits any above 2 MiB). Every IPC header is checked as it arrives,
/// before Arrow reads it: Arrow trusts the lengths a header declares and
/// allocates by them, so a crafted header from a peer could ask for a
/// terabyte and abort the gateway. Each batch goes to `sink` as it is
/// decoded, so that a share is never held whole here. The whole stream has
/// one budget of bytes and of messages from the share's shape (which the
/// plan bounds, `planner::plan::MAX_SHARE_BYTES`), never from what a peer
/// declares. Our own checks fail with `invalid_argument`; a failure of the
/// stream or of `sink` keeps its own code.
pub async fn read_share_stream<S, F, Fut>(
    stream: S,
    shape: ShareShape,
    mut sink: F,
) -> Result<(), Status>
where
    S: Stream<Item = Result<FlightData, Status>> + Send + Unpin + 'static,
    F: FnMut(arrow::array::RecordBatch) -> Fut,
    Fut: std::future::Future<Output = Result<(), Status>>,
{
    let bad = |m: String| Status::invalid_argument(format!("unreadable share batch: {m}"));
    let ShareShape {
        rows,
        max_cols,
        key_bytes,
    } = shape;
    let mut left = rows;
    let mut schema_seen = false;
    // One budget for the whole stream, not per message: the bytes a share
    // of this shape can need (8-byte words and validity bitmaps, with room
    // for text keys of the declared domains), and a number of messages an
    // honest sender (batches of `executor::transport::BATCH_ROWS` rows,
    // split by arrow-flight at 2 MiB) never comes near, so that many small
    // batches cannot hold more than one whole share would.
    let mut bytes_left = share_budget(rows, max_cols, key_bytes);
    let mut messages_left =
        2 + bytes_left / (256 << 10) + (rows / executor::transport::BATCH_ROWS) as u64;
    let checked = stream.map(move |m| {
        let m = m.map_err(FlightError::from)?;
        if messages_left == 0 {
            return Err(FlightError::ProtocolError(format!(
                "more messages than a share of {rows} rows needs"
            )));
        }
        messages_left -= 1;
        let body = m.data_body.len() as u64;
        if body > bytes_left {
            return Err(FlightError::ProtocolError(format!(
                "more bytes than a share of {rows} rows and {max_cols} columns needs"
            )));
        }
        bytes_left -= body;
        let batch_rows = check_ipc_header(&m, schema_seen, left, max_cols, key_bytes)
            .map_err(FlightError::ProtocolError)?;
        schema_seen = true;
        left -= batch_rows;
        Ok(m)
    });
    let mut batches = FlightRecordBatchStream::new_from_flight_data(checked);
    let (mut got, mut seen) = (0usize, 0usize);
    loop {
        // Arrow's IPC reader asserts on some inconsistent buffers that the
        // header checks do not rule out (a validity bitmap shorter than
        // its null count, a misaligned buffer: found by fuzzing). Those
        // panics end this share stream as an error, never more.
        let next = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(batches.next()))
            .await
            .map_err(|_| bad("Arrow could not decode it".into()))?;
        let Some(b) = next else { break };
        let b = b.map_err(|e| match e {
            FlightError::Tonic(s) => *s,
            FlightError::ProtocolError(m) => bad(m),
            other => bad(other.to_string()),
        })?;
        if b.num_columns() > max_cols {
            return Err(bad(format!(
                "{} columns where at most {max_cols} belong",
                b.num_columns()
            )));
        }
        got += b.num_rows();
        seen += 1;
        sink(b).await?;
    }
    if seen == 0 {
        return Err(Status::invalid_argument("share stream without a batch"));
    }
    if got != rows {
        return Err(bad(format!("{got} rows where {rows} belong")));
    }
    Ok(())
}

/// [`read_share_stream`] joined into one batch (the fuzz tests read a
/// share whole).
pub async fn decode_share_stream<S>(
    stream: S,
    shape: ShareShape,
) -> Result<arrow::array::RecordBatch, Status>
where
    S: Stream<Item = Result<FlightData, Status>> + Send + Unpin + 'static,
{
    let mut out = Vec::new();
    read_share_stream(stream, shape, |b| {
        out.push(b);
        std::future::ready(Ok(()))
    })
    .await?;
    let first = out
        .first()
        .ok_or_else(|| Status::invalid_argument("share stream without a batch"))?;
    arrow::compute::concat_batches(&first.schema(), &out)
        .map_err(|e| Status::invalid_argument(format!("unreadable share batch: {e}")))
}

/// The most body bytes one share stream of `rows` rows, at most `max_cols`
/// columns and `key_bytes` of key text may carry in all.
fn share_budget(rows: usize, max_cols: usize, key_bytes: u64) -> u64 {
    (rows as u64 + 1) * (max_cols as u64 + 1) * 24 + key_bytes + (1 << 20)
}

/// What a share message's IPC header may declare: first a schema of at
/// most `max_cols` flat fields, then record batches of 1 to `left` rows
/// (the rows still to come) whose nodes and buffers lie inside the
/// message's body; no compression, no dictionaries. Returns the rows the
/// message carries.
fn check_ipc_header(
    m: &FlightData,
    schema_seen: bool,
    left: usize,
    max_cols: usize,
    key_bytes: u64,
) -> Result<usize, String> {
    use arrow::ipc::MessageHeader;
    let msg = arrow::ipc::root_as_message(&m.data_header[..])
        .map_err(|e| format!("the IPC header is not a valid message: {e}"))?;
    let body = m.data_body.len() as i64;
    let declared_rows = msg
        .header_as_record_batch()
        .map(|rb| rb.length())
        .unwrap_or(0);
    // No more body than a batch of this shape can need.
    let most = share_budget(
        declared_rows.clamp(0, left as i64) as usize,
        max_cols,
        key_bytes,
    ) as i64;
    if body > most {
        return Err(format!("{body} bytes where at most {most} belong"));
    }
    if msg.bodyLength() < 0 || msg.bodyLength() > body {
        return Err(format!(
            "the header declares a body of {} bytes, the message has {body}",
            msg.bodyLength()
        ));
    }
    match msg.header_type() {
        MessageHeader::Schema if schema_seen => Err("a second schema in one share stream".into()),
        MessageHeader::RecordBatch if !schema_seen => {
            Err("a record batch before the share's schema".into())
        }
        MessageHeader::Schema => {
            let schema = msg
                .header_as_schema()
                .ok_or("a schema header without a schema")?;
            let fields = schema.fields().map(|f| f.len()).unwrap_or(0);
            if fields > max_cols {
                return Err(format!("{fields} columns where at most {max_cols} belong"));
            }
            let fs = schema.fields().ok_or("a schema without fields")?;
            for f in fs.iter() {
                if f.children().is_some_and(|c| !c.is_empty()) || f.dictionary().is_some() {
                    return Err("share columns are flat, without dictionaries".into());
                }
                check_field_type(&f)?;
            }
            Ok(0)
        }
        MessageHeader::RecordBatch => {
            let rb = msg
                .header_as_record_batch()
                .ok_or("a record batch header without a batch")?;
            let most = left.min(executor::transport::BATCH_ROWS);
            if rb.length() < 1 || rb.length() > most as i64 {
                return Err(format!(
                    "a batch of {} rows where 1 to {most} rows belong",
                    rb.length()
                ));
            }
            if rb.compression().is_some() {
                return Err("compressed share batches are not accepted".into());
            }
            if rb.variadicBufferCounts().is_some_and(|v| !v.is_empty()) {
                return Err("share batches have no variadic buffers".into());
            }
            let nodes = rb.nodes().map(|n| n.len()).unwrap_or(0);
            if nodes > max_cols {
                return Err(format!("{nodes} columns where at most {max_cols} belong"));
            }
            for n in rb.nodes().iter().flat_map(|v| v.iter()) {
                if n.length() < 0
                    || n.length() > rb.length()
                    || n.null_count() < 0
                    || n.null_count() > n.length()
                {
                    return Err("a column whose length does not match the batch".into());
                }
            }
            let buffers = rb.buffers().map(|b| b.len()).unwrap_or(0);
            if buffers > 3 * max_cols {
                return Err(format!("{buffers} buffers for at most {max_cols} columns"));
            }
            for b in rb.buffers().iter().flat_map(|v| v.iter()) {
                let end = b.offset().checked_add(b.length());
                if b.offset() < 0 || b.length() < 0 || end.is_none_or(|e| e > body) {
                    return Err("a buffer outside the message body".into());
                }
                // Arrow's writer aligns every buffer to 8 bytes.
                if b.offset() % 8 != 0 {
                    return Err("a misaligned buffer".into());
                }
            }
            Ok(rb.length() as usize)
        }
        other => Err(format!("a {other:?} message where a share belongs")),
    }
}

/// The column types a share may have (UInt64 limbs, a 32-byte seed, and
/// the group key types), checked the way Arrow's schema conversion would
/// otherwise unwrap or panic on them.
fn check_field_type(f: &arrow::ipc::Field<'_>) -> Result<(), String> {
    use arrow::ipc::{DateUnit, Precision, TimeUnit, Type};
    let ok = match f.type_type() {
        Type::Bool | Type::Utf8 | Type::LargeUtf8 => true,
        Type::Int => f
            .type_as_int()
            .is_some_and(|i| matches!(i.bitWidth(), 8 | 16 | 32 | 64)),
        Type::FixedSizeBinary => f
            .type_as_fixed_size_binary()
            .is_some_and(|b| (1..=64).contains(&b.byteWidth())),
        Type::FloatingPoint => f
            .type_as_floating_point()
            .is_some_and(|p| matches!(p.precision(), Precision::SINGLE | Precision::DOUBLE)),
        Type::Date => f
            .type_as_date()
            .is_some_and(|d| matches!(d.unit(), DateUnit::DAY | DateUnit::MILLISECOND)),
        Type::Timestamp => f.type_as_timestamp().is_some_and(|t| {
            matches!(
                t.unit(),
                TimeUnit::SECOND
                    | TimeUnit::MILLISECOND
                    | TimeUnit::MICROSECOND
                    | TimeUnit::NANOSECOND
            )
        }),
        Type::Decimal => f.type_as_decimal().is_some_and(|d| {
            d.bitWidth() == 128
                && (1..=38).contains(&d.precision())
                && (0..=d.precision()).contains(&d.scale())
        }),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a column of type {:?}, which no share has",
            f.type_type()
        ))
    }
}
