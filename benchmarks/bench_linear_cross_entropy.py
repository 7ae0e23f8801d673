"""The linear_cross_entropy family: memcore.linear_accumulate against the unfused ways, forward + backward.

Variants, each from the same hidden [N, H] and weight [V, H] leaves (their grads cleared between
rounds, outside the timing):

    plain        F.cross_entropy(F.linear(h, W), targets).backward()          - what training pays anyway
    plain_eager  plain with reduction "none" + the eager statistics (softmax / gather / max / argmax
                 and index_add_ of memcore's six columns into a float64 [S, 6] buffer)
    accumulate   memcore.accumulate(F.linear(h, W), targets, index, tracker).backward()
    linear       memcore.linear_accumulate(h, W, targets, index, tracker).backward()  (chunk_size=None)

Time: forward + backward. Memory: the peak the allocator handed out during one forward + backward
above what was allocated before it (the inputs), benchmarks/memory.py's probe; it includes the
gradients of hidden and weight, which every variant must produce. With --bench-store (scripts/bench.sh)
both become rows of the store's suite "linear_cross_entropy", judged against GOALS below.

Full mode (--bench-full or MEMCORE_BENCH_FULL=1) runs the CPU shapes of the goals, N=4,096 H=1,024
V=32,000 and N=2,048 H=2,048 V=128,256 fp32 (minutes per variant on a small CPU); quick mode a tiny
shape. On CUDA (either mode) the GPU shape of the goals, N=8,192 H=4,096 V=128,256 bf16, with one more
variant where liger_kernel imports:

    liger        liger_kernel's LigerFusedLinearCrossEntropyLoss()(W, h, targets).backward()

On the CPU, test_linear_cross_entropy_interleaved times plain, linear and, where cut-cross-entropy
imports, Cut Cross-Entropy's torch.compile route in interleaved rounds (one round runs each once,
back to back, the order rotating), with each one's peak memory:

    cce          cut_cross_entropy.linear_cross_entropy(h, W, targets, impl="torch_compile").backward()

Every case first checks, outside the timing, that its loss equals plain's (and, at the tiny shape,
that linear's gradients do), so --benchmark-disable runs also catch wrong results.

    bash scripts/bench.sh --full -k linear_cross_entropy --benchmark-min-rounds=1
"""

import gc
import math
import time
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

import memcore
from benchmarks.common import (
    DTYPES,
    TOL,
    LigerFusedLinearCrossEntropyLoss,
    cce_linear_cross_entropy,
    dtype_name,
    eager_stats,
    interleave,
    interleaved_rows,
    load_average,
    load_note,
    measure,
    paired_ratio_rows,
    param,
    sync,
)
from benchmarks.goals import Goal, ratio, value
from benchmarks.memory import peak_mib
from memcore.linear_cross_entropy import auto_chunk_size

SHAPES = [(256, 64, 1001), (4096, 1024, 32000), (2048, 2048, 128256)]  # (N, H, V), CPU
HEAVY = {(4096, 1024, 32000), (2048, 2048, 128256)}  # the goals' CPU shapes; the first is a smoke test
CUDA_SHAPES = [(8192, 4096, 128256)]  # an LLM head, either mode
VARIANTS = ("plain", "plain_eager", "accumulate", "linear")
CUDA_VARIANTS = VARIANTS + ("liger",)
_CACHE: dict = {}  # the problem of the current shape, shared by its variants

