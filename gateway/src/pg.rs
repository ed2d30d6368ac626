//! The analysts' front door for psql and Postgres-speaking tools: the
//! PostgreSQL wire protocol (the `pgwire` crate), simple and extended query
//! protocol, SCRAM-SHA-256 passwords, TLS.
//!
//! Routing: a statement that reads a federated table is a federated query
//! (agreement, policies, secure sum, exactly as through Flight SQL). Any
//! other statement (`SELECT version()`, psql's `\dt`, `information_schema`)
//! is answered by a local DataFusion context that holds only the federated
//! catalog as this analyst's policy shows it (empty tables, `pg_catalog`
//! stand-ins): no party's data is ever in it. `SET`, `BEGIN`, `COMMIT` and
//! the like are acknowledged and ignored (Council is read-only).

use std::fmt::Debug;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::empty::EmptyTable;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{create_udf, ColumnarValue, LogicalPlan, Volatility};
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::{stream, Sink};
use pgwire::api::auth::sasl::scram::ScramAuth;
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DataRowEncoder, DescribePortalResponse, DescribeStatementResponse, FieldFormat, FieldInfo,
    QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{NoopQueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, PgWireServerHandlers, Type, METADATA_USER};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use policies::Analyst;

use crate::gateway::{explain_schema, FailureKind, Gateway, QueryFailure};

pub use crate::config::SCRAM_ITERATIONS;

pub struct PgFrontDoor {
    gw: Arc<Gateway>,
    parser: Arc<NoopQueryParser>,
}

impl PgFrontDoor {
    pub fn new(gw: Arc<Gateway>) -> Self {
        PgFrontDoor {
            gw,
            parser: Arc::new(NoopQueryParser::new()),
        }
    }
}

/// SCRAM-SHA-256 verifiers from the config (`scram` of an analyst).
struct Verifiers {
    gw: Arc<Gateway>,
}

impl Debug for Verifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifiers")
    }
}

#[async_trait]
impl AuthSource for Verifiers {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        // An unknown user gets a stand-in verifier (a salt and key derived
        // from the name with this gateway's secret, stable across attempts):
        // the SCRAM exchange then
        // fails at the proof, as a wrong password does, so neither the
        // answer nor its timing tells which names exist.
        let (salt, salted) = self
            .gw
            .scram_verifier(user)
            .unwrap_or_else(|| self.gw.standin_scram(user));
        Ok(Password::new(Some(salt), salted))
    }
}

/// A PostgreSQL error with SQLSTATE `code`.
fn pg_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_string(),
        code.to_string(),
        message.into(),
    )))
}

fn failure(f: QueryFailure) -> PgWireError {
    let code = match f.kind {
        FailureKind::Invalid => "42601",
        FailureKind::Refused => "42501",
        FailureKind::Unavailable => "08006",
        FailureKind::Busy => "53000",
        FailureKind::Aborted => "57014",
        FailureKind::Unauthenticated => "28000",
        FailureKind::Internal => "XX000",
    };
    pg_error(code, f.message)
}

/// What a statement is, for routing.
enum Route {
    /// Acknowledge with this command tag and do nothing.
    Ack(&'static str),
    /// `SHOW name`.
    Show(String),
    Explain(String),
    Federated(String),
    /// Answered from the catalog-only context.
    Local(datafusion::dataframe::DataFrame),
}

impl PgFrontDoor {
    fn analyst<C: ClientInfo>(&self, client: &C) -> PgWireResult<Analyst> {
        if !client.is_secure() {
            // SCRAM kept the password safe, but answers must not travel in
            // the clear either.
            return Err(pg_error(
                "28000",
                format!(
                    "gateway {} answers only over TLS; connect with sslmode=verify-full (and sslrootcert=the federation CA)",
                    self.gw.party
                ),
            ));
        }
        let user = client
            .metadata()
            .get(METADATA_USER)
            .cloned()
            .unwrap_or_default();
        self.gw
            .analyst_named(&user)
            .ok_or_else(|| PgWireError::InvalidPassword(user))
    }

