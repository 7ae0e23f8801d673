#!/usr/bin/env bash
# The first of the two GPU calls (DEVELOPMENT.md, "GPU runs"): does memcore build and run right on
# this GPU? Within MEMCORE_GPU_BUDGET s (default 240), on a machine whose Python has a CUDA build of
# torch (MEMCORE_PY, default python3):
#
#   bash tools/gpu_check.sh
#
#   build      memcore against the machine's own torch for this GPU's architecture, all cores
#              (skipped when a call built memcore/_C from the same csrc/ and setup.py, by content:
#              a second call on the same machine, even on a fresh copy of the tree, goes
#              straight on); then one CUDA op, so a missing kernel image shows here
#   then at once, each stage with its own log in $OUT:
#   tests      pytest -m cuda: every test that runs on the GPU (tests/conftest.py marks those
#              parametrized with the cuda device or named for it), every kernel route, the accuracy
#              tests, graph capture, determinism; in MEMCORE_TEST_SHARDS processes (4), each with
#              its tests-K.xml (JUnit) and tests-K.log
#   repeat     tools/gpu_repeat.py twice: ce_forward_reduce and tracker scores (rows sharing sample
#              ids), bit for bit within each process and across the two; repeat-1/2.jsonl
#   kernels    tools/launch_all.py --profile: every op, dtype and launch route once, with the kernels
#              each ran; fails when a __global__ kernel of csrc/cuda never ran; kernels.jsonl
#   memcheck, racecheck, synccheck
#              compute-sanitizer's tools over tools/launch_all.py (racecheck and synccheck without the
#              linear-CE ops, whose own kernels are cuBLAS's); skipped, and said so, where
#              compute-sanitizer is missing or refuses the device (gVisor machines)
#
# Records: check.log, check-stages.jsonl and env.json (tools/gpu_common.sh). Exit status: the first
# failure's. After the call, `python -m tools.gpu_store OUT` turns the outcome into store rows.
call=check
budget="${MEMCORE_GPU_BUDGET:-240}"
source "$(dirname "$0")/gpu_common.sh"

test_cuda() {  # in MEMCORE_TEST_SHARDS processes at once (default 4), test files dealt round-robin
  has_gpu || echo "[memcore] tests: no GPU visible: the CUDA tests skip (their collection is what runs)"
  local files=(tests/test_*.py) n="${MEMCORE_TEST_SHARDS:-4}" k i rc=0 r pids=()
  for ((k = 0; k < n; k++)); do
    local group=()
    for i in "${!files[@]}"; do [ $((i % n)) != "$k" ] || group+=("${files[$i]}"); done
    "$py" -m pytest "${group[@]}" -m cuda -q -p no:cacheprovider -p tools.deadline -rfEs --continue-on-collection-errors \
      --junitxml="$out/tests-$k.xml" >"$out/tests-$k.log" 2>&1 &
    pids+=($!)
  done
  for k in "${!pids[@]}"; do
    wait "${pids[$k]}"
    r=$?
    echo "[memcore] tests, shard $k: exit $r: $(tail -n 1 "$out/tests-$k.log")"
    # 5: no test of the shard is a CUDA test
    [ "$r" = 0 ] || [ "$r" = 5 ] || [ "$rc" != 0 ] || rc=$r
  done
  return "$rc"
}

repeat() {
  if ! has_gpu; then echo "[memcore] repeat: skipped: no GPU visible"; return 77; fi
  local rc=0
  "$py" -m tools.gpu_repeat --out "$out/repeat-1.jsonl" || rc=$?
  "$py" -m tools.gpu_repeat --out "$out/repeat-2.jsonl" --compare "$out/repeat-1.jsonl" || rc=$?
  return "$rc"
}

kernels() {
  if ! has_gpu; then echo "[memcore] kernels: skipped: no GPU visible"; return 77; fi
  "$py" -m tools.launch_all --profile "$out/kernels.jsonl"
}

sanitize() {  # sanitize TOOL
  local tool="$1" cs d
  cs="$(command -v compute-sanitizer || true)"
  for d in "${CUDA_HOME:-}" /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -V -r); do
    [ -z "$cs" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && cs="$d/bin/compute-sanitizer"
  done
  if [ -z "$cs" ]; then
    echo "[memcore] $tool: skipped: no compute-sanitizer on PATH or in a CUDA toolkit"
    return 77
  fi
  if ! has_gpu; then echo "[memcore] $tool: skipped: no GPU visible"; return 77; fi
  local skip=() nocache=()
  # memcheck: the caching allocator off, so an out-of-bounds access lands outside live allocations
  [ "$tool" = memcheck ] && nocache=(PYTORCH_NO_CUDA_MEMORY_CACHING=1) || skip=(--skip linear)
  env "${nocache[@]}" "$cs" --tool "$tool" --error-exitcode 9 --print-limit 20 "$py" -m tools.launch_all "${skip[@]}"
  local rc=$?
  if grep -q "Device not supported" "$out/$tool.log"; then
    echo "[memcore] $tool: skipped: compute-sanitizer refused this device (seen on gVisor machines)"
    return 77
  fi
  return "$rc"
}
export -f test_cuda repeat kernels sanitize

probe
wheels
run build 150 -- build || finish
run_all tests 220 "$out/tests.log" -- test_cuda \
  ::: repeat 120 "$out/repeat.log" -- repeat \
  ::: kernels 90 "$out/kernels.log" -- kernels \
  ::: memcheck 200 "$out/memcheck.log" -- sanitize memcheck \
  ::: racecheck 200 "$out/racecheck.log" -- sanitize racecheck \
  ::: synccheck 200 "$out/synccheck.log" -- sanitize synccheck
finish
