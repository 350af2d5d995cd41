#!/usr/bin/env bash
# Set up fhirtwin in .venv/ and run the main job on the samples in examples/:
#   1. convert the HL7 v2 samples to FHIR Bundles (out/hl7v2/);
#   2. start the whole pipeline (`fhirtwin up`: embedded Kafka and Redis, MLLP listener,
#      workers), send samples over MLLP, ingest the rest, and show the twins that were
#      built and the dead letters; then stop it.
# Usage: ./run.sh            (safe to run again: it reuses .venv/)
#        MLLP_PORT=2576 HTTP_PORT=8081 ./run.sh   if the default ports are taken
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
FT=.venv/bin/fhirtwin
MLLP_PORT=${MLLP_PORT:-2575}
HTTP_PORT=${HTTP_PORT:-8080}

echo "== fhirtwin convert --from hl7v2 examples/hl7v2 --out out/hl7v2 --report"
$FT convert --from hl7v2 examples/hl7v2 --out out/hl7v2 --report
echo
echo "== fhirtwin convert --from note examples/notes --out out/notes   (clinical note → coded FHIR)"
$FT convert --from note examples/notes --out out/notes

echo
echo "== fhirtwin up   (log: out/up.log)"
mkdir -p out
$FT up --mllp-port "$MLLP_PORT" --http-port "$HTTP_PORT" >out/up.log 2>&1 &
UP_PID=$!
stop_up() { kill -TERM "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true; }
trap stop_up EXIT
for _ in $(seq 1 100); do
  if $FT status >/dev/null 2>&1; then break; fi
  if ! kill -0 "$UP_PID" 2>/dev/null; then cat out/up.log; exit 1; fi
  sleep 0.3
done
cat out/up.log

echo
echo "== fhirtwin subscriber add care-model --actor 'urn:example:org|twin-lab' --purpose TREAT --scope patient-privacy --default permit"
$FT subscriber add care-model --actor 'urn:example:org|twin-lab' --purpose TREAT --scope patient-privacy --default permit
echo "== fhirtwin send --port $MLLP_PORT examples/hl7v2/adt-a01-admit.hl7 examples/hl7v2/oru-r01-cmp.hl7"
$FT send --port "$MLLP_PORT" --wait 30 examples/hl7v2/adt-a01-admit.hl7 examples/hl7v2/oru-r01-cmp.hl7
echo "== fhirtwin ingest --from hl7v2 examples/hl7v2 examples/bad"
$FT ingest --from hl7v2 examples/hl7v2 examples/bad
echo "== fhirtwin ingest --from notes examples/notes   (an admission note about MRN448812)"
$FT ingest --from notes examples/notes
echo "== fhirtwin status --wait"
$FT status --wait --timeout 120
echo
echo "== fhirtwin twin list"
$FT twin list
echo "== fhirtwin twin show MRN448812"
$FT twin show MRN448812
echo "== fhirtwin deadletter list"
$FT deadletter list
echo "== fhirtwin audit query --subscriber care-model   (consent decisions and disclosures)"
$FT audit query --subscriber care-model
echo "== fhirtwin audit verify"
$FT audit verify
echo "== health: curl http://127.0.0.1:$HTTP_PORT/health"
.venv/bin/python -c "import httpx,sys; r=httpx.get('http://127.0.0.1:$HTTP_PORT/health'); print(r.status_code, r.text)"
