#!/usr/bin/env bash
# The test command, in two tiers (CI runs the full one):
#   bash scripts/test.sh [pytest args]          lint, the test suite, the benchmark suite run once
#       without timing, then the CUDA compile check (tools/check_cuda_build.sh: the CUDA kernels
#       compile and register, their SASS keeps its static goals; the suite runs against that build
#       only where a GPU exists). MEMCORE_SKIP_CUDA_BUILD=1 skips the CUDA check.
#   bash scripts/test.sh --quick [pytest args]  lint and the suite without its `slow` tests, for
#       development once .venv is built.
# Sets up .venv (CPU torch 2.13.0, every extra of pyproject.toml, so that no documented recipe is
# skipped) and builds memcore into it first.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
if [ "${1:-}" = "--quick" ]; then
  quick=1
  shift
fi
source scripts/env.sh
memcore_env .venv "torch==2.13.0" all
# lint and format first: seconds, and a style slip should not cost a whole run to find
.venv/bin/ruff check . && .venv/bin/ruff format --check . || {
  echo "[memcore] ruff: run '.venv/bin/ruff check --fix . && .venv/bin/ruff format .'"
  exit 1
}
if [ $quick = 1 ]; then
  .venv/bin/python -m pytest tests -q -p no:cacheprovider -m "not slow" "$@"
  exit 0
fi
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
.venv/bin/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable
if [ "${MEMCORE_SKIP_CUDA_BUILD:-0}" != "1" ]; then
  bash tools/check_cuda_build.sh
fi
