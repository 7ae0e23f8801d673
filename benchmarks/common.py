"""What the pytest benchmark suites share: devices and dtypes, the optional Liger and Cut Cross-Entropy
baselines, the eager-statistics baseline, test parameters with their marks, timing a case with the
fields benchmarks/store.py turns into rows of the store, and interleaved rounds."""

import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}  # the logits' dtype per device
# loss / statistics tolerances per dtype (memcore does fp32 math; bf16 outputs are rounded)
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}
MAX_ROUNDS = 20000

try:  # optional baselines: Liger-Kernel's fused Triton losses (CUDA only)
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
except Exception:  # noqa: BLE001 - not installed, or its triton import failed
    LigerCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss = None
HAS_LIGER = LigerCrossEntropyLoss is not None

try:  # optional baseline: Cut Cross-Entropy (Apple's cut-cross-entropy; on the CPU its torch.compile route)
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
except Exception:  # noqa: BLE001 - not installed, or its triton import failed
    cce_linear_cross_entropy = None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def param(*values, device: str, variant: str = "", full: bool = False, id: str):
    """A pytest.param marked to skip without CUDA (device "cuda"), without Liger (variant "liger"),
    and outside --bench-full (``full``: a heavy case)."""
    marks = []
    if device == "cuda":
        marks.append(pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available"))
    if variant == "liger":
        marks.append(pytest.mark.skipif(not HAS_LIGER, reason="liger_kernel not importable"))
    if full:
        marks.append(pytest.mark.bench_full)
    return pytest.param(*values, marks=marks, id=id)


def eager_stats(logits: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor) -> torch.Tensor:
    """[N, 6] float64 rows in memcore's column layout: loss, 1, correct, p(target), p^2, margin,
    gathered with unfused PyTorch ops (the baseline memcore's fused statistics are judged against)."""
    with torch.no_grad():
        z, t = logits.detach(), targets[:, None]
        p = z.softmax(-1).gather(1, t).squeeze(1)
        other = z.scatter(1, t, float("-inf")).amax(1)  # largest logit other than the target's
        margin = z.gather(1, t).squeeze(1) - other
        correct = (z.argmax(-1) == targets).to(p.dtype)
        return torch.stack([loss_rows.detach(), torch.ones_like(p), correct, p, p * p, margin], 1).double()


def rounds_for(request, benchmark, target: Callable, setup: Callable) -> int:
    """Rounds so the case runs about --benchmark-max-time, at least --benchmark-min-rounds.

    The per-round time is the fastest of a few probe runs (which double as a warm-up): on a busy
    machine a single probe can hit a scheduler stall and would leave too few rounds."""
    if benchmark.disabled:
        return 1
    max_time = float(request.config.getoption("benchmark_max_time"))
    min_rounds = int(request.config.getoption("benchmark_min_rounds"))
    fastest, spent = float("inf"), 0.0
    for _ in range(20):
        setup()
        t0 = time.perf_counter()
        target()
        took = time.perf_counter() - t0
        fastest, spent = min(fastest, took), spent + took
        if spent > 0.25 * max_time:
            break
    return max(min_rounds, min(MAX_ROUNDS, math.ceil(max_time / max(fastest, 1e-7))))


def measure(
    benchmark,
    request,
    target: Callable,
    setup: Callable = lambda: None,
    rounds: Optional[int] = None,
    warmup: int = 50,
    **fields,
):
    """Times ``target`` (``setup`` before each round, untimed) under pytest-benchmark and returns its
    last result. ``fields`` become the entry's extra_info, from which benchmarks/store.py makes the
    store's rows: suite, case (or cases), variant, shape, dtype, device, and optionally ``figures``
    ({metric: (value, unit)}), ``rows`` (more rows) and ``timed=False`` (no timing rows). Rounds: enough
    for --benchmark-max-time unless given; threads and the GPU's name are added."""
    device = fields["device"]
    benchmark.group = " ".join(str(fields[k]) for k in ("suite", "shape", "dtype", "device") if fields.get(k))
    benchmark.extra_info.update(
        threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(0) if device == "cuda" else None,
        **fields,
    )
    n = rounds or rounds_for(request, benchmark, target, setup)
    return benchmark.pedantic(target, setup=setup, rounds=n, warmup_rounds=min(n // 10, warmup), iterations=1)


def median_ci(values: Sequence[float], z: float = 1.96):
    """(median, lo, hi): the sample median and a distribution-free ~95 % confidence interval for
    the population median from order statistics (binomial normal approximation); lo / hi are the
    extremes when there are too few values."""
    v = sorted(values)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan
    mid = n // 2
    med = v[mid] if n % 2 else 0.5 * (v[mid - 1] + v[mid])
    half = z * math.sqrt(n) / 2
    lo = max(0, int(math.floor(n / 2 - half)) - 1)
    hi = min(n - 1, int(math.ceil(n / 2 + half)))
    return med, v[lo], v[hi]


def interleave(variants: Dict[str, Callable[[], float]], times: Dict[str, List[float]]) -> Callable[[], None]:
    """One interleaved round as a benchmark target: every variant once, back to back, the order
    rotating from round to round, so that a busy neighbour slows each alike. A variant returns the
    seconds of its own timed part (its setup stays outside); they are appended to ``times`` (clear its
    lists to drop warm-up rounds)."""
    names = list(variants)
    for v in names:  # rows come out in the variants' order
        times.setdefault(v, [])
    cycle = [0]

    def round_():
        k = cycle[0] % len(names)
        cycle[0] += 1
        for v in names[k:] + names[:k]:
            times[v].append(variants[v]())

    return round_


def interleaved_rows(times: Dict[str, List[float]], against: Dict[str, str]) -> List[dict]:
    """Store rows of interleaved rounds: per variant its median (ms) and rounds; per variant v in
    ``against`` its paired_ratio_rows against against[v] as "interleaved_ratio"."""
    rows = []
    for v, t in times.items():
        med, _, _ = median_ci(t)
        rows += [
            dict(variant=v, metric="interleaved_median_ms", value=1e3 * med, unit="ms"),
            dict(variant=v, metric="interleaved_rounds", value=len(t), unit="count"),
        ]
        if v in against:
            rows += paired_ratio_rows(times, v, against[v], "interleaved_ratio")
    return rows


def paired_ratio_rows(times: Dict[str, List[float]], v: str, base: str, metric: str) -> List[dict]:
    """Rows ``metric`` (+ ``_lo`` / ``_hi``) of variant v: the median over interleaved rounds of (v's
    time / base's time in the same round), with the ~95 % confidence interval of that median
    (median_ci)."""
    ratio, lo, hi = median_ci([a / b for a, b in zip(times[v], times[base])])
    return [
        dict(variant=v, metric=f"{metric}{suffix}", value=x, unit="ratio")
        for suffix, x in (("", ratio), ("_lo", lo), ("_hi", hi))
    ]


def load_average() -> Optional[float]:
    """The machine's 1-minute load average (None where the OS has none), for the notes of timings."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def load_note(before: Optional[float], after: Optional[float]) -> str:
    """The run's note (MEMCORE_BENCH_NOTE) with the load average before / after the timed rounds."""
    note = os.environ.get("MEMCORE_BENCH_NOTE", "")
    if before is None or after is None:
        return note
    load = f"load average (1 min) before / after the timed rounds: {before:.2f} / {after:.2f}"
    return f"{note}; {load}" if note else load
