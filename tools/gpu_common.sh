# What tools/gpu_check.sh and tools/gpu_bench.sh share (sourced, after they set $call and $budget):
# the environment probe, the stage runner with its time budget and records, the wheels of .whl/ and
# the build. Written to $OUT (default out/gpu): $call.log (everything, as it comes), $call-stages.jsonl
# (a line per stage: exit status, wall and CPU seconds, its cap, skipped or timed out) and env.json.
#
# Environment: MEMCORE_PY (default python3: the machine's own CUDA torch; nothing installs torch),
# MEMCORE_CUDA_ARCH (e.g. 9.0: the architecture to build for where no GPU is visible, as in a dry
# run), MEMCORE_GPU_CAP_SCALE (multiplies the budget and every stage's cap: dry runs on slow
# machines), MEMCORE_SITE (where the wheels of .whl/ go, default /tmp/site), MAX_JOBS (build jobs,
# default all cores).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-$PWD/out/gpu}"
mkdir -p "$out"
py="${MEMCORE_PY:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
scale="${MEMCORE_GPU_CAP_SCALE:-1}"
budget=$((budget * scale))
site="${MEMCORE_SITE:-/tmp/site}"
t_start=$SECONDS
status=0
log="$out/$call.log"
records="$out/$call-stages.jsonl"
: >"$log"
: >"$records"

note() { echo "[memcore] $*" | tee -a "$log"; }
left() { echo $((budget - (SECONDS - t_start))); }

cpu_s() {  # cpu_s PID: CPU seconds (user + system) of the finished children of shell PID, cutime +
  # cstime of its /proc stat (in a $(...), $BASHPID and bash's `times` would be the substitution's)
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf "%d", ($14 + $15) / hz }' "/proc/$1/stat"
}

record() {  # record STAGE EXIT WALL CPU CAP STATE: one JSON line (STATE: ok, failed, timed out, skipped: why)
  printf '{"stage": "%s", "exit": %s, "wall_s": %s, "cpu_s": %s, "cap_s": %s, "state": "%s"}\n' "$@" >>"$records"
}

# run STAGE CAP [LOGFILE] -- COMMAND...: COMMAND under `timeout`, at most min(CAP x scale, time left
# - 5) s; its output to LOGFILE (default: $call.log), live. A stage that cannot start with 15 s left
# is skipped. Exit 77 from COMMAND means "skipped" (it said why), not a failure. The pytest stages
# and tools/gpu_bench.py skip what they have not started by MEMCORE_DEADLINE, 20 s before the timeout.
run() {
  local stage="$1" cap=$(($2 * scale)) to="$log"
  shift 2
  if [ "$1" != "--" ]; then to="$1"; shift; fi
  shift
  local t; t=$(($(left) - 5))
  [ "$cap" -lt "$t" ] && t=$cap
  if [ "$t" -lt 15 ]; then
    note "=== $stage: skipped, $(left) s of the budget left"
    record "$stage" 0 0 0 "$cap" "skipped: budget spent"
    return 0
  fi
  note "=== $stage (<= $t s): $*"
  local t0=$SECONDS c0 rc state=ok me=$BASHPID  # this shell: the main one, or a stage run in the background
  c0=$(cpu_s "$me")
  # bash -c: the stage may be a function (exported below), which timeout cannot call itself. SIGINT
  # first: pytest then ends its session and writes its report; KILL 10 s later. Output: to the call's
  # log and the terminal, or (stages run at once) to the stage's own log only.
  if [ "$to" = "$log" ]; then
    MEMCORE_DEADLINE=$(($(date +%s) + t - 20)) timeout -s INT -k 10 "$t" bash -c '"$@"' _ "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
  else
    echo "[memcore] === $stage (<= $t s): $*" >"$to"
    MEMCORE_DEADLINE=$(($(date +%s) + t - 20)) timeout -s INT -k 10 "$t" bash -c '"$@"' _ "$@" >>"$to" 2>&1
    rc=$?
  fi
  case "$rc" in
    0) ;;
    77) state="skipped: $(grep -o 'skipped: .*' "$to" | tail -1 | cut -c10- | tr -d '"\\')"; rc=0 ;;
    124 | 137) state="timed out" ;;
    *) state=failed ;;
  esac
  local where=""
  [ "$to" = "$log" ] || where=", output in $(basename "$to")"
  local cpu=$(($(cpu_s "$me") - c0))
  note "=== $stage: $state, exit $rc after $((SECONDS - t0)) s, $cpu CPU-s$where"
  record "$stage" "$rc" "$((SECONDS - t0))" "$cpu" "$cap" "$state"
  [ "$rc" = 0 ] || [ "$status" != 0 ] || status=$rc
  return "$rc"
}

# env.json: torch, the GPU (name, compute capability, SMs, memory), the toolkit, the source tree's
# digest (tools/gpu_store.py matches it with the local checkout); the architecture for the build
probe() {
  local t0=$SECONDS
  "$py" - "$out/env.json" <<'PY' 2>&1 | tee -a "$log"
import json, os, shutil, subprocess, sys, time
import torch
gpu = torch.cuda.is_available()
env = dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), torch=torch.__version__,
           cuda=torch.version.cuda, python=sys.version.split()[0], cpus=os.cpu_count(),
           nvcc=shutil.which("nvcc"), compute_sanitizer=shutil.which("compute-sanitizer"))
try:
    from tools.gpu_store import tree_digest
    env["tree"] = tree_digest()
except Exception as e:  # the rows are then stored as unrecorded; the run goes on
    env["tree_error"] = repr(e)
if gpu:
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, capability="%d.%d" % (p.major, p.minor), sms=p.multi_processor_count,
               memory_gib=round(p.total_memory / 2**30, 1))
