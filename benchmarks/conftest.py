"""pytest options and machine info for the memcore kernel benchmarks.

Quick mode (default) skips the cases marked ``bench_full`` (the multi-GiB CPU shapes); full mode
runs them too:

    pytest benchmarks/ --bench-full            # or MEMCORE_BENCH_FULL=1 pytest benchmarks/
    pytest benchmarks/ --benchmark-disable     # CI smoke run: every benchmark body runs once
    pytest benchmarks/ --bench-threads=1       # or MEMCORE_BENCH_THREADS=1: torch CPU threads

On a shared machine, torch's default intra-op thread pool can stall at its barriers while the
other processes hold the cores; --bench-threads=1 gives steadier CPU figures there. The thread
count is recorded with every result.
"""
import os
import platform

import pytest

from machine import cpu_model

FULL_ENV = "MEMCORE_BENCH_FULL"
THREADS_ENV = "MEMCORE_BENCH_THREADS"


def pytest_addoption(parser):
    parser.addoption(
        "--bench-full",
        action="store_true",
        default=False,
        help=f"also run the heavy benchmark cases (marked bench_full); same as {FULL_ENV}=1",
    )
    parser.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help=f"torch.set_num_threads for the CPU benchmarks (default: torch's; or {THREADS_ENV})",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_full: heavy benchmark case, runs only with --bench-full")
    threads = config.getoption("--bench-threads", default=None) or os.environ.get(THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def full_mode(config) -> bool:
    env = os.environ.get(FULL_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(config.getoption("--bench-full", default=False))


def pytest_collection_modifyitems(config, items):
    if full_mode(config):
        return
    skip = pytest.mark.skip(reason=f"heavy case: run with --bench-full or {FULL_ENV}=1")
    for item in items:
        if "bench_full" in item.keywords:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Stores what report.py's header needs in the JSON, so it can be rendered anywhere later."""
    import torch

    import memcore

    info = {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "memcore_version": memcore.__version__,
        "memcore_with_cuda": bool(memcore.with_cuda()) if callable(memcore.with_cuda) else None,
        "cpu_isa": memcore._ops._C.cpu_isa(),
        "cuda_available": torch.cuda.is_available(),
        "full_mode": full_mode(config),
    }
    if torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    machine_info["memcore"] = info
