#!/usr/bin/env bash
# The test command (README): installs the clients the end-to-end tests drive
# and that this project did not write, then runs every test.
#   - Python: pyarrow and the ADBC Flight SQL driver, pinned, in a virtual
#     environment at target/py (created once; no root needed).
# Set COUNCIL_TEST_PYTHON to use another interpreter that has them.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_PACKAGES="pyarrow==26.0.1 adbc-driver-manager==1.13.0 adbc-driver-flightsql==1.13.0"

if [ -z "${COUNCIL_TEST_PYTHON:-}" ]; then
  if ! target/py/bin/python -c "import adbc_driver_flightsql, adbc_driver_manager, pyarrow" 2>/dev/null; then
    echo "tests/run.sh: installing $PY_PACKAGES into target/py"
    mkdir -p target
    rm -rf target/py
    python3 -m venv target/py
    target/py/bin/pip install --quiet --disable-pip-version-check $PY_PACKAGES
  fi
  export COUNCIL_TEST_PYTHON="$PWD/target/py/bin/python"
fi

cargo test --workspace --locked "$@"
