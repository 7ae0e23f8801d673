#!/usr/bin/env bash
# The GPU checks on a CUDA machine whose Python already has a CUDA build of torch, in one run that
# keeps to a time budget (MEMCORE_GPU_BUDGET, default 560 s), for machines lent for a limited time:
#
#   bash tools/gpu_session.sh            # every stage, in this order
#   bash tools/gpu_session.sh build test # only the named stages (same order rules)
#
#   build     memcore against the machine's own torch, for this GPU's architecture only (skipped
#             when memcore/_C is up to date); then one CUDA op, so a missing kernel image shows here
#   test      the CUDA tests (pytest -k cuda: every test parametrized over devices, on the GPU)
#   quick     tools/gpu_quick.py: 8192x32000 bf16 forward-only, fwd+bwd and overwrite against
#             the D2D copy and liger; fused linear-CE at 8192x4096x128256 (memcore / plain / liger:
#             time, peak memory); overwrite at 8192x128256; torch.compile last; one JSON line each
#             in $OUT/quick.jsonl as soon as measured
#   sanitize  compute-sanitizer memcheck over the CUDA kernel tests (skipped, and said so, where
#             compute-sanitizer is missing or refuses the device, as on gVisor machines)
#   bench     scripts/bench.sh --full -k cuda (cross-entropy with liger and the D2D copy, fused
#             linear-CE with liger, scaling, training steps; appended to benchmarks/results.csv
#             beside the CPU rows); results.tgz, and the raw pytest-benchmark JSON as bench.json
#   curvature the curvature figures into the store, RESULTS.md regenerated; results.tgz
#
# Each stage runs under `timeout` with the smaller of its own cap and the time left of the budget,
# and a stage that cannot start with 20 s left is skipped and says so. The pytest stages get a
# deadline (tools/deadline.py) shortly before their timeout: tests not started by then are skipped,
# so the run ends by itself, prints its summary and, for bench, stores its figures (which
# pytest-benchmark writes only at the end of a session; a killed run stores none).
#
# What it writes to $OUT (default out/gpu): session.log (each stage's exit status, wall and CPU
# seconds), stages.log (every stage's output, written while it runs, so the part of a stage cut
# short is kept too), quick.jsonl, bench.json and results.tgz. The exit status is that of the first
# failure. Run on a copy of the tree, `tar xzf results.tgz` in the repository root brings back the
# new benchmarks/results.csv (GPU rows appended), RESULTS.md and scaling.png; commit them. Stage
# times: DEVELOPMENT.md, "GPU runs".
#
# Environment: MEMCORE_PY (default python3: the machine's own CUDA torch; nothing installs torch),
# MEMCORE_CUDA_ARCH (e.g. 9.0: overrides the architecture read off the GPU, and is needed where no
# GPU is visible, as in a dry run), MEMCORE_GPU_CAP_SCALE (multiplies every stage's cap: dry runs on
# slow machines), MAX_JOBS (default: all cores). Wheels in .whl/ (made with tools/gpu_wheels.sh:
# liger-kernel for the comparisons) are installed into MEMCORE_SITE (default /tmp/site) first, for
# machines that cannot fetch packages.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/out/gpu}"
mkdir -p "$out"
py="${MEMCORE_PY:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget="${MEMCORE_GPU_BUDGET:-560}"
scale="${MEMCORE_GPU_CAP_SCALE:-1}"
site="${MEMCORE_SITE:-/tmp/site}"  # where the wheels of .whl/ are installed
t_start=$SECONDS
status=0
log="$out/stages.log"
# a fresh record each session where $OUT persists (out/gpu); gpu_quick.py appends to quick.jsonl
rm -f "$out/session.log" "$out/quick.jsonl" "$out/bench.json" "$out/results.tgz"
: >"$log"

note() { echo "[memcore] $*" | tee -a "$out/session.log" "$log"; }
# inside a stage: its output already goes to stages.log through run's tee
stage_note() { echo "[memcore] $*" | tee -a "$out/session.log"; }

left() { echo $((budget - (SECONDS - t_start))); }

cpu_s() {  # CPU seconds (user + system) of this shell's finished children: cutime + cstime of
  # /proc/$$/stat (bash's `times` in a $(...) subshell would read the subshell's, which are zero)
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf "%d", ($14 + $15) / hz }' /proc/$$/stat
}

