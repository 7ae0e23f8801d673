"""The headline GPU figures in about a minute: tools/gpu_session.sh runs it right after the CUDA
tests, before the full benchmark suite, so a run cut short still brings them.

    python -m tools.gpu_quick --out $OUT/quick.jsonl     # one JSON object per line, as measured

Cases, most valuable first (bf16, CUDA events, median of --iters after warm-up; in-place variants
get a fresh copy of the logits before each run, outside the timing):
    copy                    D2D copy of the 8192 x 32000 logits: the bandwidth the kernels are judged by
    forward 8192x32000      torch.ops.memcore.ce_forward alone (reads the logits once)
    fwd+bwd 8192x32000      memcore.accumulate(...).backward() (two reads, one write), F.cross_entropy,
                            liger
    overwrite 8192x32000    accumulate(..., overwrite_logits=True).backward() (one read + one write
                            when the row stays in L2)
    linear-CE 8192x4096x128256  fused linear + cross-entropy forward + backward (an LLM head):
                            F.cross_entropy(F.linear(h, W)) ("plain"), memcore.linear_accumulate,
                            liger's LigerFusedLinearCrossEntropyLoss; time, TFLOP/s (the three
                            GEMMs, 6 N H V), peak memory above the inputs (gradients of h and W
                            included), and the loss / gradient differences from plain
    split 16x256000         few wide rows (the CUDA split launch: each row over several blocks):
                            copy, forward, fwd+bwd and overwrite as above; slices: what the
                            launcher picks on this GPU (1: one block per row)
    overwrite 8192x128256   memcore and liger at the Llama-3 vocabulary
    torch.compile           torch.compile(F.cross_entropy) at 8192x32000 (its compile time too)
GB/s counts the HBM traffic the case needs at the least (forward 1 pass, fwd+bwd 3, overwrite 2),
so it compares directly with the copy's (read + write). Each line is flushed as soon as it is
measured: whatever finished survives a timeout. A case that raises writes its error and the run
goes on. Without a GPU it says so and exits 2, unless --small (tiny shapes on the CPU: a smoke
test of everything but the timings' meaning).
"""

import argparse
import json
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import memcore
from benchmarks.common import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
from benchmarks.memory import peak_mib
from memcore.linear_cross_entropy import auto_chunk_size


