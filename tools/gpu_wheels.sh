#!/usr/bin/env bash
# Downloads (here, where pip can reach the registry) the wheels the GPU checks need but the device
# machine's image lacks, into .whl/ (git-ignored), for the device tool to carry:
#   bash scripts/gpu_wheels.sh        then run(..., carry=[".whl"]) with scripts/gpu_session.sh
# liger-kernel is pure Python (Triton); its needs, torch and triton, are in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${MEMCORE_GPU_PY:-3.12}" \
  --implementation cp -d .whl "liger-kernel==${LIGER_VERSION:-0.8.5}"
ls -la .whl
