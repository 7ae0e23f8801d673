"""The GPU figures of the second GPU call (tools/gpu_bench.sh): bandwidth of each launch-shape class
of the cross-entropy kernels against a device-to-device copy of the same bytes, Liger, torch.compile
and the fused linear-CE case.

    python -m tools.gpu_bench --out $OUT/results.jsonl   # one JSON object per line, as measured
    python -m tools.gpu_bench --small --out x.jsonl      # tiny shapes on the CPU: a smoke test

Cases, most valuable first (bf16 unless named; CUDA events around back-to-back calls, median of
--rounds after warm-up). Per launch-shape class (SHAPES: the launch dispatch_shape and the split
decision in csrc/cuda/cross_entropy.cu take for it):
    copy        dst.copy_(logits): the bandwidth the kernels are judged by (read + write)
    forward     torch.ops.memcore.ce_forward (1 pass: the logits read once)
    fwd+bwd     ce_forward + ce_backward (3 passes: read, read, gradient written)
    overwrite   ce_forward_grad_, the gradient written over the logits (2 passes at the least: the
                second read comes from L2 while the rows in flight fit there)
  with, per class, the loss of its first and last 64 rows against F.cross_entropy in fp32 (the
  last rows of 8192 x 262144 lie past 2^31 elements) and, for the split class, the forward with the
  split forced off (the same 16 rows padded with ignored rows to as many rows as SMs: ce_forward
  reads nothing of an ignored row, and the block-per-row launch is taken from SMs rows on; the op
  has no other way to turn the split off, and fwd+bwd / overwrite have none at all, as their
  ignored rows get zero gradient rows written). Then:
    input sqnorm  ce_input_sqnorm, 16-byte packs (D = 4096) and the scalar path (D = 4095), fp32
    latency     one thread chasing pointers through 512 MiB (Triton): the DRAM latency that
                tools/sass_report.py's bytes-in-flight model assumes
    linear-CE   8192 x 4096 x 128256 fused linear + cross-entropy forward + backward: plain
                (F.linear + F.cross_entropy), memcore.linear_accumulate, Liger's fused loss: time,
                TFLOP/s (6 N H V), peak memory above the inputs, differences from plain
    accumulate  memcore.accumulate(...).backward() end to end (tracker commit included), default
                and overwrite_logits=True, with softcap=30 on both routes, F.cross_entropy, Liger's
                cross-entropy (with softcap=30 too), at 8192 x 32000 and 8192 x 128256
    torch.compile  torch.compile(F.cross_entropy) fwd+bwd at 8192 x 32000 (its compile time too)
GB/s counts the least HBM traffic of the case (the passes above), so it compares directly with the
copy's; pct_copy is that ratio. Each line is flushed as soon as measured; a case that raises writes
its error and the run goes on; a case not started before the deadline (MEMCORE_DEADLINE, seconds
since the epoch, or --deadline) is written as skipped. Without a GPU it says so and exits 2, unless
--small. The rows go into the results store with tools/gpu_store.py.
"""

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import memcore
from benchmarks.memory import peak_mib
from memcore.linear_cross_entropy import auto_chunk_size
from tools.gpu_store import tree_digest

OPS = torch.ops.memcore
try:  # the Liger baselines (liger-kernel: tools/gpu_wheels.sh); pytest-free, unlike benchmarks.common
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
except Exception:  # noqa: BLE001 - not installed, or its triton import failed
    LigerCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss = None

# launch-shape class -> (rows, classes), full and --small; bf16 logits (fp32 with --small on the CPU)
SHAPES = {
    "512-thread rows": ((8192, 32000), (64, 1000)),
    "warp rows, C <= 32": ((1048576, 10), (4096, 10)),
    "256-thread rows, C 2049-8192": ((32768, 4096), (64, 4096)),
    "split launch": ((16, 256000), (4, 50000)),
    "512-thread rows, N*C >= 2^31": ((8192, 262144), (8, 20000)),
    "512-thread rows, C 128256": ((8192, 128256), (16, 20001)),
    "warp rows": ((131072, 1000), (256, 999)),
    "256-thread rows, C 8193-16384": ((16384, 16384), (16, 16384)),
}
SQNORM = ((16384, 4096), (16384, 4095)), ((64, 256), (64, 255))
LINEAR = (8192, 4096, 128256), (256, 64, 1001)
ACCUMULATE = ((8192, 32000), (8192, 128256)), ((64, 1000), (64, 4001))
# seconds a case needs at the least: not started with less than that left before the deadline
NEEDS = {"linear-CE": 30.0, "accumulate": 20.0, "torch.compile": 90.0}