def _time(fn: Callable[[], None], setup: Optional[Callable[[], None]], iters: int, device: str) -> float:
    """Median seconds of fn over iters runs (setup before each, untimed)."""
    times = []
    for i in range(iters + 3):
        if setup:
            setup()
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn()
            b.record()
            b.synchronize()
            dt = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        if i >= 3:
            times.append(dt)
    times.sort()
    return times[len(times) // 2]


class Run:
    """The output stream and what every case needs: device, dtype, iterations."""

    def __init__(self, out, device: str, iters: int):
        self.out, self.device, self.iters = out, device, iters
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"

    def write(self, rec: dict) -> None:
        self.out.write(json.dumps(rec) + "\n")
        self.out.flush()

    def emit(self, case: str, shape, seconds: float, passes: int, **extra) -> None:
        """One memory-bound case: ms and the GB/s of its least HBM traffic (passes over the logits)."""
        n, c = shape
        nbytes = n * c * torch.finfo(self.dtype).bits // 8
        self.write(
            dict(
                case=case,
                shape=f"{n}x{c}",
                dtype=str(self.dtype).replace("torch.", ""),
                device=self.gpu,
                ms=round(seconds * 1e3, 4),
                gbs=round(passes * nbytes / seconds / 1e9, 1),
                passes=passes,
                **extra,
            )
        )

    def attempt(self, case: str, fn: Callable[[], None]) -> None:
        """fn(), or a line with its error: one failing case costs only its own figures."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded; the next case may still run
            self.write(dict(case=case, device=self.gpu, error=repr(e)[:500]))
        if self.device == "cuda":
            torch.cuda.empty_cache()


def _parity(master, targets, index, tracker) -> dict:
    """The loss and gradient memcore computes (overwrite mode, on a copy of master) against
    F.cross_entropy in fp32: the errors stored beside a shape's timings."""
    ref = master.float().detach().requires_grad_()
    F.cross_entropy(ref, targets).backward()
    x = master.detach().clone().requires_grad_()
    loss = memcore.accumulate(x, targets, index, tracker, overwrite_logits=True)
    loss.backward()
    return dict(
        loss_err=abs(float(loss.detach()) - float(F.cross_entropy(master.float(), targets))),
        grad_err=float((x.grad.float() - ref.grad).abs().max()),
    )


def cross_entropy(run: Run, n: int, c: int, first: bool) -> None:
    """memcore.accumulate at [n, c]: parity with F.cross_entropy, then the timings (the copy,
    forward-only and the non-overwriting variants at the first shape only)."""
    device, dtype, iters = run.device, run.dtype, run.iters
    torch.manual_seed(0)
    master = torch.randn(n, c, device=device, dtype=dtype)
    targets = torch.randint(0, c, (n,), device=device)
    index = torch.arange(n, device=device)
    tracker = memcore.Tracker(n, device)
    box = {}

    def fresh():
        box["x"] = master.detach().clone().requires_grad_()

    err = _parity(master, targets, index, tracker)  # first, not timed
    if first:
        dst = torch.empty_like(master)
        run.emit("copy", (n, c), _time(lambda: dst.copy_(master), None, iters, device), 2)
        del dst
        fwd = _time(
            lambda: torch.ops.memcore.ce_forward(master, targets, index, n, -100), None, iters, device
        )
        run.emit("forward", (n, c), fwd, 1, **err)

        def fwd_bwd():
            memcore.accumulate(box["x"], targets, index, tracker).backward()

        run.emit("fwd+bwd memcore", (n, c), _time(fwd_bwd, fresh, iters, device), 3)

        def plain():
            F.cross_entropy(box["x"], targets).backward()

        run.emit("fwd+bwd F.cross_entropy", (n, c), _time(plain, fresh, iters, device), 3)
    if LigerCrossEntropyLoss is not None and device == "cuda":
        lig = LigerCrossEntropyLoss()
        run.attempt(
            "fwd+bwd liger",
            lambda: run.emit(
                "fwd+bwd liger",
                (n, c),
                _time(lambda: lig(box["x"], targets).backward(), fresh, iters, device),
                2,
            ),
        )

    def overwrite():
        memcore.accumulate(box["x"], targets, index, tracker, overwrite_logits=True).backward()

    run.emit("overwrite memcore", (n, c), _time(overwrite, fresh, iters, device), 2, **err)


def split_rows(run: Run, n: int, c: int) -> None:
    """Few wide rows with a huge vocabulary: at 16 x 256000 one block per row
    would leave most SMs idle; the CUDA launcher splits each row over several blocks."""
    device, iters = run.device, run.iters
    torch.manual_seed(0)
    master = torch.randn(n, c, device=device, dtype=run.dtype)
    targets = torch.randint(0, c, (n,), device=device)
    index = torch.arange(n, device=device)
    tracker = memcore.Tracker(n, device)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 0
    slices = memcore._C._ce_split_slices(n, c, master.element_size(), sms) if device == "cuda" else 1
    box = {}

    def fresh():
        box["x"] = master.detach().clone().requires_grad_()

    err = dict(_parity(master, targets, index, tracker), slices=slices)
    dst = torch.empty_like(master)
    run.emit("copy", (n, c), _time(lambda: dst.copy_(master), None, iters, device), 2)
    fwd = _time(lambda: torch.ops.memcore.ce_forward(master, targets, index, n, -100), None, iters, device)
    run.emit("forward", (n, c), fwd, 1, **err)

    def fwd_bwd():
        memcore.accumulate(box["x"], targets, index, tracker).backward()

    run.emit("fwd+bwd memcore", (n, c), _time(fwd_bwd, fresh, iters, device), 3, slices=slices)

    def overwrite():
        memcore.accumulate(box["x"], targets, index, tracker, overwrite_logits=True).backward()

    run.emit("overwrite memcore", (n, c), _time(overwrite, fresh, iters, device), 2, **err)


def linear_cross_entropy(run: Run, n: int, h: int, v: int) -> None:
    """Fused linear + cross-entropy forward + backward from hidden [n, h] and weight [v, h] leaves:
    plain (the logits materialised), memcore.linear_accumulate (auto chunk size), liger's fused
    loss. Per variant: median time, TFLOP/s, peak MiB above the inputs, and the differences from
    plain's loss and gradients (relative to the largest gradient entry)."""
    device, dtype = run.device, run.dtype
    iters = max(3, run.iters // 2)  # ~40 ms a run at this shape on an H200: enough for a median
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
        case = f"linear-CE {name}"

        def measure(name=name, loss_fn=loss_fn, case=case):
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
            del got
            seconds = _time(lambda: loss_fn().backward(), clear, iters, device)
            rec = dict(
                case=case,
                shape=f"{n}x{h}x{v}",
                dtype=str(dtype).replace("torch.", ""),
                device=run.gpu,
                ms=round(seconds * 1e3, 3),
                tflops=round(6 * n * h * v / seconds / 1e12, 1),
                peak_mib=None if peak is None else round(peak, 1),
                **extra,
            )
            if ref.get("peak") and peak is not None and name != "plain":
                rec["peak_vs_plain"] = round(peak / ref["peak"], 3)
            if name == "memcore":
                rec["chunk_size"] = auto_chunk_size(n, v, dtype, torch.device(device))
            run.write(rec)

        run.attempt(case, measure)
        clear()


def compiled_cross_entropy(run: Run, n: int, c: int) -> None:
    """torch.compile(F.cross_entropy) fwd+bwd, its first call (the compile) timed separately."""
    device, dtype = run.device, run.dtype
    torch.manual_seed(0)
    master = torch.randn(n, c, device=device, dtype=dtype)
    targets = torch.randint(0, c, (n,), device=device)
    box = {}

    def fresh():
        box["x"] = master.detach().clone().requires_grad_()

    comp = torch.compile(F.cross_entropy)
    t0 = time.perf_counter()
    fresh()
    comp(box["x"], targets).backward()
    warm = time.perf_counter() - t0
    seconds = _time(lambda: comp(box["x"], targets).backward(), fresh, run.iters, device)
    run.emit("fwd+bwd torch.compile", (n, c), seconds, 3, compile_s=round(warm, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="-", help="JSON lines file, appended to ('-': stdout)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(F.cross_entropy)")
    ap.add_argument("--no-linear", action="store_true", help="skip the fused linear-CE case")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.small:
        print(
            f"gpu_quick.py: no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda}): "
            "nothing measured. --small runs the tiny CPU smoke test.",
            file=sys.stderr,
        )
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = sys.stdout if args.out == "-" else open(args.out, "a")
    run = Run(out, device, args.iters)
    if device == "cuda" and not memcore.with_cuda():
        run.write(dict(case="setup", error="memcore was built without its CUDA kernels"))
        return 1
    run.write(
        dict(
            case="setup",
            device=run.gpu,
            torch=torch.__version__,
            liger=LigerCrossEntropyLoss is not None,
            small=args.small,
        )
    )
    ce = [(64, 1000), (64, 4001)] if args.small else [(8192, 32000), (8192, 128256)]
    run.attempt("cross_entropy", lambda: cross_entropy(run, *ce[0], first=True))
    if not args.no_linear:
        shape = (256, 64, 1001) if args.small else (8192, 4096, 128256)
        run.attempt("linear-CE", lambda: linear_cross_entropy(run, *shape))
    run.attempt("split", lambda: split_rows(run, *((4, 50000) if args.small else (16, 256000))))
    run.attempt("cross_entropy", lambda: cross_entropy(run, *ce[1], first=False))
    if not args.no_compile:  # last: its compile takes longest and its figure matters least
        run.attempt("fwd+bwd torch.compile", lambda: compiled_cross_entropy(run, *ce[0]))
    if out is not sys.stdout:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
