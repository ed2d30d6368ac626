//! Parties whose data lives in different places: p0 in a real PostgreSQL
//! server (TLS, SCRAM, a schema-qualified table with other column names),
//! p1 in a SQLite file (exact decimals kept as text), p2 in Parquet. Council's
//! answers equal plaintext DataFusion over the pooled rows; EXPLAIN shows the
//! SQL each database runs; a filter PostgreSQL would order differently is
//! computed in the gateway and the answer still agrees.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use arrow::array::{Array, RecordBatch};
use arrow::util::display::array_value_to_string;
use connectors::postgres::PgConnect;
use connectors::{FileFormat, FileSource, SqlTable, TableFile};
use council::compare::compare;
use council::federation::{plaintext, LocalFederation};
use council_tests::pg::PgServer;
use council_tests::{
    party_ids, spec_for, write_random_data, Shape, EXTREME_QUERIES, PASSWORD, QUERIES, USER,
};
use gateway::config::{DatabaseConfig, DbTable};
use planner::Catalog;

const COLUMNS: &str = "id, grp, h, flag, amount, d, f, label, ts";

async fn rows_of(csv: &Path, catalog: &Catalog) -> Vec<RecordBatch> {
    let src = FileSource::open(
        vec![TableFile {
            table: catalog.table("t").unwrap().clone(),
            path: csv.to_path_buf(),
            format: FileFormat::Csv,
            renames: BTreeMap::new(),
        }],
        None,
    )
    .await
    .unwrap();
    src.read_rows_for_reference("t").await.unwrap()
}

/// p1's rows into a SQLite file: exact decimals as text, booleans as 0/1.
fn write_sqlite(db: &Path, batches: &[RecordBatch]) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch(
        "CREATE TABLE t (id INTEGER, g TEXT, h INTEGER, flag BOOLEAN, x INTEGER, d TEXT, f REAL, label TEXT, ts DATETIME)",
    )
    .unwrap();
    let mut stmt = c
        .prepare("INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)")
        .unwrap();
    for b in batches {
        for r in 0..b.num_rows() {
            let v: Vec<rusqlite::types::Value> = b
                .columns()
                .iter()
                .map(|col| {
                    use rusqlite::types::Value as V;
                    if col.is_null(r) {
                        return V::Null;
                    }
                    let s = array_value_to_string(col, r).unwrap();
                    match col.data_type() {
                        arrow::datatypes::DataType::Int64 => V::Integer(s.parse().unwrap()),
                        arrow::datatypes::DataType::Boolean => V::Integer((s == "true") as i64),
                        arrow::datatypes::DataType::Float64 => V::Real(s.parse().unwrap()),
                        _ => V::Text(s),
                    }
                })
                .collect();
            stmt.execute(rusqlite::params_from_iter(v)).unwrap();
        }
    }
}

fn write_parquet(path: &Path, batches: &[RecordBatch]) {
    let f = std::fs::File::create(path).unwrap();
    let mut w =
        datafusion::parquet::arrow::ArrowWriter::try_new(f, batches[0].schema(), None).unwrap();
    for b in batches {
        w.write(b).unwrap();
    }
    w.close().unwrap();
}

/// Every query, led by each party in turn, equals plaintext over the pooled
/// rows.
async fn agree_with_plaintext(
    fed: &LocalFederation,
    pooled: &datafusion::prelude::SessionContext,
    ids: &[String],
    queries: &[(&str, bool)],
) {
    for (qi, (sql, ordered)) in queries.iter().enumerate() {
        let leader = &ids[qi % ids.len()];
        let client = fed.client(leader, USER, PASSWORD).await.unwrap();
        let secure = client
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("leader {leader}: {sql}: {e}"));
        let plain = plaintext(pooled, sql).await.unwrap();
        if let Err(d) = compare(&secure, &plain, *ordered) {
            panic!(
                "leader {leader}: {sql}\n{d}\nsecure:\n{}\nplain:\n{}",
                arrow::util::pretty::pretty_format_batches(&secure).unwrap(),
                arrow::util::pretty::pretty_format_batches(&plain).unwrap()
            );
        }
    }
}

/// Three parties over seeded random data, each with its CSV in `data`.
struct Setup {
    dir: tempfile::TempDir,
    ids: Vec<String>,
    data: std::path::PathBuf,
    spec: council::federation::FederationSpec,
    catalog: Catalog,
    table: planner::TableDef,
}

