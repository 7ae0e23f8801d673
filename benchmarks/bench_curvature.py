"""The curvature family: memcore.curvature against the reference algorithm (curvature_reference.py: a Python
loop over probes recomputing the clean and the perturbed forward/backward for every probe) on a
small CNN with 1x28x28 (MNIST-sized) random inputs, batch 128, 10 probes.

    python -m pytest benchmarks/bench_curvature.py                       # timings (pytest-benchmark)
    python -m pytest benchmarks/bench_curvature.py --benchmark-disable   # quick: everything once
    python -m benchmarks.bench_curvature [--rounds 15] [--write]         # figures into the store

Runs on CUDA when available, else on the CPU.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

import memcore
from benchmarks import store
from benchmarks.curvature_reference import reference_curvature, small_cnn
from benchmarks.goals import Goal, ratio, value
from memcore.curvature import DEFAULT_MAX_ROWS

BATCH, N_PROBES, H = 128, 10, 1e-3
MAX_ROWS = DEFAULT_MAX_ROWS  # memcore's default memory budget (rows per forward/backward)
MAX_ROWS_BIG = 512
RANK_PROBES = 100  # probes per method for the rank agreement: the two use different random probes
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TITLE = "Input-loss curvature: memcore.curvature vs the reference algorithm"
NOTES = """
Seconds per batch of `small_cnn` (benchmarks/curvature_reference.py, 10 classes) over interleaved rounds:
best and median wall time, best process CPU time. *reference*: `benchmarks/curvature_reference.py`, the
public implementation's algorithm (per probe a clean and a perturbed forward and one backward).
*memcore*: `memcore.curvature` (one clean pass, probes batched into passes of at most max_rows rows;
memcore_max_rows_512: 512 rows). Per batch memcore runs n + 1 forward/backward passes, the reference
2n, so where the model's passes dominate the speedup is about 2n/(n+1) = 1.82x at 10 probes. Peak:
extra memory of one call; CPU: resident-set high-water mark above the RSS before the call (fresh
process, after a warm-up call); CUDA: `torch.cuda.max_memory_allocated` above the allocation before
the call. spearman_vs_reference: rank correlation of the two methods' scores on the same model and
inputs (different random probes).
"""
CPU_COMMAND = "python -m benchmarks.bench_curvature --rounds 15 --write"
SPEEDUP = ratio("best_s", "reference", "memcore", case="10 probes")
GOALS = [
    Goal("curvature ≥ 2x faster than the reference algorithm (10 probes, best round)", "cpu", SPEEDUP,
         ">=", 2.0, "{:.2f}x", CPU_COMMAND),
    Goal("curvature ranks like the reference (Spearman ≥ 0.95)", "cpu",
         value("spearman_vs_reference", label="{case}, {shape}"), ">=", 0.95, "{:.3f}", CPU_COMMAND),
    Goal("curvature ≥ 3x faster than the reference algorithm (10 probes, best round)", "cuda", SPEEDUP,
         ">=", 3.0, "{:.2f}x", "python3 -m benchmarks.bench_curvature --rounds 15 --write"),
]  # fmt: skip


def make_setup(device: str = DEVICE, batch: int = BATCH):
    torch.manual_seed(0)
    model = small_cnn().to(device).eval()
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def run_memcore(model, x, y, n_probes: int = N_PROBES, max_rows: int = MAX_ROWS) -> Dict[str, torch.Tensor]:
    return memcore.curvature(model, x, y, n_probes=n_probes, h=H, max_rows=max_rows)


def run_memcore_big(model, x, y, n_probes: int = N_PROBES) -> Dict[str, torch.Tensor]:
    """A larger memory budget: 512 rows per pass."""
    return run_memcore(model, x, y, n_probes, max_rows=MAX_ROWS_BIG)


def run_reference(model, x, y, n_probes: int = N_PROBES) -> Dict[str, torch.Tensor]:
    return reference_curvature(model, x, y, n_probes=n_probes, h=H)


METHODS = {
    "memcore": run_memcore,
    f"memcore_max_rows_{MAX_ROWS_BIG}": run_memcore_big,
    "reference": run_reference,
}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (continuous scores: no ties)."""
    ra = a.double().cpu().argsort().argsort().double()
    rb = b.double().cpu().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(method: str) -> Optional[float]:
    """Peak extra memory of one call, in MiB: CUDA max_memory_allocated on GPU; on the CPU the
    resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the RSS before
    the call, measured in a fresh process after one warm-up call, with glibc returning large
    blocks to the system on free. None where neither works."""
    code = f"""
import re, torch
from benchmarks.bench_curvature import METHODS, make_setup
model, x, y = make_setup()
f = METHODS[{method!r}]
f(model, x, y)
if torch.cuda.is_available():
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    f(model, x, y); torch.cuda.synchronize()
    print("PEAK", (torch.cuda.max_memory_allocated() - base) / 2**20)
else:
    def status(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    f(model, x, y)
    print("PEAK", (status("VmHWM") - base) / 1024)
"""
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(memcore.__file__)))  # the memcore in use
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([pkg_root, str(store.ROOT), os.environ.get("PYTHONPATH", "")]),
        # fixed glibc thresholds: large blocks are mmapped and returned on free, so memory kept
        # from the warm-up call does not hide the second call's peak
        MALLOC_MMAP_THRESHOLD_="131072",
        MALLOC_TRIM_THRESHOLD_="131072",
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"PEAK (\S+)", out.stdout)
    return float(m.group(1)) if m else None


