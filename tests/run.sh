#!/usr/bin/env bash
# The test command (README): installs the clients the end-to-end tests drive
# and that this project did not write, then runs every test.
#   - Python: pyarrow, the ADBC Flight SQL driver and psycopg 3, pinned, in
#     a virtual environment at target/py (created once; no root needed);
#   - psql (Debian's postgresql-client) and a PostgreSQL server (Debian's
#     postgresql: the tests start their own throwaway cluster on 127.0.0.1
#     and an ephemeral port), installed with apt-get when missing and run as
#     root; otherwise the tests that need them say how to get them;
#   - protoc (Debian's protobuf-compiler), which the test-only Flight SQL
#     server's substrait dependency needs at build time.
# Set COUNCIL_TEST_PYTHON to use another interpreter that has them.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_PACKAGES="pyarrow==26.0.1 adbc-driver-manager==1.13.0 adbc-driver-flightsql==1.13.0 psycopg[binary]==3.2.10"

if [ -z "${COUNCIL_TEST_PYTHON:-}" ]; then
  if ! target/py/bin/python -c "import adbc_driver_flightsql, adbc_driver_manager, pyarrow, psycopg" 2>/dev/null; then
    echo "tests/run.sh: installing $PY_PACKAGES into target/py"
    mkdir -p target
    rm -rf target/py
    python3 -m venv target/py
    target/py/bin/pip install --quiet --disable-pip-version-check $PY_PACKAGES
  fi
  export COUNCIL_TEST_PYTHON="$PWD/target/py/bin/python"
fi

need=()
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
# protoc: the test-only Flight SQL server (datafusion-flight-sql-server)
# depends on substrait, whose build generates code with protoc.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "tests/run.sh: installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

cargo test --workspace --locked "$@"
