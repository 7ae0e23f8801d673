"""docs/distributed.md's torchrun commands run as written (2 gloo processes), replicated and sharded,
and print the same highest-CSL samples."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    """The doc's `torchrun ...` lines, in order."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    return re.findall(r"^(torchrun .+)$", text, flags=re.M)


@pytest.mark.slow
def test_torchrun_commands_of_the_docs_run_and_agree():
    commands = _commands()
    assert [c.endswith("--shard") for c in commands] == [False, True], commands
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    reports = []
    for command in commands:
        # torchrun is `python -m torch.distributed.run`; this Python's, with the memcore under test
        argv = [sys.executable, "-m", "torch.distributed.run", *command.split()[1:]]
        r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]
        found = re.search(
            r"^(replicated|sharded) over 2 ranks, 5 epochs: (.*)\ntop 10 by CSL: (.*)$", r.stdout, re.M
        )
        assert found, r.stdout
        reports.append(found.groups())
    (mode_a, count_a, top_a), (mode_b, count_b, top_b) = reports
    assert (mode_a, mode_b) == ("replicated", "sharded")
    assert (count_a, top_a) == (count_b, top_b)
