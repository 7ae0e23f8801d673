"""Launches every memcore op once per dtype and launch route, small shapes: the script the GPU check
runs under compute-sanitizer (memcheck, racecheck, synccheck), so each CUDA kernel instance is
checked without the test suite's thousands of launches.

    python -m tools.launch_all                      # every case on the GPU (the CPU where none)
    python -m tools.launch_all --profile out.jsonl  # also: which kernels ran (torch.profiler), and
                                                    # the __global__ kernels of csrc/cuda never launched

CASES is built from OPS (each registered ``memcore::`` op, the routes its CUDA launcher takes) and
DTYPES (every dtype the CUDA kernels dispatch on); tests/test_gpu_scripts.py checks, on the CPU, that
OPS names every registered op, that every case runs, and that each cross-entropy route lands on its
launch shape (``dispatch_shape`` and the split decision in csrc/cuda/cross_entropy.cu) on 108- and
132-SM GPUs. Each case synchronizes after its launches, so a fault is reported against its case.
Exit status: 0, or 1 when a case raised or (--profile) a kernel of csrc/cuda never ran.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

import memcore

ROOT = Path(__file__).resolve().parents[1]
OPS_NS = torch.ops.memcore
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IGNORE = -100

# Cross-entropy launch routes: (rows, classes); rows 0: one more than the GPU has SMs. C is odd, so
# consecutive rows start at every 16-byte alignment (scalar head, packs, scalar tail); row 1 is
# ignored (the early-out path). dispatch_shape: a warp per row up to 2048 classes, 256 threads up to
# 16384, 512 above; but the split launch when the rows are fewer than the SMs and each row holds two
# 16 KiB slices (cerow::split_slices), which every row of over 16384 classes does.
CE_ROUTES: Dict[str, Tuple[int, int]] = {
    "warp, C <= 32": (5, 11),
    "warp": (5, 999),
    "block 256": (3, 3001),
    "block 512": (0, 16411),
    "split": (2, 40001),
}


class Case(NamedTuple):
    op: str
    route: str
    dtype: torch.dtype
    run: Callable[[], object]


def _gen(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _rows(n: int, c: int, dtype: torch.dtype, device: str):
    g = _gen(device, n * 100003 + c)
    logits = (3 * torch.randn(n, c, device=device, generator=g)).to(dtype)
    targets = torch.randint(0, c, (n,), device=device, generator=g)
    targets[1] = IGNORE
    return logits, targets, torch.arange(n, device=device)


def ce_shape(route: str, sms: int) -> Tuple[int, int]:
    n, c = CE_ROUTES[route]
    return (n or sms + 1), c


def _ce(op: str, n: int, c: int, dtype: torch.dtype, device: str) -> Callable[[], object]:
    def run():
        logits, targets, index = _rows(n, c, dtype, device)
        if op == "ce_forward":
            return OPS_NS.ce_forward(logits, targets, index, n, IGNORE)
        if op == "ce_forward_reduce":
            return [OPS_NS.ce_forward_reduce(logits, targets, index, n, IGNORE, r) for r in (1, 2)]
        if op == "ce_forward_grad_":
            return [OPS_NS.ce_forward_grad_(logits.clone(), targets, index, n, IGNORE, r) for r in (1, 2)]
        if op == "ce_backward":
            _, lse, _, _ = OPS_NS.ce_forward(logits, targets, index, n, IGNORE)
            grad_loss = torch.linspace(0.5, 1.5, n, device=device, dtype=lse.dtype)
            return OPS_NS.ce_backward(grad_loss, logits, targets, lse, IGNORE)
        raise AssertionError(op)

    return run


# The options route's launches (csrc/cuda/cross_entropy_options.cu): block-per-row shapes only, each
# with soft-capping on and off (CAP is a compile-time variant), smoothing with class weights and
# without, and the gradient's c term present and absent.
OPTION_ROUTES = ("warp", "block 256", "block 512")


def _ce_options(op: str, n: int, c: int, dtype: torch.dtype, device: str) -> Callable[[], object]:
    def run():
        logits, targets, index = _rows(n, c, dtype, device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        w = torch.linspace(0.5, 1.5, c, device=device, dtype=acc)
        out = []
        for cap, eps, weight in ((0.0, 0.1, None), (7.0, 0.2, w), (7.0, 0.0, None)):
            if op == "ce_forward_reduce_options":  # the options' loss, every reduction, and its backward
                for r in (0, 1, 2):
                    x = logits.detach().clone().requires_grad_()
                    res = OPS_NS.ce_forward_reduce_options(
                        x, targets, index, n, IGNORE, r, weight, eps, cap, 1e-3
                    )
                    res[0].sum().backward()
                    out.append((res, x.grad))
                continue
            if op == "ce_forward_grad_options_":  # both kernels, the backward in place; mean and sum
                for r in (1, 2):
                    out.append(
                        OPS_NS.ce_forward_grad_options_(
                            logits.clone(), targets, index, n, IGNORE, r, weight, eps, cap, 1e-3
                        )
                    )
                continue
            res = OPS_NS.ce_forward_options(logits, targets, index, n, IGNORE, cap, eps, weight)
            if op == "ce_forward_options":
                out.append(res)
                continue
            lse = res[1]
            a = torch.linspace(0.5, 1.5, n, device=device, dtype=acc)
            cc = a * 0.1 if eps else a[:0]
            out.append(OPS_NS.ce_backward_options(a, a * 0.9, cc, logits, targets, lse, IGNORE, cap, weight))
        return out

    return run


def _scale_unless_one(dtype: torch.dtype, device: str) -> Callable[[], object]:
    def run():
        grad = torch.randn(7, 333, device=device, generator=_gen(device, 1)).to(dtype)
        for s in (1.0, 0.5):  # 1: the kernel returns at once; 0.5: it scales every element
            OPS_NS.scale_unless_one_(grad, torch.tensor([s], device=device))
        return grad

    return run


def _sqnorm(d: int, dtype: torch.dtype, device: str) -> Callable[[], object]:
    def run():
        grad = torch.randn(4, d, device=device, generator=_gen(device, d)).to(dtype)
        scale = torch.tensor([1.0, 0.0, 2.0, 0.5], device=device, dtype=torch.float64)  # 0: row not read
        return OPS_NS.ce_input_sqnorm(grad, scale)

    return run


def _linear(op: str, dtype: torch.dtype, device: str, options: bool = False) -> Callable[[], object]:
    """The chunk loop, on the default route or (options) through the options ops with every option
    set; the backward then with a separate z-loss upstream, as a recomputed mean passes it."""
    n, h, v, chunk = 9, 16, 37, 4  # three chunks, the last one short

    def run():
        g = _gen(device, 5)
        hidden = torch.randn(n, h, device=device, generator=g).to(dtype)
        weight = (torch.randn(v, h, device=device, generator=g) / h**0.5).to(dtype)
        bias = torch.randn(v, device=device, generator=g).to(dtype)
        targets = torch.randint(0, v, (n,), device=device, generator=g)
        targets[2] = IGNORE
        index = torch.arange(n, device=device)
        mask = [True, True, True]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        opts = (torch.linspace(0.5, 1.5, v, device=device, dtype=acc), 0.1, 7.0, 1e-2) if options else ()
        if op == "linear_ce_forward":
            return OPS_NS.linear_ce_forward(
                hidden, weight, bias, targets, index, n, IGNORE, 1, chunk, mask, *opts
            )
        out = OPS_NS.linear_ce_forward(hidden, weight, bias, targets, index, n, IGNORE, 0, chunk, mask, *opts)
        grad_loss = torch.linspace(0.5, 1.5, n, device=device, dtype=out[3].dtype)
        grad_z = (grad_loss * 0.5,) if options else ()
        return OPS_NS.linear_ce_backward(
            grad_loss, hidden, weight, bias, targets, out[3], IGNORE, chunk, mask, *opts, *grad_z
        )

    return run


def _curvature(op: str, dtype: torch.dtype, device: str) -> Callable[[], object]:
    b, shape, probes = 3, (5, 67), 2  # 335 elements: a partial 128-element Philox block

    def run():
        index = torch.tensor([4, 0, 9], device=device)
        if op == "rademacher":
            return OPS_NS.rademacher(index, 7, 1, probes, list(shape), dtype)
        x = torch.randn(b, *shape, device=device, generator=_gen(device, 3)).to(dtype)
        if op == "rademacher_perturb":
            return OPS_NS.rademacher_perturb(x, index, 7, 1, probes, 1e-2)
        gp = torch.randn(probes, b, *shape, device=device, generator=_gen(device, 4)).to(dtype)
        return OPS_NS.probe_reduce(gp, x, index, 7, 1)

    return run


# op -> its routes: route name -> factory(dtype, device, SMs) of the case's callable
Factory = Callable[[torch.dtype, str, int], Callable[[], object]]
OPS: Dict[str, Dict[str, Factory]] = {
    **{
        op: {r: (lambda dt, dev, sms, op=op, r=r: _ce(op, *ce_shape(r, sms), dt, dev)) for r in CE_ROUTES}
        for op in ("ce_forward", "ce_forward_reduce", "ce_forward_grad_", "ce_backward")
    },
    **{
        op: {
            r: (lambda dt, dev, sms, op=op, r=r: _ce_options(op, *ce_shape(r, sms), dt, dev))
            for r in OPTION_ROUTES
        }
        for op in (
            "ce_forward_options",
            "ce_backward_options",
            "ce_forward_reduce_options",
            "ce_forward_grad_options_",
        )
    },
    "scale_unless_one_": {"grid-stride": lambda dt, dev, sms: _scale_unless_one(dt, dev)},
    # 16-byte packs where D is a multiple of the pack and the rows aligned; else the scalar loop
    "ce_input_sqnorm": {
        "packs": lambda dt, dev, sms: _sqnorm(64, dt, dev),
        "scalar": lambda dt, dev, sms: _sqnorm(63, dt, dev),
    },
    **{
        op: {
            "chunks": lambda dt, dev, sms, op=op: _linear(op, dt, dev),
            "options-chunks": lambda dt, dev, sms, op=op: _linear(op, dt, dev, options=True),
        }
        for op in ("linear_ce_forward", "linear_ce_backward")
    },
    **{
        op: {"rows": lambda dt, dev, sms, op=op: _curvature(op, dt, dev)}
        for op in ("rademacher", "rademacher_perturb", "probe_reduce")
    },
}


def registered_ops() -> List[str]:
    """The ``memcore::`` operators this build registers (without the namespace)."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted({n.split("::", 1)[1].split(".")[0] for n in names if n.startswith("memcore::")})


