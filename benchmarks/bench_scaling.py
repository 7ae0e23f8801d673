"""The scaling suite: forward + backward time (and CUDA peak memory) as C and N grow, and the cost
of closing an epoch and reading the scores as the dataset grows.

Loss sweeps, on one pre-made logits tensor per shape (the problem and variants of
bench_cross_entropy.py, imported from there):

    vs C   C in 10, 100, 1000, 10000, 32000 at N = 1024 (CPU float32) / N = 8192 (CUDA bfloat16)
    vs N   N in 256, 1024, 4096, 16384 at C = 1000

Variants: ``memcore`` (accumulate + backward), ``memcore_overwrite`` (the same with
``overwrite_logits=True``; a fresh copy of the logits each round, outside the timing), ``eager`` (F.cross_entropy plus the same six
statistics with unfused ops and index_add_), ``plain`` (F.cross_entropy alone, the reference line)
and, on CUDA when ``liger_kernel`` is importable, ``liger`` (LigerCrossEntropyLoss; it writes the
gradient into its input during the forward, so each round gets a fresh copy of the logits, made
outside the timing). Each case also records the peak memory torch allocated during one forward +
backward above what was allocated before it (benchmarks/memory.py: torch.cuda.max_memory_allocated
on CUDA, the CPU allocator's events under torch.profiler on the CPU).

Tracker sweep (CPU): ``tracker.end_epoch()`` + ``tracker.scores()`` for num_samples 1e4, 1e5, 1e6,
after an epoch in which every sample was seen once (filled outside the timing each round); also
the tracker's state size (every buffer of its state_dict) and the peak memory of the timed call.

Quick mode (default) runs a subset of the CPU sizes (C in 10, 1000, 32000; N in 256, 1024, 4096;
num_samples 1e4, 1e5); --bench-full runs them all. CUDA runs every size.

    bash scripts/bench.sh -k scaling --bench-threads=1     # measure, store, render (RESULTS.md + scaling.png)
"""

import gc

import pytest
import torch

import memcore
from benchmarks import bench_cross_entropy as ce  # problem, variants and their checks
from benchmarks.common import DTYPES, dtype_name, measure, param
from benchmarks.memory import peak_mib

C_SWEEP = (10, 100, 1000, 10000, 32000)
N_FIXED = {"cpu": 1024, "cuda": 8192}
N_SWEEP = (256, 1024, 4096, 16384)
C_FIXED = 1000
QUICK_CPU_C = {10, 1000, 32000}
QUICK_CPU_N = {256, 1024, 4096}
TRACKER_SIZES = (10_000, 100_000, 1_000_000)
QUICK_TRACKER_SIZES = {10_000, 100_000}

TITLE = "Scaling: loss time vs C and N, tracker vs dataset size"
BY_CASE = True
NOTES = """
![time vs C and N](scaling.png)

*loss vs C*, *loss vs N*: median wall time of one forward + backward pass over one logits tensor,
variants as in the cross-entropy section. Peak: memory torch allocated during one forward + backward
above what was allocated before it, the logits gradient included (`torch.cuda.max_memory_allocated()` on
CUDA; on the CPU the running sum of the allocator's events recorded by `torch.profiler`,
`benchmarks/memory.py`). *tracker*: `end_epoch()` + `scores()` after an epoch that saw every sample
once (shape: the number of samples); state: every tensor of `state_dict()`.
"""
GOALS = []


def points(device: str):
    """[(n, c, sweeps, quick)]: the union of both sweeps, each shape once."""
    pts = {}
    for c in C_SWEEP:
        pts.setdefault((N_FIXED[device], c), set()).add("C")
    for n in N_SWEEP:
        pts.setdefault((n, C_FIXED), set()).add("N")
    out = []
    for (n, c), sweeps in sorted(pts.items(), key=lambda kv: (kv[0][0] * kv[0][1], kv[0])):
        quick = device == "cuda" or (
            ("C" in sweeps and c in QUICK_CPU_C and n == N_FIXED["cpu"])
            or ("N" in sweeps and n in QUICK_CPU_N and c == C_FIXED)
        )
        out.append((n, c, sorted(sweeps), quick))
    return out


