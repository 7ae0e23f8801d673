"""The GPU figures issue #18 asks for first, in about a minute: scripts/gpu_session.sh runs it right
after the CUDA tests, before the full benchmark suite, so a short device lease still brings them.

    python benchmarks/gpu_quick.py --out $OUT/quick.jsonl     # one JSON object per line, as measured

Cases (bf16, CUDA events, median of --iters after warm-up; in-place variants get a fresh copy of
the logits before each run, outside the timing):
    copy                    D2D copy of the 8192 x 32000 logits: the bandwidth the kernels are judged by
    forward 8192x32000      torch.ops.memcore.ce_forward alone (reads the logits once)
    fwd+bwd 8192x32000      memcore.accumulate(...).backward() (two reads, one write), liger,
                            torch.compile(F.cross_entropy), F.cross_entropy
    overwrite 8192x32000 and 8192x128256: accumulate(..., overwrite_logits=True).backward() (one
                            read + one write when the row stays in L2), liger at the same shape
    split 16x256000         few wide rows (the split launch: each row over several blocks): copy,
                            forward, fwd+bwd and overwrite as above; slices: what the launcher
                            picks on this GPU (1: one block per row)
GB/s counts the HBM traffic the case needs at the least (forward 1 pass, fwd+bwd 3, overwrite 2),
so it compares directly with the copy's (read + write). Each line is flushed as soon as it is
measured: whatever finished survives a timeout. Runs on the CPU with --small (a smoke test).
"""

import argparse
import json
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import memcore


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="-", help="JSON lines file ('-': stdout)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(F.cross_entropy)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = sys.stdout if args.out == "-" else open(args.out, "a")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"

    def emit(case: str, shape, seconds: float, passes: int, **extra) -> None:
        n, c = shape
        nbytes = n * c * torch.finfo(dtype).bits // 8
        rec = dict(
            case=case,
            shape=f"{n}x{c}",
            dtype=str(dtype).replace("torch.", ""),
            device=gpu,
            ms=round(seconds * 1e3, 4),
            gbs=round(passes * nbytes / seconds / 1e9, 1),
            passes=passes,
            **extra,
        )
        out.write(json.dumps(rec) + "\n")
        out.flush()

    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        LigerCrossEntropyLoss = None
    shapes = [(64, 1000), (64, 4001)] if args.small else [(8192, 32000), (8192, 128256)]
    for n, c in shapes:
        torch.manual_seed(0)
        master = torch.randn(n, c, device=device, dtype=dtype)
        targets = torch.randint(0, c, (n,), device=device)
        index = torch.arange(n, device=device)
        tracker = memcore.Tracker(n, device)
        box = {}

        def fresh():
            box["x"] = master.detach().clone().requires_grad_()

        # parity first (not timed): the loss and gradient memcore computes at this shape
        fresh()
        ref = master.float().detach().requires_grad_()
        F.cross_entropy(ref, targets).backward()
        x = box["x"]
        loss = memcore.accumulate(x, targets, index, tracker, overwrite_logits=True)
        loss.backward()
        err = dict(
            loss_err=abs(float(loss.detach()) - float(F.cross_entropy(master.float(), targets))),
            grad_err=float((x.grad.float() - ref.grad).abs().max()),
        )
        del ref
        if n * c == shapes[0][0] * shapes[0][1]:
            dst = torch.empty_like(master)
            emit("copy", (n, c), _time(lambda: dst.copy_(master), None, args.iters, device), 2)
            del dst
            emit(
                "forward",
                (n, c),
                _time(
                    lambda: torch.ops.memcore.ce_forward(master, targets, index, n, -100),
                    None,
                    args.iters,
                    device,
                ),
                1,
                **err,
            )

            def fwd_bwd():
                memcore.accumulate(box["x"], targets, index, tracker).backward()

            emit("fwd+bwd memcore", (n, c), _time(fwd_bwd, fresh, args.iters, device), 3)

            def plain():
                F.cross_entropy(box["x"], targets).backward()

            emit("fwd+bwd F.cross_entropy", (n, c), _time(plain, fresh, args.iters, device), 3)
        emit(
            "overwrite memcore",
            (n, c),
            _time(
                lambda: memcore.accumulate(
                    box["x"], targets, index, tracker, overwrite_logits=True
                ).backward(),
                fresh,
                args.iters,
                device,
            ),
            2,
            **err,
        )
        if LigerCrossEntropyLoss is not None and device == "cuda":
            lig = LigerCrossEntropyLoss()
            emit(
                "fwd+bwd liger",
                (n, c),
                _time(lambda: lig(box["x"], targets).backward(), fresh, args.iters, device),
                2,
            )
        if not args.no_compile and n * c == shapes[0][0] * shapes[0][1]:
            try:
                comp = torch.compile(F.cross_entropy)
                t0 = time.perf_counter()
                fresh()
                comp(box["x"], targets).backward()
                warm = time.perf_counter() - t0
                emit(
                    "fwd+bwd torch.compile",
                    (n, c),
                    _time(lambda: comp(box["x"], targets).backward(), fresh, args.iters, device),
                    3,
                    compile_s=round(warm, 1),
                )
            except Exception as e:  # noqa: BLE001  (no inductor toolchain on the machine: note it, go on)
                out.write(json.dumps(dict(case="fwd+bwd torch.compile", error=repr(e)[:300])) + "\n")
                out.flush()
        master = box = None  # free the logits before the next shape (the closures are done with them)
        if device == "cuda":
            torch.cuda.empty_cache()
    _split_rows(args, device, dtype, emit)
    return 0


def _split_rows(args, device: str, dtype: torch.dtype, emit) -> None:
    """Few wide rows (issue #18, "few rows, huge vocabulary"): 16 x 256000, where one block per row
    would leave most SMs idle and the CUDA launcher splits each row over several blocks."""
    n, c = (4, 50000) if args.small else (16, 256000)
    torch.manual_seed(0)
    master = torch.randn(n, c, device=device, dtype=dtype)
    targets = torch.randint(0, c, (n,), device=device)
    index = torch.arange(n, device=device)
    tracker = memcore.Tracker(n, device)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 0
    slices = memcore._C._ce_split_slices(n, c, master.element_size(), sms) if device == "cuda" else 1
    box = {}

    def fresh():
        box["x"] = master.detach().clone().requires_grad_()

    fresh()
    ref = master.float().detach().requires_grad_()
    F.cross_entropy(ref, targets).backward()
    x = box["x"]
    loss = memcore.accumulate(x, targets, index, tracker, overwrite_logits=True)
    loss.backward()
    err = dict(
        loss_err=abs(float(loss.detach()) - float(F.cross_entropy(master.float(), targets))),
        grad_err=float((x.grad.float() - ref.grad).abs().max()),
        slices=slices,
    )
    dst = torch.empty_like(master)
    emit("copy", (n, c), _time(lambda: dst.copy_(master), None, args.iters, device), 2)
    fwd = lambda: torch.ops.memcore.ce_forward(master, targets, index, n, -100)  # noqa: E731
    emit("forward", (n, c), _time(fwd, None, args.iters, device), 1, **err)

    def fwd_bwd():
        memcore.accumulate(box["x"], targets, index, tracker).backward()

    emit("fwd+bwd memcore", (n, c), _time(fwd_bwd, fresh, args.iters, device), 3, slices=slices)

    def overwrite():
        memcore.accumulate(box["x"], targets, index, tracker, overwrite_logits=True).backward()

    emit("overwrite memcore", (n, c), _time(overwrite, fresh, args.iters, device), 2, **err)


if __name__ == "__main__":
    sys.exit(main())