def cases(device: str, sms: int) -> List[Case]:
    """Every (op, route, dtype), shaped for a GPU of ``sms`` SMs."""
    return [
        Case(op, r, dt, f(dt, device, sms))
        for op, routes in OPS.items()
        for r, f in routes.items()
        for dt in DTYPES
    ]


def ce_route_on(route: str, dtype: torch.dtype, sms: int) -> str:
    """The launch the CUDA cross-entropy kernels take for a route's shape on a GPU with ``sms`` SMs:
    "split", or the block-per-row launch's class ("warp" / "block 256" / "block 512")."""
    n, c = ce_shape(route, sms)
    esize = torch.finfo(dtype).bits // 8
    if memcore._C._ce_split_slices(n, c, esize, sms) > 1:
        return "split"
    return "warp" if c <= 2048 else "block 256" if c <= 16384 else "block 512"


def global_kernels(src: Path = ROOT / "csrc" / "cuda") -> List[str]:
    """Names of the __global__ functions of the CUDA sources."""
    found = set()
    for f in sorted(src.glob("*.cu")) + sorted(src.glob("*.cuh")) + sorted(src.glob("*.h")):
        text = f.read_text()
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(", text):
            found.add(m.group(1))
    return sorted(found)


def _kernel_names(prof) -> List[str]:
    """Kernel names from a torch.profiler run (demangled, parameters dropped)."""
    names = set()
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            name = e.name.replace("(anonymous namespace)::", "")
            names.add(name.split("(")[0].replace("void ", "").strip())
    return sorted(names)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cuda where available, else cpu")
    ap.add_argument("--profile", help="JSON lines: each case's kernels, then the coverage of csrc/cuda")
    ap.add_argument("-k", default="", help="only cases whose 'op [route] dtype' contains this")
    ap.add_argument(
        "--skip", nargs="*", default=[], help="leave out the ops whose name contains one of these"
    )
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not memcore.with_cuda():
        print("launch_all: memcore was built without its CUDA kernels", file=sys.stderr)
        return 1
    missing = sorted(set(registered_ops()) - set(OPS))
    if missing:  # a new op must get its cases here before the GPU check can vouch for it
        print(f"launch_all: registered ops without cases in tools/launch_all.py: {missing}", file=sys.stderr)
        return 1
    if args.profile and device != "cuda":
        print("launch_all: --profile records CUDA kernels: it needs a GPU", file=sys.stderr)
        return 2
    out = open(args.profile, "w") if args.profile else None
    ran: set = set()
    failed = 0
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132
    todo = [
        c
        for c in cases(device, sms)
        if args.k in f"{c.op} [{c.route}] {str(c.dtype)[6:]}" and not any(s in c.op for s in args.skip)
    ]
    t0 = time.perf_counter()
    for c in todo:
        name = f"{c.op} [{c.route}] {str(c.dtype)[6:]}"
        if c.route in CE_ROUTES:
            name += f" -> {ce_route_on(c.route, c.dtype, sms)}"
        try:
            if out:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    c.run()
                    torch.cuda.synchronize()
                kernels = _kernel_names(prof)
                ran.update(kernels)
                out.write(json.dumps(dict(case=name, kernels=kernels)) + "\n")
            else:
                c.run()
                if device == "cuda":
                    torch.cuda.synchronize()
            print(f"[launch_all] ok   {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported per case; the others still run
            failed += 1
            print(f"[launch_all] FAIL {name}: {e!r}"[:2000], flush=True)
            if out:
                out.write(json.dumps(dict(case=name, error=repr(e)[:2000])) + "\n")
    status = 1 if failed else 0
    if out and not ran and todo:
        # no kernel at all: the profiler could not trace (CUPTI refused, say), not a coverage finding
        print(
            "[launch_all] torch.profiler recorded no CUDA kernel: the kernel coverage is unknown", flush=True
        )
        out.write(json.dumps(dict(case="coverage", error="torch.profiler recorded no CUDA kernel")) + "\n")
        out.close()
        return 1
    if out:
        launched = {re.sub(r"<.*", "", k).split("::")[-1] for k in ran}
        never = [k for k in global_kernels() if k not in launched]
        out.write(json.dumps(dict(case="coverage", kernels=global_kernels(), never_launched=never)) + "\n")
        out.close()
        if never:
            print(f"[launch_all] kernels of csrc/cuda never launched: {never}", flush=True)
            status = 1
    print(
        f"[launch_all] {len(todo) - failed}/{len(todo)} cases on {device} in {time.perf_counter() - t0:.1f} s"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
