#!/usr/bin/env bash
# Set up fhirtwin in .venv/ and run the main job on the samples in examples/.
# Usage: ./run.sh            (safe to run again: it reuses .venv/)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "== fhirtwin convert --from hl7v2 examples/hl7v2 --out out/hl7v2 --report"
.venv/bin/fhirtwin convert --from hl7v2 examples/hl7v2 --out out/hl7v2 --report