run() {  # run STAGE CAP COMMAND...: at most min(CAP * scale, time left) s, logged live to $log
  local stage="$1" cap=$(($2 * scale)); shift 2
  local t; t=$(left)
  [ "$cap" -lt "$t" ] && t=$cap
  if [ "$t" -lt 20 ]; then
    note "=== $stage: skipped, $(left) s of the budget left"
    return 0
  fi
  echo "[memcore] === $stage (<= $t s): $*" | tee -a "$log"
  local t0=$SECONDS c0; c0=$(cpu_s)
  # the pytest stages skip what they have not started 25 s before the timeout (tools/deadline.py)
  # bash -c: the stage may be one of the functions below (exported), which timeout cannot call.
  # SIGINT first: pytest then ends its session (summary, benchmark JSON); KILL 15 s later.
  MEMCORE_DEADLINE=$(($(date +%s) + t - 25)) timeout -s INT -k 15 "$t" bash -c '"$@"' _ "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local why=""
  { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && why=" (timed out)"
  note "=== $stage: exit $rc$why after $((SECONDS - t0)) s, $(($(cpu_s) - c0)) CPU-s"
  [ "$rc" = 0 ] || [ "$status" != 0 ] || status=$rc
  return "$rc"
}

# the GPU's compute capability ("9.0"), or empty where torch sees none: read once at the start
# (each python that imports torch costs seconds of the budget)
has_gpu() { [ -n "$gpu_arch" ]; }

built() {  # memcore/_C*.so newer than every source, and importable with its CUDA kernels
  local so; so="$(ls memcore/_C*.so 2>/dev/null | head -1)"
  [ -n "$so" ] || return 1
  [ -z "$(find csrc setup.py -newer "$so" -type f | head -1)" ] || return 1
  "$py" -c "import memcore, sys; sys.exit(0 if memcore.with_cuda() else 1)" 2>/dev/null
}

build() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  if built; then
    echo "[memcore] memcore/_C is up to date"
  else
    # This GPU's architecture only (a fraction of the device compile of a list). MEMCORE_CUDA_ARCH
    # overrides it; a TORCH_CUDA_ARCH_LIST the image may set for its own builds is not used.
    local arch="${MEMCORE_CUDA_ARCH:-}"
    if [ -z "$arch" ]; then
      if ! has_gpu; then
        echo "[memcore] build: no GPU visible to $py and MEMCORE_CUDA_ARCH unset: set it (e.g. 9.0) to build anyway"
        return 3
      fi
      arch="$gpu_arch"
    fi
    local ignored=""
    [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] || ignored=" (in place of the environment's $TORCH_CUDA_ARCH_LIST)"
    echo "[memcore] building for TORCH_CUDA_ARCH_LIST=$arch$ignored"
    MEMCORE_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$py" setup.py -q build_ext --inplace || return 1
  fi
  if has_gpu; then  # one kernel launch: a build for the wrong architecture fails here, not in every test
    "$py" -c "
import torch, memcore
assert memcore.with_cuda(), 'memcore built without its CUDA kernels'; print('[memcore] built', memcore.__file__)
x = torch.randn(4, 7, device='cuda', requires_grad=True); t = torch.tensor([0, 1, 6, 2], device='cuda')
memcore.accumulate(x, t, torch.arange(4, device='cuda'), memcore.Tracker(4, device='cuda')).backward()
torch.cuda.synchronize(); print('[memcore] CUDA kernels run on', torch.cuda.get_device_name(0))" || return 1
  else
    "$py" -c "import memcore; assert memcore.with_cuda(), 'memcore built without its CUDA kernels'
print('[memcore] built', memcore.__file__, '(no GPU visible: not run)')" || return 1
  fi
}

test_cuda() {
  if ! has_gpu; then echo "[memcore] test: no GPU visible, the CUDA tests will skip (collection checked only)"; fi
  "$py" -m pytest tests -q -p no:cacheprovider -p tools.deadline -rs -k cuda
}

