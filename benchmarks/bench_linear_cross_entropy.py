"""Fused linear + cross-entropy: memcore.linear_accumulate against the unfused ways, forward + backward.

Variants, each from the same hidden [N, H] and weight [V, H] leaves (their grads cleared between
rounds, outside the timing):

    plain        F.cross_entropy(F.linear(h, W), targets).backward()          - what training pays anyway
    plain_eager  plain with reduction "none" + the eager statistics (softmax / gather / max / argmax
                 and index_add_ of memcore's six columns into a float64 [S, 6] buffer)
    accumulate   memcore.accumulate(F.linear(h, W), targets, index, tracker).backward()
    linear       memcore.linear_accumulate(h, W, targets, index, tracker).backward()  (chunk_size=None)

Time: forward + backward. Memory: the peak the allocator handed out during one forward + backward
above what was allocated before it (the inputs), benchmarks/memory.py's probe; it includes the
gradients of hidden and weight, which every variant must produce. Goals (issue "LLM scale"): linear's
peak at most 25% of plain's, time at most 1.15x plain's. Figures go into benchmark.extra_info
(kernel "linear_cross_entropy", shape, dtype, variant, peak_mib, and the ratios against plain for
linear); with --bench-store (scripts/bench.sh) they become the store's suite "linear_cross_entropy"
rows, which RESULTS.md tables and judges against those goals.

Full mode (--bench-full or MEMCORE_BENCH_FULL=1) runs the issue's CPU shapes, N=4,096 H=1,024
V=32,000 and N=2,048 H=2,048 V=128,256 fp32 (minutes per variant on a small CPU); quick mode a tiny
shape. On CUDA (either mode) the issue's GPU shape, N=8,192 H=4,096 V=128,256 bf16, with one more
variant where liger_kernel imports:

    liger        liger_kernel's LigerFusedLinearCrossEntropyLoss()(W, h, targets).backward()

Every case first checks, outside the timing, that its loss equals plain's (and, at the tiny shape,
that linear's gradients do), so --benchmark-disable runs also catch wrong results.

    pytest benchmarks/test_bench_linear_ce.py --bench-full --benchmark-min-rounds=1 \\
        --benchmark-json=/tmp/bench_linear.json
"""

import gc
import math
import time

import pytest
import torch
import torch.nn.functional as F

import memcore
from benchmarks.memory import peak_mib
from benchmarks.test_bench_cross_entropy import HAS_CUDA, TOL, _sync
from memcore.linear_accumulate import auto_chunk_size

SHAPES = [(256, 64, 1001), (4096, 1024, 32000), (2048, 2048, 128256)]  # (N, H, V), CPU
HEAVY = {(4096, 1024, 32000), (2048, 2048, 128256)}
CUDA_SHAPES = [(8192, 4096, 128256)]  # the GPU shape (an LLM head), either mode
VARIANTS = ("plain", "plain_eager", "accumulate", "linear")
CUDA_VARIANTS = VARIANTS + ("liger",)
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
_CACHE: dict = {}  # the problem of the current shape, shared by its variants
_RESULTS: dict = {}  # (device, shape, variant) -> (seconds, peak_mib), for the ratios of the linear rows

try:  # optional baseline: liger's fused linear cross-entropy (Triton, CUDA only)
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
except Exception:  # noqa: BLE001 - not installed, or its triton import failed
    LigerFusedLinearCrossEntropyLoss = None
HAS_LIGER = LigerFusedLinearCrossEntropyLoss is not None


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
        if device == "cuda" and HAS_LIGER:
            _CACHE[key]["liger"] = LigerFusedLinearCrossEntropyLoss()
    return _CACHE[key]


def _eager_stats(z, targets, loss_rows):
    with torch.no_grad():
        t = targets[:, None]
        p = z.softmax(-1).gather(1, t).squeeze(1)
        other = z.scatter(1, t, float("-inf")).amax(1)
        margin = z.gather(1, t).squeeze(1) - other
        correct = (z.argmax(-1) == targets).to(p.dtype)
        return torch.stack([loss_rows.detach(), torch.ones_like(p), correct, p, p * p, margin], 1).double()


