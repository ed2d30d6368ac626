"""Drives a Council gateway's PostgreSQL door with psycopg 3 over the
extended query protocol (prepared statements), in text and binary result
formats, for tests/tests/real_clients.rs.

usage: psycopg_client.py CONNINFO SQL
Prints JSON: {"text": rows, "binary": rows}, every value as a string.
"""
import json
import sys

import psycopg

conninfo, sql = sys.argv[1:3]
out = {}
with psycopg.connect(conninfo) as conn:
    for name, binary in (("text", False), ("binary", True)):
        with conn.cursor(binary=binary) as cur:
            cur.execute(sql, prepare=True)
            out[name] = [[None if v is None else str(v) for v in row] for row in cur.fetchall()]
print(json.dumps(out))
