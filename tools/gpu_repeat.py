"""Bit-for-bit repeats: ce_forward_reduce's outputs and a Tracker's scores after a few training steps
whose rows share sample ids (the tokens of a sequence), computed twice in this process and compared
bit for bit; a digest per case lets a second process be compared with the first.

    python -m tools.gpu_repeat --out a.jsonl                 # twice in-process; digests into a.jsonl
    python -m tools.gpu_repeat --out b.jsonl --compare a.jsonl   # and against another process's run

Cases: ce_forward_reduce (mean and sum) on the block-per-row launch and the split launch (few wide
rows), bfloat16 and float32; tracker scores through memcore.accumulate (default route and
overwrite_logits=True) and memcore.linear_accumulate. On the CPU (--small shapes) the same script
checks the CPU kernels. Exit status: 0 when every case repeats, 1 otherwise (each differing case is
named, with the outputs that differ).
"""

import argparse
import hashlib
import json
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import memcore

Outputs = Dict[str, torch.Tensor]


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def digest(outs: Outputs) -> Dict[str, str]:
    return {k: hashlib.sha256(_bytes(v)).hexdigest()[:16] for k, v in sorted(outs.items())}


def reduce_case(n: int, c: int, dtype: torch.dtype, device: str) -> Callable[[], Outputs]:
    def run() -> Outputs:
        g = torch.Generator(device=device).manual_seed(n + c)
        logits = (4 * torch.randn(n, c, device=device, generator=g)).to(dtype)
        targets = torch.randint(0, c, (n,), device=device, generator=g)
        targets[::7] = -100
        index = torch.arange(n, device=device)
        outs = {}
        for red, name in ((1, "mean"), (2, "sum")):
            res = torch.ops.memcore.ce_forward_reduce(logits, targets, index, n, -100, red)
            for k, v in zip(("out", "count", "loss", "lse", "row_stats", "status"), res):
                outs[f"{name}.{k}"] = v
        return outs

    return run


def tracker_case(b: int, t: int, v: int, route: str, device: str) -> Callable[[], Outputs]:
    """Three steps of a language-model head: logits [b, t, v] (bf16 on CUDA), one sample id per
    sequence (every token row of a sequence shares it) and ids repeated across steps."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    num_samples = 2 * b

    def run() -> Outputs:
        g = torch.Generator(device=device).manual_seed(11)
        tracker = memcore.Tracker(num_samples, device=device)
        losses = []
        for step in range(3):
            index = (torch.arange(b, device=device) * 3 + step) % num_samples
            targets = torch.randint(0, v, (b, t), device=device, generator=g)
            targets[:, -3:] = -100  # padding
            if route == "linear":
                h = 64
                hidden = torch.randn(b * t, h, device=device, generator=g).to(dtype).requires_grad_()
                weight = (torch.randn(v, h, device=device, generator=g) / h**0.5).to(dtype).requires_grad_()
                rows = index.repeat_interleave(t)
                loss = memcore.linear_accumulate(hidden, weight, targets.flatten(), rows, tracker)
                loss.backward()
                losses += [loss.detach(), hidden.grad, weight.grad]
            else:
                logits = (4 * torch.randn(b, t, v, device=device, generator=g)).to(dtype).requires_grad_()
                x = logits * 1  # a non-leaf, as a model's output is
                loss = memcore.accumulate(x, targets, index, tracker, overwrite_logits=route == "overwrite")
                loss.backward()
                losses += [loss.detach(), logits.grad]
        tracker.end_epoch()
        outs = {f"step.{i}": x for i, x in enumerate(losses)}
        outs.update({f"score.{k}": s for k, s in tracker.scores().items()})
        return outs

    return run


def all_cases(device: str, small: bool) -> List[Tuple[str, Callable[[], Outputs]]]:
    if small:
        red = [(64, 1000, torch.float32), (4, 50000, torch.float32)]
        trk = (4, 16, 300)
    else:  # the block-per-row launch, then the split launch (rows fewer than the SMs)
        red = [
            (3000, 1000, torch.bfloat16),
            (1500, 20000, torch.float32),
            (16, 50257, torch.bfloat16),
            (8, 131072, torch.float32),
        ]
        trk = (16, 128, 32000)
    out = [(f"ce_forward_reduce {n}x{c} {str(dt)[6:]}", reduce_case(n, c, dt, device)) for n, c, dt in red]
    out += [(f"tracker {route} {'x'.join(map(str, trk))}", tracker_case(*trk, route, device)) for route in
            ("default", "overwrite", "linear")]  # fmt: skip
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="-", help="JSON lines: one per case ('-': stdout)")
    ap.add_argument("--compare", help="an earlier run's --out: its digests must be these")
    ap.add_argument("--small", action="store_true", help="small shapes (the CPU)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not memcore.with_cuda():
        print("gpu_repeat: memcore was built without its CUDA kernels", file=sys.stderr)
        return 1
    before = {}
    if args.compare:
        with open(args.compare) as f:
            before = {r["case"]: r["digest"] for r in map(json.loads, f) if "digest" in r}
    out = sys.stdout if args.out == "-" else open(args.out, "w")
    bad = 0
    for name, run in all_cases(device, args.small or device == "cpu"):
        rec = dict(case=name, device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu")
        try:
            a, b = run(), run()
            differ = sorted(k for k in a if a[k].shape != b[k].shape or _bytes(a[k]) != _bytes(b[k]))
            rec.update(repeat=not differ, differ=differ, digest=digest(a))
            if name in before:
                other = [k for k, d in rec["digest"].items() if before[name].get(k) != d]
                rec.update(across_processes=not other, differ_across=other)
            ok = rec["repeat"] and rec.get("across_processes", True)
        except Exception as e:  # noqa: BLE001 - recorded; the next case still runs
            rec.update(error=repr(e)[:1000])
            ok = False
        bad += not ok
        out.write(json.dumps(rec) + "\n")
        out.flush()
        print(f"[repeat] {'ok  ' if ok else 'DIFF'} {name}" + ("" if ok else f": {rec}"), file=sys.stderr)
    if out is not sys.stdout:
        out.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
