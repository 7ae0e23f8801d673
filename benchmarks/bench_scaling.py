"""Scaling benchmarks: forward + backward time (and CUDA peak memory) as C and N grow, and the cost
of closing an epoch and reading the scores as the dataset grows.

Loss sweeps, on one pre-made logits tensor per shape (the problem and variants of
test_bench_cross_entropy.py, imported from there, not copied):

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
from benchmarks import test_bench_cross_entropy as ce  # problem, variants and timing helper
from benchmarks.memory import peak_mib

HAS_CUDA = torch.cuda.is_available()
C_SWEEP = (10, 100, 1000, 10000, 32000)
N_FIXED = {"cpu": 1024, "cuda": 8192}
N_SWEEP = (256, 1024, 4096, 16384)
C_FIXED = 1000
QUICK_CPU_C = {10, 1000, 32000}
QUICK_CPU_N = {256, 1024, 4096}
TRACKER_SIZES = (10_000, 100_000, 1_000_000)
QUICK_TRACKER_SIZES = {10_000, 100_000}

HAS_LIGER = ce.HAS_LIGER


def points(device: str):
    """[(n, c, sweeps, quick)]: the union of both sweeps, each shape once."""
    pts = {}
    for c in C_SWEEP:
        n = N_FIXED[device]
        pts.setdefault((n, c), set()).add("C")
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
        variants = ["plain", "eager", "memcore", "memcore_overwrite"] + (
            ["liger"] if device == "cuda" else []
        )
        for n, c, sweeps, quick in points(device):
            for variant in variants:
                marks = []
                if device == "cuda":
                    marks.append(pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available"))
                if variant == "liger":
                    marks.append(pytest.mark.skipif(not HAS_LIGER, reason="liger_kernel not importable"))
                if not quick:
                    marks.append(pytest.mark.bench_full)
                yield pytest.param(
                    device,
                    n,
                    c,
                    tuple(sweeps),
                    variant,
                    marks=marks,
                    id=f"{device}-{n}x{c}-{ce._dtype_name(ce.DTYPES[device])}-{variant}",
                )


@pytest.mark.parametrize("device,n,c,sweeps,variant", list(_cases()))
def test_loss_scaling(benchmark, request, device, n, c, sweeps, variant):
    p = ce._problem(device, n, c)
    dtype = ce._dtype_name(p.dtype)
    if variant == "memcore":
        ce._check_grad(p)
    elif variant == "eager":
        ce._check_eager_stats(p)
    else:
        ce._check_loss(p)

    setup, target = ce.timed_call(p, variant)
    if variant in ce.IN_PLACE:
        ce._check_in_place(p, setup, target)

    setup()
    peak = peak_mib(device, target)
    p.logits.grad = None

    benchmark.group = f"scaling {device} {dtype}"
    benchmark.extra_info.update(
        kernel="scaling",
        variant=variant,
        shape=f"{n}x{c}",
        n=n,
        c=c,
        dtype=dtype,
        device=device,
        sweeps=list(sweeps),
        threads=torch.get_num_threads(),
        peak_mem_mb=peak,
        gpu=torch.cuda.get_device_name(0) if device == "cuda" else None,
    )
    rounds = ce._rounds(request, benchmark, target, setup)
    loss = benchmark.pedantic(
        target, setup=setup, rounds=rounds, warmup_rounds=min(rounds // 10, 50), iterations=1
    )
    p.logits.grad = None
    assert torch.isfinite(loss.float()).all()


# ---------------------------------------------------------------------------------------- tracker
def _tracker_cases():
    for s in TRACKER_SIZES:
        marks = [] if s in QUICK_TRACKER_SIZES else [pytest.mark.bench_full]
        yield pytest.param(s, marks=marks, id=f"cpu-{s}")


def _nbytes(obj) -> int:
    """Bytes of every tensor in a (nested) state_dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


@pytest.mark.parametrize("num_samples", list(_tracker_cases()))
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
    state_mb = _nbytes(tracker.state_dict()) / 2**20
    setup()
    peak = peak_mib("cpu", target)

    benchmark.group = "scaling tracker cpu"
    benchmark.extra_info.update(
        kernel="tracker_scaling",
        variant="memcore",
        num_samples=num_samples,
        device="cpu",
        dtype="float64",
        threads=torch.get_num_threads(),
        state_mb=state_mb,
        peak_mem_mb=peak,
    )
    rounds = ce._rounds(request, benchmark, target, setup)
    out = benchmark.pedantic(
        target, setup=setup, rounds=rounds, warmup_rounds=min(rounds // 10, 5), iterations=1
    )
    assert len(out["csl"]) == num_samples