    /// A context with the federated tables this analyst may see (empty) and
    /// small `pg_catalog` stand-ins, for tools' catalog queries.
    fn catalog_context(&self, analyst: &Analyst) -> PgWireResult<SessionContext> {
        let df = |e: datafusion::error::DataFusionError| pg_error("XX000", e.to_string());
        // Bounded like everything an analyst can start: a memory pool, and
        // (in `route`/`execute`) a time limit and a row limit.
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_limit(CATALOG_QUERY_MEMORY, 1.0)
            .build_arc()
            .map_err(df)?;
        let ctx = SessionContext::new_with_config_rt(
            SessionConfig::new()
                .with_information_schema(true)
                .with_target_partitions(1)
                .with_default_catalog_and_schema(
                    crate::flightsql::CATALOG_NAME,
                    crate::flightsql::SCHEMA_NAME,
                ),
            runtime,
        );
        let tables = self.gw.visible_tables(analyst);
        for (name, schema) in &tables {
            ctx.register_table(
                name.as_str(),
                Arc::new(EmptyTable::new(Arc::new(schema.clone()))),
            )
            .map_err(df)?;
        }
        let text = |v: Vec<String>| Arc::new(StringArray::from(v)) as ArrayRef;
        let int = |v: Vec<i32>| Arc::new(arrow::array::Int32Array::from(v)) as ArrayRef;
        let n = tables.len();
        let oids: Vec<i32> = (0..n as i32).map(|i| 16384 + i).collect();
        let mem = |cols: Vec<(&str, ArrayRef)>| -> PgWireResult<Arc<MemTable>> {
            let batch =
                RecordBatch::try_from_iter(cols).map_err(|e| pg_error("XX000", e.to_string()))?;
            Ok(Arc::new(
                MemTable::try_new(batch.schema(), vec![vec![batch]]).map_err(df)?,
            ))
        };
        ctx.register_table(
            "pg_class",
            mem(vec![
                ("oid", int(oids)),
                (
                    "relname",
                    text(tables.iter().map(|t| t.0.clone()).collect()),
                ),
                ("relnamespace", int(vec![2200; n])),
                ("relkind", text(vec!["r".into(); n])),
                ("relowner", int(vec![10; n])),
                ("relam", int(vec![2; n])),
            ])?,
        )
        .map_err(df)?;
        ctx.register_table(
            "pg_namespace",
            mem(vec![
                ("oid", int(vec![2200, 11])),
                ("nspname", text(vec!["public".into(), "pg_catalog".into()])),
            ])?,
        )
        .map_err(df)?;
        ctx.register_table(
            "pg_am",
            mem(vec![
                ("oid", int(vec![2])),
                ("amname", text(vec!["heap".into()])),
            ])?,
        )
        .map_err(df)?;
        let owner = Arc::new(|args: &[ColumnarValue]| {
            let rows = match args.first() {
                Some(ColumnarValue::Array(a)) => a.len(),
                _ => 1,
            };
            Ok(ColumnarValue::Array(Arc::new(StringArray::from(
                vec!["council"; rows],
            ))))
        });
        ctx.register_udf(create_udf(
            "pg_get_userbyid",
            vec![DataType::Int32],
            DataType::Utf8,
            Volatility::Immutable,
            owner,
        ));
        let visible = Arc::new(|args: &[ColumnarValue]| {
            let rows = match args.first() {
                Some(ColumnarValue::Array(a)) => a.len(),
                _ => 1,
            };
            Ok(ColumnarValue::Array(Arc::new(
                arrow::array::BooleanArray::from(vec![true; rows]),
            )))
        });
        ctx.register_udf(create_udf(
            "pg_table_is_visible",
            vec![DataType::Int32],
            DataType::Boolean,
            Volatility::Immutable,
            visible,
        ));
        Ok(ctx)
    }

