//! The analysts' front door for BI tools: a Flight SQL server (arrow-flight's
//! `FlightSqlService`) over TLS.
//!
//! - Authentication: `Handshake` with `authorization: Basic base64(user:pw)`
//!   (padded or not) answers `authorization: Bearer <token>`; every later
//!   call sends that token. A preset token whose SHA-256 is in the config
//!   (`token_sha256`) works too, and so does Basic on any call.
//! - Statements: `GetFlightInfo(CommandStatementQuery)` runs the federated
//!   query (or EXPLAIN) and keeps its answer under a one-time ticket that
//!   only the same analyst can redeem with `DoGet`. Prepared statements plan
//!   locally for their schema at `CreatePreparedStatement` and run at
//!   `GetFlightInfo(CommandPreparedStatementQuery)`. Parameters are refused.
//! - Catalog browsing shows the federated catalog (catalog `council`,
//!   schema `public`) as this party's policy lets the analyst see it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, IpcMessage, SchemaAsIpc, Ticket,
};
use futures::{Stream, TryStreamExt};
use policies::Analyst;
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::gateway::{Gateway, QueryFailure};
use crate::service::{basic_credentials, failure_status};

type FlightStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How long a handshake's Bearer token stays valid.
const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// How long an answer waits for its `DoGet`, and a prepared statement for
/// its use.
const RESULT_TTL: Duration = Duration::from_secs(600);
const PREPARED_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most answers and prepared statements kept at once (oldest dropped).
const MAX_KEPT: usize = 10_000;

pub const CATALOG_NAME: &str = "council";
pub const SCHEMA_NAME: &str = "public";

struct Kept<T> {
    owner: String,
    at: Instant,
    value: T,
}

#[derive(Default)]
struct State {
    tokens: HashMap<String, Kept<Analyst>>,
    answers: HashMap<String, Kept<(SchemaRef, Vec<RecordBatch>)>>,
    prepared: HashMap<String, Kept<(String, SchemaRef)>>,
}

fn prune<T>(map: &mut HashMap<String, Kept<T>>, ttl: Duration) {
    map.retain(|_, k| k.at.elapsed() < ttl);
    while map.len() >= MAX_KEPT {
        let Some(oldest) = map.iter().min_by_key(|(_, k)| k.at).map(|(h, _)| h.clone()) else {
            break;
        };
        map.remove(&oldest);
    }
}

fn new_handle() -> String {
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut b);
    hex::encode(b)
}

pub struct FlightSqlFrontDoor {
    gw: Arc<Gateway>,
    state: Mutex<State>,
    info: SqlInfoData,
}

impl FlightSqlFrontDoor {
    pub fn new(gw: Arc<Gateway>) -> Result<Self, arrow_flight::error::FlightError> {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "Council");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        b.append(SqlInfo::FlightSqlServerCancel, false);
        b.append(SqlInfo::SqlDdlCatalog, false);
        b.append(SqlInfo::SqlDdlSchema, false);
        b.append(SqlInfo::SqlDdlTable, false);
        b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        b.append(SqlInfo::SqlIdentifierCase, 1i32); // case-insensitive (lower)
        Ok(FlightSqlFrontDoor {
            gw,
            state: Mutex::new(State::default()),
            info: b.build()?,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who is calling: a Bearer token from a handshake or preset, or Basic.
    async fn analyst(&self, md: &MetadataMap) -> Result<Analyst, Status> {
        let header = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let bearer = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "));
        if let Some(token) = bearer {
            let token = token.trim();
            if let Some(k) = self.state().tokens.get(token) {
                if k.at.elapsed() < TOKEN_TTL {
                    return Ok(k.value.clone());
                }
            }
            return self
                .gw
                .authenticate_token(token)
                .map_err(|f| failure_status(&f));
        }
        let (user, password) = basic_credentials(md)?;
        self.gw
            .authenticate(&user, &password)
            .await
            .map_err(|f| failure_status(&f))
    }

    /// Runs a statement (a query or EXPLAIN) and keeps its answer for one
    /// `DoGet` by the same analyst.
    async fn run_and_keep(
        &self,
        analyst: &Analyst,
        sql: &str,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let (schema, batches) = self
            .run(analyst, sql)
            .await
            .map_err(|f| failure_status(&f))?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let handle = new_handle();
        {
            let mut st = self.state();
            prune(&mut st.answers, RESULT_TTL);
            st.answers.insert(
                handle.clone(),
                Kept {
                    owner: analyst.to_string(),
                    at: Instant::now(),
                    value: (schema.clone(), batches),
                },
            );
        }
        let ticket = TicketStatementQuery {
            statement_handle: handle.into_bytes().into(),
        };
        let endpoint =
            FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec()));
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor)
            .with_total_records(rows as i64)
            .with_ordered(true);
        Ok(Response::new(info))
    }

    /// The answer (its DP notice is in the schema's metadata, which ADBC
    /// and JDBC hand to the application).
    async fn run(
        &self,
        analyst: &Analyst,
        sql: &str,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), QueryFailure> {
        let answer = self.gw.answer(analyst, sql).await?;
        Ok((answer.schema, answer.batches))
    }

    /// A metadata answer: schema up front, the command itself as the ticket.
    fn metadata_info(
        &self,
        schema: &Schema,
        command: arrow_flight::sql::Any,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(command.encode_to_vec()));
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }
}

/// Streams `batches` as Flight data, the schema first even when empty.
pub fn stream_batches(schema: SchemaRef, batches: Vec<RecordBatch>) -> FlightStream<FlightData> {
    let s = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::iter(batches.into_iter().map(Ok)))
        .map_err(|e| Status::internal(e.to_string()));
    Box::pin(s)
}