# ------------------------------------------------------------------------------ pytest
@pytest.fixture(scope="module")
def setup():
    return make_setup()


@pytest.mark.parametrize("method", list(METHODS))
def test_curvature(benchmark, setup, method):
    model, x, y = setup
    f = METHODS[method]

    def call():
        out = f(model, x, y)
        _sync()
        return out

    out = benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    assert out["curvature"].shape == (BATCH,) and torch.isfinite(out["curvature"]).all()
    benchmark.extra_info.update(device=DEVICE, batch=BATCH, n_probes=N_PROBES)
    if benchmark.stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["samples_per_s"] = BATCH / benchmark.stats.stats.mean


def test_rank_agreement_with_reference(setup):
    """Both estimate the same per-sample quantity: with enough probes their rankings agree."""
    model, x, y = setup
    torch.manual_seed(1)
    ref = run_reference(model, x, y, RANK_PROBES)
    ours = run_memcore(model, x, y, RANK_PROBES)
    rho = spearman(ours["curvature"], ref["curvature"])
    assert rho >= 0.95, rho
    # same units: per-sample loss, gradient difference norm
    ratio = float(ours["curvature"].mean() / ref["curvature"].mean())
    assert 0.9 < ratio < 1.1, ratio


def test_peak_memory_is_measurable():
    if DEVICE == "cpu" and not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs: cannot reset the RSS high-water mark")
    peaks = {m: peak_memory_mib(m) for m in METHODS}
    assert all(p is not None and p >= 0 for p in peaks.values()), peaks


# ------------------------------------------------------------------------------ script: interleaved rounds -> store
def _time(f: Callable[[], object]) -> Tuple[float, float]:
    """(wall seconds, process CPU seconds over all threads) of one call."""
    t, c = time.perf_counter(), time.process_time()
    f()
    _sync()
    return time.perf_counter() - t, time.process_time() - c


