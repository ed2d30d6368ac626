#!/usr/bin/env bash
# Three hospitals as three real `council serve` processes on 127.0.0.1,
# queried with `council query`. Run from anywhere; needs cargo or $COUNCIL.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${COUNCIL:-}" ]; then
  (cd ../.. && cargo build -q -p council)
  COUNCIL="$(cd ../.. && pwd)/target/debug/council"
fi
export COUNCIL

rm -rf run && mkdir -p run
echo "== certificates: a federation CA and one certificate per hospital"
"$COUNCIL" certs --parties hospital_a,hospital_b,hospital_c --out run/certs

echo "== policy tests beside the policies"
policies/policy-tests.sh

echo "== starting three gateways"
pids=()
for h in hospital_a hospital_b hospital_c; do
  "$COUNCIL" serve --config "$h.toml" > "run/$h.out" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

export COUNCIL_USER=alice COUNCIL_PASSWORD=demo-password-not-secret COUNCIL_CA=run/certs/ca.pem
q() { "$COUNCIL" query --gateway "$1" "${@:2}"; }
for i in $(seq 1 60); do
  if q 127.0.0.1:7201 "SELECT COUNT(*) FROM patients" > /dev/null 2>&1 \
     && q 127.0.0.1:7202 "SELECT COUNT(*) FROM patients" > /dev/null 2>&1; then break; fi
  sleep 0.5
done

echo "== hospital_a's analyst: diabetes patients by age band"
q 127.0.0.1:7201 "SELECT age_band, COUNT(*) AS patients, AVG(cost) AS mean_cost FROM patients WHERE diagnosis = 'E11' GROUP BY age_band ORDER BY age_band"

echo "== hospital_b's analyst, as CSV for a script"
q 127.0.0.1:7202 --format csv "SELECT sex, COUNT(*) AS admissions, SUM(cost) AS total_cost FROM patients GROUP BY sex ORDER BY sex"

echo "== as JSON"
q 127.0.0.1:7203 --format json "SELECT readmitted, AVG(length_of_stay) AS mean_stay FROM patients GROUP BY readmitted ORDER BY readmitted"

echo "== EXPLAIN: what runs where and who learns what"
"$COUNCIL" explain --gateway 127.0.0.1:7201 "SELECT sex, STDDEV_SAMP(cost) FROM patients GROUP BY sex"

echo "== a query hospital_b's policy refuses"
if q 127.0.0.1:7201 "SELECT sex, COUNT(*) FROM patients WHERE patient_id < 1000100 GROUP BY sex"; then
  echo "expected a refusal" >&2; exit 1
fi

echo "== an external analyst of hospital_a: hospital_c answers only with differential privacy"
COUNCIL_USER=victor q 127.0.0.1:7201 "SELECT age_band, COUNT(*) AS patients, SUM(length_of_stay) AS bed_days FROM patients GROUP BY age_band ORDER BY age_band"
echo "== hospital_c's budget ledger"
"$COUNCIL" budget show --config hospital_c.toml

if command -v psql > /dev/null; then
  echo "== hospital_c's analyst through psql (PostgreSQL wire protocol, TLS, SCRAM)"
  PGPASSWORD="$COUNCIL_PASSWORD" psql -X \
    "host=127.0.0.1 port=7303 user=alice dbname=council sslmode=verify-full sslrootcert=run/certs/ca.pem" \
    -c "SELECT sex, COUNT(*) AS n, AVG(cost) AS avg_cost FROM patients GROUP BY sex ORDER BY sex"
  echo "== hospital_a's external analyst through psql: the noise comes as a NOTICE"
  PGPASSWORD="$COUNCIL_PASSWORD" psql -X \
    "host=127.0.0.1 port=7301 user=victor dbname=council sslmode=verify-full sslrootcert=run/certs/ca.pem" \
    -c "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex ORDER BY sex"
fi

echo "== audit logs"
for h in hospital_a hospital_b hospital_c; do "$COUNCIL" audit verify "run/audit-$h.log"; done
echo "three-hospitals example: ok"