    async fn route(&self, analyst: &Analyst, sql: &str) -> PgWireResult<Route> {
        planner::limits::check_text(sql).map_err(|e| pg_error("54000", e.to_string()))?;
        let sql = sql.trim().trim_end_matches(';').trim();
        let first = sql
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match first.as_str() {
            "SET" | "RESET" => return Ok(Route::Ack("SET")),
            "BEGIN" | "START" => return Ok(Route::Ack("BEGIN")),
            "COMMIT" | "END" => return Ok(Route::Ack("COMMIT")),
            "ROLLBACK" | "ABORT" => return Ok(Route::Ack("ROLLBACK")),
            "DISCARD" => return Ok(Route::Ack("DISCARD ALL")),
            "DEALLOCATE" => return Ok(Route::Ack("DEALLOCATE")),
            "SHOW" => return Ok(Route::Show(sql[4..].trim().to_string())),
            "EXPLAIN" => return Ok(Route::Explain(sql.to_string())),
            _ => {}
        }
        // Read-only: one SELECT (or VALUES) and nothing else reaches a
        // DataFusion context. DDL, DML, COPY, CREATE/DROP of anything and
        // settings are refused here, before planning, and again by the
        // context's SQLOptions.
        read_only(sql).await?;
        // Catalog queries name pg_catalog's tables and functions qualified.
        let local_sql = strip_pg_catalog(sql);
        let ctx = self.catalog_context(analyst)?;
        let options = datafusion::execution::context::SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let planned = match tokio::time::timeout(
            CATALOG_QUERY_TIME,
            ctx.sql_with_options(&local_sql, options),
        )
        .await
        {
            Ok(r) => r.and_then(|df| {
                let names: Vec<String> = ctx
                    .catalog_names()
                    .iter()
                    .filter_map(|c| ctx.catalog(c))
                    .flat_map(|c| {
                        c.schema_names()
                            .into_iter()
                            .filter_map(move |s| c.schema(&s))
                            .flat_map(|s| s.table_names())
                    })
                    .collect();
                bounded_catalog_plan(df.logical_plan(), &names)
                    .map_err(datafusion::error::DataFusionError::Plan)?;
                df.limit(0, Some(MAX_CATALOG_ROWS))
            }),
            Err(_) => return Err(pg_error("57014", "the catalog query took too long")),
        };
        let catalog = self.gw.catalog();
        let reads_federated = |plan: &LogicalPlan| {
            let mut found = false;
            let _ = plan.apply(|n| {
                if let LogicalPlan::TableScan(s) = n {
                    if catalog.table(s.table_name.table()).is_some() {
                        found = true;
                        return Ok(TreeNodeRecursion::Stop);
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            });
            found
        };
        match planned {
            Ok(df) if !reads_federated(df.logical_plan()) => Ok(Route::Local(df)),
            Ok(_) => Ok(Route::Federated(sql.to_string())),
            // A table this analyst cannot see, or SQL only the federation
            // can judge: let the federation (and its policies) answer.
            Err(e) => {
                let lower = sql.to_ascii_lowercase();
                if catalog
                    .tables()
                    .keys()
                    .any(|t| lower.contains(&t.to_ascii_lowercase()))
                {
                    Ok(Route::Federated(sql.to_string()))
                } else {
                    Err(pg_error(
                        "42601",
                        planner::plan::clean_df_error(&e.to_string()),
                    ))
                }
            }
        }
    }

    /// The answer's schema, without running anything.
    async fn describe(&self, analyst: &Analyst, sql: &str) -> PgWireResult<Option<SchemaRef>> {
        Ok(match self.route(analyst, sql).await? {
            Route::Ack(_) => None,
            Route::Show(name) => Some(show_schema(&name)),
            Route::Explain(_) => Some(explain_schema()),
            Route::Federated(sql) => Some(self.gw.describe(&sql).await.map_err(failure)?),
            Route::Local(df) => Some(Arc::new(df.schema().as_arrow().clone())),
        })
    }

    /// Runs `sql`; with it, under differential privacy, a notice that says
    /// what noise the answer carries (psql prints it above the rows).
    async fn execute(
        &self,
        analyst: &Analyst,
        sql: &str,
        format: &Format,
    ) -> PgWireResult<(Response, Option<String>)> {
        let mut notice = None;
        let (schema, batches) = match self.route(analyst, sql).await? {
            Route::Ack(tag) => return Ok((Response::Execution(Tag::new(tag)), None)),
            Route::Show(name) => {
                let schema = show_schema(&name);
                let value = show_value(&name);
                let batch = RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(StringArray::from(vec![value]))],
                )
                .map_err(|e| pg_error("XX000", e.to_string()))?;
                (schema, vec![batch])
            }
            Route::Explain(sql) | Route::Federated(sql) => {
                let a = self.gw.answer(analyst, &sql).await.map_err(failure)?;
                notice = a.notice;
                (a.schema, a.batches)
            }
            Route::Local(df) => {
                let schema = Arc::new(df.schema().as_arrow().clone());
                let batches = tokio::time::timeout(CATALOG_QUERY_TIME, df.collect())
                    .await
                    .map_err(|_| pg_error("57014", "the catalog query took too long"))?
                    .map_err(|e| {
                        pg_error("42601", planner::plan::clean_df_error(&e.to_string()))
                    })?;
                (schema, batches)
            }
        };
        Ok((encode(&schema, &batches, format)?, notice))
    }
}

/// Limits of the catalog-only context (tools' catalog queries).
const CATALOG_QUERY_TIME: std::time::Duration = std::time::Duration::from_secs(10);
const CATALOG_QUERY_MEMORY: usize = 64 * 1024 * 1024;
const MAX_CATALOG_ROWS: usize = 10_000;
/// Functions a catalog query may call, beyond `planner::total`'s: the
/// stand-ins tools' catalog queries use. Anything else (array_resize,
/// repeat, generate_series, …) could build values of any size from a
/// literal, which the memory pool does not see.
const CATALOG_FUNCTIONS: &[&str] = &[
    "version",
    "pg_get_userbyid",
    "pg_table_is_visible",
    "current_schema",
    "current_database",
    "current_user",
];

/// Refuses anything but one SELECT/VALUES query. Parsing runs on the
/// planning thread (a deep statement must not overflow a worker's stack).
async fn read_only(sql: &str) -> PgWireResult<()> {
    let text = sql.to_string();
    let verdict = planner::limits::on_planning_thread(move || {
        use datafusion::sql::sqlparser::ast::{SetExpr, Statement};
        use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
        let stmts = match datafusion::sql::sqlparser::parser::Parser::parse_sql(
            &PostgreSqlDialect {},
            &text,
        ) {
            Ok(s) => s,
            Err(e) => {
                // Unparsable: nothing runs either way, but a statement that
                // writes is told why it would be refused.
                const WRITES: &[&str] = &[
                    "CREATE", "DROP", "ALTER", "INSERT", "UPDATE", "DELETE", "COPY", "TRUNCATE",
                    "GRANT", "REVOKE", "MERGE", "VACUUM", "CALL", "DO", "LOAD", "ATTACH",
                    "INSTALL", "UPSERT", "REPLACE", "COMMENT", "SECURITY", "REINDEX", "CLUSTER",
                ];
                let first = text
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_ascii_uppercase();
                if WRITES.contains(&first.as_str()) {
                    return Ok(Some(format!("{first} statement")));
                }
                return Err(planner::PlanError::Syntax(e.to_string()));
            }
        };
        if let [Statement::Query(q)] = stmts.as_slice() {
            planner::limits::check_statement(&stmts[0])?;
            let into = matches!(q.body.as_ref(), SetExpr::Select(s) if s.into.is_some());
            if !into {
                return Ok(None);
            }
            return Ok(Some("SELECT INTO".to_string()));
        }
        let what = stmts
            .first()
            .map(|s| {
                s.to_string()
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
                    .to_uppercase()
            })
            .unwrap_or_else(|| "an empty statement".into());
        Ok(Some(if stmts.len() > 1 {
            "more than one statement".to_string()
        } else {
            what
        }))
    })
    .await
    .map_err(|e| pg_error("42601", e.to_string()))?;
    match verdict {
        None => Ok(()),
        Some(what) => Err(pg_error(
            "25006",
            format!(
                "Council's front doors are read-only: {what} is refused. Send SELECT, EXPLAIN or SHOW; \
                 nothing an analyst sends changes data, settings or files at a gateway"
            ),
        )),
    }
}

/// A catalog query may scan only the stand-in tables of its context (no
/// table functions) and call no function whose output size an argument
/// sets.
fn bounded_catalog_plan(plan: &LogicalPlan, tables: &[String]) -> Result<(), String> {
    let mut problem = None;
    let mut pieces = 0usize;
    let _ = plan.apply_with_subqueries(|n| {
        if let LogicalPlan::TableScan(s) = n {
            let t = s.table_name.table();
            if !tables.iter().any(|x| x == t) {
                problem = Some(format!("`{t}` is not a table of the catalog"));
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        let _ = n.apply_expressions(|e| {
            let _ = e.apply(|x| {
                use datafusion::logical_expr::Expr;
                match x {
                    Expr::ScalarFunction(f) => {
                        let name = f.func.name().to_ascii_lowercase();
                        if matches!(name.as_str(), "concat" | "concat_ws") {
                            pieces += f.args.len();
                        }
                        let known = planner::total::TOTAL_FUNCTIONS.contains(&name.as_str())
                            || planner::total::FLOAT_FUNCTIONS.contains(&name.as_str())
                            || CATALOG_FUNCTIONS.contains(&name.as_str());
                        if !known {
                            problem = Some(format!(
                                "{}() is not answered on the catalog",
                                name.to_uppercase()
                            ));
                            return Ok(TreeNodeRecursion::Stop);
                        }
                    }
                    Expr::BinaryExpr(b)
                        if b.op == datafusion::logical_expr::Operator::StringConcat =>
                    {
                        pieces += 1
                    }
                    _ => {}
                }
                Ok(TreeNodeRecursion::Continue)
            });
            if pieces > planner::total::MAX_STRING_PIECES {
                problem = Some("too many strings concatenated in a catalog query".into());
            }
            Ok(TreeNodeRecursion::Continue)
        });
        // Counted over the whole plan: nested subqueries multiply growth.
        Ok(if problem.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    match problem {
        Some(p) => Err(p),
        None => Ok(()),
    }
}

/// Sends a NOTICE (psql prints it before the answer).
async fn send_notice<C>(client: &mut C, text: &str) -> PgWireResult<()>
where
    C: Sink<PgWireBackendMessage> + Unpin,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    use futures::SinkExt;
    let info = ErrorInfo::new("NOTICE".into(), "01000".into(), text.trim_end().to_string());
    client
        .send(PgWireBackendMessage::NoticeResponse(info.into()))
        .await?;
    Ok(())
}

/// Removes `pg_catalog.` qualifiers (any case) outside string literals.
fn strip_pg_catalog(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let lower = sql.to_ascii_lowercase();
    let mut in_str = false;
    let mut i = 0;
    let bytes = sql.as_bytes();
    while i < bytes.len() {
        if bytes[i] == b'\'' {
            in_str = !in_str;
        }
        if !in_str && lower[i..].starts_with("pg_catalog.") {
            i += "pg_catalog.".len();
            continue;
        }
        let ch = sql[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn show_schema(name: &str) -> SchemaRef {
    let col = name.trim().to_ascii_lowercase().replace(' ', "_");
    Arc::new(Schema::new(vec![Field::new(col, DataType::Utf8, false)]))
}

fn show_value(name: &str) -> String {
    match name.trim().to_ascii_lowercase().as_str() {
        "transaction isolation level" | "transaction_isolation" => "read committed".into(),
        "server_version" => "15.0".into(),
        "standard_conforming_strings" => "on".into(),
        "client_encoding" | "server_encoding" => "UTF8".into(),
        "datestyle" => "ISO, MDY".into(),
        "timezone" => "UTC".into(),
        "search_path" => "public".into(),
        _ => String::new(),
    }
}

/// The PostgreSQL type an Arrow column is sent as.
fn pg_type(dt: &DataType) -> Type {
    match dt {
        DataType::Boolean => Type::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => Type::INT2,
        DataType::Int32 | DataType::UInt16 => Type::INT4,
        DataType::Int64 | DataType::UInt32 => Type::INT8,
        DataType::Float16 | DataType::Float32 => Type::FLOAT4,
        DataType::Float64 => Type::FLOAT8,
        DataType::Decimal128(_, _) | DataType::Decimal256(_, _) | DataType::UInt64 => Type::NUMERIC,
        DataType::Date32 | DataType::Date64 => Type::DATE,
        DataType::Timestamp(_, _) => Type::TIMESTAMP,
        _ => Type::TEXT,
    }
}

fn fields(schema: &Schema, format: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            FieldInfo::new(
                f.name().clone(),
                None,
                None,
                pg_type(f.data_type()),
                format.format_for(i),
            )
        })
        .collect()
}

/// Arrow batches as PostgreSQL rows: text format through Arrow's own
/// formatting (exact for decimals), binary format through typed values.
fn encode(schema: &SchemaRef, batches: &[RecordBatch], format: &Format) -> PgWireResult<Response> {
    let info = Arc::new(fields(schema, format));
    let mut rows = Vec::new();
    let mut enc = DataRowEncoder::new(info.clone());
    let opts = FormatOptions::default();
    let err = |e: arrow::error::ArrowError| pg_error("XX000", e.to_string());
    for b in batches {
        let formatters: Vec<ArrayFormatter> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        for r in 0..b.num_rows() {
            for (c, col) in b.columns().iter().enumerate() {
                let binary = info[c].format() == FieldFormat::Binary;
                encode_value(&mut enc, col, r, &formatters[c], binary)?;
            }
            rows.push(Ok(enc.take_row()));
        }
    }
    Ok(Response::Query(QueryResponse::new(
        info,
        stream::iter(rows),
    )))
}

fn encode_value(
    enc: &mut DataRowEncoder,
    col: &ArrayRef,
    r: usize,
    text: &ArrayFormatter,
    binary: bool,
) -> PgWireResult<()> {
    use arrow::array::AsArray;
    use arrow::datatypes as t;
    if col.is_null(r) {
        return enc.encode_field(&None::<i32>);
    }
    if let DataType::Boolean = col.data_type() {
        return enc.encode_field(&col.as_boolean().value(r));
    }
    if !binary {
        return enc.encode_field(&text.value(r).to_string());
    }
    match col.data_type() {
        DataType::Int8 => enc.encode_field(&(col.as_primitive::<t::Int8Type>().value(r) as i16)),
        DataType::UInt8 => enc.encode_field(&(col.as_primitive::<t::UInt8Type>().value(r) as i16)),
        DataType::Int16 => enc.encode_field(&col.as_primitive::<t::Int16Type>().value(r)),
        DataType::UInt16 => {
            enc.encode_field(&(col.as_primitive::<t::UInt16Type>().value(r) as i32))
        }
        DataType::Int32 => enc.encode_field(&col.as_primitive::<t::Int32Type>().value(r)),
        DataType::UInt32 => {
            enc.encode_field(&(col.as_primitive::<t::UInt32Type>().value(r) as i64))
        }
        DataType::Int64 => enc.encode_field(&col.as_primitive::<t::Int64Type>().value(r)),
        DataType::Float32 => enc.encode_field(&col.as_primitive::<t::Float32Type>().value(r)),
        DataType::Float64 => enc.encode_field(&col.as_primitive::<t::Float64Type>().value(r)),
        DataType::Decimal128(_, s) => {
            let v = col.as_primitive::<t::Decimal128Type>().value(r);
            let d = rust_decimal::Decimal::try_from_i128_with_scale(v, (*s).max(0) as u32)
                .map_err(|_| {
                    pg_error(
                        "22003",
                        "a decimal value has more than 28 digits, too many for binary NUMERIC; request text format",
                    )
                })?;
            enc.encode_field(&d)
        }
        DataType::Date32 => {
            let days = col.as_primitive::<t::Date32Type>().value(r);
            let d = days
                .checked_add(719_163)
                .and_then(chrono::NaiveDate::from_num_days_from_ce_opt)
                .ok_or_else(|| pg_error("22008", "date out of range"))?;
            enc.encode_field(&d)
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            enc.encode_field(&text.value(r).to_string())
        }
        other => Err(pg_error(
            "0A000",
            format!("binary format for {other} is not supported; request text format"),
        )),
    }
}

#[async_trait]
impl SimpleQueryHandler for PgFrontDoor {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let analyst = self.analyst(client)?;
        let mut out = Vec::new();
        for stmt in split_statements(query) {
            match self.execute(&analyst, stmt, &Format::UnifiedText).await {
                Ok((r, notice)) => {
                    if let Some(n) = notice {
                        send_notice(client, &n).await?;
                    }
                    out.push(r)
                }
                Err(PgWireError::UserError(info)) => {
                    out.push(Response::Error(info));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if out.is_empty() {
            out.push(Response::EmptyQuery);
        }
        Ok(out)
    }
}

/// Splits a simple-protocol query string at semicolons outside quotes.
fn split_statements(q: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut in_str) = (0, false);
    for (i, ch) in q.char_indices() {
        match ch {
            '\'' => in_str = !in_str,
            ';' if !in_str => {
                out.push(&q[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&q[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

#[async_trait]
impl ExtendedQueryHandler for PgFrontDoor {
    type Statement = String;
    type QueryParser = NoopQueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_describe_statement<C>(
        &self,
        client: &mut C,
        target: &StoredStatement<Self::Statement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let analyst = self.analyst(client)?;
        let fields = match self.describe(&analyst, &target.statement).await? {
            Some(s) => fields(&s, &Format::UnifiedText),
            None => Vec::new(),
        };
        Ok(DescribeStatementResponse::new(Vec::new(), fields))
    }

    async fn do_describe_portal<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let analyst = self.analyst(client)?;
        let fields = match self.describe(&analyst, &portal.statement.statement).await? {
            Some(s) => fields(&s, &portal.result_column_format),
            None => Vec::new(),
        };
        Ok(DescribePortalResponse::new(fields))
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if !portal.parameters.is_empty() {
            return Err(pg_error(
                "0A000",
                "Council statements take no parameters; write the values into the SQL text",
            ));
        }
        let analyst = self.analyst(client)?;
        let (r, notice) = self
            .execute(
                &analyst,
                &portal.statement.statement,
                &portal.result_column_format,
            )
            .await?;
        if let Some(n) = notice {
            send_notice(client, &n).await?;
        }
        Ok(r)
    }
}

/// One per connection: SCRAM at startup, then the query handlers.
pub struct PgHandlers {
    pub door: Arc<PgFrontDoor>,
    /// Set once this connection has logged in (the login deadline then no
    /// longer applies).
    pub logged_in: Arc<std::sync::atomic::AtomicBool>,
}

/// The PostgreSQL door's startup: TLS first, then SCRAM. A client that
/// starts without TLS (libpq's `sslmode=prefer` can be downgraded by the
/// network, and SCRAM could then be relayed) is refused before anything
/// else happens.
pub struct TlsFirst<H> {
    inner: Arc<H>,
    logged_in: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl<H: StartupHandler> StartupHandler for TlsFirst<H> {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: pgwire::messages::PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if !client.is_secure() {
            return Err(pg_error(
                "28000",
                "this gateway accepts PostgreSQL connections over TLS only; connect with sslmode=verify-full \
                 and sslrootcert=the federation CA",
            ));
        }
        self.inner.on_startup(client, message).await?;
        if matches!(
            client.state(),
            pgwire::api::PgWireConnectionState::ReadyForQuery
        ) {
            self.logged_in
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A connection that has not logged in by then is closed.
pub const PG_LOGIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// PostgreSQL connections open at once; more are closed on arrival.
pub const PG_MAX_CONNECTIONS: usize = 256;

impl PgWireServerHandlers for PgHandlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.door.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.door.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        let mut scram = ScramAuth::new(Arc::new(Verifiers {
            gw: self.door.gw.clone(),
        }));
        scram.set_iterations(SCRAM_ITERATIONS);
        let mut params = DefaultServerParameterProvider::default();
        params.server_version = "15.0 (Council)".to_string();
        Arc::new(TlsFirst {
            inner: Arc::new(SASLAuthStartupHandler::new(Arc::new(params)).with_scram(scram)),
            logged_in: self.logged_in.clone(),
        })
    }
}

/// Serves PostgreSQL clients on `listener` over TLS until `stop` fires.
pub fn spawn_pg(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    door: Arc<PgFrontDoor>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let open = Arc::new(tokio::sync::Semaphore::new(PG_MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => {
                    let Ok((socket, _)) = accepted else { continue };
                    let Ok(permit) = open.clone().try_acquire_owned() else {
                        drop(socket);
                        continue;
                    };
                    let _ = socket.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let logged_in = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let handlers = Arc::new(PgHandlers { door: door.clone(), logged_in: logged_in.clone() });
                    tokio::spawn(async move {
                        // pgwire 0.42's frame decoder panics on some
                        // malformed frames (found by fuzzing: `advance out of
                        // bounds`); the panic ends this connection only,
                        // quietly, never the gateway.
                        let serve = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
                            pgwire::tokio::process_socket(socket, Some(acceptor), handlers),
                        ));
                        tokio::pin!(serve);
                        tokio::select! {
                            _ = &mut serve => {}
                            _ = tokio::time::sleep(PG_LOGIN_DEADLINE) => {
                                // Logged in: serve on. Else drop the socket.
                                if logged_in.load(std::sync::atomic::Ordering::SeqCst) {
                                    let _ = serve.await;
                                }
                            }
                        }
                        drop(permit);
                    });
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_pg_catalog_outside_literals_and_splits_statements() {
        assert_eq!(
            strip_pg_catalog(
                "SELECT PG_CATALOG.pg_get_userbyid(1), 'pg_catalog.x' FROM pg_catalog.pg_class"
            ),
            "SELECT pg_get_userbyid(1), 'pg_catalog.x' FROM pg_class"
        );
        assert_eq!(
            split_statements("SET a = 1; SELECT ';' ;  "),
            vec!["SET a = 1", " SELECT ';' "]
        );
    }
}
