#!/usr/bin/env bash
# The benchmark suite: bash scripts/bench.sh [--full] [extra pytest args]
#   default: quick shapes with real timing; --full adds the heavy cases (8192 x 32000 on CPU).
# Appends every measured figure to benchmarks/results.csv (one row each, with the git commit and
# whether the tree had changes), then regenerates benchmarks/RESULTS.md and scaling.png from the
# whole store (python -m benchmarks.render; the latest figure per case wins, so a GPU-only run
# `-k cuda` adds its rows beside the CPU ones). A figure from a modified tree is stored, but shown
# only where no figure of a clean tree exists.
# MEMCORE_BENCH_NOTE: a line stored with each figure (e.g. "otherwise idle machine"). Uses .venv
# (CPU torch) unless MEMCORE_PY names a Python that already has torch and memcore (e.g. a GPU
# machine's own torch). The raw pytest-benchmark JSON stays in benchmarks/out/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${MEMCORE_PY:-}" ]; then
  py="$MEMCORE_PY"
else
  source scripts/env.sh
  memcore_env .venv "torch==2.13.0" all
  py=.venv/bin/python
fi
mkdir -p benchmarks/out
json="benchmarks/out/bench-$(date -u +%Y%m%dT%H%M%SZ).json"
args=()
for a in "$@"; do
  if [ "$a" = "--full" ]; then args+=(--bench-full); else args+=("$a"); fi
done
"$py" -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$json" --bench-store=benchmarks/results.csv \
  ${args[@]+"${args[@]}"}
"$py" -m benchmarks.render