TITLE = "Fused linear + cross-entropy: memcore.linear_accumulate vs F.linear + F.cross_entropy"
NOTES = """
Wall time of one forward + backward from the same hidden [N, H] and weight [V, H]; the multi-GiB CPU
shapes run one round, so their times are single measurements. *plain*:
`F.cross_entropy(F.linear(h, W), t).backward()`; *plain_eager*: plain plus the six statistics with
unfused ops and `index_add_`; *accumulate*: `memcore.accumulate` on `F.linear`'s logits; *linear*:
`memcore.linear_accumulate` (never materializes the [N, V] logits); *liger* (CUDA): Liger-Kernel's
`LigerFusedLinearCrossEntropyLoss`. Peak: memory the allocator handed out during one forward + backward
above what was allocated before it (the inputs), `benchmarks/memory.py`; it includes the gradients of
hidden and weight. The [V, H] weight gradient alone is a floor no variant goes below: in fp32 at
V = 128,256, H = 2,048 it takes 1,002 MiB. Goals are judged at the large shapes only; the smallest is
the quick-mode smoke test, where fixed costs dominate.
"""
CPU_SHAPES = [f"{n}x{h}x{v}" for n, h, v in SHAPES if (n, h, v) in HEAVY]
GPU_SHAPES = [f"{n}x{h}x{v}" for n, h, v in CUDA_SHAPES]
CPU, GPU = (
    "bash scripts/bench.sh --full -k linear_cross_entropy",
    "MEMCORE_PY=python3 bash scripts/bench.sh --full -k cuda",
)
CPU_INTERLEAVED = CPU + "_interleaved (cut-cross-entropy importable)"
GOALS = [
    Goal("linear_accumulate fwd+bwd at least as fast as Cut Cross-Entropy's torch.compile route (interleaved)",
         "cpu", value("interleaved_ratio_to_cce", variant="linear", shape=CPU_SHAPES), "<=", 1.0, "{:.2f}x",
         CPU_INTERLEAVED),
    Goal("linear_accumulate peak ≤ half of Cut Cross-Entropy's, above the inputs", "cpu",
         ratio("peak_mib", "linear", "cce", scale=100, shape=CPU_SHAPES), "<=", 50.0, "{:.0f} %", CPU_INTERLEAVED),
    Goal("linear_accumulate peak ≤ 25 % of plain F.linear + F.cross_entropy's, above the inputs", "cpu",
         ratio("peak_mib", "linear", "plain", scale=100, shape=CPU_SHAPES), "<=", 25.0, "{:.1f} %", CPU),
    Goal("linear_accumulate fwd+bwd ≤ 1.15x plain F.linear + F.cross_entropy (interleaved)", "cpu",
         value("interleaved_ratio", variant="linear", shape=CPU_SHAPES), "<=", 1.15, "{:.2f}x", CPU_INTERLEAVED),
    Goal("linear_accumulate fwd+bwd at least as fast as Liger's fused linear cross-entropy", "cuda",
         ratio("median_ms", "linear", "liger", shape=GPU_SHAPES), "<=", 1.0, "{:.2f}x", GPU),
    Goal("linear_accumulate peak ≤ 2 GiB above the inputs", "cuda",
         value("peak_mib", scale=1 / 1024, variant="linear", shape=GPU_SHAPES), "<=", 2.0, "{:.2f} GiB", GPU),
]  # fmt: skip


def _problem(device, n, h, v):
    key = (device, n, h, v)
    if key not in _CACHE:
        _CACHE.clear()
        gc.collect()
        dtype = DTYPES[device]
        g = torch.Generator().manual_seed(n + h + v)
        hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
        weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), generator=g).to(device)
        index = torch.randperm(n, generator=g).to(device)
        _CACHE[key] = dict(
            device=device,
            dtype=dtype,
            hidden=hidden,
            weight=weight,
            targets=targets,
            index=index,
            tracker=memcore.Tracker(n, device=device),
            eager=torch.zeros(n, 6, dtype=torch.float64, device=device),
        )
        if device == "cuda" and LigerFusedLinearCrossEntropyLoss is not None:
            _CACHE[key]["liger"] = LigerFusedLinearCrossEntropyLoss()
    return _CACHE[key]


def _run(variant, p):
    h, w, t, i = p["hidden"], p["weight"], p["targets"], p["index"]
    if variant == "plain":
        loss = F.cross_entropy(F.linear(h, w), t)
    elif variant == "plain_eager":
        z = F.linear(h, w)
        rows = F.cross_entropy(z, t, reduction="none")
        p["eager"].index_add_(0, i, eager_stats(z, t, rows))
        loss = rows.mean()
    elif variant == "accumulate":
        loss = memcore.accumulate(F.linear(h, w), t, i, p["tracker"])
    elif variant == "liger":
        loss = p["liger"](w, h, t)
    elif variant == "cce":
        loss = cce_linear_cross_entropy(h, w, t, impl="torch_compile")
    else:
        loss = memcore.linear_accumulate(h, w, t, i, p["tracker"])
    loss.backward()
    sync(p["device"])
    return loss.detach()


def _clear(p):
    p["hidden"].grad = None
    p["weight"].grad = None


