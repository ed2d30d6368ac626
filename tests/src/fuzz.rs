//! Fuzzing of everything that crosses a socket or comes from a user: SQL →
//! plan (and policy check), policy and catalog TOML, peer messages (action
//! bodies, share descriptors, Arrow IPC bytes), and both front doors' frames
//! (Flight SQL commands, PostgreSQL frontend messages).
//!
//! Each target generates inputs from a seeded ChaCha8 stream: grammar-built
//! SQL with the constructs attackers reach for, and mutations (bytes
//! replaced, inserted, deleted, duplicated; numbers swapped for extremes) of
//! valid messages. An input passes if the code under test returns, whatever
//! it returns; a panic is a finding. `cargo run --release -p council-tests
//! --bin fuzz -- --iterations 1000000` runs every target by hand; the test
//! suite runs a seeded slice.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::CATALOG;

/// The fuzz targets, by name.
pub const TARGETS: &[&str] = &[
    "sql",
    "policy",
    "catalog",
    "peer",
    "ipc",
    "flight_sql",
    "pg",
];

/// What one target did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub target: String,
    pub inputs: u64,
    /// Inputs the code accepted (planned, parsed, decoded).
    pub accepted: u64,
    /// Inputs that made the code panic, with the first few shown.
    pub panics: u64,
    /// Panics inside a library that the gateway contains (the connection
    /// or share stream ends with an error, nothing else): pgwire's frame
    /// decoder, Arrow's IPC reader.
    pub contained: u64,
    pub examples: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<10} {:>9} inputs, {:>9} accepted, {} panics{}",
            self.target,
            self.inputs,
            self.accepted,
            self.panics,
            if self.contained > 0 {
                format!(
                    " ({} more inside {}, contained: {} ends with an error)",
                    self.contained,
                    if self.target == "ipc" {
                        "Arrow's IPC reader"
                    } else {
                        "pgwire's decoder"
                    },
                    if self.target == "ipc" {
                        "the share stream"
                    } else {
                        "the connection"
                    }
                )
            } else {
                String::new()
            }
        )
    }
}

/// Runs `target` on `n` inputs from `seed`.
pub async fn run(target: &str, n: u64, seed: u64) -> Report {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut report = Report {
        target: target.to_string(),
        ..Default::default()
    };
    let ctx = Context::new().await;
    for _ in 0..n {
        let outcome = match target {
            "sql" => {
                let sql = random_sql(&mut rng);
                sql_case(&ctx, &sql).await.map(|ok| (ok, sql))
            }
            other => {
                let (ok, shown) = sync_case(other, &ctx, &mut rng);
                Ok((ok, shown))
            }
        };
        report.inputs += 1;
        // A panic that the code under test caught (the gateway contains
        // panics inside pgwire's frame decoder and Arrow's IPC reader).
        let caught = !last_panic().is_empty();
        match outcome {
            Ok((Some(_), _)) if caught => report.contained += 1,
            Ok((Some(true), _)) => report.accepted += 1,
            Ok((Some(false), _)) => {}
            // The pg target runs only pgwire's own frame decoder, whose
            // panics the gateway contains (spawn_pg).
            Ok((None, _)) if target == "pg" => {
                report.contained += 1;
            }
            Ok((None, shown)) | Err(shown) => {
                report.panics += 1;
                if report.examples.len() < 5 {
                    report.examples.push(shown.chars().take(300).collect());
                }
            }
        }
    }
    report
}

struct Context {
    catalog: planner::Catalog,
    parties: Vec<String>,
    policy: policies::Policy,
    policy_text: String,
    /// A plan to apply decoded DP parameters to.
    plan: planner::FederatedPlan,
    /// The FlightData messages of one share stream (schema, batch).
    share_flight: Vec<arrow_flight::FlightData>,
    share_keys: Vec<arrow::array::ArrayRef>,
}

