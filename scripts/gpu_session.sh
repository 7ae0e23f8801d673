#!/usr/bin/env bash
# The GPU checks in one device call of at most 10 minutes (the device tool's limit), for a machine
# lent through the device tool (or any CUDA machine whose python3 already has a CUDA torch):
#
#   bash scripts/gpu_session.sh            # every stage, in this order, within MEMCORE_GPU_BUDGET s
#   bash scripts/gpu_session.sh build test # only the named stages (same order rules)
#
#   build     memcore for this GPU's architecture only (skipped when memcore/_C is up to date)
#   test      the CUDA tests (pytest -k cuda: every test parametrized over devices, on the GPU)
#   quick     benchmarks/gpu_quick.py: 8192x32000 bf16 forward-only and fwd+bwd against the D2D
#             copy, liger and torch.compile, overwrite at 8192x32000 and 8192x128256 (issue #18's
#             first figures), one JSON line each in $OUT/quick.jsonl as soon as measured
#   sanitize  compute-sanitizer memcheck over the CUDA kernel tests
#   bench     scripts/bench.sh --full -k cuda (cross-entropy with liger and the D2D copy, scaling,
#             training steps; appended to benchmarks/results.csv beside the CPU rows); results.tgz
#   curvature the curvature figures into the store, RESULTS.md regenerated; results.tgz
#
# Each stage runs under `timeout` with the smaller of its own cap and the time left of the budget
# (MEMCORE_GPU_BUDGET, default 560 s: the 10-minute call less start-up and the copy back), and a
# stage that cannot start with 20 s left is skipped and says so. Every stage's log is written to
# $OUT (the device tool's return folder; out/gpu elsewhere) while it runs, so whatever finished,
# and the part of a stage cut short, comes back. session.log lists each stage's exit status and
# seconds; the exit status is that of the first failure. Back here, `tar xzf <returned
# folder>/results.tgz` in the repository root brings the new benchmarks/results.csv (GPU rows
# appended), RESULTS.md and scaling.png; commit them.
# Estimated, not yet timed on a GPU machine: build ~3 min on 16 cores (one arch), test ~1 min,
# quick ~1 min (+~40 s for torch.compile), sanitize <= 90 s; bench takes what is left.
# Wheels carried in .whl/ (made here with scripts/gpu_wheels.sh: liger-kernel for the comparison)
# are installed into /tmp/site first, since nothing can be fetched on the device machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/out/gpu}"
mkdir -p "$out"
py="${MEMCORE_PY:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget="${MEMCORE_GPU_BUDGET:-560}"
t_start=$SECONDS
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

left() { echo $((budget - (SECONDS - t_start))); }

run() {  # run STAGE CAP COMMAND...: at most min(CAP, time left) s, logged live to $out/STAGE.log
  local stage="$1" cap="$2"; shift 2
  local t; t=$(left)
  [ "$cap" -lt "$t" ] && t=$cap
  if [ "$t" -lt 20 ]; then
    echo "[memcore] === $stage: skipped, $(left) s of the budget left" | tee -a "$out/session.log"
    return 0
  fi
  echo "[memcore] === $stage (<= $t s): $*"
  local t0=$SECONDS
  # bash -c: the stage may be one of the functions below (exported), which timeout cannot call
  timeout -k 10 "$t" bash -c '"$@"' _ "$@" 2>&1 | tee "$out/$stage.log"
  local rc=${PIPESTATUS[0]}
  local note=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (timed out)"
  echo "[memcore] === $stage: exit $rc$note after $((SECONDS - t0)) s" | tee -a "$out/$stage.log" "$out/session.log"
  [ "$rc" = 0 ] || [ "$status" != 0 ] || status=$rc
  return "$rc"
}

built() {  # memcore/_C*.so newer than every source, and importable with its CUDA kernels
  local so; so="$(ls memcore/_C*.so 2>/dev/null | head -1)"
  [ -n "$so" ] || return 1
  [ -z "$(find csrc setup.py -newer "$so" -type f | head -1)" ] || return 1
  "$py" -c "import memcore, sys; sys.exit(0 if memcore.with_cuda() else 1)" 2>/dev/null
}

build() {
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  if built; then echo "[memcore] memcore/_C is up to date"; return 0; fi
  local arch; arch="$("$py" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" 2>/dev/null)"
  # this GPU's architecture only: half the device compile of the default list
  MEMCORE_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${arch:-9.0}}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$py" setup.py -q build_ext --inplace || return 1
  "$py" -c "import torch, memcore; assert memcore.with_cuda(); assert torch.cuda.is_available(); print('[memcore] built', memcore.__file__)"
}

sanitize() {
  # memcheck over the kernels' own tests; the caching allocator off so out-of-bounds accesses
  # land outside live allocations and are seen
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    "$py" -m pytest tests/test_cross_entropy.py tests/test_bad_input.py tests/test_ops.py tests/test_overwrite.py \
    tests/test_curvature.py tests/test_input_grad.py tests/test_linear_accumulate.py -q -p no:cacheprovider -x -k cuda
}

bench() {
  # the device copy of the tree may carry no .git: its rows are "unrecorded", published anyway
  MEMCORE_ALLOW_DIRTY=1 MEMCORE_PY="$py" bash scripts/bench.sh --full -k cuda || return 1
}

pack() {
  tar czf "$out/results.tgz" benchmarks/RESULTS.md benchmarks/scaling.png benchmarks/results.csv 2>/dev/null
}

export py out
export -f built build sanitize bench

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build test quick sanitize bench curvature)
[ "${stages[0]}" = all ] && stages=(build test quick sanitize bench curvature)
echo "[memcore] session: ${stages[*]} within $budget s" | tee "$out/session.log"
for stage in "${stages[@]}"; do
  case "$stage" in
    build) run build 330 build || break ;;   # nothing else can run without the extension
    test) run test 150 "$py" -m pytest tests -q -p no:cacheprovider -rs -k cuda ;;
    quick) run quick 150 "$py" benchmarks/gpu_quick.py --out "$out/quick.jsonl" ;;
    sanitize) run sanitize 90 sanitize ;;
    bench) run bench 600 bench; pack ;;
    curvature) run curvature 600 "$py" -m benchmarks.test_bench_curvature --rounds 15 --write \
                 && "$py" -m benchmarks.render --allow-dirty > /dev/null; pack ;;
    *) echo "[memcore] unknown stage '$stage' (build test quick sanitize bench curvature all)"; status=2 ;;
  esac
done
echo "[memcore] results in $out after $((SECONDS - t_start)) s: $(ls "$out" | tr '\n' ' ')" | tee -a "$out/session.log"
exit "$status"