fn one_batch<E: std::fmt::Display>(
    batch: Result<RecordBatch, E>,
) -> Result<Response<FlightStream<FlightData>>, Status> {
    let batch = batch.map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(stream_batches(batch.schema(), vec![batch])))
}

fn schema_ipc(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let msg: IpcMessage = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
    Ok(msg.0)
}

#[tonic::async_trait]
impl FlightSqlService for FlightSqlFrontDoor {
    type FlightService = FlightSqlFrontDoor;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<FlightStream<HandshakeResponse>>, Status> {
        let (user, password) = basic_credentials(request.metadata())?;
        let analyst = self
            .gw
            .authenticate(&user, &password)
            .await
            .map_err(|f| failure_status(&f))?;
        let token = new_handle();
        {
            let mut st = self.state();
            prune(&mut st.tokens, TOKEN_TTL);
            st.tokens.insert(
                token.clone(),
                Kept {
                    owner: analyst.to_string(),
                    at: Instant::now(),
                    value: analyst,
                },
            );
        }
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into_bytes().into(),
        };
        let mut resp: Response<FlightStream<HandshakeResponse>> =
            Response::new(Box::pin(futures::stream::iter(vec![Ok(reply)])));
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::internal("token is not a valid header"))?;
        resp.metadata_mut().insert("authorization", header);
        Ok(resp)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let analyst = self.analyst(request.metadata()).await?;
        self.run_and_keep(&analyst, &query.query, request.into_inner())
            .await
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let analyst = self.analyst(request.metadata()).await?;
        let handle = String::from_utf8_lossy(&cmd.prepared_statement_handle).to_string();
        let sql = {
            let st = self.state();
            match st.prepared.get(&handle) {
                Some(k) if k.owner == analyst.to_string() => k.value.0.clone(),
                _ => {
                    return Err(Status::not_found(
                        "no such prepared statement (closed, expired, or another analyst's); prepare it again",
                    ))
                }
            }
        };
        self.run_and_keep(&analyst, &sql, request.into_inner())
            .await
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream<FlightData>>, Status> {
        let analyst = self.analyst(request.metadata()).await?;
        let handle = String::from_utf8_lossy(&ticket.statement_handle).to_string();
        let kept = {
            let mut st = self.state();
            match st.answers.get(&handle) {
                Some(k) if k.owner == analyst.to_string() => st.answers.remove(&handle),
                _ => None,
            }
        };
        let Some(kept) = kept else {
            return Err(Status::not_found(
                "no answer under this ticket (already fetched, expired, or another analyst's); run the statement again",
            ));
        };
        let (schema, batches) = kept.value;
        Ok(Response::new(stream_batches(schema, batches)))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let analyst = self.analyst(request.metadata()).await?;
        let schema = self
            .gw
            .describe(&query.query)
            .await
            .map_err(|f| failure_status(&f))?;
        let handle = new_handle();
        let dataset_schema = schema_ipc(&schema)?;
        {
            let mut st = self.state();
            prune(&mut st.prepared, PREPARED_TTL);
            st.prepared.insert(
                handle.clone(),
                Kept {
                    owner: analyst.to_string(),
                    at: Instant::now(),
                    value: (query.query, schema),
                },
            );
        }
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into_bytes().into(),
            dataset_schema,
            parameter_schema: schema_ipc(&Schema::empty())?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        let analyst = self.analyst(request.metadata()).await?;
        let handle = String::from_utf8_lossy(&query.prepared_statement_handle).to_string();
        let mut st = self.state();
        if st
            .prepared
            .get(&handle)
            .is_some_and(|k| k.owner == analyst.to_string())
        {
            st.prepared.remove(&handle);
        }
        Ok(())
    }

    async fn do_put_prepared_statement_query(
        &self,
        _query: CommandPreparedStatementQuery,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        Err(Status::invalid_argument(
            "Council statements take no parameters; write the values into the SQL text",
        ))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.analyst(request.metadata()).await?;
        let schema = query.into_builder().schema();
        self.metadata_info(&schema, query.as_any(), request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream<FlightData>>, Status> {
        self.analyst(request.metadata()).await?;
        let mut b = query.into_builder();
        b.append(CATALOG_NAME);
        one_batch(b.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.analyst(request.metadata()).await?;
        let schema = query.clone().into_builder().schema();
        self.metadata_info(&schema, query.as_any(), request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream<FlightData>>, Status> {
        self.analyst(request.metadata()).await?;
        let mut b = query.into_builder();
        b.append(CATALOG_NAME, SCHEMA_NAME);
        one_batch(b.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.analyst(request.metadata()).await?;
        let schema = query.clone().into_builder().schema();
        self.metadata_info(&schema, query.as_any(), request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream<FlightData>>, Status> {
        let analyst = self.analyst(request.metadata()).await?;
        let mut b = query.into_builder();
        for (name, schema) in self.gw.visible_tables(&analyst) {
            b.append(CATALOG_NAME, SCHEMA_NAME, name, "TABLE", &schema)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        one_batch(b.build())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.analyst(request.metadata()).await?;
        let schema = query.into_builder().schema();
        self.metadata_info(&schema, query.as_any(), request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream<FlightData>>, Status> {
        self.analyst(request.metadata()).await?;
        let mut b = query.into_builder();
        b.append("TABLE");
        one_batch(b.build())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.analyst(request.metadata()).await?;
        let schema = query.clone().into_builder(&self.info).schema();
        self.metadata_info(&schema, query.as_any(), request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream<FlightData>>, Status> {
        self.analyst(request.metadata()).await?;
        one_batch(query.into_builder(&self.info).build())
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