def _cases():
    for device in ("cpu", "cuda"):
        for n, c, sweeps, quick in points(device):
            for variant in ce.CUDA_VARIANTS if device == "cuda" else ce.VARIANTS:
                yield param(
                    device,
                    n,
                    c,
                    tuple(sweeps),
                    variant,
                    device=device,
                    variant=variant,
                    full=not quick,
                    id=f"{device}-{n}x{c}-{dtype_name(DTYPES[device])}-{variant}",
                )


@pytest.mark.parametrize("device,n,c,sweeps,variant", list(_cases()))
def test_loss_scaling(benchmark, request, device, n, c, sweeps, variant):
    p = ce.problem(device, n, c)
    setup, target = ce.checked_call(p, variant)
    setup()
    peak = peak_mib(device, target)
    p.logits.grad = None
    loss = measure(
        benchmark,
        request,
        target,
        setup,
        suite="scaling",
        cases=[f"loss vs {s}" for s in sweeps],
        variant=variant,
        shape=f"{n}x{c}",
        dtype=dtype_name(p.dtype),
        device=device,
        figures={"peak_mib": (peak, "MiB")},
    )
    p.logits.grad = None
    assert torch.isfinite(loss.float()).all()


# ---------------------------------------------------------------------------------------- tracker
def _nbytes(obj) -> int:
    """Bytes of every tensor in a (nested) state_dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


@pytest.mark.parametrize(
    "num_samples",
    [param(s, device="cpu", full=s not in QUICK_TRACKER_SIZES, id=f"cpu-{s}") for s in TRACKER_SIZES],
)
def test_tracker_scaling(benchmark, request, num_samples):
    """end_epoch() + scores() after an epoch that saw every sample once (10 classes)."""
    ce._CACHE.clear()
    gc.collect()
    g = torch.Generator().manual_seed(num_samples)
    logits = 2.0 * torch.randn(num_samples, 10, generator=g)
    targets = torch.randint(0, 10, (num_samples,), generator=g)
    index = torch.randperm(num_samples, generator=g)
    tracker = memcore.Tracker(num_samples, device="cpu")

    def setup():  # one epoch of statistics; not timed
        with torch.no_grad():
            memcore.accumulate(logits, targets, index, tracker)

    def target():
        tracker.end_epoch()
        return tracker.scores()

    setup()
    scores = target()
    assert scores["rows"].sum().item() == num_samples
    assert torch.isfinite(scores["csl"]).all()
    state = _nbytes(tracker.state_dict()) / 2**20
    setup()
    peak = peak_mib("cpu", target)
    out = measure(
        benchmark,
        request,
        target,
        setup,
        warmup=5,
        suite="scaling",
        case="tracker",
        variant="memcore",
        shape=num_samples,
        dtype="float64",
        device="cpu",
        figures={"state_mib": (state, "MiB"), "peak_mib": (peak, "MiB")},
    )
    assert len(out["csl"]) == num_samples


def plot(rows, folder) -> None:
    """scaling.png: time vs C and vs N, log-log, one line per variant and device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[rows.metric == "median_ms"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, (sweep, axis) in zip(axes, (("C", 1), ("N", 0))):
        part = rows[rows.case == f"loss vs {sweep}"]
        for (variant, device), g in part.groupby(["variant", "device"]):
            g = g.assign(x=[int(s.split("x")[axis]) for s in g["shape"]]).sort_values("x")
            style = "-" if device == "cpu" else "--"
            ax.plot(g.x, g.value, marker="o", linestyle=style, label=f"{variant} ({device})")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel=sweep,
            ylabel="forward + backward (ms)",
            title=f"time vs {sweep}",
        )
        ax.grid(True, which="both", alpha=0.3)
        if not part.empty:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "scaling.png", dpi=110)
    plt.close(fig)
