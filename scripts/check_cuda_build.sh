#!/usr/bin/env bash
# Builds the CUDA extension (no GPU needed) in .venv-cuda against the CUDA build of torch, out of
# tree in build/cuda, then imports it and checks the CUDA kernels are registered; where a GPU is
# present it also runs the test suite on it. Fails on any CUDA compile error.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
TORCH_CUDA_SPEC="${MEMCORE_CUDA_TORCH:-torch==2.14.1}"
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)" 2>/dev/null || echo /x/x/x)")")"; do
    if [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_HOME="$d"; break; fi
  done
fi
# nvcc on PATH may be a wrapper script; torch must see the real toolkit or the link misses cudart
[ -n "${CUDA_HOME:-}" ] || { echo "[memcore] no CUDA toolkit found (set CUDA_HOME)"; exit 1; }
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
echo "[memcore] CUDA build check: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
python3 -m venv .venv-cuda 2>/dev/null || true
memcore_pip .venv-cuda/bin/pip install -q --disable-pip-version-check "$TORCH_CUDA_SPEC" numpy
memcore_pip .venv-cuda/bin/pip install -q --disable-pip-version-check "$TORCH_CUDA_SPEC" "${MEMCORE_DEPS[@]}"
.venv-cuda/bin/python -c "import torch; assert torch.version.cuda, 'expected a CUDA build of torch'; print('[memcore] torch', torch.__version__)"
MEMCORE_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" .venv-cuda/bin/python setup.py -q build --build-base build/cuda
lib="$(ls -d build/cuda/lib.*)"
(cd /tmp && PYTHONPATH="$OLDPWD/$lib" "$OLDPWD/.venv-cuda/bin/python" - <<'PY'
import torch, memcore
assert memcore.with_cuda(), "memcore was built without its CUDA kernels"
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("memcore::"))
assert ops, "no memcore operators registered"
has = torch._C._dispatch_has_kernel_for_dispatch_key
# composite ops (ce_accumulate) run their CUDA constituents; every other op needs its own kernel
missing = [n for n in ops if not has(n, "CUDA") and not has(n, "CompositeImplicitAutograd")]
assert not missing, f"operators without a CUDA kernel: {missing}"
print("[memcore] CUDA kernels compiled and registered for", ", ".join(ops))
PY
)
PYTHONPATH="$lib" .venv-cuda/bin/pytest tests -q -p no:cacheprovider -x
