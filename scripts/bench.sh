#!/usr/bin/env bash
# The benchmark suite: bash scripts/bench.sh [--full] [extra pytest args]
#   default: quick shapes with real timing; --full adds the heavy cases (8192 x 32000 on CPU).
# Saves pytest-benchmark JSON under benchmarks/out/ and regenerates the tables in
# benchmarks/RESULTS.md from it (benchmarks/report.py). Uses .venv (CPU torch) unless
# MEMCORE_PY names a Python that already has torch and memcore (e.g. a GPU machine's own torch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${MEMCORE_PY:-}" ]; then
  py="$MEMCORE_PY"
else
  source scripts/env.sh
  memcore_env .venv "torch==2.13.0"
  py=.venv/bin/python
fi
mkdir -p benchmarks/out
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
json="benchmarks/out/bench-$stamp.json"
args=()
for a in "$@"; do
  if [ "$a" = "--full" ]; then args+=(--bench-full); else args+=("$a"); fi
done
"$py" -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$json" ${args[@]+"${args[@]}"}
"$py" benchmarks/report.py "$json"
echo "[memcore] wrote $json and benchmarks/RESULTS.md"
