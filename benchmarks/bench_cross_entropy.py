"""Kernel benchmarks: memcore.accumulate against plain and unfused ("eager") cross-entropy.

Each case times forward + backward on one pre-made logits tensor (a leaf with requires_grad; its
grad is set to None between rounds, outside the timing) in three variants:

    plain    F.cross_entropy(logits, targets).backward()            - what training pays anyway
    eager    F.cross_entropy(reduction="none") + softmax/gather/max/argmax + index_add_ of the same
             six statistics into a float64 [num_samples, 6] buffer   - the unfused way to get them
    memcore  memcore.accumulate(logits, targets, index, tracker).backward()
    memcore_overwrite  memcore.accumulate(..., overwrite_logits=True).backward(): the gradient
             written over the logits in the forward pass, as liger does
    liger    liger_kernel's LigerCrossEntropyLoss (CUDA only, when importable)
The two that write their gradient into the logits get a fresh copy of them each round, made
outside the timing.

On CUDA, test_cuda_copy_bandwidth also times a device-to-device copy of a buffer the size of the
largest logits tensor: the bandwidth the memory-bound loss kernels are judged against (render.py
turns memcore's time into effective GB/s: logits read twice, gradient written once).

CPU runs float32, CUDA bfloat16. Quick mode (default) runs 512x10 and 4096x1000 on CPU (and every
shape on CUDA); the 8192x32000 CPU case (1 GiB of logits, 1 GiB of grads) needs --bench-full or
MEMCORE_BENCH_FULL=1. Every case first checks, outside the timing, that memcore's loss matches
F.cross_entropy (and, per variant, the eager statistics / memcore gradient), so a quick or
--benchmark-disable run also catches wrong results.

    bash scripts/bench.sh -k cross_entropy      # measure, store in benchmarks/results.csv, render
"""

import gc
import math
import time
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import memcore

SHAPES = [(512, 10), (4096, 1000), (8192, 32000)]
HEAVY_CPU = {(8192, 32000)}  # full mode only on CPU
VARIANTS = ("plain", "eager", "memcore", "memcore_overwrite")
CUDA_VARIANTS = VARIANTS + ("liger",)
IN_PLACE = {"memcore_overwrite", "liger"}  # variants that overwrite the logits they are given
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
# loss / statistics tolerances per dtype (memcore does fp32 math; bf16 outputs are rounded)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
MAX_ROUNDS = 20000
HAS_CUDA = torch.cuda.is_available()

try:  # optional baseline: a fused Triton cross-entropy (CUDA only)
    from liger_kernel.transformers import LigerCrossEntropyLoss
except Exception:  # noqa: BLE001 - not installed, or its triton import failed
    LigerCrossEntropyLoss = None