def measure(rounds: int, extra_probes: int = 0, extra_rounds: int = 5) -> Dict[str, object]:
    """Times every method over interleaved rounds, then the rank agreement and peak memory."""
    model, x, y = make_setup()
    for f in METHODS.values():  # warm-up
        f(model, x, y)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    wall: Dict[str, List[float]] = {m: [] for m in METHODS}
    cpu: Dict[str, List[float]] = {m: [] for m in METHODS}
    for _ in range(rounds):  # interleaved, so a busy neighbour slows every method alike
        for m, f in METHODS.items():
            w, c = _time(lambda: f(model, x, y))
            wall[m].append(w)
            cpu[m].append(c)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    extra: Dict[str, List[float]] = {"memcore": [], "reference": []}
    for _ in range(extra_rounds if extra_probes else 0):  # the same at more probes per sample
        for m in extra:
            extra[m].append(_time(lambda: METHODS[m](model, x, y, extra_probes))[0])
    torch.manual_seed(1)
    ref = run_reference(model, x, y, RANK_PROBES)
    rho = spearman(run_memcore(model, x, y, RANK_PROBES)["curvature"], ref["curvature"])
    return dict(
        wall=wall,
        cpu=cpu,
        rho=rho,
        peaks={m: peak_memory_mib(m) for m in METHODS},
        date=start,
        load=(load0, load1),
        rounds=rounds,
        extra=extra,
        extra_probes=extra_probes,
    )


def rows(r: Dict[str, object], note: str = "") -> List[Dict[str, str]]:
    """The store rows of one measurement (benchmarks/store.py): per method its best, median and best
    CPU seconds and peak memory at N_PROBES probes, the best at the extra probe count, the Spearman."""
    commit, dirty = store.git_state()
    base = dict(
        suite="curvature",
        shape=f"{BATCH}x1x28x28",
        dtype="float32",
        device=DEVICE,
        machine=store.machine(torch.cuda.get_device_name(0) if DEVICE == "cuda" else None),
        threads=torch.get_num_threads(),
        date=r["date"],
        torch=torch.__version__,
        commit=commit,
        dirty=dirty,
        note="; ".join(
            filter(
                None,
                [
                    note,
                    "load average (1 min) before / after the timed rounds: {:.2f} / {:.2f}".format(*r["load"])
                    if r["load"][0] is not None
                    else "",
                ],
            )
        ),
    )
    out = []
    for m, wall in r["wall"].items():
        b = dict(base, case=f"{N_PROBES} probes", variant=m)
        out += [
            store.row(**b, metric="best_s", value=min(wall), unit="s"),
            store.row(**b, metric="median_s", value=sorted(wall)[len(wall) // 2], unit="s"),
            store.row(**b, metric="best_cpu_s", value=min(r["cpu"][m]), unit="s"),
            store.row(**b, metric="rounds", value=r["rounds"], unit="count"),
        ]
        if r["peaks"][m] is not None:
            out.append(store.row(**b, metric="peak_mib", value=r["peaks"][m], unit="MiB"))
    for m, wall in r["extra"].items():
        if wall:
            b = dict(base, case=f"{r['extra_probes']} probes", variant=m)
            out += [
                store.row(**b, metric="best_s", value=min(wall), unit="s"),
                store.row(**b, metric="rounds", value=len(wall), unit="count"),
            ]
    out.append(
        store.row(
            **dict(base, case=f"{RANK_PROBES} probes", variant="memcore"),
            metric="spearman_vs_reference",
            value=r["rho"],
            unit="rho",
        )
    )
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Measures the curvature benchmark over interleaved rounds and "
        "appends its figures to the benchmark store"
    )
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--note", default="", help="context stored with the figures (e.g. machine load)")
    p.add_argument(
        "--extra-probes", type=int, default=50, help="also time both methods at this many probes (0: skip)"
    )
    p.add_argument(
        "--write",
        nargs="?",
        const=str(store.STORE),
        default=None,
        help="append the figures to this store (default: benchmarks/results.csv); then run "
        "`python -m benchmarks.render`",
    )
    args = p.parse_args(argv)
    out = rows(measure(args.rounds, args.extra_probes), args.note)
    for row in out:
        print(row["case"], row["variant"], row["metric"], row["value"])
    if args.write:
        print(f"[memcore] stored {store.append(out, args.write)} rows in {args.write}")


if __name__ == "__main__":
    main()
