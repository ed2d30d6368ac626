//! arrow-flight's own `FlightSqlServiceClient` against a gateway's Flight
//! SQL front door: handshake, statements, prepared statements, catalog
//! browsing as the policy shows it, SqlInfo, and clear errors.

use std::time::Duration;

use arrow::array::{Array, StringArray};
use arrow::record_batch::RecordBatch;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{CommandGetDbSchemas, CommandGetTables, SqlInfo};
use arrow_flight::FlightInfo;
use council::compare::compare;
use council::federation::{plaintext, LocalFederation};
use council_tests::{
    open_policy, party_ids, policy_without_filter_on, spec_for, write_random_data, Shape, PASSWORD,
    USER,
};
use futures::TryStreamExt;
use tonic::transport::Channel;

async fn fetch(c: &mut FlightSqlServiceClient<Channel>, info: FlightInfo) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for ep in info.endpoint {
        let stream = c.do_get(ep.ticket.expect("a ticket")).await.unwrap();
        let mut b: Vec<RecordBatch> = stream.try_collect().await.unwrap();
        out.append(&mut b);
    }
    out
}

fn strings(batches: &[RecordBatch], col: &str) -> Vec<String> {
    let mut v = Vec::new();
    for b in batches {
        let a = b
            .column_by_name(col)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        for i in 0..a.len() {
            v.push(a.value(i).to_string());
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flight_sql_client_queries_prepares_browses_and_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(3);
    write_random_data(
        &dir.path().join("data"),
        &ids,
        Shape {
            seed: 21,
            large: false,
        },
    )
    .unwrap();
    let mut spec = spec_for(dir.path(), &ids, Duration::from_secs(10));
    // p0 hides column `label` from its analysts entirely; p1 refuses
    // filtering on `h`.
    let p0 = open_policy("p0", &ids);
    spec.parties[0].policy_toml = p0
        .split("[tables.t.columns.label]")
        .next()
        .unwrap()
        .to_string();
    spec.parties[1].policy_toml = policy_without_filter_on("p1", &ids, "h");
    spec.parties[0]
        .tokens
        .insert(USER.to_string(), "preset-token-for-a-bi-tool".to_string());
    let fed = LocalFederation::start(&spec, &dir.path().join("run"))
        .await
        .unwrap();
    let pooled = fed.pooled_context().await.unwrap();
    let addr = fed.gateway("p0").unwrap().analyst_addr.to_string();
    let channel = gateway::client::tls_channel(&addr, &fed.ca_pem)
        .await
        .unwrap();

    // A wrong password is refused at the handshake.
    let mut bad = FlightSqlServiceClient::new(channel.clone());
    let e = bad.handshake(USER, "wrong").await.unwrap_err().to_string();
    assert!(e.contains("wrong user name or password"), "{e}");
    // A made-up token is refused on use.
    bad.set_token("not-a-token".into());
    let e = bad
        .execute("SELECT COUNT(*) FROM t".into(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("Bearer token is not valid"), "{e}");

    // A preset token (its SHA-256 in the config) works without a handshake.
    let mut preset = FlightSqlServiceClient::new(channel.clone());
    preset.set_token("preset-token-for-a-bi-tool".into());
    let info = preset
        .execute("SELECT COUNT(*) FROM t".into(), None)
        .await
        .unwrap();
    let n = fetch(&mut preset, info).await;
    compare(
        &n,
        &plaintext(&pooled, "SELECT COUNT(*) FROM t").await.unwrap(),
        true,
    )
    .unwrap();

    let mut c = FlightSqlServiceClient::new(channel);
    c.handshake(USER, PASSWORD).await.unwrap();
    assert!(c.token().is_some(), "the handshake gives a Bearer token");

    // Ad-hoc statements equal plaintext over the pooled data.
    for sql in [
        "SELECT g, COUNT(*), SUM(x), AVG(d) FROM t GROUP BY g ORDER BY g",
        "SELECT SUM(d) AS total, STDDEV_SAMP(f) FROM t WHERE flag",
    ] {
        let info = c.execute(sql.into(), None).await.unwrap();
        let secure = fetch(&mut c, info).await;
        let plain = plaintext(&pooled, sql).await.unwrap();
        compare(&secure, &plain, true).unwrap_or_else(|d| panic!("{sql}: {d}"));
    }

    // Prepared statements: schema before running, the same answer after.
    let sql = "SELECT h, COUNT(*) AS n, AVG(x) AS ax FROM t GROUP BY h ORDER BY h";
    let mut ps = c.prepare(sql.into(), None).await.unwrap();
    let names: Vec<String> = ps
        .dataset_schema()
        .unwrap()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(names, ["h", "n", "ax"]);
    let info = ps.execute().await.unwrap();
    let secure = fetch(&mut c, info).await;
    compare(&secure, &plaintext(&pooled, sql).await.unwrap(), true).unwrap();
    ps.close().await.unwrap();

    // EXPLAIN as a statement: the plan and every party's verdict.
    let info = c.execute(format!("EXPLAIN {sql}"), None).await.unwrap();
    let plan = strings(&fetch(&mut c, info).await, "plan").join("\n");
    assert!(
        plan.contains("Local part") && plan.contains("p2: allow"),
        "{plan}"
    );

    // Catalog browsing: the federated table, with the columns p0's policy
    // lets this analyst use (label is hidden).
    let info = c.get_catalogs().await.unwrap();
    assert_eq!(
        strings(&fetch(&mut c, info).await, "catalog_name"),
        ["council"]
    );
    let info = c
        .get_db_schemas(CommandGetDbSchemas {
            catalog: None,
            db_schema_filter_pattern: None,
        })
        .await
        .unwrap();
    assert_eq!(
        strings(&fetch(&mut c, info).await, "db_schema_name"),
        ["public"]
    );
    let info = c
        .get_tables(CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: None,
            table_name_filter_pattern: Some("%".into()),
            table_types: vec![],
            include_schema: true,
        })
        .await
        .unwrap();
    let tables = fetch(&mut c, info).await;
    assert_eq!(strings(&tables, "table_name"), ["t"]);
    let raw = tables[0]
        .column_by_name("table_schema")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::BinaryArray>()
        .unwrap()
        .value(0)
        .to_vec();
    let schema = arrow::ipc::convert::try_schema_from_ipc_buffer(&raw).unwrap();
    let cols: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert!(cols.contains(&"x") && cols.contains(&"g"), "{cols:?}");
    assert!(
        !cols.contains(&"label"),
        "label is hidden by p0's policy: {cols:?}"
    );
    let info = c.get_table_types().await.unwrap();
    assert_eq!(strings(&fetch(&mut c, info).await, "table_type"), ["TABLE"]);
    let info = c
        .get_sql_info(vec![SqlInfo::FlightSqlServerName])
        .await
        .unwrap();
    let info_batches = fetch(&mut c, info).await;
    let text = arrow::util::pretty::pretty_format_batches(&info_batches)
        .unwrap()
        .to_string();
    assert!(text.contains("Council"), "{text}");

    // A refusal names the party and the rule.
    let e = c
        .execute("SELECT COUNT(*) FROM t WHERE h = 1".into(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("p1 refused: column h may not be used in WHERE (policy: tables.t.columns.h)"),
        "{e}"
    );
    // Garbage tickets and commands are errors, and the door keeps serving.
    let junk = c
        .do_get(arrow_flight::Ticket::new(b"\xff\x00not a ticket".to_vec()))
        .await;
    assert!(junk.is_err());
    let forged = arrow_flight::sql::TicketStatementQuery {
        statement_handle: b"0123456789abcdef".to_vec().into(),
    };
    use arrow_flight::sql::ProstMessageExt;
    use prost::Message;
    let e = c
        .do_get(arrow_flight::Ticket::new(forged.as_any().encode_to_vec()))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no answer under this ticket"), "{e}");
    let mut raw = c.inner().clone();
    let mut req = tonic::Request::new(arrow_flight::FlightDescriptor::new_cmd(vec![0xde, 0xad]));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", c.token().unwrap()).parse().unwrap(),
    );
    assert!(raw.get_flight_info(req).await.is_err());

    // Bad SQL gets the planner's message.
    let e = c
        .execute("SELECT nope FROM t".into(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
    fed.stop().await;
}
