"""The cross-entropy family: memcore.accumulate against plain and unfused ("eager") cross-entropy.

Each case times forward + backward on one pre-made logits tensor (a leaf with requires_grad; its
grad is set to None between rounds, outside the timing) in these variants:

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
largest logits tensor: the bandwidth the memory-bound loss kernels are judged against.

On the CPU, test_cross_entropy_interleaved also times the kernels against ATen's in interleaved
rounds (one round runs each of these once, back to back, the order rotating), at 512x10, 512x100,
4096x1000 and (full mode) 8192x32000 in float32, bfloat16 and float64:

    plain / memcore                    the whole forward + backward, as above
    aten_forward / memcore_forward     F.cross_entropy / memcore::ce_forward_reduce under no_grad
    aten_backward / memcore_backward   loss.backward() of the two, the forward outside the timing
Its case names the CPU kernels that ran (memcore.cpu_isa(); MEMCORE_CPU_ISA=avx2|baseline caps them).

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
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F

import memcore
from benchmarks.common import (
    DTYPES,
    TOL,
    LigerCrossEntropyLoss,
    dtype_name,
    eager_stats,
    interleave,
    interleaved_rows,
    load_average,
    load_note,
    measure,
    param,
    rounds_for,
    sync,
)
from benchmarks.goals import Goal, ratio, value

SHAPES = [(512, 10), (4096, 1000), (8192, 32000)]
HEAVY_CPU = {(8192, 32000)}  # full mode only on CPU
VARIANTS = ("plain", "eager", "memcore", "memcore_overwrite")
CUDA_VARIANTS = VARIANTS + ("liger",)
IN_PLACE = {"memcore_overwrite", "liger"}  # variants that overwrite the logits they are given

TITLE = "Cross-entropy kernel: memcore.accumulate vs F.cross_entropy"
NOTES = """
Wall time of one forward + backward pass over the same logits tensor (CPU: float32, CUDA: bfloat16).
*plain*: `F.cross_entropy(...).backward()`, no statistics. *eager*: the same six per-sample statistics
memcore records, gathered with unfused PyTorch ops and `index_add_` into a float64 buffer. *memcore*:
`memcore.accumulate(...).backward()`; *memcore_overwrite*: the same with `overwrite_logits=True` (a fresh
copy of the logits each round, outside the timing); *liger*: Liger-Kernel's `LigerCrossEntropyLoss`
(CUDA). *d2d_copy* (CUDA): a device-to-device copy of the largest logits, the bandwidth the loss is
judged against (memcore moves the logits three times: two reads, one gradient write).
"""
GPU = "MEMCORE_PY=python3 bash scripts/bench.sh --full -k cuda"  # on a GPU machine, after tools/gpu_check.sh built memcore


def copy_bandwidth(rows):
    """memcore's effective bandwidth at its largest shape as a percentage of the D2D copy's."""
    loss = rows[(rows.case == "loss") & (rows.variant == "memcore") & (rows.metric == "median_ms")]
    copy = rows[rows.case == "d2d_copy"]
    have = copy.set_index("metric").value
    if loss.empty or not {"median_ms", "bytes_moved"} <= set(have.index):
        return []
    big = loss.loc[loss["shape"].map(lambda s: math.prod(map(int, s.split("x")))).idxmax()]
    n, c = map(int, big["shape"].split("x"))
    moved = 3 * n * c * torch.finfo(getattr(torch, big["dtype"])).bits // 8
    pct = 100 * (moved / big["value"]) / (have["bytes_moved"] / have["median_ms"])
    return [(f"{big['shape']} {big['dtype']}", pct, rows.loc[[big.name, *copy.index]], "")]


CPU_INTERLEAVED = "bash scripts/bench.sh --full -k cross_entropy_interleaved (MEMCORE_CPU_ISA=baseline too)"
OPTION_SHAPES = [(512, 1000), (4096, 32000)]
OPTIONS = {  # variant: accumulate's options ("w": the class weights of the case)
    "memcore_weight": dict(weight="w"),
    "memcore_label_smoothing": dict(label_smoothing=0.1),
    "memcore_softcap": dict(softcap=30.0),
    "memcore_z_loss": dict(z_loss=1e-4),
}
CPU_OPTIONS = "bash scripts/bench.sh --full -k cross_entropy_options"
GOALS = [
    Goal("accumulate fwd+bwd ≤ 1.10x plain F.cross_entropy", "cpu", ratio("median_ms", "memcore", "plain"),
         "<=", 1.10, "{:.2f}x", "bash scripts/bench.sh --full"),
    Goal("accumulate fwd+bwd ≤ 0.75x plain F.cross_entropy at 512x10 (interleaved)", "cpu",
         value("interleaved_ratio", label="{case}, {shape} {dtype}", variant="memcore", shape="512x10",
               dtype="float32"), "<=", 0.75, "{:.2f}x", CPU_INTERLEAVED),
    Goal("CPU forward kernel at least as fast as F.cross_entropy's forward (interleaved)", "cpu",
         value("interleaved_ratio", label="{case}, {shape} {dtype}", variant="memcore_forward"),
         "<=", 1.0, "{:.2f}x", CPU_INTERLEAVED),
    Goal("CPU backward kernel at least as fast as F.cross_entropy's backward (interleaved)", "cpu",
         value("interleaved_ratio", label="{case}, {shape} {dtype}", variant="memcore_backward"),
         "<=", 1.0, "{:.2f}x", CPU_INTERLEAVED),
    Goal("each loss option's step ≤ 1.10x the default step at 4096x32000 (interleaved)", "cpu",
         value("interleaved_ratio", label="{variant}, {shape} {dtype}", variant=list(OPTIONS), shape="4096x32000"),
         "<=", 1.10, "{:.2f}x", CPU_OPTIONS),
    Goal("accumulate ≥ 1.5x faster than the eager statistics", "cpu", ratio("median_ms", "eager", "memcore"),
         ">=", 1.5, "{:.2f}x", "bash scripts/bench.sh --full"),
    Goal("accumulate fwd+bwd ≤ 1.10x plain F.cross_entropy", "cuda", ratio("median_ms", "memcore", "plain"),
         "<=", 1.10, "{:.2f}x", GPU),
    Goal("accumulate ≥ 2x faster than the eager statistics", "cuda", ratio("median_ms", "eager", "memcore"),
         ">=", 2.0, "{:.2f}x", GPU),
    Goal("accumulate at least as fast as Liger's cross-entropy", "cuda", ratio("median_ms", "memcore", "liger"),
         "<=", 1.0, "{:.2f}x", GPU + " (liger-kernel from tools/gpu_wheels.sh)"),
    Goal("≥ 80 % of the D2D copy bandwidth on the largest shape", "cuda", copy_bandwidth,
         ">=", 80.0, "{:.0f} %", GPU),
]  # fmt: skip


def _cases():
    for device in ("cpu", "cuda"):
        for n, c in SHAPES:
            for variant in CUDA_VARIANTS if device == "cuda" else VARIANTS:
                yield param(
                    device,
                    (n, c),
                    variant,
                    device=device,
                    variant=variant,
                    full=device == "cpu" and (n, c) in HEAVY_CPU,
                    id=f"{device}-{n}x{c}-{dtype_name(DTYPES[device])}-{variant}",
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


_CACHE: dict = {}  # holds one Problem at a time: the variants of a shape share it


def problem(device: str, n: int, c: int) -> Problem:
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


# ---------------------------------------------------------------------------------------- variants
def run_plain(p: Problem) -> torch.Tensor:
    loss = F.cross_entropy(p.logits, p.targets)
    loss.backward()
    sync(p.device)
    return loss


def run_eager(p: Problem) -> torch.Tensor:
    loss_rows = F.cross_entropy(p.logits, p.targets, reduction="none")
    p.eager_buf.index_add_(0, p.index, eager_stats(p.logits, p.targets, loss_rows))
    loss = loss_rows.mean()
    loss.backward()
    sync(p.device)
    return loss


def run_memcore(p: Problem, tracker: Optional[memcore.Tracker] = None) -> torch.Tensor:
    loss = memcore.accumulate(p.logits, p.targets, p.index, tracker or p.tracker)
    loss.backward()
    sync(p.device)
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
    sync(p.device)
    return loss


def run_memcore_overwrite(p: Problem, logits: torch.Tensor) -> torch.Tensor:
    """accumulate(..., overwrite_logits=True) fwd + bwd on ``logits`` (a fresh leaf: overwritten)."""
    _LAST["logits"] = logits
    loss = memcore.accumulate(logits, p.targets, p.index, p.tracker, overwrite_logits=True)
    loss.backward()
    sync(p.device)
    return loss


RUN = {"plain": run_plain, "eager": run_eager, "memcore": run_memcore}
RUN_IN_PLACE = {"memcore_overwrite": run_memcore_overwrite, "liger": run_liger}


def timed_call(p: Problem, variant: str):
    """(setup, target) for one variant: setup clears the gradient (and, for the variants that
    overwrite their logits, makes the fresh copy they need); neither is timed."""
    box = {}

    def setup():
        p.logits.grad = None
        if variant in IN_PLACE:
            box["logits"] = p.logits.detach().clone().requires_grad_()

    if variant in IN_PLACE:
        return setup, lambda: RUN_IN_PLACE[variant](p, box["logits"])
    return setup, lambda: RUN[variant](p)


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


def checked_call(p: Problem, variant: str):
    """(setup, target) of ``variant`` after checking its results (outside the timing)."""
    _check_loss(p)
    if variant in ("memcore", "eager"):
        (_check_grad if variant == "memcore" else _check_eager_stats)(p)
    setup, target = timed_call(p, variant)
    if variant in IN_PLACE:
        _check_in_place(p, setup, target)
    return setup, target


# ---------------------------------------------------------------------------------------- timing
@pytest.mark.parametrize("device,shape,variant", list(_cases()))
def test_cross_entropy(benchmark, request, device, shape, variant):
    n, c = shape
    p = problem(device, n, c)
    setup, target = checked_call(p, variant)
    fields = dict(suite="cross_entropy", case="loss", variant=variant, shape=f"{n}x{c}", device=device)
    loss = measure(benchmark, request, target, setup, dtype=dtype_name(p.dtype), **fields)
    p.logits.grad = None
    assert torch.isfinite(loss.float()).all()


# ---------------------------------------------------------------------------- interleaved, CPU kernels
KERNEL_SHAPES = [(512, 10), (512, 100), (4096, 1000), (8192, 32000)]
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
KERNEL_AGAINST = {"memcore": "plain", "memcore_forward": "aten_forward", "memcore_backward": "aten_backward"}


def _kernel_cases():
    for n, c in KERNEL_SHAPES:
        for dtype in KERNEL_DTYPES:
            name = f"cpu-{n}x{c}-{dtype_name(dtype)}"
            yield param((n, c), dtype, device="cpu", full=(n, c) in HEAVY_CPU, id=name)


def _clock(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


@pytest.mark.parametrize("shape,dtype", list(_kernel_cases()))
def test_cross_entropy_interleaved(benchmark, request, shape, dtype):
    n, c = shape
    _CACHE.clear()
    gc.collect()
    g = torch.Generator().manual_seed(1234 + n + c)
    z = (2.0 * torch.randn(n, c, generator=g)).to(dtype).requires_grad_()
    t, index = torch.randint(0, c, (n,), generator=g), torch.randperm(n, generator=g)
    tracker = memcore.Tracker(n)

    def plain():
        return F.cross_entropy(z, t)

    def fused():
        return torch.ops.memcore.ce_forward_reduce(z, t, index, n, -100, 1)[0]

    def step(loss):  # forward + backward
        z.grad = None
        return _clock(lambda: loss().backward())

    def forward(loss):
        with torch.no_grad():
            return _clock(loss)

    def backward(loss):
        z.grad = None
        out = loss()
        return _clock(out.backward)

    # outside the timing: memcore's loss and gradient equal F.cross_entropy's
    step(plain)
    ref = z.grad
    step(lambda: memcore.accumulate(z, t, index, memcore.Tracker(n)))
    torch.testing.assert_close(z.grad.float(), ref.float(), **TOL[dtype])
    with torch.no_grad():
        torch.testing.assert_close(fused().float(), plain().float(), **TOL[dtype])

    times: Dict[str, List[float]] = {}
    target = interleave(
        {
            "plain": lambda: step(plain),
            "memcore": lambda: step(lambda: memcore.accumulate(z, t, index, tracker)),
            "aten_forward": lambda: forward(plain),
            "memcore_forward": lambda: forward(fused),
            "aten_backward": lambda: backward(plain),
            "memcore_backward": lambda: backward(fused),
        },
        times,
    )
    rounds = rounds_for(request, benchmark, target, lambda: None)  # probes double as the warm-up
    for v in times.values():
        v.clear()
    before = load_average()
    fields = dict(suite="cross_entropy", case=f"interleaved, {memcore.cpu_isa()} kernels", shape=f"{n}x{c}")
    measure(benchmark, request, target, rounds=rounds, warmup=0, variant="interleaved", dtype=dtype_name(dtype),
            device="cpu", timed=False, **fields)  # fmt: skip
    note = load_note(before, load_average())
    benchmark.extra_info["rows"] = [dict(r, note=note) for r in interleaved_rows(times, KERNEL_AGAINST)]
    z.grad = None


@pytest.mark.parametrize(
    "shape",
    [
        param((n, c), device="cpu", full=(n, c) == (4096, 32000), id=f"cpu-{n}x{c}-float32")
        for n, c in OPTION_SHAPES
    ],
)
def test_cross_entropy_options_interleaved(benchmark, request, shape):
    """Each loss option's training step (forward + backward, recorded) against the default step's."""
    n, c = shape
    _CACHE.clear()
    gc.collect()
    g = torch.Generator().manual_seed(4321 + n + c)
    z = (2.0 * torch.randn(n, c, generator=g)).requires_grad_()
    t, index = torch.randint(0, c, (n,), generator=g), torch.randperm(n, generator=g)
    w = torch.rand(c, generator=g) + 0.5
    tracker = memcore.Tracker(n)

    def step(**options):
        kw = {k: (w if v == "w" else v) for k, v in options.items()}
        z.grad = None
        return _clock(lambda: memcore.accumulate(z, t, index, tracker, **kw).backward())

    # outside the timing: the weighted, smoothed loss is F.cross_entropy's
    with torch.no_grad():
        got = memcore.accumulate(z, t, index, memcore.Tracker(n), weight=w, label_smoothing=0.1)
        torch.testing.assert_close(
            got, F.cross_entropy(z, t, weight=w, label_smoothing=0.1), **TOL[torch.float32]
        )
    variants = {"memcore": lambda: step(), **{v: (lambda o=o: step(**o)) for v, o in OPTIONS.items()}}
    times: Dict[str, List[float]] = {}
    target = interleave(variants, times)
    rounds = rounds_for(request, benchmark, target, lambda: None)
    for v in times.values():
        v.clear()
    before = load_average()
    fields = dict(suite="cross_entropy", case="loss options, interleaved", shape=f"{n}x{c}")
    measure(benchmark, request, target, rounds=rounds, warmup=0, variant="interleaved", dtype="float32",
            device="cpu", timed=False, **fields)  # fmt: skip
    note = load_note(before, load_average())
    benchmark.extra_info["rows"] = [
        dict(r, note=note) for r in interleaved_rows(times, {v: "memcore" for v in OPTIONS})
    ]
    z.grad = None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_copy_bandwidth(benchmark, request):
    """Device-to-device copy of a buffer the size of the largest logits tensor (bf16): the
    bandwidth reference for the memory-bound kernels. Bytes moved = read + write."""
    n, c = max(SHAPES, key=lambda s: s[0] * s[1])
    _CACHE.clear()
    gc.collect()
    src = torch.randn(n, c, device="cuda").to(DTYPES["cuda"])
    dst = torch.empty_like(src)

    def target():
        dst.copy_(src)
        torch.cuda.synchronize()

    target()
    assert torch.equal(dst, src)
    moved = 2 * src.numel() * src.element_size()
    fields = dict(suite="cross_entropy", case="d2d_copy", variant="copy", shape=f"{n}x{c}", device="cuda")
    measure(
        benchmark,
        request,
        target,
        warmup=20,
        dtype=dtype_name(src.dtype),
        figures={"bytes_moved": (moved, "B")},
        **fields,
    )
