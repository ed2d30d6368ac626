#!/usr/bin/env bash
# Policy tests kept beside the policies: each line states the decision the
# governance team expects. Run from examples/three-hospitals/.
set -euo pipefail
COUNCIL=${COUNCIL:-council}
t() { "$COUNCIL" policy test "policies/$1.toml" --catalog catalog.toml --analyst "$2" --sql "$3" --expect "$4"; }

for h in hospital_a hospital_b hospital_c; do
  "$COUNCIL" policy check "policies/$h.toml" --catalog catalog.toml
  t $h hospital_a:alice "SELECT age_band, COUNT(*), AVG(cost) FROM patients WHERE diagnosis = 'E11' GROUP BY age_band" allow
  t $h hospital_a:alice "SELECT diagnosis, COUNT(*) FROM patients GROUP BY diagnosis" deny
  t $h other_bank:bob "SELECT COUNT(*) FROM patients" deny
done
t hospital_a hospital_a:alice "SELECT COUNT(*) FROM patients WHERE patient_id < 1000100" allow
t hospital_b hospital_a:alice "SELECT COUNT(*) FROM patients WHERE patient_id < 1000100" deny
# A condition hidden inside an aggregate filters as WHERE does: the same rule.
t hospital_b hospital_a:alice "SELECT sex, COUNT(CASE WHEN patient_id < 2000100 THEN 1 END) FROM patients GROUP BY sex" deny
t hospital_b hospital_a:alice "SELECT age_band, SUM(length_of_stay + 0 * patient_id) FROM patients GROUP BY age_band" deny
# External analysts get noised answers from hospital_c (the test prints the noise).
"$COUNCIL" policy test policies/hospital_c.toml --catalog catalog.toml --analyst hospital_a:victor --role external \
  --sql "SELECT age_band, COUNT(*), SUM(length_of_stay) FROM patients GROUP BY age_band" --expect allow
echo "all policy tests passed"
