"""Every benchmark goal of the issues, declared once: the goals-at-a-glance table of RESULTS.md is
made from this list and the figures render.py derives from the store and results/*/results.json.

A goal names one figure (``figure``: a name in render.figures()), the device it is judged on, the
comparison and threshold, and how its cases combine: ``each`` gives one verdict per case (model,
experiment), ``worst`` one verdict on the worst case ("every shape"). The verdict is taken on the
value as printed (``fmt``), so a figure never reads 1.10 with ✗.
"""

from typing import NamedTuple

GPU_BENCH = "bash scripts/gpu_session.sh build bench"
GPU_CURV = "bash scripts/gpu_session.sh build curvature"
CPU_CURV = "python -m benchmarks.test_bench_curvature --rounds 15 --write"
LINEAR_CPU = "bash scripts/bench.sh --full -k linear_cross_entropy"
LINEAR_GPU = GPU_BENCH  # benchmarks/test_bench_linear_ce.py's CUDA cases, liger's fused loss among them
SHARD_STEP = (
    "python benchmarks/bench_shard.py step --world 2 --store benchmarks/results.csv (on a quiet machine)"
)
SASS = "python -m benchmarks.sass_report"
# the issue's shapes (N x H x V) for the linear_accumulate goals; the quick-mode shape is a smoke test
LINEAR_SHAPES = {"cpu": ("4096x1024x32000", "2048x2048x128256"), "cuda": ("8192x4096x128256",)}
EXPERIMENT = (
    "python -m memcore experiment --dataset mnist --subset 4000 --model mlp --noise '' --stability-k 128 "
    "[--stability-noise 0.1] --epochs 60 --weight-decay 0 --out results/mnist-memorization[-clean]"
)


class Goal(NamedTuple):
    wording: str  # the goal in the issue's words
    issue: str
    device: str
    figure: str  # which derived figure (render.figures) the goal is judged by
    op: str  # "<=" or ">="
    threshold: float
    fmt: str  # how the figure is printed; the verdict uses the printed value
    per: str  # "each": a verdict per case; "worst": one verdict on the worst case
    command: str  # what measures it, shown while it is not measured