def _check(variant, p, shape):
    """Outside the timing: the loss equals plain's (kept from plain's run at the heavy shapes, where a
    second plain run would cost minutes; bf16 on CUDA: within bf16 rounding); at the tiny shape,
    linear's gradients equal plain's too."""
    _clear(p)
    if "plain_loss" not in p or shape not in HEAVY:
        p["plain_loss"] = _run("plain", p)
    ref_grads = (p["hidden"].grad, p["weight"].grad)
    _clear(p)
    if variant == "plain":
        return
    got = _run(variant, p)
    if p["dtype"] == torch.float32:
        torch.testing.assert_close(got, p["plain_loss"], rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(got.float(), p["plain_loss"].float(), **TOL[p["dtype"]])
    if shape not in HEAVY and p["device"] == "cpu":
        torch.testing.assert_close(p["hidden"].grad, ref_grads[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p["weight"].grad, ref_grads[1], rtol=1e-5, atol=1e-7)
    _clear(p)


def _cases():
    for device, shapes, variants in (("cpu", SHAPES, VARIANTS), ("cuda", CUDA_SHAPES, CUDA_VARIANTS)):
        for shape in shapes:
            for variant in variants:
                full = device == "cpu" and shape in HEAVY
                name = f"{device}-{'x'.join(map(str, shape))}-{dtype_name(DTYPES[device])}-{variant}"
                yield param(device, shape, variant, device=device, variant=variant, full=full, id=name)


@pytest.mark.parametrize("device,shape,variant", list(_cases()))
def test_linear_cross_entropy(benchmark, request, device, shape, variant):
    n, h, v = shape
    p = _problem(device, n, h, v)
    _check(variant, p, shape)
    peak = peak_mib(device, lambda: _run(variant, p))  # also the warm-up
    _clear(p)

    def target():
        return _run(variant, p)

    rounds = int(request.config.getoption("benchmark_min_rounds"))
    if benchmark.disabled:
        rounds = 1
    elif shape not in HEAVY or device == "cuda":  # heavy CPU shapes: min-rounds
        t0 = time.perf_counter()
        target()
        max_time = float(request.config.getoption("benchmark_max_time"))
        rounds = max(rounds, math.ceil(max_time / (time.perf_counter() - t0)))
    loss = measure(
        benchmark,
        request,
        target,
        lambda: _clear(p),
        rounds=rounds,
        warmup=0,
        suite="linear_cross_entropy",
        case="fwd+bwd",
        variant=variant,
        shape=f"{n}x{h}x{v}",
        dtype=dtype_name(p["dtype"]),
        device=device,
        figures={"peak_mib": (peak, "MiB")},
        chunk_size=auto_chunk_size(n, v, p["dtype"], torch.device(device), h),
    )
    _clear(p)
    assert torch.isfinite(loss.float())


INTERLEAVED = ("plain", "linear", "cce")


@pytest.mark.parametrize(
    "shape", [param(s, device="cpu", full=s in HEAVY, id="cpu-" + "x".join(map(str, s))) for s in SHAPES]
)
def test_linear_cross_entropy_interleaved(benchmark, request, shape):
    n, h, v = shape
    p = _problem("cpu", n, h, v)
    variants = [x for x in INTERLEAVED if x != "cce" or cce_linear_cross_entropy is not None]
    peaks = {}
    for variant in variants:
        _check(variant, p, shape)
        peaks[variant] = peak_mib("cpu", lambda: _run(variant, p))  # also the warm-up (cce: compiles)
        _clear(p)

    def timed(variant):
        _clear(p)
        t0 = time.perf_counter()
        _run(variant, p)
        return time.perf_counter() - t0

    times: Dict[str, List[float]] = {}
    target = interleave({x: (lambda x=x: timed(x)) for x in variants}, times)
    rounds = 1 if benchmark.disabled else int(request.config.getoption("benchmark_min_rounds"))
    before = load_average()
    fields = dict(suite="linear_cross_entropy", case="fwd+bwd, interleaved", shape=f"{n}x{h}x{v}")
    measure(benchmark, request, target, rounds=rounds, warmup=0, variant="interleaved", dtype=dtype_name(p["dtype"]),
            device="cpu", timed=False, **fields)  # fmt: skip
    note = load_note(before, load_average())
    rows = interleaved_rows(times, {x: "plain" for x in variants if x != "plain"})
    if "cce" in times:  # linear against Cut Cross-Entropy round by round, as the goal reads it
        rows += paired_ratio_rows(times, "linear", "cce", "interleaved_ratio_to_cce")
    rows += [
        dict(variant=x, metric="peak_mib", value=peaks[x], unit="MiB")
        for x in variants
        if peaks[x] is not None
    ]
    benchmark.extra_info["rows"] = [dict(r, note=note) for r in rows]
    _clear(p)
