"""Drives a Council gateway with the ADBC Flight SQL driver (a client this
project did not write), for tests/tests/real_clients.rs.

usage: adbc_client.py URI CA_FILE USER PASSWORD OUT_DIR QUERIES_JSON REFUSED_SQL

Writes each query's answer as an Arrow IPC file OUT_DIR/q<i>.arrow, and
prints one JSON object: the tables seen by catalog browsing, the error for
REFUSED_SQL, and the error for a wrong password.
"""
import json
import sys

import adbc_driver_flightsql.dbapi as flight_sql
import pyarrow as pa
from adbc_driver_flightsql import DatabaseOptions

uri, ca_file, user, password, out_dir, queries_json, refused_sql = sys.argv[1:8]
ca = open(ca_file).read()


def connect(pw):
    return flight_sql.connect(
        uri,
        db_kwargs={
            "username": user,
            "password": pw,
            DatabaseOptions.TLS_ROOT_CERTS.value: ca,
        },
    )


report = {}
with connect(password) as conn:
    with conn.cursor() as cur:
        for i, sql in enumerate(json.loads(queries_json)):
            cur.execute(sql)
            table = cur.fetch_arrow_table()
            with pa.OSFile(f"{out_dir}/q{i}.arrow", "wb") as f:
                with pa.ipc.new_file(f, table.schema) as w:
                    w.write_table(table)
        # Prepared explicitly, then executed.
        cur.adbc_prepare(json.loads(queries_json)[0])
        cur.execute(json.loads(queries_json)[0])
        report["prepared_rows"] = cur.fetch_arrow_table().num_rows
        try:
            cur.execute(refused_sql)
            cur.fetch_arrow_table()
            report["refused_error"] = None
        except Exception as e:  # the driver's error, as an analyst sees it
            report["refused_error"] = str(e)
    objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    tables = []
    for catalog in objects:
        for schema in catalog["catalog_db_schemas"] or []:
            for t in schema["db_schema_tables"] or []:
                tables.append(f'{catalog["catalog_name"]}.{schema["db_schema_name"]}.{t["table_name"]}')
    report["tables"] = tables
try:
    with connect(password + "-wrong") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM t")
            cur.fetch_arrow_table()
    report["wrong_password_error"] = None
except Exception as e:
    report["wrong_password_error"] = str(e)
print(json.dumps(report))
