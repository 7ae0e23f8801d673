"""pytest plugin for runs with a wall-clock deadline (tools/gpu_check.sh loads it with
``-p tools.deadline`` for its CUDA tests).

Once ``MEMCORE_DEADLINE`` (seconds since the epoch) has passed, every test not yet started is
skipped, so the session ends by itself: its summary is printed and, for the benchmarks,
pytest-benchmark's JSON and the store's rows are written (they are written only at the end of a
session). A run killed by ``timeout`` instead would bring back none of its figures.
"""

import os
import time

import pytest

DEADLINE_ENV = "MEMCORE_DEADLINE"


def pytest_runtest_setup(item):
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() >= float(deadline):
        pytest.skip(f"not started: past the run's deadline ({DEADLINE_ENV})")