def _run(variant, p):
    h, w, t, i = p["hidden"], p["weight"], p["targets"], p["index"]
    if variant == "plain":
        loss = F.cross_entropy(F.linear(h, w), t)
    elif variant == "plain_eager":
        z = F.linear(h, w)
        rows = F.cross_entropy(z, t, reduction="none")
        p["eager"].index_add_(0, i, _eager_stats(z.detach(), t, rows))
        loss = rows.mean()
    elif variant == "accumulate":
        loss = memcore.accumulate(F.linear(h, w), t, i, p["tracker"])
    elif variant == "liger":
        loss = p["liger"](w, h, t)
    else:
        loss = memcore.linear_accumulate(h, w, t, i, p["tracker"])
    loss.backward()
    _sync(p["device"])
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
    for shape in SHAPES:
        marks = [pytest.mark.bench_full] if shape in HEAVY else []
        for variant in VARIANTS:
            yield pytest.param(
                "cpu", shape, variant, marks=marks, id=f"cpu-{'x'.join(map(str, shape))}-float32-{variant}"
            )
    for shape in CUDA_SHAPES:
        for variant in CUDA_VARIANTS:
            marks = [pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")]
            if variant == "liger":
                marks.append(pytest.mark.skipif(not HAS_LIGER, reason="liger_kernel not importable"))
            yield pytest.param(
                "cuda", shape, variant, marks=marks, id=f"cuda-{'x'.join(map(str, shape))}-bfloat16-{variant}"
            )


@pytest.mark.parametrize("device,shape,variant", list(_cases()))
def test_linear_cross_entropy(benchmark, request, device, shape, variant):
    n, h, v = shape
    p = _problem(device, n, h, v)
    dtype = str(p["dtype"]).replace("torch.", "")
    _check(variant, p, shape)
    peak = peak_mib(device, lambda: _run(variant, p))  # also the warm-up
    _clear(p)

    def setup():
        _clear(p)

    def target():
        return _run(variant, p)

    rounds = 1
    if not benchmark.disabled and (shape not in HEAVY or device == "cuda"):  # heavy CPU: min-rounds
        t0 = time.perf_counter()
        target()
        once = time.perf_counter() - t0
        max_time = float(request.config.getoption("benchmark_max_time"))
        rounds = max(int(request.config.getoption("benchmark_min_rounds")), math.ceil(max_time / once))
    elif not benchmark.disabled:
        rounds = int(request.config.getoption("benchmark_min_rounds"))
    benchmark.group = f"linear_cross_entropy {n}x{h}x{v} {dtype} {device}"
    benchmark.extra_info.update(
        kernel="linear_cross_entropy",
        variant=variant,
        shape=f"{n}x{h}x{v}",
        n=n,
        h=h,
        v=v,
        dtype=dtype,
        device=device,
        threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(0) if device == "cuda" else None,
        peak_mib=peak,
        chunk_size=auto_chunk_size(n, v, p["dtype"], torch.device(device)),
    )
    loss = benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1)
    _clear(p)
    assert torch.isfinite(loss.float())
    if not benchmark.disabled and benchmark.stats is not None:
        _RESULTS[(device, shape, variant)] = (benchmark.stats.stats.min, peak)
        if variant == "linear" and (device, shape, "plain") in _RESULTS:
            t_plain, m_plain = _RESULTS[(device, shape, "plain")]
            t_lin, m_lin = _RESULTS[(device, shape, variant)]
            benchmark.extra_info.update(
                time_vs_plain=t_lin / t_plain,
                time_goal=1.15,
                peak_vs_plain=None if not (m_plain and m_lin) else m_lin / m_plain,
                peak_goal=0.25,
            )