impl Context {
    async fn new() -> Context {
        let catalog = planner::Catalog::from_toml(CATALOG, "catalog").expect("test catalog");
        let parties = vec!["p0".to_string(), "p1".to_string(), "p2".to_string()];
        let policy_text = crate::open_policy("p1", &parties)
            + "[privacy]\nmechanism = \"gaussian\"\nepsilon_per_query = 1\ndelta_per_query = 1e-6\n\
               budget = { epsilon = 10, delta = 1e-5, period_days = 30 }\n\
               [tables.t.privacy]\nindividual_id = \"id\"\nmax_rows_per_individual = 3\n";
        let policy = policies::Policy::parse(&policy_text, Some(&catalog)).expect("test policy");
        let plan = planner::plan_query(
            "SELECT g, COUNT(*), SUM(x), AVG(d), VAR_SAMP(f) FROM t GROUP BY g",
            &catalog,
            &parties,
            &planner::QueryOptions::default(),
        )
        .await
        .expect("test plan");
        let keys = plan.groups.key_arrays();
        let table = executor::SharedTable::zeros(keys.clone(), &SHARE_WIDTHS, plan.groups.len());
        let batch = table.to_batch().expect("share batch");
        // Split as arrow-flight splits a large share (here at 64 bytes, so
        // that the stream has several batches): the mutations then hit the
        // schema, every batch and the bookkeeping across them.
        use futures::StreamExt;
        let share_flight = futures::executor::block_on(
            arrow_flight::encode::FlightDataEncoderBuilder::new()
                .with_max_flight_data_size(64)
                .build(futures::stream::iter([Ok(batch)]))
                .map(|r| r.expect("flight data"))
                .collect::<Vec<_>>(),
        );
        assert!(share_flight.len() > 2, "a share in several batches");
        Context {
            catalog,
            parties,
            policy,
            policy_text,
            plan,
            share_flight,
            share_keys: keys,
        }
    }
}

/// Plans `sql` and checks it against the open policy. `Ok(Some(planned))`,
/// or `Err` when planning panicked (on its thread: it then ends without an
/// answer) or the checker did.
async fn sql_case(ctx: &Context, sql: &str) -> Result<Option<bool>, String> {
    let planned = planner::plan_query(
        sql,
        &ctx.catalog,
        &ctx.parties,
        &planner::QueryOptions::default(),
    )
    .await;
    match planned {
        Ok(plan) => {
            let analyst = policies::Analyst {
                party: "p0".into(),
                name: "ana".into(),
                roles: vec![],
            };
            let checked = catch_unwind(AssertUnwindSafe(|| {
                let _ = ctx.policy.check(&plan, &analyst);
                let _ = plan.explain("p0");
                if let Some(req) = ctx.policy.requirement(&plan, &analyst) {
                    if let Ok(Some(dp)) = planner::privacy::DpParams::merge(&[req], 3) {
                        let _ = plan.clone().with_privacy(dp);
                    }
                }
            }));
            checked.map(|_| Some(true)).map_err(|_| sql.to_string())
        }
        Err(planner::PlanError::Internal(m)) if m.contains("planning thread ended") => {
            Err(sql.to_string())
        }
        Err(_) => Ok(Some(false)),
    }
}

