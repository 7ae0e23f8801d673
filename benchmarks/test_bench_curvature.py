"""memcore.curvature against the reference algorithm (benchmarks/curvature_reference.py: a Python
loop over probes recomputing the clean and the perturbed forward/backward for every probe) on a
small CNN with 1x28x28 (MNIST-sized) random inputs, batch 128, 10 probes.

    python -m pytest benchmarks/test_bench_curvature.py                       # timings (pytest-benchmark)
    python -m pytest benchmarks/test_bench_curvature.py --benchmark-disable   # quick: everything once
    python benchmarks/test_bench_curvature.py [--rounds 7]                     # the RESULTS.md table

Runs on CUDA when available, else on the CPU.
"""
import argparse
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
if __name__ == "__main__":  # as a script: this checkout's memcore, as `python -m pytest` from the root
    sys.path.insert(0, os.path.dirname(HERE))
from curvature_reference import reference_curvature, small_cnn  # noqa: E402

import memcore  # noqa: E402
from memcore.curvature import DEFAULT_MAX_ROWS  # noqa: E402

BATCH, N_PROBES, H = 128, 10, 1e-3
MAX_ROWS = DEFAULT_MAX_ROWS  # memcore's default memory budget (rows per forward/backward)
MAX_ROWS_BIG = 512
RANK_PROBES = 100  # probes per method for the rank agreement: the two use different random probes
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


METHODS = {"memcore": run_memcore, f"memcore_max_rows_{MAX_ROWS_BIG}": run_memcore_big, "reference": run_reference}


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
import re, sys, torch
sys.path.insert(0, {HERE!r})
from test_bench_curvature import METHODS, make_setup
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
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")]),
               # fixed glibc thresholds: large blocks are mmapped and returned on free, so memory kept
               # from the warm-up call does not hide the second call's peak
               MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"PEAK (\S+)", out.stdout)
    return float(m.group(1)) if m else None


# ------------------------------------------------------------------------------ pytest
@pytest.fixture(scope="module")
def setup():
    return make_setup()


@pytest.mark.parametrize("method", list(METHODS))
def test_bench_curvature(benchmark, setup, method):
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


# ------------------------------------------------------------------------------ report
def _time(f: Callable[[], object]) -> Tuple[float, float]:
    """(wall seconds, process CPU seconds over all threads) of one call."""
    t, c = time.perf_counter(), time.process_time()
    f()
    _sync()
    return time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Prints the curvature rows of benchmarks/RESULTS.md")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    model, x, y = make_setup()
    for f in METHODS.values():  # warm-up
        f(model, x, y)
    times: Dict[str, List[float]] = {m: [] for m in METHODS}
    cpu: Dict[str, List[float]] = {m: [] for m in METHODS}
    for _ in range(args.rounds):  # interleaved, so a busy neighbour slows both alike
        for m, f in METHODS.items():
            w, c = _time(lambda: f(model, x, y))
            times[m].append(w)
            cpu[m].append(c)
    torch.manual_seed(1)
    ref = run_reference(model, x, y, RANK_PROBES)
    rho = spearman(run_memcore(model, x, y, RANK_PROBES)["curvature"], ref["curvature"])
    peaks = {m: peak_memory_mib(m) for m in METHODS}
    print(f"device: {DEVICE} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}")
    print(f"shapes: small CNN, inputs [{BATCH}, 1, 28, 28] float32, n_probes={N_PROBES}, h={H}, "
          f"memcore max_rows={MAX_ROWS} (default) or {MAX_ROWS_BIG}; {args.rounds} interleaved rounds")
    print("| method | best s/batch | median s/batch | samples/s (best) | samples/s (median) "
          "| best CPU s/batch | peak extra memory |")
    print("|---|---|---|---|---|---|---|")
    for m, ts in times.items():
        ts = sorted(ts)
        best, med = ts[0], ts[len(ts) // 2]
        peak = f"{peaks[m]:.0f} MiB" if peaks[m] is not None else "not measured"
        print(f"| {m} | {best:.3f} | {med:.3f} | {BATCH / best:.0f} | {BATCH / med:.0f} | {min(cpu[m]):.3f} | {peak} |")
    b = {m: sorted(ts)[0] for m, ts in times.items()}
    md = {m: sorted(ts)[len(ts) // 2] for m, ts in times.items()}
    for m in METHODS:
        if m != "reference":
            print(f"speedup of {m} (reference time / its time): best {b['reference'] / b[m]:.2f}x, "
                  f"median {md['reference'] / md[m]:.2f}x, CPU time {min(cpu['reference']) / min(cpu[m]):.2f}x")
    print(f"Spearman rank correlation of the curvature scores ({RANK_PROBES} probes each): {rho:.4f}")


if __name__ == "__main__":
    main()
