#!/usr/bin/env bash
# The two GPU calls without a GPU, to find their faults before a GPU machine's time is spent:
#
#   MEMCORE_PY=.venv-cuda/bin/python bash tools/gpu_dryrun.sh [check] [bench]   # default: both
#
# (.venv-cuda: the CUDA build of torch tools/check_cuda_build.sh installs.) Copies the tree as git
# sees it (tracked and untracked-not-ignored files, no .git, plus .whl/) to $MEMCORE_DRY_DIR/tree
# (default /tmp/memcore-dry) and runs tools/gpu_check.sh and tools/gpu_bench.sh there with a CUDA
# torch that sees no GPU: the build for MEMCORE_CUDA_ARCH (default 9.0), the test collection, the
# wheel install, the skips and the records all run, with the budgets and caps stretched
# (MEMCORE_GPU_CAP_SCALE, default 20: two busy cores compile many times slower than a 16-core GPU
# machine). Then, on the CPU with the same Python, the programs the calls run on the GPU:
# tools/launch_all.py (every case), tools/gpu_repeat.py and tools/gpu_bench.py --small. Each call's
# output is left in $MEMCORE_DRY_DIR/out-<call>; its <call>-stages.jsonl holds the stage times.
set -euo pipefail
cd "$(dirname "$0")/.."
dry="${MEMCORE_DRY_DIR:-/tmp/memcore-dry}"
: "${MEMCORE_PY:?MEMCORE_PY must name a python with a CUDA torch (e.g. .venv-cuda/bin/python)}"
# the calls run in the copy: a relative path to the Python is made absolute (not resolved: a venv's
# python is a link whose target would lose the venv)
case "$MEMCORE_PY" in /*) ;; */*) MEMCORE_PY="$(cd "$(dirname "$MEMCORE_PY")" && pwd)/$(basename "$MEMCORE_PY")" ;; esac
export MEMCORE_PY
calls=("$@")
[ ${#calls[@]} -gt 0 ] || calls=(check bench)
# the tree is copied over the last dry run's, whose build (memcore/_C and build/, ignored by git, stay)
# the calls then find up to date; MEMCORE_DRY_FRESH=1 starts from nothing, as a fresh GPU machine does
[ "${MEMCORE_DRY_FRESH:-0}" != 1 ] || rm -rf "$dry/tree"
rm -rf "$dry/site" "$dry/cpu"
mkdir -p "$dry/tree" "$dry/cpu"
{
  git ls-files -z --cached --others --exclude-standard
  [ ! -d .whl ] || find .whl -type f -print0
} | tar --null --ignore-failed-read -T - -cf - | tar -C "$dry/tree" -xf -
echo "[dry] tree: $(du -sh "$dry/tree" | cut -f1)"
set +e
rc=0
for call in "${calls[@]}"; do
  case "$call" in check | bench) ;; *) echo "[dry] unknown call '$call' (check, bench)"; exit 2 ;; esac
  rm -rf "$dry/out-$call"
  (cd "$dry/tree" && OUT="$dry/out-$call" MEMCORE_SITE="$dry/site" MEMCORE_CUDA_ARCH="${MEMCORE_CUDA_ARCH:-9.0}" \
    MEMCORE_GPU_CAP_SCALE="${MEMCORE_GPU_CAP_SCALE:-20}" bash "tools/gpu_$call.sh")
  r=$?
  echo "[dry] $call: exit $r; stages:"
  cat "$dry/out-$call/$call-stages.jsonl"
  [ "$r" = 0 ] || [ "$rc" != 0 ] || rc=$r
done
cd "$dry/tree"
export PYTHONPATH="$dry/tree:$dry/site"
for prog in "tools.launch_all" "tools.gpu_repeat --small --out $dry/cpu/repeat.jsonl" \
  "tools.gpu_bench --small --rounds 2 --skip torch.compile --out $dry/cpu/results.jsonl"; do
  t0=$SECONDS
  # shellcheck disable=SC2086  # the program's arguments
  "$MEMCORE_PY" -m $prog >"$dry/cpu/${prog%% *}.log" 2>&1
  r=$?
  echo "[dry] CPU: python -m $prog: exit $r after $((SECONDS - t0)) s ($dry/cpu/${prog%% *}.log)"
  [ "$r" = 0 ] || [ "$rc" != 0 ] || rc=$r
done
exit "$rc"
