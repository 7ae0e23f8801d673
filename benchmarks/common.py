"""What the pytest benchmark suites share: devices and dtypes, the optional Liger baselines, the
eager-statistics baseline, test parameters with their marks, and timing a case with the fields
benchmarks/store.py turns into rows of the store."""

import math
import time
from typing import Callable, Optional

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}  # the logits' dtype per device
# loss / statistics tolerances per dtype (memcore does fp32 math; bf16 outputs are rounded)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
MAX_ROUNDS = 20000

try:  # optional baselines: Liger-Kernel's fused Triton losses (CUDA only)
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
except Exception:  # noqa: BLE001 - not installed, or its triton import failed
    LigerCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss = None
HAS_LIGER = LigerCrossEntropyLoss is not None


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