/// One input of a synchronous target: `(Some(accepted), input shown)`, or
/// `(None, input shown)` on a panic.
fn sync_case(target: &str, ctx: &Context, rng: &mut ChaCha8Rng) -> (Option<bool>, String) {
    let (bytes, shown): (Vec<u8>, String) = match target {
        "policy" => {
            let t = mutate_text(rng, &ctx.policy_text);
            (t.clone().into_bytes(), t)
        }
        "catalog" => {
            let t = mutate_text(rng, CATALOG);
            (t.clone().into_bytes(), t)
        }
        "peer" => {
            let msgs = peer_messages();
            let pick = rng.random_range(0..msgs.len());
            let b = mutate_json(rng, &msgs[pick]);
            let s = String::from_utf8_lossy(&b).into_owned();
            (b, s)
        }
        "ipc" => {
            // One part of one message mutated: a schema or batch header
            // (flatbuffer) or body (Arrow buffers), as a peer's do_put sends.
            let m = rng.random_range(0..ctx.share_flight.len());
            let header = rng.random_bool(0.6);
            let fd = &ctx.share_flight[m];
            let part = if header {
                &fd.data_header
            } else {
                &fd.data_body
            };
            let b = mutate_bytes(rng, part);
            let mut encoded = vec![m as u8, header as u8];
            encoded.extend_from_slice(&b);
            (
                encoded,
                format!(
                    "share FlightData message {m}, {}",
                    if header { "header" } else { "body" }
                ),
            )
        }
        "flight_sql" => {
            let valid = flight_sql_command(rng);
            let b = mutate_bytes(rng, &valid);
            (b, "Flight SQL command bytes".into())
        }
        "pg" => {
            let valid = pg_message(rng);
            let b = mutate_bytes(rng, &valid);
            (b, "PostgreSQL frontend bytes".into())
        }
        other => panic!("unknown fuzz target {other}; the targets are {TARGETS:?}"),
    };
    let r = catch_unwind(AssertUnwindSafe(|| match target {
        "policy" => {
            policies::Policy::parse(&String::from_utf8_lossy(&bytes), Some(&ctx.catalog)).is_ok()
        }
        "catalog" => planner::Catalog::from_toml(&String::from_utf8_lossy(&bytes), "c").is_ok(),
        "peer" => peer_case(ctx, &bytes),
        "ipc" => ipc_case(ctx, &bytes),
        "flight_sql" => flight_sql_case(&bytes),
        "pg" => pg_case(&bytes),
        _ => false,
    }));
    match r {
        Ok(ok) => (Some(ok), shown),
        Err(_) => (None, format!("{} [{}]", shown, last_panic())),
    }
}

fn peer_messages() -> Vec<Vec<u8>> {
    vec![
        br#"{"query_id":"q1","sql":"SELECT g, COUNT(*) FROM t GROUP BY g","options":{"engine":"additive"},"analyst":{"party":"p0","name":"ana","roles":["r"]},"explain_only":false}"#.to_vec(),
        br#"{"query_id":"q1","privacy":{"mechanism":"gaussian","epsilon_micro":500000,"delta":1e-6,"colluders":2,"clamps":{"x":{"lo":"-1000","hi":"1000"},"d":{"lo":"-5.5","hi":"7.25"}},"individual_id":"id","max_rows":3,"min_group_size":5,"required_by":["p1"]},"fingerprint":"abc"}"#.to_vec(),
        br#"{"query_id":"q1","privacy":{"mechanism":"laplace","epsilon_micro":1000000,"delta":0.0,"colluders":1,"clamps":{"x":{"lo":"0","hi":"100000"}},"individual_id":null,"max_rows":1,"min_group_size":0,"required_by":["p1","p2"]},"fingerprint":"abc"}"#.to_vec(),
        br#"{"query_id":"q1","reason":{"kind":"data","party":"p2","detail":"its local part failed"},"leader":"p0"}"#.to_vec(),
        br#"{"allow":{"fingerprint":"abc","source":["x"],"privacy":{"party":"p1","mechanism":"laplace","epsilon_micro":1000000,"delta":0.0,"colluders":null,"clamps":{},"individual_id":"id","max_rows":3,"min_group_size":0}}}"#.to_vec(),
        br#"{"leader":"p0","query_id":"q1","step":1}"#.to_vec(),
    ]
}

fn peer_case(ctx: &Context, bytes: &[u8]) -> bool {
    let mut any = false;
    any |= serde_json::from_slice::<gateway::peer::Propose>(bytes).is_ok();
    any |= serde_json::from_slice::<gateway::peer::QueryRef>(bytes).is_ok();
    any |= serde_json::from_slice::<gateway::peer::Verdict>(bytes).is_ok();
    any |= serde_json::from_slice::<gateway::peer::PutHeader>(bytes).is_ok();
    if let Ok(start) = serde_json::from_slice::<gateway::peer::Start>(bytes) {
        any = true;
        if let Some(p) = start.privacy {
            // What a peer does with a leader's parameters: validate, then
            // apply them to the plan it computed itself.
            if p.validate(ctx.parties.len()).is_ok() {
                let _ = ctx.plan.clone().with_privacy(p);
            }
        }
    }
    any
}

/// The rings of the fuzzed share's columns.
const SHARE_WIDTHS: [executor::Width; 3] = [
    executor::Width::Z64,
    executor::Width::Z128,
    executor::Width::Z256,
];

