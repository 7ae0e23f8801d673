#!/usr/bin/env bash
# The GPU checks, for a machine lent through the device tool (or any CUDA machine whose python3
# already has a CUDA torch). Builds memcore's CUDA kernels against that torch, then runs the named
# stages; each stage's log, and a tarball of the benchmark store / RESULTS.md / scaling.png, go to
# $OUT (the device tool's return folder; out/gpu elsewhere). A failing stage does not stop the
# next one; the exit status is that of the first failure.
#
#   bash scripts/gpu_session.sh build test sanitize     # one device call (each call <= 10 min)
#   bash scripts/gpu_session.sh build bench             # the next call; build is skipped while warm
#   bash scripts/gpu_session.sh build curvature         # curvature figures into the store, RESULTS.md
# (not timed yet on a GPU machine: no session so far was lent one)
# Back here, `tar xzf <returned folder>/results.tgz` in the repository root brings the new
# benchmarks/results.csv (the GPU rows appended), RESULTS.md and scaling.png; commit them.
#
# Stages: build (skipped when memcore/_C is newer than csrc/ and setup.py), test (the whole suite,
# CUDA tests included), sanitize (compute-sanitizer memcheck over the CUDA kernel tests), bench
# (scripts/bench.sh --full -k cuda: cross-entropy with liger and the D2D copy, scaling, training
# steps; appended to benchmarks/results.csv beside the CPU rows), curvature.
# Wheels carried in .whl/ (made here with scripts/gpu_wheels.sh: liger-kernel for the comparison)
# are installed into /tmp/site first, since nothing can be fetched on the device machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/out/gpu}"
mkdir -p "$out"
py="${MEMCORE_PY:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

run() {  # run STAGE COMMAND...: logs to $out/STAGE.log, remembers the first failure
  local stage="$1"; shift
  echo "[memcore] === $stage: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$out/$stage.log"
  local rc=${PIPESTATUS[0]}
  echo "[memcore] === $stage: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/$stage.log"
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
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  if built; then echo "[memcore] memcore/_C is up to date"; return 0; fi
  local arch; arch="$("$py" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" 2>/dev/null)"
  MEMCORE_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${arch:-9.0}}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$py" setup.py -q build_ext --inplace || return 1
  "$py" -c "import torch, memcore; assert memcore.with_cuda(); assert torch.cuda.is_available(); print('[memcore] built', memcore.__file__)"
}

sanitize() {
  # memcheck over the kernels' own tests; the caching allocator off so out-of-bounds accesses
  # land outside live allocations and are seen. Instrumented runs are slow: capped so the stages
  # after it still fit in one device call (MEMCORE_SANITIZE_TIMEOUT seconds, default 300)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${MEMCORE_SANITIZE_TIMEOUT:-300}" compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    "$py" -m pytest tests/test_cross_entropy.py tests/test_bad_input.py tests/test_ops.py tests/test_curvature.py \
    tests/test_input_grad.py -q -p no:cacheprovider -x -k cuda
}

bench() {
  MEMCORE_PY="$py" bash scripts/bench.sh --full -k cuda || return 1
}

pack() {
  tar czf "$out/results.tgz" benchmarks/RESULTS.md benchmarks/scaling.png benchmarks/results.csv 2>/dev/null
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build test)
[ "${stages[0]}" = all ] && stages=(build test sanitize bench curvature)
for stage in "${stages[@]}"; do
  case "$stage" in
    build) run build build || break ;;   # nothing else can run without the extension
    test) run test "$py" -m pytest tests -q -p no:cacheprovider -rs ;;
    sanitize) run sanitize sanitize ;;
    bench) run bench bench; pack ;;
    curvature) run curvature "$py" -m benchmarks.test_bench_curvature --rounds 15 --write \
                 && "$py" -m benchmarks.render; pack ;;
    *) echo "[memcore] unknown stage '$stage' (build test sanitize bench curvature all)"; status=2 ;;
  esac
done
echo "[memcore] results in $out: $(ls "$out" | tr '\n' ' ')"
exit "$status"