if shutil.which("nvidia-smi"):
    q = "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,memory.total"
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True,
                                       text=True).stdout.strip()
json.dump(env, open(sys.argv[1], "w"), indent=1)
print("[memcore] env:", json.dumps(env))
PY
  gpu_arch="$("$py" -c "import json, sys; print(json.load(open(sys.argv[1])).get('capability', ''))" "$out/env.json" 2>/dev/null)"
  export gpu_arch
  note "probe: ${gpu_arch:+compute capability $gpu_arch, }$((SECONDS - t0)) s"
}
has_gpu() { [ -n "$gpu_arch" ]; }

wheels() {  # .whl/ (tools/gpu_wheels.sh) into $site, for machines that cannot fetch packages;
  # .whl/test/ (pytest) only where the Python has none
  local whl=()
  compgen -G ".whl/*.whl" >/dev/null && whl+=(.whl/*.whl)
  if compgen -G ".whl/test/*.whl" >/dev/null && ! "$py" -c "import pytest" 2>/dev/null; then whl+=(.whl/test/*.whl); fi
  [ ${#whl[@]} -gt 0 ] || return 0
  if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${whl[@]}" >>"$log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$site"
    note "wheels: ${whl[*]} into $site"
  else
    note "wheels: install into $site failed (see $call.log); what they bring (Liger, pytest) may be missing"
  fi
}

# what memcore/_C is built from: a digest of csrc/ and setup.py by content (a fresh copy of the tree
# renews every file's time, which would make an up-to-date build look stale), and the architecture
sources() {
  { find csrc setup.py -type f -print0 | sort -z | xargs -0 sha256sum; echo "arch ${MEMCORE_CUDA_ARCH:-$gpu_arch}"; } |
    sha256sum | cut -c1-16
}
stamp=build/gpu-build.sources

built() {  # memcore/_C*.so built by build() from these sources, and importable with its CUDA kernels
  local so; so="$(ls memcore/_C*.so 2>/dev/null | head -1)"
  [ -n "$so" ] && [ -f "$stamp" ] || return 1
  [ "$(cat "$stamp")" = "$(sources)" ] || return 1
  "$py" -c "import memcore, sys; sys.exit(0 if memcore.with_cuda() else 1)" 2>/dev/null
}

build() {
  if built; then
    echo "[memcore] memcore/_C is up to date"
  else
    # this GPU's architecture only (a fraction of the device compile of a list); MEMCORE_CUDA_ARCH
    # overrides it; a TORCH_CUDA_ARCH_LIST the image may set for its own builds is not used
    local arch="${MEMCORE_CUDA_ARCH:-$gpu_arch}"
    if [ -z "$arch" ]; then
      echo "[memcore] build: no GPU visible to $py and MEMCORE_CUDA_ARCH unset: set it (e.g. 9.0) to build anyway"
      return 3
    fi
    # the toolkit: CUDA_HOME, else the one nvcc belongs to (torch guesses from PATH, and an nvcc
    # wrapper script there would leave the link without cudart)
    local home="${CUDA_HOME:-}" d
    for d in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /x/x/x)")")")"; do
      [ -n "$home" ] || { [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ] && home="$d"; }
    done
    if [ -z "$home" ]; then
      echo "[memcore] build: no CUDA toolkit (CUDA_HOME, /usr/local/cuda, or nvcc on PATH): the CUDA kernels cannot be built here"
      return 3
    fi
    export CUDA_HOME="$home"
    echo "[memcore] building for TORCH_CUDA_ARCH_LIST=$arch with MAX_JOBS=${MAX_JOBS:-$(nproc)}, CUDA_HOME=$CUDA_HOME"
    rm -f "$stamp"
    MEMCORE_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$py" setup.py -q build_ext --inplace || return 1
    mkdir -p build && sources >"$stamp"
  fi
  if has_gpu; then  # one kernel launch: a build for the wrong architecture fails here, not in every test
    "$py" -c "
import torch, memcore
assert memcore.with_cuda(), 'memcore built without its CUDA kernels'
x = torch.randn(4, 7, device='cuda', requires_grad=True); t = torch.tensor([0, 1, 6, 2], device='cuda')
memcore.accumulate(x, t, torch.arange(4, device='cuda'), memcore.Tracker(4, device='cuda')).backward()
torch.cuda.synchronize(); print('[memcore] CUDA kernels run on', torch.cuda.get_device_name(0))" || return 1
  else
    "$py" -c "import memcore; assert memcore.with_cuda(), 'memcore built without its CUDA kernels'
print('[memcore] built', memcore.__file__, '(no GPU visible: not run)')" || return 1
  fi
}

finish() {
  note "$call: exit $status after $((SECONDS - t_start)) s; in $out: $(ls "$out" | tr '\n' ' ')"
  exit "$status"
}

# run_all STAGE CAP LOGFILE -- COMMAND... [::: STAGE CAP LOGFILE -- COMMAND...]...: the stages at
# once (one GPU, many cores), each with its own log; $status: the first failure's exit status
run_all() {
  local pids=() args=()
  while [ $# -gt 0 ]; do
    args=()
    while [ $# -gt 0 ] && [ "$1" != ":::" ]; do args+=("$1"); shift; done
    [ $# -eq 0 ] || shift
    run "${args[@]}" &
    pids+=($!)
  done
  local pid rc
  for pid in "${pids[@]}"; do
    wait "$pid"
    rc=$?
    [ "$rc" = 0 ] || [ "$status" != 0 ] || status=$rc
  done
}

gpu_arch=""
export py out log gpu_arch site stamp
export -f has_gpu sources built build