/// Decodes a share stream whose message `bytes[0]` had its header
/// (`bytes[1] == 1`) or body replaced by the rest, as `do_put` does
/// (`gateway::service::read_share_stream`), adding each batch where it
/// belongs as the leader does.
fn ipc_case(ctx: &Context, bytes: &[u8]) -> bool {
    let (Some(&m), Some(&header)) = (bytes.first(), bytes.get(1)) else {
        return false;
    };
    let mut msgs = ctx.share_flight.clone();
    let m = m as usize;
    if m >= msgs.len() {
        return false;
    }
    match header % 5 {
        // A batch's header or body replaced.
        1 => msgs[m].data_header = bytes[2..].to_vec().into(),
        0 => msgs[m].data_body = bytes[2..].to_vec().into(),
        // A message dropped, repeated, or out of order.
        2 => {
            msgs.remove(m);
        }
        3 => {
            let again = msgs[m].clone();
            msgs.insert(m, again);
        }
        _ => {
            let other = (m + 1) % msgs.len();
            msgs.swap(m, other);
        }
    }
    let rows = ctx.plan.groups.len();
    // As a leader reads a result share: each decoded batch added at the
    // rows it holds into the running total, checked against the public
    // keys there.
    let mut total = executor::SharedTable::zeros(ctx.share_keys.clone(), &SHARE_WIDTHS, rows);
    let mut at = 0usize;
    let read = futures::executor::block_on(gateway::service::read_share_stream(
        futures::stream::iter(msgs.into_iter().map(Ok)),
        gateway::gateway::ShareShape {
            rows,
            max_cols: 16,
            key_bytes: ctx.plan.groups.key_text_bytes(),
        },
        |b| {
            let added = total
                .add_batch(&b, at)
                .map(|n| at += n)
                .map_err(tonic::Status::invalid_argument);
            std::future::ready(added)
        },
    ));
    read.is_ok() && at == rows
}

fn flight_sql_command(rng: &mut ChaCha8Rng) -> Vec<u8> {
    use arrow_flight::sql::{CommandGetTables, CommandStatementQuery, ProstMessageExt};
    use prost::Message;
    let any = if rng.random_bool(0.5) {
        CommandStatementQuery {
            query: random_sql(rng),
            transaction_id: None,
        }
        .as_any()
    } else {
        CommandGetTables {
            catalog: Some("council".into()),
            db_schema_filter_pattern: Some("%".into()),
            table_name_filter_pattern: Some("t%".into()),
            table_types: vec!["TABLE".into()],
            include_schema: rng.random_bool(0.5),
        }
        .as_any()
    };
    any.encode_to_vec()
}

fn flight_sql_case(bytes: &[u8]) -> bool {
    use prost::Message;
    let mut ok = arrow_flight::FlightDescriptor::decode(bytes).is_ok();
    if let Ok(any) = arrow_flight::sql::Any::decode(bytes) {
        ok |= arrow_flight::sql::Command::try_from(any).is_ok();
    }
    ok
}