sanitize() {
  local cs; cs="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
  if [ ! -x "$cs" ]; then stage_note "sanitize: no compute-sanitizer (not on PATH, nor at $cs): skipped"; return 0; fi
  if ! has_gpu; then stage_note "sanitize: no GPU visible: skipped"; return 0; fi
  # memcheck over the kernels' own tests; the caching allocator off so out-of-bounds accesses
  # land outside live allocations and are seen
  local rc
  # kernel tests first; left out: opcheck's tests (many launches of the same kernels) and the
  # linear-CE parity at N=4096 x V=50257 (GEMMs of ~0.3 TFLOP), both slow under memcheck
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --error-exitcode 9 --print-limit 20 \
    "$py" -m pytest tests/test_cross_entropy.py tests/test_cross_entropy_overwrite.py tests/test_linear_cross_entropy.py \
    tests/test_cross_entropy_input_grad.py tests/test_curvature.py tests/test_cross_entropy_bad_input.py \
    tests/test_cross_entropy_ops.py -q \
    -p no:cacheprovider -p tools.deadline -x -k "cuda and not opcheck and not auto_chunks" 2>&1 | tee /tmp/memcore-sanitize.log
  rc=${PIPESTATUS[0]}
  # gVisor machines: "Device not supported", then error 999 at the first allocation; not memcore's fault
  if grep -q "Device not supported" /tmp/memcore-sanitize.log; then
    stage_note "sanitize: compute-sanitizer refused this device (seen on gVisor machines): no memcheck here"
    return 0
  fi
  return "$rc"
}

bench() {
  # a copy of the tree without .git stores its rows as "unrecorded": shown where no clean figure exists
  local rc=0
  MEMCORE_PY="$py" bash scripts/bench.sh --full -k cuda -p tools.deadline || rc=$?
  local json; json="$(ls -t benchmarks/out/bench-*.json 2>/dev/null | head -1)"
  [ -z "$json" ] || cp "$json" "$out/bench.json"
  return "$rc"
}

curvature() {
  # without a GPU the benchmark would measure the CPU, whose figures come from their own command
  if ! has_gpu; then stage_note "curvature: no GPU visible: skipped"; return 0; fi
  "$py" -m benchmarks.bench_curvature --rounds 15 --write || return 1
  "$py" -m benchmarks.render >/dev/null
}

quick() {
  if ! has_gpu; then stage_note "quick: no GPU visible: skipped"; return 0; fi
  "$py" -m tools.gpu_quick --out "$out/quick.jsonl"
}

pack() {
  tar czf "$out/results.tgz" benchmarks/RESULTS.md benchmarks/scaling.png benchmarks/results.csv 2>/dev/null
}

probe="$("$py" -c "
import torch
gpu = torch.cuda.is_available()
print('%d.%d' % torch.cuda.get_device_capability() if gpu else '')
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if gpu else None)
" 2>&1)"
gpu_arch="$(echo "$probe" | head -1 | grep -E '^[0-9]+\.[0-9]+$')"  # empty too if torch failed to import
export py out log gpu_arch
export -f stage_note has_gpu built build test_cuda sanitize bench curvature quick

all=(build test quick sanitize bench curvature)
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=("${all[@]}")
[ "${stages[0]}" = all ] && stages=("${all[@]}")
note "session: ${stages[*]} within $budget s (stage caps x$scale), $py"
note "$(echo "$probe" | tail -n +2)${gpu_arch:+, compute capability $gpu_arch}"

if compgen -G ".whl/*.whl" >/dev/null; then
  t0=$SECONDS
  if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .whl/*.whl 2>&1 | tee -a "$log"; then
    export PYTHONPATH="$PYTHONPATH:$site"
    note "wheels: $(cd .whl && ls *.whl | tr '\n' ' ')into $site in $((SECONDS - t0)) s"
  else
    note "wheels: install into $site failed (see stages.log); liger comparisons will be missing"
  fi
fi

for stage in "${stages[@]}"; do
  case "$stage" in
    build) run build 330 build || break ;;   # nothing else can run without the extension
    test) run test 120 test_cuda ;;
    quick) run quick 120 quick ;;
    sanitize) run sanitize 90 sanitize ;;
    bench) run bench 600 bench; pack ;;
    curvature) run curvature 600 curvature; pack ;;
    *) note "unknown stage '$stage' (${all[*]} all)"; status=2 ;;
  esac
done
note "results in $out after $((SECONDS - t_start)) s: $(ls "$out" | tr '\n' ' ')"
exit "$status"
