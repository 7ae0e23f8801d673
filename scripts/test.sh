#!/usr/bin/env bash
# The test command: sets up .venv (CPU torch 2.13.0), builds memcore, runs ruff, the tests and the
# benchmark suite in quick mode; then proves every CUDA file compiles (tools/check_cuda_build.sh).
# MEMCORE_SKIP_CUDA_BUILD=1 skips that last step (it needs ~6 GB of disk and a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
memcore_env .venv "torch==2.13.0"
# lint and format first: seconds, and a style slip should not cost a 15-minute run to find
.venv/bin/ruff check . && .venv/bin/ruff format --check . || {
  echo "[memcore] ruff: run '.venv/bin/ruff check --fix . && .venv/bin/ruff format .'"; exit 1; }
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
.venv/bin/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable
if [ "${MEMCORE_SKIP_CUDA_BUILD:-0}" != "1" ]; then
  bash tools/check_cuda_build.sh
fi
