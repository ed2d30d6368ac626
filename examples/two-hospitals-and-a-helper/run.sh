#!/usr/bin/env bash
# Two hospitals and a data-less helper gateway as three `council serve`
# processes on 127.0.0.1. MIN and MAX need three compute parties; the
# helper is the third. Run from anywhere; needs cargo or $COUNCIL.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${COUNCIL:-}" ]; then
  (cd ../.. && cargo build -q -p council)
  COUNCIL="$(cd ../.. && pwd)/target/debug/council"
fi

rm -rf run && mkdir -p run
echo "== certificates: a federation CA and one certificate per party (the helper too)"
"$COUNCIL" certs --parties hospital_a,hospital_b,helper --out run/certs

echo "== starting two hospital gateways and the helper (no tables)"
pids=()
for p in hospital_a hospital_b helper; do
  "$COUNCIL" serve --config "$p.toml" > "run/$p.out" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

export COUNCIL_USER=alice COUNCIL_PASSWORD=demo-password-not-secret COUNCIL_CA=run/certs/ca.pem
q() { "$COUNCIL" query --gateway "$1" "${@:2}"; }
for i in $(seq 1 60); do
  if q 127.0.0.1:7501 "SELECT COUNT(*) FROM patients" > /dev/null 2>&1 \
     && q 127.0.0.1:7502 "SELECT COUNT(*) FROM patients" > /dev/null 2>&1; then break; fi
  sleep 0.5
done

echo "== hospital_a's analyst: cheapest and dearest admission by age band (the helper computes, sees no row)"
q 127.0.0.1:7501 "SELECT age_band, MIN(cost) AS cheapest, MAX(cost) AS dearest, COUNT(*) AS admissions FROM patients GROUP BY age_band ORDER BY age_band"

echo "== EXPLAIN: the compute parties and the security model of each step"
"$COUNCIL" explain --gateway 127.0.0.1:7502 "SELECT sex, MAX(cost), AVG(cost) FROM patients GROUP BY sex"

echo "== audit logs"
for p in hospital_a hospital_b helper; do "$COUNCIL" audit verify "run/audit-$p.log"; done
echo "two-hospitals-and-a-helper example: ok"