fn setup(seed: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ids = party_ids(3);
    let data = dir.path().join("data");
    write_random_data(&data, &ids, Shape { seed, large: false }).unwrap();
    let spec = spec_for(dir.path(), &ids, Duration::from_secs(20));
    let catalog = Catalog::from_toml(&spec.catalog_toml, "catalog").unwrap();
    let table = catalog.table("t").unwrap().clone();
    Setup {
        dir,
        ids,
        data,
        spec,
        catalog,
        table,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_sqlite_and_parquet_parties_agree_with_plaintext() {
    let pg = PgServer::start().unwrap();
    let Setup {
        dir,
        ids,
        data,
        mut spec,
        catalog,
        table,
    } = setup(40);

    // p0: PostgreSQL, `clinic.visits`, two columns named differently.
    pg.execute(
        "CREATE SCHEMA clinic; CREATE TABLE clinic.visits (id bigint, grp text, h integer, flag boolean, \
         amount bigint, d numeric(14,3), f double precision, label varchar(20), ts timestamp)",
    )
    .await
    .unwrap();
    let csv = std::fs::read_to_string(data.join("p0/t.csv")).unwrap();
    let loaded = pg.copy_csv("clinic.visits", COLUMNS, &csv).await.unwrap();
    assert_eq!(loaded as usize, csv.lines().count() - 1);
    spec.parties[0].databases.insert(
        "clinic".into(),
        DatabaseConfig::Postgres(PgConnect {
            url: pg.url(),
            ca_file: Some(pg.ca_file.clone()),
        }),
    );
    spec.parties[0].db_tables.push(DbTable {
        source: "clinic".into(),
        table: SqlTable {
            table: table.clone(),
            local: "clinic.visits".into(),
            renames: [("g", "grp"), ("x", "amount")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        },
    });

    // p1: SQLite.
    let p1_rows = rows_of(&data.join("p1/t.csv"), &catalog).await;
    let db = dir.path().join("p1.sqlite");
    write_sqlite(&db, &p1_rows);
    spec.parties[1]
        .databases
        .insert("registry".into(), DatabaseConfig::Sqlite(db));
    spec.parties[1].db_tables.push(DbTable {
        source: "registry".into(),
        table: SqlTable {
            table: table.clone(),
            local: "t".into(),
            renames: BTreeMap::new(),
        },
    });

    // p2: Parquet (the CSV removed, so the gateway can only read Parquet).
    let p2_rows = rows_of(&data.join("p2/t.csv"), &catalog).await;
    std::fs::remove_file(data.join("p2/t.csv")).unwrap();
    write_parquet(&data.join("p2/t.parquet"), &p2_rows);

    let fed = LocalFederation::start(&spec, &dir.path().join("run"))
        .await
        .unwrap();
    let pooled = fed.pooled_context().await.unwrap();
    let extra: &[(&str, bool)] = &[
        // Text order depends on PostgreSQL's collation: computed in p0's
        // gateway from the rows PostgreSQL returns.
        (
            "SELECT g, COUNT(*), SUM(d) FROM t WHERE label < 'lz' GROUP BY g ORDER BY g",
            true,
        ),
        (
            "SELECT h, COUNT(x), SUM(f) FROM t WHERE d > 1000.5 AND g <> 'c' GROUP BY h ORDER BY h",
            true,
        ),
    ];
    let queries: Vec<(&str, bool)> = QUERIES
        .iter()
        .chain(extra)
        .chain(EXTREME_QUERIES)
        .copied()
        .collect();
    agree_with_plaintext(&fed, &pooled, &ids, &queries).await;

    // EXPLAIN: each party's source says what it runs.
    let client = fed.client("p1", USER, PASSWORD).await.unwrap();
    let explained = client
        .explain("SELECT g, SUM(d), COUNT(*) FROM t WHERE label < 'lz' AND h = 2 GROUP BY g")
        .await
        .unwrap();
    for want in [
        "p0: sent to PostgreSQL (council@127.0.0.1:",
        "FROM \"clinic\".\"visits\" WHERE ((\"h\" = 2))",
        "not pushed down: (label < 'lz'): the order of text depends on PostgreSQL's collation",
        "p1: sent to SQLite",
        "not pushed down: aggregate argument d: SQLite stores the exact decimal column d as text",
        "p2: computed in the gateway by DataFusion over t: Parquet",
    ] {
        assert!(
            explained.contains(want),
            "missing `{want}` in:\n{explained}"
        );
    }
    let pushed = client
        .explain("SELECT g, SUM(x), AVG(d) FROM t WHERE h IN (1, 2) GROUP BY g")
        .await
        .unwrap();
    assert!(
        pushed.contains("CAST(SUM(\"amount\") AS TEXT)")
            && pushed.contains("CAST(SUM(CAST(\"d\" AS NUMERIC(38,3))) AS TEXT)")
            && pushed.contains("GROUP BY \"grp\""),
        "{pushed}"
    );

    // The database goes away: the query fails at every party and nothing is
    // revealed. (p0's gateway log names PostgreSQL; other parties learn
    // only that p0's local part failed.)
    drop(pg);
    let client = fed.client("p1", USER, PASSWORD).await.unwrap();
    let e = client
        .query("SELECT g, COUNT(*) FROM t GROUP BY g")
        .await
        .expect_err("a query over a database that is down must fail")
        .to_string();
    // Usually "p0 aborted: its local part failed"; a peer that ended the
    // query on p0's abort before the leader's `start` arrived may instead
    // answer that it has no such query (a known race in the wording only).
    assert!(
        (e.contains("a party aborted: its local part failed") || e.contains("has no agreed query"))
            && e.contains("nothing was revealed"),
        "{e}"
    );
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_mismatches_and_connection_errors_are_clear() {
    let pg = PgServer::start().unwrap();
    pg.execute(
        "CREATE TABLE visits (id bigint, g text, h integer, flag boolean, x numeric, d numeric(20,5), f text, \
         ts timestamptz)",
    )
    .await
    .unwrap();
    let catalog = Catalog::from_toml(council_tests::CATALOG, "catalog").unwrap();
    let sql_table = |local: &str| SqlTable {
        table: catalog.table("t").unwrap().clone(),
        local: local.into(),
        renames: BTreeMap::new(),
    };
    let connect = |url: String, ca: bool| PgConnect {
        url,
        ca_file: ca.then(|| pg.ca_file.clone()),
    };
    let db = connectors::postgres::PostgresDatabase::connect(&connect(pg.url(), true))
        .await
        .unwrap();
    let db: std::sync::Arc<dyn connectors::Database> = std::sync::Arc::new(db);
    let e = connectors::DatabaseSource::open(db.clone(), vec![sql_table("visits")], None)
        .await
        .err()
        .expect("a mismatching table was accepted")
        .to_string();
    for want in [
        "(5 problem(s))",
        "column ts: expected timestamp, found timestamp with time zone",
        "column x: expected int, found numeric",
        "column d: expected decimal(14,3), found numeric(20,5)",
        "column f: expected float(scale 4), found text",
        "column label: expected text, found no column `label`",
    ] {
        assert!(e.contains(want), "missing `{want}` in {e}");
    }
    // An empty party: the same partials as DataFusion over no rows (one
    // row of zero counts and NULL sums without GROUP BY, none with it).
    pg.execute(
        "CREATE TABLE empty_t (id bigint, g text, h integer, flag boolean, x bigint, \
         d numeric(14,3), f double precision, label text, ts timestamp)",
    )
    .await
    .unwrap();
    let empty = connectors::DatabaseSource::open(db.clone(), vec![sql_table("empty_t")], None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("t.csv");
    std::fs::write(&csv, "id,g,h,flag,x,d,f,label,ts\n").unwrap();
    let files = FileSource::open(
        vec![TableFile {
            table: catalog.table("t").unwrap().clone(),
            path: csv,
            format: FileFormat::Csv,
            renames: BTreeMap::new(),
        }],
        None,
    )
    .await
    .unwrap();
    for (sql, _) in QUERIES {
        let plan = planner::plan_query(sql, &catalog, &["p".into()], &Default::default())
            .await
            .unwrap();
        let got = connectors::LocalSource::run(&empty, &plan.local)
            .await
            .unwrap();
        let want = connectors::LocalSource::run(&files, &plan.local)
            .await
            .unwrap();
        let text = |b: &[RecordBatch]| {
            arrow::util::pretty::pretty_format_batches(b)
                .unwrap()
                .to_string()
        };
        assert_eq!(text(&got), text(&want), "{sql}");
    }

    let e = connectors::DatabaseSource::open(db, vec![sql_table("public.nothing")], None)
        .await
        .err()
        .expect("a missing table was accepted")
        .to_string();
    assert!(e.contains("no table or view `public.nothing`"), "{e}");

    let err = |c: PgConnect| async move {
        connectors::postgres::PostgresDatabase::connect(&c)
            .await
            .err()
            .expect("connected")
            .to_string()
    };
    let e = err(connect(pg.url(), false)).await;
    assert!(e.contains("sslmode=require needs `ca_file`"), "{e}");
    let e = err(connect(pg.url().replace(&pg.password, "wrong"), true)).await;
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(!e.contains("wrong"), "the password is not echoed: {e}");
    let plain = pg.url().replace("sslmode=require", "sslmode=disable");
    let e = err(connect(plain, false)).await;
    assert!(
        e.contains("no pg_hba.conf entry"),
        "the server refuses plaintext: {e}"
    );
    let e = err(connect("not a url at all".into(), false)).await;
    assert!(e.contains("connection string is not valid"), "{e}");
}

/// p0's rows behind a Flight SQL server this project did not write
/// (`datafusion-flight-sql-server`): the whole local part runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_party_behind_a_flight_sql_server_agrees_with_plaintext() {
    let Setup {
        dir,
        ids,
        data,
        mut spec,
        catalog,
        table,
    } = setup(41);

    // The server's own DataFusion context: p0's rows as table `visits`,
    // column `x` named `amount`.
    let ctx = datafusion::prelude::SessionContext::new();
    let rows = rows_of(&data.join("p0/t.csv"), &catalog).await;
    let renamed: Vec<RecordBatch> = rows
        .iter()
        .map(|b| {
            let fields: Vec<arrow::datatypes::Field> = b
                .schema()
                .fields()
                .iter()
                .map(|f| {
                    let name = if f.name() == "x" {
                        "amount"
                    } else {
                        f.name().as_str()
                    };
                    f.as_ref().clone().with_name(name)
                })
                .collect();
            RecordBatch::try_new(
                std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
                b.columns().to_vec(),
            )
            .unwrap()
        })
        .collect();
    let schema = renamed[0].schema();
    let mem = datafusion::datasource::MemTable::try_new(schema, vec![renamed]).unwrap();
    ctx.register_table("visits", std::sync::Arc::new(mem))
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = datafusion_flight_sql_server::service::FlightSqlService::new(ctx.state());
    let serving = tokio::spawn(async move {
        let _ = server
            .serve_with_listener(listener)
            .await
            .map_err(|e| e.to_string());
    });

    spec.parties[0].databases.insert(
        "warehouse".into(),
        DatabaseConfig::FlightSql(connectors::flight_sql::FlightSqlConnect {
            uri: format!("grpc://{addr}"),
            ..Default::default()
        }),
    );
    spec.parties[0].db_tables.push(DbTable {
        source: "warehouse".into(),
        table: SqlTable {
            table,
            local: "visits".into(),
            renames: [("x".to_string(), "amount".to_string())]
                .into_iter()
                .collect(),
        },
    });
    let fed = LocalFederation::start(&spec, &dir.path().join("run"))
        .await
        .unwrap();
    let pooled = fed.pooled_context().await.unwrap();
    let queries: Vec<(&str, bool)> = QUERIES.iter().chain(EXTREME_QUERIES).copied().collect();
    agree_with_plaintext(&fed, &pooled, &ids, &queries).await;
    let client = fed.client("p2", USER, PASSWORD).await.unwrap();
    let explained = client
        .explain("SELECT g, SUM(x), AVG(d) FROM t WHERE label LIKE 'l%' GROUP BY g")
        .await
        .unwrap();
    assert!(
        explained.contains(&format!(
            "p0: sent to Flight SQL (DataFusion dialect) (grpc://{addr})"
        )) && explained.contains("amount")
            && !explained.contains("p0: then computed in the gateway"),
        "{explained}"
    );
    fed.stop().await;
    serving.abort();
}
