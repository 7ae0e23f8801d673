#!/usr/bin/env bash
# The test command: sets up .venv (CPU torch 2.13.0), builds memcore, runs the tests and the
# benchmark suite in quick mode; then proves every CUDA file compiles (scripts/check_cuda_build.sh).
# MEMCORE_SKIP_CUDA_BUILD=1 skips that last step (it needs ~6 GB of disk and a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
memcore_env .venv "torch==2.13.0"
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
.venv/bin/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable
if [ "${MEMCORE_SKIP_CUDA_BUILD:-0}" != "1" ]; then
  bash scripts/check_cuda_build.sh
fi
