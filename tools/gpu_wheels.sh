#!/usr/bin/env bash
# Downloads, where pip can reach the package index, the wheels the GPU checks need but a GPU
# machine's Python may lack, into .whl/ (git-ignored); tools/gpu_session.sh installs them from there,
# so a machine without network access gets them by copying .whl/ along with the tree:
#   bash tools/gpu_wheels.sh
# liger-kernel is pure Python (Triton); its needs, torch and triton, come with a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${MEMCORE_GPU_PY:-3.12}" \
  --implementation cp -d .whl "liger-kernel==${LIGER_VERSION:-0.8.5}"
ls -la .whl