HAS_LIGER = LigerCrossEntropyLoss is not None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _cases():
    for device in ("cpu", "cuda"):
        for n, c in SHAPES:
            marks = []
            if device == "cuda":
                marks.append(pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available"))
            if device == "cpu" and (n, c) in HEAVY_CPU:
                marks.append(pytest.mark.bench_full)
            for variant in CUDA_VARIANTS if device == "cuda" else VARIANTS:
                vmarks = list(marks)
                if variant == "liger":
                    vmarks.append(pytest.mark.skipif(not HAS_LIGER, reason="liger_kernel not importable"))
                yield pytest.param(
                    device,
                    (n, c),
                    variant,
                    marks=vmarks,
                    id=f"{device}-{n}x{c}-{_dtype_name(DTYPES[device])}-{variant}",
                )


# ---------------------------------------------------------------------------------------- problem
@dataclass
class Problem:
    device: str
    n: int
    c: int
    dtype: torch.dtype
    logits: torch.Tensor  # [n, c] leaf, requires_grad
    targets: torch.Tensor  # [n] int64
    index: torch.Tensor  # [n] shuffled arange(n): dataset ids
    tracker: memcore.Tracker
    eager_buf: torch.Tensor  # float64 [n, 6]


_CACHE: dict = {}  # holds one Problem at a time: the three variants of a shape share it


def _problem(device: str, n: int, c: int) -> Problem:
    key = (device, n, c)
    if key not in _CACHE:
        _CACHE.clear()
        gc.collect()
        dtype = DTYPES[device]
        g = torch.Generator().manual_seed(1234 + n + c)
        logits = (2.0 * torch.randn(n, c, generator=g)).to(device=device, dtype=dtype).requires_grad_()
        targets = torch.randint(0, c, (n,), generator=g).to(device)
        index = torch.randperm(n, generator=g).to(device)
        _CACHE[key] = Problem(
            device,
            n,
            c,
            dtype,
            logits,
            targets,
            index,
            tracker=memcore.Tracker(n, device=device),
            eager_buf=torch.zeros(n, 6, dtype=torch.float64, device=device),
        )
    return _CACHE[key]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- variants
def run_plain(p: Problem) -> torch.Tensor:
    loss = F.cross_entropy(p.logits, p.targets)
    loss.backward()
    _sync(p.device)
    return loss


def eager_stats(logits: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor) -> torch.Tensor:
    """[N, 6] float64 rows in memcore's column layout: loss, 1, correct, p(target), p^2, margin."""
    with torch.no_grad():
        z, t = logits.detach(), targets[:, None]
        p = z.softmax(-1).gather(1, t).squeeze(1)
        other = z.scatter(1, t, float("-inf")).amax(1)  # largest logit other than the target's
        margin = z.gather(1, t).squeeze(1) - other
        correct = (z.argmax(-1) == targets).to(p.dtype)
        return torch.stack([loss_rows.detach(), torch.ones_like(p), correct, p, p * p, margin], 1).double()


def run_eager(p: Problem) -> torch.Tensor:
    loss_rows = F.cross_entropy(p.logits, p.targets, reduction="none")
    p.eager_buf.index_add_(0, p.index, eager_stats(p.logits, p.targets, loss_rows))
    loss = loss_rows.mean()
    loss.backward()
    _sync(p.device)
    return loss


def run_memcore(p: Problem, tracker: Optional[memcore.Tracker] = None) -> torch.Tensor:
    loss = memcore.accumulate(p.logits, p.targets, p.index, tracker or p.tracker)
    loss.backward()
    _sync(p.device)
    return loss


_LIGER: dict = {}  # the LigerCrossEntropyLoss module, made on first use
_LAST: dict = {}  # the logits copy an in-place variant last wrote its gradient into


def run_liger(p: Problem, logits: torch.Tensor) -> torch.Tensor:
    """LigerCrossEntropyLoss forward + backward on ``logits`` (a fresh leaf: liger overwrites it)."""
    if "loss" not in _LIGER:
        _LIGER["loss"] = LigerCrossEntropyLoss()
    _LAST["logits"] = logits
    loss = _LIGER["loss"](logits, p.targets)
    loss.backward()
    _sync(p.device)
    return loss


def run_memcore_overwrite(p: Problem, logits: torch.Tensor) -> torch.Tensor:
    """accumulate(..., overwrite_logits=True) fwd + bwd on ``logits`` (a fresh leaf: overwritten)."""
    _LAST["logits"] = logits
    loss = memcore.accumulate(logits, p.targets, p.index, p.tracker, overwrite_logits=True)
    loss.backward()
    _sync(p.device)
    return loss


RUN = {"plain": run_plain, "eager": run_eager, "memcore": run_memcore}
RUN_IN_PLACE = {"memcore_overwrite": run_memcore_overwrite, "liger": run_liger}


def timed_call(p: Problem, variant: str):
    """(setup, target) for one variant: setup clears the gradient (and, for the variants that
    overwrite their logits, makes the fresh copy they need); neither is timed."""
    if variant in IN_PLACE:
        box = {}
        run_in_place = RUN_IN_PLACE[variant]

        def setup():
            p.logits.grad = None
            box["logits"] = p.logits.detach().clone().requires_grad_()

        def target():
            return run_in_place(p, box["logits"])

        return setup, target
    run = RUN[variant]

    def setup():
        p.logits.grad = None

    def target():
        return run(p)

    return setup, target


# ---------------------------------------------------------------------------------------- checks
def _check_loss(p: Problem) -> None:
    """memcore's loss (fresh tracker) equals F.cross_entropy on the same batch."""
    with torch.no_grad():
        expected = F.cross_entropy(p.logits, p.targets).float()
        got = memcore.accumulate(p.logits, p.targets, p.index, memcore.Tracker(p.n, device=p.device)).float()
    torch.testing.assert_close(got, expected, **TOL[p.dtype])


def _check_grad(p: Problem) -> None:
    """memcore's logits gradient equals plain cross-entropy's."""
    p.logits.grad = None
    run_plain(p)
    expected, p.logits.grad = p.logits.grad, None
    run_memcore(p, memcore.Tracker(p.n, device=p.device))
    got, p.logits.grad = p.logits.grad, None
    torch.testing.assert_close(got.float(), expected.float(), **TOL[p.dtype])


def _check_eager_stats(p: Problem) -> None:
    """The eager baseline gathers the same per-sample statistics memcore records."""
    with torch.no_grad():
        rows = F.cross_entropy(p.logits, p.targets, reduction="none")
        ref = torch.zeros(p.n, 6, dtype=torch.float64, device=p.device)
        ref.index_add_(0, p.index, eager_stats(p.logits, p.targets, rows))
        tracker = memcore.Tracker(p.n, device=p.device)
        memcore.accumulate(p.logits, p.targets, p.index, tracker)
        s = tracker.scores()  # every index appears once: per-sample values are the row values
    ref = ref.cpu()
    tol = TOL[p.dtype]
    torch.testing.assert_close(s["rows"], ref[:, 1])
    torch.testing.assert_close(s["csl"], ref[:, 0], **tol)
    torch.testing.assert_close(s["confidence_mean"], ref[:, 3], **tol)
    torch.testing.assert_close(s["aum"], ref[:, 5], **tol)
    # argmax ties (possible in bf16) may be broken differently: allow a few disagreements
    wrong = int((s["correctness"] != ref[:, 2]).sum())
    assert wrong <= max(1, p.n // 1000), f"{wrong} of {p.n} rows disagree on correctness"


def _check_in_place(p: Problem, setup, target) -> None:
    """The in-place variant's loss and gradient equal plain cross-entropy's (like for like)."""
    p.logits.grad = None
    run_plain(p)
    expected, p.logits.grad = p.logits.grad, None
    with torch.no_grad():
        ref = F.cross_entropy(p.logits, p.targets).float()
    setup()
    loss = target()
    torch.testing.assert_close(loss.float(), ref, **TOL[p.dtype])
    torch.testing.assert_close(_LAST.pop("logits").grad.float(), expected.float(), **TOL[p.dtype])


# ---------------------------------------------------------------------------------------- timing
def _rounds(request, benchmark, target, setup) -> int:
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


@pytest.mark.parametrize("device,shape,variant", list(_cases()))
def test_cross_entropy(benchmark, request, device, shape, variant):
    n, c = shape
    p = _problem(device, n, c)
    dtype = _dtype_name(p.dtype)

    _check_loss(p)
    if variant == "eager":
        _check_eager_stats(p)
    elif variant == "memcore":
        _check_grad(p)
    setup, target = timed_call(p, variant)
    if variant in IN_PLACE:
        _check_in_place(p, setup, target)

    benchmark.group = f"cross_entropy {n}x{c} {dtype} {device}"
    benchmark.extra_info.update(
        kernel="cross_entropy",
        variant=variant,
        shape=f"{n}x{c}",
        n=n,
        c=c,
        dtype=dtype,
        device=device,
        threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(0) if device == "cuda" else None,
    )

    rounds = _rounds(request, benchmark, target, setup)
    loss = benchmark.pedantic(
        target, setup=setup, rounds=rounds, warmup_rounds=min(rounds // 10, 50), iterations=1
    )
    p.logits.grad = None
    assert torch.isfinite(loss.float()).all()


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")
def test_cuda_copy_bandwidth(benchmark, request):
    """Device-to-device copy of a buffer the size of the largest logits tensor (bf16): the
    bandwidth reference for the memory-bound kernels. Bytes moved = read + write."""
    n, c = max(SHAPES, key=lambda s: s[0] * s[1])
    _CACHE.clear()
    gc.collect()
    src = torch.randn(n, c, device="cuda").to(DTYPES["cuda"])
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()

    def target():
        dst.copy_(src)
        torch.cuda.synchronize()

    def setup():
        pass

    target()
    assert torch.equal(dst, src)
    benchmark.group = "d2d copy"
    benchmark.extra_info.update(
        kernel="d2d_copy",
        variant="copy",
        shape=f"{n}x{c}",
        n=n,
        c=c,
        dtype=_dtype_name(src.dtype),
        device="cuda",
        bytes_moved=2 * nbytes,
        gpu=torch.cuda.get_device_name(0),
    )
    rounds = _rounds(request, benchmark, target, setup)
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=min(rounds // 10, 20), iterations=1)