GOALS = [
    Goal(
        "accumulate fwd+bwd ≤ 1.10x plain F.cross_entropy, every shape",
        "#3",
        "cpu",
        "memcore / plain",
        "<=",
        1.10,
        "{:.2f}x",
        "worst",
        "bash scripts/bench.sh --full",
    ),
    Goal(
        "accumulate ≥ 1.5x faster than the eager statistics, every shape",
        "#3",
        "cpu",
        "eager / memcore",
        ">=",
        1.5,
        "{:.2f}x",
        "worst",
        "bash scripts/bench.sh --full",
    ),
    Goal(
        "training step with accumulate ≤ 1 % slower (interleaved median)",
        "#6",
        "cpu",
        "step overhead memcore",
        "<=",
        1.0,
        "{:+.1f} %",
        "each",
        "bash scripts/bench.sh --full",
    ),
    Goal(
        "training step with accumulate(..., inputs=x) ≤ 5 % slower (interleaved median)",
        "#6",
        "cpu",
        "step overhead memcore+inputs",
        "<=",
        5.0,
        "{:+.1f} %",
        "each",
        "bash scripts/bench.sh --full",
    ),
    Goal(
        "curvature ≥ 2x faster than the reference algorithm (10 probes, best round)",
        "#4",
        "cpu",
        "curvature speedup",
        ">=",
        2.0,
        "{:.2f}x",
        "each",
        CPU_CURV,
    ),
    Goal(
        "curvature ranks like the reference (Spearman ≥ 0.95)",
        "#4",
        "cpu",
        "curvature spearman",
        ">=",
        0.95,
        "{:.3f}",
        "each",
        CPU_CURV,
    ),
    Goal(
        "CSL ≥ 1,000x cheaper than stability at K=2000",
        "#6",
        "cpu",
        "stability cost ratio K=2000",
        ">=",
        1000.0,
        "{:,.0f}x",
        "each",
        EXPERIMENT,
    ),
    Goal(
        "cosine(CSL, memorization) on the top-k ≥ 0.87",
        "#5/#6",
        "cpu",
        "cosine top-k",
        ">=",
        0.87,
        "{:.3f}",
        "each",
        EXPERIMENT,
    ),
    Goal(
        "Pearson(CSL, memorization) on all ≥ 0.79",
        "#5/#6",
        "cpu",
        "pearson all",
        ">=",
        0.79,
        "{:.3f}",
        "each",
        EXPERIMENT,
    ),
    # the issue asks for agreement judged by rank on a set where the estimate varies; its threshold is the
    # cosine goal's, carried over until the issue states one
    Goal(
        "CSL ranks the most-memorized like the stability estimate, where the estimate varies (Spearman / "
        "top-k overlap ≥ 0.87)",
        "#15",
        "cpu",
        "rank agreement top-k",
        ">=",
        0.87,
        "{:.3f}",
        "each",
        EXPERIMENT + " (with the experiment's rank agreement on a varying set)",
    ),
    Goal(
        "linear_accumulate peak ≤ 25 % of plain F.linear + F.cross_entropy's, above the inputs",
        "#16",
        "cpu",
        "linear / plain peak",
        "<=",
        25.0,
        "{:.1f} %",
        "each",
        LINEAR_CPU,
    ),
    Goal(
        "linear_accumulate fwd+bwd ≤ 1.15x plain F.linear + F.cross_entropy",
        "#16",
        "cpu",
        "linear / plain time",
        "<=",
        1.15,
        "{:.2f}x",
        "each",
        LINEAR_CPU,
    ),
    Goal(
        "tracker state ≤ 64 bytes per sample (no input gradients; per rank: / world when sharded)",
        "#17",
        "cpu",
        "state bytes per sample",
        "<=",
        64.0,
        "{:.1f} B",
        "each",
        "python benchmarks/bench_shard.py bytes --store benchmarks/results.csv",
    ),
    Goal(
        "sharded routing ≤ 1 % of a training step (interleaved)",
        "#17",
        "cpu",
        "routing overhead",
        "<=",
        1.0,
        "{:+.1f} %",
        "each",
        SHARD_STEP,
    ),
    Goal(
        "accumulate fwd+bwd ≤ 1.10x plain F.cross_entropy, every shape",
        "#3",
        "cuda",
        "memcore / plain",
        "<=",
        1.10,
        "{:.2f}x",
        "worst",
        GPU_BENCH,
    ),
    Goal(
        "accumulate ≥ 2x faster than the eager statistics, every shape",
        "#3",
        "cuda",
        "eager / memcore",
        ">=",
        2.0,
        "{:.2f}x",
        "worst",
        GPU_BENCH,
    ),
    Goal(
        "accumulate at least as fast as Liger's cross-entropy (memcore / liger ≤ 1.00)",
        "#3",
        "cuda",
        "memcore / liger",
        "<=",
        1.0,
        "{:.2f}",
        "worst",
        GPU_BENCH + " (liger-kernel from scripts/gpu_wheels.sh)",
    ),
    Goal(
        "≥ 80 % of the D2D copy bandwidth on the largest shape",
        "#3",
        "cuda",
        "% of copy bandwidth",
        ">=",
        80.0,
        "{:.0f} %",
        "each",
        GPU_BENCH,
    ),
    Goal(
        "training step with accumulate ≤ 1 % slower (ResNet-18 bf16, LM bf16; interleaved median)",
        "#6",
        "cuda",
        "step overhead memcore",
        "<=",
        1.0,
        "{:+.1f} %",
        "each",
        GPU_BENCH,
    ),
    Goal(
        "curvature ≥ 3x faster than the reference algorithm (10 probes, best round)",
        "#4",
        "cuda",
        "curvature speedup",
        ">=",
        3.0,
        "{:.2f}x",
        "each",
        GPU_CURV,
    ),
    Goal(
        "linear_accumulate fwd+bwd at least as fast as Liger's fused linear cross-entropy (N=8192, H=4096, "
        "V=128256 bf16)",
        "#16",
        "cuda",
        "linear / liger time",
        "<=",
        1.0,
        "{:.2f}x",
        "each",
        LINEAR_GPU,
    ),
    Goal(
        "linear_accumulate peak ≤ 2 GiB above the inputs (N=8192, H=4096, V=128256 bf16)",
        "#16",
        "cuda",
        "linear peak",
        "<=",
        2.0,
        "{:.2f} GiB",
        "each",
        LINEAR_GPU,
    ),
    # static, from the compiled code (no GPU): store rows of suite "sass", one per arch (device sm_XX)
    Goal(
        "forward main loop ≤ 10 SASS instructions per bf16 element, every arch",
        "#18",
        "cuda",
        "sass forward instr/elem",
        "<=",
        10.0,
        "{:.1f}",
        "worst",
        SASS,
    ),
    Goal(
        "backward main loop ≤ 10 SASS instructions per bf16 element, every arch",
        "#18",
        "cuda",
        "sass backward instr/elem",
        "<=",
        10.0,
        "{:.1f}",
        "worst",
        SASS,
    ),
    Goal(
        "no register spills in any CUDA kernel, every arch",
        "#18",
        "cuda",
        "sass spill bytes",
        "<=",
        0.0,
        "{:.0f} B",
        "worst",
        SASS,
    ),
]
