#!/usr/bin/env bash
# tools/gpu_session.sh without a GPU, to find its faults before a GPU machine's time is spent:
#
#   MEMCORE_PY=.venv-cuda/bin/python bash tools/gpu_dryrun.sh [stages...]
#
# (.venv-cuda: the CUDA build of torch tools/check_cuda_build.sh installs.) Copies the tree as git
# sees it (tracked and untracked-not-ignored files, no .git, plus .whl/) to $MEMCORE_DRY_DIR/tree
# (default /tmp/memcore-dry), runs the session there with a CUDA torch that sees no GPU, building for
# MEMCORE_CUDA_ARCH (default 9.0), with the budget and stage caps stretched (MEMCORE_GPU_BUDGET
# 7200 s, caps x20: two busy cores compile many times slower than a 16-core GPU machine), the wheels
# into $MEMCORE_DRY_DIR/site; then gpu_quick.py --small on the CPU (its JSON path). The session's
# output is left in $MEMCORE_DRY_DIR/out. The CUDA tests skip; the stage times and CPU seconds in
# out/session.log are what an estimate for a GPU machine is made from.
set -euo pipefail
cd "$(dirname "$0")/.."
dry="${MEMCORE_DRY_DIR:-/tmp/memcore-dry}"
: "${MEMCORE_PY:?MEMCORE_PY must name a python with a CUDA torch (e.g. .venv-cuda/bin/python)}"
# the session runs in the copy: a relative path to the Python is made absolute (not resolved: a
# venv's python is a link whose target would lose the venv)
case "$MEMCORE_PY" in /*) ;; */*) MEMCORE_PY="$(cd "$(dirname "$MEMCORE_PY")" && pwd)/$(basename "$MEMCORE_PY")" ;; esac
export MEMCORE_PY
# the tree is copied over the last dry run's, whose build the session then finds up to date (the
# copy keeps the files' times); MEMCORE_DRY_FRESH=1 starts from nothing, as a fresh GPU machine does
[ "${MEMCORE_DRY_FRESH:-0}" != 1 ] || rm -rf "$dry/tree"
rm -rf "$dry/out" "$dry/site" "$dry/quick-small.jsonl"
mkdir -p "$dry/tree" "$dry/out"
{
  git ls-files -z --cached --others --exclude-standard
  [ ! -d .whl ] || find .whl -type f -print0
} | tar --null --ignore-failed-read -T - -cf - | tar -C "$dry/tree" -xf -
echo "[dry] tree: $(du -sh "$dry/tree" | cut -f1)"
set +e
(cd "$dry/tree" && OUT="$dry/out" MEMCORE_SITE="$dry/site" MEMCORE_CUDA_ARCH="${MEMCORE_CUDA_ARCH:-9.0}" \
  MEMCORE_GPU_BUDGET="${MEMCORE_GPU_BUDGET:-7200}" MEMCORE_GPU_CAP_SCALE="${MEMCORE_GPU_CAP_SCALE:-20}" \
  bash tools/gpu_session.sh "$@")
rc=$?
(cd "$dry/tree" && PYTHONPATH="$dry/tree:$dry/site" "$MEMCORE_PY" -m tools.gpu_quick --small --iters 2 \
  --no-compile --out "$dry/quick-small.jsonl") || echo "[dry] gpu_quick.py --small failed"
echo "[dry] gpu_quick.py --small wrote $(cat "$dry/quick-small.jsonl" 2>/dev/null | wc -l) lines to $dry/quick-small.jsonl"
echo "[dry] session exit $rc; in $dry/out: $(ls "$dry/out" | tr '\n' ' ')"
exit "$rc"
