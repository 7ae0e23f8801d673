#!/usr/bin/env bash
# The second of the two GPU calls (DEVELOPMENT.md, "GPU runs"): the figures, within
# MEMCORE_GPU_BUDGET s (default 300), on a machine whose Python has a CUDA build of torch
# (MEMCORE_PY, default python3):
#
#   bash tools/gpu_bench.sh
#
#   wheels     .whl/ (tools/gpu_wheels.sh: liger-kernel) into MEMCORE_SITE, for machines without
#              network access
#   build      as in tools/gpu_check.sh (skipped when memcore/_C is up to date)
#   bench      tools/gpu_bench.py: bandwidth of each launch-shape class against the D2D copy (the
#              split launch on and off, 8192 x 262144 where N x C >= 2^31, 1M x 10), the DRAM latency,
#              the fused linear-CE case, accumulate end to end with F.cross_entropy and Liger,
#              torch.compile last; results.jsonl, a line per figure as measured, cases not started by
#              the deadline written as skipped
#
# Records: bench.log, bench-stages.jsonl and env.json (tools/gpu_common.sh). After the call,
# `python -m tools.gpu_store OUT` turns results.jsonl into store rows, `python -m benchmarks.render`
# into RESULTS.md.
call=bench
budget="${MEMCORE_GPU_BUDGET:-300}"
source "$(dirname "$0")/gpu_common.sh"

bench() {
  if ! has_gpu; then echo "[memcore] bench: skipped: no GPU visible"; return 77; fi
  "$py" -m tools.gpu_bench --out "$out/results.jsonl"
}
export -f bench

probe
wheels
run build 150 -- build || finish
run bench 300 -- bench
finish