class Run:
    """The output stream, the device, the dtype of the logits and the deadline."""

    def __init__(self, out, device: str, rounds: int, deadline: float):
        self.out, self.device, self.rounds, self.deadline = out, device, rounds, deadline
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132

    def write(self, rec: dict) -> None:
        self.out.write(json.dumps(dict(rec, device=self.gpu)) + "\n")
        self.out.flush()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object], setup: Optional[Callable[[], None]] = None) -> float:
        """Median seconds per call of fn: CUDA events around back-to-back calls (enough for about
        a millisecond per round; one call per round where setup must run before each)."""
        for _ in range(2):
            if setup:
                setup()
            fn()
        self.sync()
        reps = 1
        if setup is None:
            t0 = time.perf_counter()
            fn()
            self.sync()
            reps = max(1, min(200, math.ceil(1e-3 / max(time.perf_counter() - t0, 1e-7))))
        times = []
        for _ in range(self.rounds):
            if setup:
                setup()
            self.sync()
            if self.device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(reps):
                    fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3 / reps)
            else:
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                times.append((time.perf_counter() - t0) / reps)
        times.sort()
        return times[len(times) // 2]

    def case(self, name: str, fn: Callable[[], None]) -> None:
        """fn(), unless the deadline is too near (then a skipped line); an error is written as a
        line and the run goes on."""
        need = next((v for k, v in NEEDS.items() if name.startswith(k)), 5.0)
        left = self.deadline - time.time()
        if left < need:
            self.write(dict(case=name, skipped=f"{left:.0f} s left before the deadline, needs {need:.0f} s"))
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded; the next case may still run
            self.write(dict(case=name, error=repr(e)[:500]))
        if self.device == "cuda":
            torch.cuda.empty_cache()


def _rows_err(loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Largest |loss - F.cross_entropy| (fp32 reference) over the first and last 64 rows."""
    n = logits.shape[0]
    err = 0.0
    for sl in (slice(0, min(64, n)), slice(max(0, n - 64), n)):
        ref = F.cross_entropy(logits[sl].float(), targets[sl], reduction="none")
        err = max(err, float((loss[sl].float() - ref).abs().max()))
    return err


def bandwidth(run: Run, cls: str, n: int, c: int) -> None:
    """copy, forward, fwd+bwd and overwrite at [n, c] (one line each); for the split launch the
    forward with the split off as well."""
    dev, dt = run.device, run.dtype
    g = torch.Generator(device=dev).manual_seed(n + c)
    logits = torch.randn(n, c, device=dev, dtype=dt, generator=g)
    targets = torch.randint(0, c, (n,), device=dev, generator=g)
    index = torch.arange(n, device=dev)
    nbytes = logits.numel() * logits.element_size()
    slices = memcore._C._ce_split_slices(n, c, logits.element_size(), run.sms)
    base = dict(case=cls, shape=f"{n}x{c}", dtype=str(dt)[6:], slices=slices)

    def emit(variant: str, seconds: float, passes: int, **extra) -> None:
        gbs = passes * nbytes / seconds / 1e9
        if variant != "copy" and copy_gbs:
            extra["pct_copy"] = round(100 * gbs / copy_gbs, 1)
        run.write(
            dict(base, variant=variant, ms=round(seconds * 1e3, 4), gbs=round(gbs, 1), passes=passes, **extra)
        )

    dst = torch.empty_like(logits)
    copy_s = run.time(lambda: dst.copy_(logits))
    copy_gbs = 0.0
    emit("copy", copy_s, 2)
    copy_gbs = 2 * nbytes / copy_s / 1e9
    dst = None  # freed before the kernels run
    loss, lse, _, status = OPS.ce_forward(logits, targets, index, n, -100)
    err = dict(loss_err=_rows_err(loss, logits, targets), status=int(status))
    emit("forward", run.time(lambda: OPS.ce_forward(logits, targets, index, n, -100)), 1, **err)
    if slices > 1:  # the same rows on the block-per-row launch: padded to SMs rows, the rest ignored
        m = max(run.sms, n)
        pad = torch.empty(m, c, device=dev, dtype=dt)
        pad[:n] = logits
        tp = torch.full((m,), -100, device=dev, dtype=targets.dtype)
        tp[:n] = targets
        ip = torch.arange(m, device=dev)
        assert memcore._C._ce_split_slices(m, c, logits.element_size(), run.sms) == 1
        lp = OPS.ce_forward(pad, tp, ip, m, -100)[0][:n]
        emit("forward, split off", run.time(lambda: OPS.ce_forward(pad, tp, ip, m, -100)), 1,
             loss_err=_rows_err(lp, logits, targets), padded_rows=m)  # fmt: skip
        del pad
    grad_loss = torch.ones(n, device=dev, dtype=lse.dtype)

    def fwd_bwd():
        lse = OPS.ce_forward(logits, targets, index, n, -100)[1]
        return OPS.ce_backward(grad_loss, logits, targets, lse, -100)

    grad = fwd_bwd()
    last = slice(max(0, n - 4), n)  # the gradient of the last rows (past 2^31 elements at 262144)
    want = logits[last].float().softmax(1) - F.one_hot(targets[last], c).float()
    emit("fwd+bwd", run.time(fwd_bwd), 3, grad_err=float((grad[last].float() - want).abs().max()))
    del grad
    buf = logits.clone()
    emit("overwrite", run.time(lambda: OPS.ce_forward_grad_(buf, targets, index, n, -100, 2)), 2)


def sqnorm(run: Run, cls: str, n: int, d: int) -> None:
    dev = run.device
    grad = torch.randn(n, d, device=dev, generator=torch.Generator(device=dev).manual_seed(d))
    scale = torch.ones(n, device=dev, dtype=torch.float64)
    dst = torch.empty_like(grad)
    copy_s = run.time(lambda: dst.copy_(grad))
    s = run.time(lambda: OPS.ce_input_sqnorm(grad, scale))
    nbytes = grad.numel() * grad.element_size()
    err = float((OPS.ce_input_sqnorm(grad, scale) - grad.double().pow(2).sum(1)).abs().max())
    base = dict(case=cls, shape=f"{n}x{d}", dtype="float32")
    run.write(dict(base, variant="copy", ms=round(copy_s * 1e3, 4), gbs=round(2 * nbytes / copy_s / 1e9, 1)))
    run.write(dict(base, variant="input sqnorm", ms=round(s * 1e3, 4), gbs=round(nbytes / s / 1e9, 1),
                   pct_copy=round(100 * nbytes / s / (2 * nbytes / copy_s), 1), sqnorm_err=err))  # fmt: skip


def latency(run: Run) -> None:
    """Idle DRAM latency: one thread follows a random cycle of pointers 512 B apart through
    512 MiB (each load a new line, far more lines than L2 holds), steps loads in a row."""
    import triton
    import triton.language as tl

    @triton.jit
    def chase(nxt, steps, out):
        i = tl.load(nxt)
        for _ in range(steps):
            i = tl.load(nxt + i)
        tl.store(out, i)

    stride, nodes, steps = 64, 2**20, 50000  # int64 entries: 512 B apart, 512 MiB
    perm = torch.randperm(nodes, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    nxt = torch.zeros(nodes * stride, device="cuda", dtype=torch.int64)
    nxt[perm * stride] = torch.roll(perm, -1) * stride  # one cycle through every node; the walk starts at 0
    out = torch.empty(1, device="cuda", dtype=torch.int64)
    chase[(1,)](nxt, 10, out)  # compile
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    chase[(1,)](nxt, steps, out)
    b.record()
    b.synchronize()
    run.write(dict(case="latency", variant="pointer chase", shape=f"{nodes}x{stride * 8}B",
                   latency_ns=round(a.elapsed_time(b) * 1e6 / steps, 1), steps=steps))  # fmt: skip


def linear_cross_entropy(run: Run, n: int, h: int, v: int) -> None:
    """Fused linear + cross-entropy forward + backward from hidden [n, h] and weight [v, h] leaves:
    plain (the logits materialised), memcore.linear_accumulate (auto chunk size), Liger's fused
    loss. Per variant: median time, TFLOP/s, peak MiB above the inputs, and the differences from
    plain's loss and gradients (relative to the largest gradient entry)."""
    device, dtype = run.device, run.dtype
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=g) / h**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    index = torch.arange(n, device=device)
    tracker = memcore.Tracker(n, device)
    variants = {
        "plain": lambda: F.cross_entropy(F.linear(hidden, weight), targets),
        "memcore": lambda: memcore.linear_accumulate(hidden, weight, targets, index, tracker),
    }
    if LigerFusedLinearCrossEntropyLoss is not None and device == "cuda":
        lig = LigerFusedLinearCrossEntropyLoss()
        variants["liger"] = lambda: lig(weight, hidden, targets)

    def clear():
        hidden.grad = weight.grad = None

    ref = {}
    for name, loss_fn in variants.items():

        def measure(name=name, loss_fn=loss_fn):
            clear()
            peak = peak_mib(device, lambda: loss_fn().backward())  # also the warm-up
            clear()
            loss = loss_fn()
            loss.backward()
            got = (float(loss.detach()), hidden.grad, weight.grad)
            clear()
            if name == "plain":
                ref.update(loss=got[0], gh=got[1], gw=got[2], peak=peak)
            extra = {}
            if ref and name != "plain":
                extra = dict(
                    loss_err=abs(got[0] - ref["loss"]),
                    grad_hidden_err=float((got[1] - ref["gh"]).abs().max() / ref["gh"].abs().max()),
                    grad_weight_err=float((got[2] - ref["gw"]).abs().max() / ref["gw"].abs().max()),
                )
                if ref.get("peak") and peak is not None:
                    extra["peak_vs_plain"] = round(peak / ref["peak"], 3)
            if name == "memcore":
                extra["chunk_size"] = auto_chunk_size(n, v, dtype, torch.device(device))
            del got
            seconds = run.time(lambda: loss_fn().backward(), clear)
            run.write(dict(case="linear-CE", variant=name, shape=f"{n}x{h}x{v}", dtype=str(dtype)[6:],
                           ms=round(seconds * 1e3, 3), tflops=round(6 * n * h * v / seconds / 1e12, 1),
                           peak_mib=None if peak is None else round(peak, 1), **extra))  # fmt: skip

        run.case(f"linear-CE {name}", measure)
        clear()


def accumulate(run: Run, n: int, c: int) -> None:
    """End to end fwd+bwd from a leaf of logits (a fresh copy before each call, untimed):
    memcore.accumulate (default, overwrite_logits=True, each with softcap=30 too; its tracker commit
    included), F.cross_entropy and Liger's cross-entropy (and with softcap=30)."""
    dev, dt = run.device, run.dtype
    g = torch.Generator(device=dev).manual_seed(c)
    master = torch.randn(n, c, device=dev, dtype=dt, generator=g)
    targets = torch.randint(0, c, (n,), device=dev, generator=g)
    index = torch.arange(n, device=dev)
    tracker = memcore.Tracker(n, dev)
    box = {}

    def fresh():
        box["x"] = master.detach().clone().requires_grad_()

    variants = {
        "memcore": (lambda: memcore.accumulate(box["x"], targets, index, tracker).backward(), 3),
        "memcore overwrite": (
            lambda: memcore.accumulate(box["x"], targets, index, tracker, overwrite_logits=True).backward(),
            2,
        ),
        # the options route (Gemma's soft-capping; its kernels, then in place with overwrite)
        "memcore softcap": (
            lambda: memcore.accumulate(box["x"], targets, index, tracker, softcap=30.0).backward(),
            3,
        ),
        "memcore softcap overwrite": (
            lambda: memcore.accumulate(
                box["x"], targets, index, tracker, softcap=30.0, overwrite_logits=True
            ).backward(),
            3,
        ),
        "F.cross_entropy": (lambda: F.cross_entropy(box["x"], targets).backward(), 3),
    }
    if LigerCrossEntropyLoss is not None and dev == "cuda":
        lig, lig_cap = LigerCrossEntropyLoss(), LigerCrossEntropyLoss(softcap=30.0)
        variants["liger"] = (lambda: lig(box["x"], targets).backward(), 2)
        variants["liger softcap"] = (lambda: lig_cap(box["x"], targets).backward(), 2)
    nbytes = master.numel() * master.element_size()
    for name, (fn, passes) in variants.items():

        def measure(name=name, fn=fn, passes=passes):
            s = run.time(fn, fresh)
            run.write(dict(case="accumulate", variant=name, shape=f"{n}x{c}", dtype=str(dt)[6:],
                           ms=round(s * 1e3, 4), gbs=round(passes * nbytes / s / 1e9, 1), passes=passes))  # fmt: skip

        run.case(f"accumulate {name}", measure)


def compiled(run: Run, n: int, c: int) -> None:
    """torch.compile(F.cross_entropy) fwd+bwd, its first call (the compile) timed separately."""
    dev, dt = run.device, run.dtype
    g = torch.Generator(device=dev).manual_seed(0)
    master = torch.randn(n, c, device=dev, dtype=dt, generator=g)
    targets = torch.randint(0, c, (n,), device=dev, generator=g)
    box = {}

    def fresh():
        box["x"] = master.detach().clone().requires_grad_()

    comp = torch.compile(F.cross_entropy)
    t0 = time.perf_counter()
    fresh()
    comp(box["x"], targets).backward()
    run.sync()
    warm = time.perf_counter() - t0
    s = run.time(lambda: comp(box["x"], targets).backward(), fresh)
    nbytes = master.numel() * master.element_size()
    run.write(dict(case="accumulate", variant="torch.compile", shape=f"{n}x{c}", dtype=str(dt)[6:],
                   ms=round(s * 1e3, 4), gbs=round(3 * nbytes / s / 1e9, 1), passes=3, compile_s=round(warm, 1)))  # fmt: skip


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="-", help="JSON lines file, appended to ('-': stdout)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--deadline", type=float, default=float(os.environ.get("MEMCORE_DEADLINE", "inf")),
                    help="seconds since the epoch: cases not started by then are skipped")  # fmt: skip
    ap.add_argument("--skip", nargs="*", default=[], help="leave out cases whose name starts with these")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.small:
        print(
            f"gpu_bench.py: no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda}): "
            "nothing measured. --small runs the tiny CPU smoke test.",
            file=sys.stderr,
        )
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = sys.stdout if args.out == "-" else open(args.out, "a")
    run = Run(out, device, args.rounds, args.deadline)
    if device == "cuda" and not memcore.with_cuda():
        run.write(dict(case="setup", error="memcore was built without its CUDA kernels"))
        return 1
    run.write(dict(case="setup", torch=torch.__version__, cuda=torch.version.cuda, sms=run.sms,
                   liger=LigerCrossEntropyLoss is not None, small=args.small, tree=tree_digest(),
                   date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))  # fmt: skip
    k = 1 if args.small else 0
    todo: Dict[str, Callable[[], None]] = {}
    for cls, shapes in SHAPES.items():
        todo[cls] = lambda cls=cls, nc=shapes[k]: bandwidth(run, cls, *nc)
    for (n, d), name in zip(SQNORM[k], ("input sqnorm, packs", "input sqnorm, scalar")):
        todo[name] = lambda n=n, d=d, name=name: sqnorm(run, name, n, d)
    if device == "cuda":
        todo["latency"] = lambda: latency(run)
    todo["linear-CE"] = lambda: linear_cross_entropy(run, *LINEAR[k])
    for n, c in ACCUMULATE[k]:
        todo[f"accumulate {n}x{c}"] = lambda n=n, c=c: accumulate(run, n, c)
    todo["torch.compile"] = lambda: compiled(run, *ACCUMULATE[k][0])  # last: longest, least needed
    for name, fn in todo.items():
        if not any(name.startswith(s) for s in args.skip):
            run.case(name, fn)
    if out is not sys.stdout:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