fn pg_message(rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut v = Vec::new();
    let body = |tag: Option<u8>, payload: &[u8], v: &mut Vec<u8>| {
        if let Some(t) = tag {
            v.push(t);
        }
        v.extend_from_slice(&((payload.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(payload);
    };
    match rng.random_range(0..5) {
        0 => {
            let mut p = 196608u32.to_be_bytes().to_vec();
            p.extend_from_slice(b"user\0ana\0database\0council\0\0");
            body(None, &p, &mut v);
        }
        1 => body(None, &80877103u32.to_be_bytes(), &mut v),
        2 => {
            let mut p = random_sql(rng).into_bytes();
            p.push(0);
            body(Some(b'Q'), &p, &mut v);
        }
        3 => body(
            Some(b'P'),
            b"s1\0SELECT COUNT(*) FROM t\0\0\x01\0\0\0\x17",
            &mut v,
        ),
        _ => body(
            Some(b'p'),
            b"SCRAM-SHA-256\0\0\0\0\x20n,,n=ana,r=abcdefghijklmnopqrstuv",
            &mut v,
        ),
    }
    v
}

fn pg_case(bytes: &[u8]) -> bool {
    use pgwire::messages::{DecodeContext, PgWireFrontendMessage, ProtocolVersion};
    let mut ok = false;
    for (ssl, startup) in [(true, true), (false, true), (false, false)] {
        let mut ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
        ctx.awaiting_frontend_ssl = ssl;
        ctx.awaiting_frontend_startup = startup;
        let mut buf = bytes::BytesMut::from(bytes);
        // Decode until the buffer is used up or a message is incomplete.
        for _ in 0..16 {
            match PgWireFrontendMessage::decode(&mut buf, &ctx) {
                Ok(Some(_)) => ok = true,
                _ => break,
            }
        }
    }
    ok
}

// ----- generators --------------------------------------------------------

const COLUMNS: &[&str] = &[
    "id", "g", "h", "flag", "x", "d", "f", "label", "ts", "t.x", "nope",
];
const FUNCTIONS: &[&str] = &[
    "abs",
    "lower",
    "upper",
    "length",
    "substr",
    "left",
    "right",
    "concat",
    "coalesce",
    "nullif",
    "repeat",
    "lpad",
    "to_date",
    "to_timestamp",
    "date_part",
    "date_trunc",
    "regexp_like",
    "regexp_replace",
    "power",
    "ln",
    "sqrt",
    "round",
    "trunc",
    "floor",
    "make_array",
    "arrow_cast",
    "strpos",
    "starts_with",
    "greatest",
    "least",
    "md5",
    "random",
    "now",
    "isnan",
    "signum",
    "generate_series",
    "range",
    "unnest",
    "array_length",
    "btrim",
    "to_char",
    "chr",
    "ascii",
];
const AGGREGATES: &[&str] = &[
    "COUNT",
    "SUM",
    "AVG",
    "VAR_SAMP",
    "VAR_POP",
    "STDDEV",
    "STDDEV_POP",
    "MIN",
    "MAX",
    "MEDIAN",
    "COUNT(DISTINCT",
    "APPROX_DISTINCT",
    "ARRAY_AGG",
];
const TYPES: &[&str] = &[
    "INT",
    "BIGINT",
    "SMALLINT",
    "TINYINT",
    "DOUBLE",
    "REAL",
    "DECIMAL(38,2)",
    "DECIMAL(5,4)",
    "VARCHAR",
    "DATE",
    "TIMESTAMP",
    "BOOLEAN",
    "INTERVAL",
    "BYTEA",
];
const BINOPS: &[&str] = &[
    "+",
    "-",
    "*",
    "/",
    "%",
    "=",
    "<>",
    "<",
    "<=",
    ">",
    ">=",
    "AND",
    "OR",
    "||",
    "~",
    "~*",
    "!~",
    "LIKE",
    "ILIKE",
    "IS DISTINCT FROM",
    "&",
    "|",
    "#",
    "<<",
    ">>",
    "->",
    "@>",
];

fn literal(rng: &mut ChaCha8Rng) -> String {
    match rng.random_range(0..14) {
        0 => "0".into(),
        1 => "-1".into(),
        2 => i64::MAX.to_string(),
        3 => i64::MIN.to_string(),
        4 => "99999999999999999999999999999999999999".into(),
        5 => format!(
            "{}.{}",
            rng.random_range(-1000..1000),
            rng.random_range(0..1000)
        ),
        6 => "1e308".into(),
        7 => "NULL".into(),
        8 => "TRUE".into(),
        9 => [
            "'('",
            "'%'",
            "'\\'",
            "'a''b'",
            "'2024-13-45'",
            "'é😀'",
            "''",
            "'[[:alpha:]'",
        ][rng.random_range(0..8)]
        .into(),
        10 => "DATE '2024-06-15'".into(),
        11 => "TIMESTAMP '2024-06-15 12:00:00'".into(),
        12 => "INTERVAL '1000000 years'".into(),
        _ => rng.random_range(-5..50).to_string(),
    }
}

/// Half the queries use only what plans (real columns, admitted
/// functions, linear aggregates), so that inputs reach past the refusals
/// into planning, the policy check and DP calibration.
fn pick<'a>(rng: &mut ChaCha8Rng, all: &'a [&'a str], safe: bool, safe_len: usize) -> &'a str {
    let n = if safe {
        safe_len.min(all.len())
    } else {
        all.len()
    };
    all[rng.random_range(0..n)]
}

thread_local! {
    static SAFE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn expr(rng: &mut ChaCha8Rng, depth: u32) -> String {
    let safe = SAFE.with(|s| s.get());
    if depth == 0 || rng.random_bool(0.3) {
        return if rng.random_bool(0.6) {
            pick(rng, COLUMNS, safe, 9).to_string()
        } else if safe {
            rng.random_range(-5..50).to_string()
        } else {
            literal(rng)
        };
    }
    let d = depth - 1;
    match rng.random_range(0..10) {
        0 | 1 => format!(
            "({} {} {})",
            expr(rng, d),
            pick(rng, BINOPS, safe, 11),
            expr(rng, d)
        ),
        2 => format!("NOT {}", expr(rng, d)),
        3 => format!(
            "CASE WHEN {} THEN {} ELSE {} END",
            expr(rng, d),
            expr(rng, d),
            expr(rng, d)
        ),
        4 => format!(
            "{}({} AS {})",
            if rng.random_bool(0.5) {
                "CAST"
            } else {
                "TRY_CAST"
            },
            expr(rng, d),
            TYPES[rng.random_range(0..TYPES.len())]
        ),
        5 => {
            let f = if safe {
                ["lower", "upper", "length", "coalesce", "nullif"][rng.random_range(0..5)]
            } else {
                FUNCTIONS[rng.random_range(0..FUNCTIONS.len())]
            };
            let n = rng.random_range(0..4);
            let args: Vec<String> = (0..n).map(|_| expr(rng, d)).collect();
            format!("{f}({})", args.join(", "))
        }
        6 => format!(
            "{} BETWEEN {} AND {}",
            expr(rng, d),
            expr(rng, d),
            expr(rng, d)
        ),
        7 => {
            let n = rng.random_range(1..6);
            let items: Vec<String> = (0..n).map(|_| literal(rng)).collect();
            format!("{} IN ({})", expr(rng, d), items.join(", "))
        }
        8 => format!("{} IS NULL", expr(rng, d)),
        _ => format!("-{}", expr(rng, d)),
    }
}

/// A random query over the test catalog, sometimes mutated at the byte
/// level, sometimes not a query at all.
pub fn random_sql(rng: &mut ChaCha8Rng) -> String {
    if rng.random_bool(0.05) {
        return [
            "COPY (VALUES (1)) TO '/tmp/x'",
            "CREATE TABLE x (a INT)",
            "DROP TABLE t",
            "SELECT * FROM t",
            "EXPLAIN ANALYZE SELECT COUNT(*) FROM t",
            "WITH a AS (SELECT 1) SELECT COUNT(*) FROM a",
            "SELECT COUNT(*) FROM t JOIN t u ON t.id = u.id",
            "",
            ";;;",
        ][rng.random_range(0..9)]
        .to_string();
    }
    let safe = rng.random_bool(0.5);
    SAFE.with(|s| s.set(safe));
    let depth = rng.random_range(0..5);
    let mut items = Vec::new();
    let grouped = rng.random_bool(0.5);
    if grouped {
        let n = if safe { 3 } else { 5 };
        items.push(["g", "h", "flag", "label", "x"][rng.random_range(0..n)].to_string());
    }
    for _ in 0..rng.random_range(1..4) {
        let a = pick(rng, AGGREGATES, safe, 5);
        let arg = if safe && rng.random_bool(0.5) {
            ["x", "d", "f", "id", "h"][rng.random_range(0..5)].to_string()
        } else if rng.random_bool(0.2) {
            "*".to_string()
        } else {
            expr(rng, depth)
        };
        items.push(if a.ends_with("(DISTINCT") {
            format!("{a} {arg})")
        } else {
            format!("{a}({arg})")
        });
    }
    let mut sql = format!("SELECT {} FROM t", items.join(", "));
    if rng.random_bool(0.7) {
        let cond = expr(rng, depth);
        if safe {
            sql.push_str(&format!(" WHERE ({cond}) IS NOT NULL"));
        } else {
            sql.push_str(&format!(" WHERE {cond}"));
        }
    }
    if grouped {
        sql.push_str(&format!(" GROUP BY {}", items[0]));
        if rng.random_bool(0.3) {
            sql.push_str(&format!(" HAVING COUNT(*) > {}", literal(rng)));
        }
    }
    if rng.random_bool(0.3) {
        sql.push_str(" ORDER BY 1");
    }
    if rng.random_bool(0.2) {
        sql.push_str(&format!(" LIMIT {}", literal(rng)));
    }
    if !safe && rng.random_bool(0.3) {
        sql = mutate_text(rng, &sql);
    }
    sql
}

/// `text` with a few random edits, kept valid UTF-8.
pub fn mutate_text(rng: &mut ChaCha8Rng, text: &str) -> String {
    String::from_utf8_lossy(&mutate_bytes(rng, text.as_bytes())).into_owned()
}

/// `bytes` with 1–8 random edits: a byte replaced, inserted or deleted, a
/// run duplicated or cut, or an interesting value written in.
pub fn mutate_bytes(rng: &mut ChaCha8Rng, bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    for _ in 0..rng.random_range(1..9) {
        let len = v.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = rng.random();
            }
            1 => {
                let i = rng.random_range(0..=len);
                v.insert(i, rng.random());
            }
            2 if len > 0 => {
                let i = rng.random_range(0..len);
                v.remove(i);
            }
            3 if len > 1 => {
                let a = rng.random_range(0..len);
                let b = (a + rng.random_range(1..64)).min(len);
                let run: Vec<u8> = v[a..b].to_vec();
                let at = rng.random_range(0..=v.len());
                v.splice(at..at, run);
            }
            4 if len > 1 => {
                let a = rng.random_range(0..len);
                let b = (a + rng.random_range(1..64)).min(len);
                v.drain(a..b);
            }
            5 if len > 4 => {
                let i = rng.random_range(0..len - 4);
                let val: [u8; 4] = [
                    [0xff, 0xff, 0xff, 0x7f],
                    [0xff, 0xff, 0xff, 0xff],
                    [0, 0, 0, 0x80],
                    [0, 0, 0, 0],
                ][rng.random_range(0..4)];
                v[i..i + 4].copy_from_slice(&val);
            }
            _ => {
                let i = rng.random_range(0..=len);
                v.truncate(i);
            }
        }
    }
    v
}

/// JSON with values swapped for extremes, or mutated bytes.
fn mutate_json(rng: &mut ChaCha8Rng, json: &[u8]) -> Vec<u8> {
    if rng.random_bool(0.5) {
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(json) {
            extreme_values(rng, &mut v);
            if let Ok(b) = serde_json::to_vec(&v) {
                return b;
            }
        }
    }
    mutate_bytes(rng, json)
}

fn extreme_values(rng: &mut ChaCha8Rng, v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Number(_) if rng.random_bool(0.4) => {
            *v = [
                serde_json::json!(0),
                serde_json::json!(-1),
                serde_json::json!(u64::MAX),
                serde_json::json!(i64::MIN),
                serde_json::json!(1e308),
                serde_json::json!(5e-324),
                serde_json::json!("NaN"),
            ][rng.random_range(0..7)]
            .clone()
        }
        Value::String(s) if rng.random_bool(0.3) => {
            *s = [
                String::new(),
                "x".repeat(10_000),
                "1e999".into(),
                "-0".into(),
                "99999999999999999999999999999999999999.99".into(),
                "NaN".into(),
            ][rng.random_range(0..6)]
            .clone()
        }
        Value::Array(a) => a.iter_mut().for_each(|x| extreme_values(rng, x)),
        Value::Object(o) => o.values_mut().for_each(|x| extreme_values(rng, x)),
        _ => {}
    }
}

static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Quiets the panic messages of inputs that panic (they are counted, and
/// the place of the last one is kept for the report).
pub fn quiet_panics() -> Arc<()> {
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        if let Ok(mut l) = LAST_PANIC.lock() {
            *l = Some(format!("{at}: {msg}"));
        }
    }));
    Arc::new(())
}

fn last_panic() -> String {
    LAST_PANIC
        .lock()
        .ok()
        .and_then(|mut l| l.take())
        .unwrap_or_default()
}
