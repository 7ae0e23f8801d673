#!/usr/bin/env bash
# Builds the CUDA extension (no GPU needed) in .venv-cuda against the CUDA build of torch, out of
# tree in build/cuda, then imports it and checks that every op has a CUDA kernel registered. Fails on
# any CUDA compile error, and when the compiled kernels break the static goals of
# tools/sass_report.py --check (spills, instructions per element). Where a GPU is visible it then
# runs the test suite against that build (the CPU suite has run against the CPU build already).
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
# the build's needs only (a CUDA torch is ~6 GB); the test extras follow where a GPU runs the suite
memcore_install "$PWD/.venv-cuda" "$TORCH_CUDA_SPEC" ""
.venv-cuda/bin/python -c "import torch; assert torch.version.cuda, 'expected a CUDA build of torch'; print('[memcore] torch', torch.__version__)"
# torch's headers are passed as -isystem (setup.py), which silences their host-compiler warnings;
# what nvcc's front end still reports from torch / CUDA headers is not ours. Shown live: setup.py's
# [memcore] lines (each file as its compile starts and ends) and diagnostics naming csrc/; the whole
# log stays in build/cuda/build.log and is printed on failure.
log="build/cuda/build.log"
mkdir -p build/cuda
set +e
MEMCORE_FORCE_CUDA=1 .venv-cuda/bin/python setup.py -q build --build-base build/cuda 2>&1 | tee "$log" |
  { grep --line-buffered -E '^\[memcore\]|csrc/[^ ]*\.(cu|cpp|h|inc)[(:]' || true; }
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then
  cat "$log"
  echo "[memcore] CUDA build failed (log: $log)"
  exit 1
fi
echo "[memcore] CUDA build log: $log ($(wc -l <"$log") lines, $(grep -c -i 'warning' "$log" || true) with 'warning')"
lib="$(ls -d build/cuda/lib.*)"
(cd /tmp && PYTHONPATH="$OLDPWD/$lib" "$OLDPWD/.venv-cuda/bin/python" - <<'PY'
import torch, memcore
assert memcore.with_cuda(), "memcore was built without its CUDA kernels"
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("memcore::"))
assert ops, "no memcore operators registered"
has = torch._C._dispatch_has_kernel_for_dispatch_key
# a CompositeImplicitAutograd op would run its CUDA constituents; every other op needs its own kernel
missing = [n for n in ops if not has(n, "CUDA") and not has(n, "CompositeImplicitAutograd")]
assert not missing, f"operators without a CUDA kernel: {missing}"
print("[memcore] CUDA kernels compiled and registered for", ", ".join(ops))
PY
)
# the static goals, read from the compiled code (no GPU): no kernel spills, the main loops take
# <= 10 SASS instructions per bf16 element and <= 8 per fp32 element (sm_90 and sm_80; table in
# build/cuda/sass.md)
echo "[memcore] SASS check (sm_90, sm_80): no spills, main loops <= 10 instructions per bf16 element, <= 8 per fp32 element"
.venv-cuda/bin/python -m tools.sass_report --arch 90 80 --check --markdown build/cuda/sass.md
if ! .venv-cuda/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "[memcore] no GPU visible: the suite ran against the CPU build; not again here"
  exit 0
fi
memcore_install "$PWD/.venv-cuda" "$TORCH_CUDA_SPEC" all
# the CUDA build first on sys.path: pyproject's pythonpath ["."] would otherwise put the source tree's
# memcore (its _C built by the CPU venv) ahead of it
PYTHONPATH="$lib" .venv-cuda/bin/python -m pytest tests -q -p no:cacheprovider -x -o pythonpath="$PWD/$lib ."
