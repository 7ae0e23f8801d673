#!/usr/bin/env bash
# Downloads, where pip can reach the package index, the wheels the GPU calls need but a GPU machine's
# Python may lack, into .whl/ (git-ignored); tools/gpu_check.sh and tools/gpu_bench.sh install them
# from there, so a machine without network access gets them by copying .whl/ along with the tree:
#   bash tools/gpu_wheels.sh
# .whl/: liger-kernel (pure Python on Triton; its needs, torch and triton, come with a CUDA torch),
# always installed. .whl/test/: pytest and what it needs, installed only where the Python has no
# pytest (a machine's own pytest, and the plugins built for it, are left as they are).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/test
get() {  # get DIR SPEC...
  local dir="$1"
  shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${MEMCORE_GPU_PY:-3.12}" \
    --implementation cp -d "$dir" "$@"
}
get .whl "liger-kernel==${LIGER_VERSION:-0.8.5}"
get .whl/test pytest pluggy iniconfig packaging
ls -la .whl .whl/test
