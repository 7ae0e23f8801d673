#!/usr/bin/env bash
# The benchmark suite: bash scripts/bench.sh [--full] [extra pytest args]
#   default: quick shapes with real timing; --full adds the heavy cases (8192 x 32000 on CPU).
# Saves pytest-benchmark JSON under benchmarks/out/, keeps a compact copy in benchmarks/json/ (the
# runs RESULTS.md is made from, committed), and regenerates the tables in benchmarks/RESULTS.md
# from every run kept there (benchmarks/report.py --dir; a kept run whose every case was measured
# again is pruned), then the goals table at its top (benchmarks/summary.py). So a GPU-only run
# (`-k cuda`) adds its rows beside the CPU ones.
# MEMCORE_BENCH_NOTE: a line stored with the run and shown under its sections' headers (e.g.
# "otherwise idle machine"). Uses .venv (CPU torch) unless MEMCORE_PY names a Python that
# already has torch and memcore (e.g. a GPU machine's own torch).
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
[ -f "$json" ] || { echo "[memcore] no benchmark ran (all skipped or deselected): nothing to report"; exit 1; }
notes=()
[ -z "${MEMCORE_BENCH_NOTE:-}" ] || notes=(--note "$MEMCORE_BENCH_NOTE")
"$py" benchmarks/report.py "$json" --dir benchmarks/json --save benchmarks/json --prune ${notes[@]+"${notes[@]}"}
"$py" benchmarks/summary.py > /dev/null  # the goals table at the top, from every saved measurement
echo "[memcore] wrote $json, benchmarks/json/$(basename "$json") and benchmarks/RESULTS.md"
