"""pytest options for the memcore benchmarks, and the hook that stores their figures.

Quick mode (default) skips the cases marked ``bench_full`` (the multi-GiB CPU shapes); full mode
runs them too:

    pytest benchmarks/ --bench-full            # or MEMCORE_BENCH_FULL=1 pytest benchmarks/
    pytest benchmarks/ --benchmark-disable     # CI smoke run: every benchmark body runs once, nothing stored
    pytest benchmarks/ --bench-threads=1       # or MEMCORE_BENCH_THREADS=1: torch CPU threads
    pytest benchmarks/ --benchmark-json=out.json --bench-store=benchmarks/results.csv   # scripts/bench.sh

On a shared machine, torch's default intra-op thread pool can stall at its barriers while the
other processes hold the cores; --bench-threads=1 gives steadier CPU figures there. The thread
count is recorded with every result.
"""

import os
import platform

import pytest

from benchmarks import store

FULL_ENV = "MEMCORE_BENCH_FULL"
THREADS_ENV = "MEMCORE_BENCH_THREADS"
NOTE_ENV = "MEMCORE_BENCH_NOTE"


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
    parser.addoption(
        "--bench-store",
        default=None,
        help="append the measured figures to this CSV (benchmarks/results.csv); needs "
        f"--benchmark-json. {NOTE_ENV} is stored as each row's note",
    )


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=None) or os.environ.get(THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if config.getoption("--bench-store", default=None) and not config.getoption(
        "benchmark_json", default=None
    ):
        raise pytest.UsageError(
            "--bench-store needs --benchmark-json=FILE (the rows are made from that document)"
        )


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
    """What the store's rows name the machine by, kept in the JSON too."""
    import torch

    import memcore

    machine_info["memcore"] = {
        "platform": platform.platform(),
        "cpu_model": store.cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "cpu_isa": memcore.cpu_isa(),
        "torch_num_threads": torch.get_num_threads(),
        "full_mode": full_mode(config),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Appends this run's figures to the store (only with --bench-store: a smoke run stores nothing)."""
    path = config.getoption("--bench-store", default=None)
    if not path:
        return
    commit, dirty = store.git_state()
    rows = store.rows_from_pytest(output_json, commit, dirty, os.environ.get(NOTE_ENV, ""))
    n = store.append(rows, path)
    print(
        f"\n[memcore] stored {n} rows in {path} (commit {commit[:9] or '?'}{', dirty tree' if dirty != '0' else ''})"
    )
