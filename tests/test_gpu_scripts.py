"""The GPU session's parts that run without a GPU: the shell scripts (scripts/ and tools/) parse,
tools/deadline.py skips what has not started once the deadline has passed, and tools/gpu_quick.py
writes every case (the fused linear-CE included) on the CPU with --small and refuses the full shapes
there."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


SCRIPTS = sorted(
    str(p.relative_to(ROOT)) for folder in ("scripts", "tools") for p in (ROOT / folder).glob("*.sh")
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _pytest_with_deadline(tmp_path, deadline):
    (tmp_path / "test_two.py").write_text("def test_a():\n    pass\n\n\ndef test_b():\n    pass\n")
    env = dict(os.environ, MEMCORE_DEADLINE=str(deadline), PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tools.deadline", "-rs"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_deadline_skips_tests_not_started(tmp_path):
    late = _pytest_with_deadline(tmp_path, time.time() - 1)
    assert late.returncode == 0, late.stdout + late.stderr
    assert "2 skipped" in late.stdout and "past the run's deadline" in late.stdout
    early = _pytest_with_deadline(tmp_path, time.time() + 3600)
    assert early.returncode == 0 and "2 passed" in early.stdout, early.stdout + early.stderr


@pytest.mark.slow
def test_gpu_quick_small_writes_every_case(tmp_path):
    from tools import gpu_quick

    out = tmp_path / "quick.jsonl"
    assert gpu_quick.main(["--small", "--iters", "1", "--no-compile", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in recs if "error" in r], recs
    cases = [r["case"] for r in recs]
    expected = ["setup", "copy", "forward", "fwd+bwd memcore", "fwd+bwd F.cross_entropy", "overwrite memcore"]
    assert cases[: len(expected)] == expected
    assert cases[len(expected) : len(expected) + 2] == ["linear-CE plain", "linear-CE memcore"]
    assert cases[-1] == "overwrite memcore" and recs[-1]["shape"] == "64x4001"
    lin = recs[len(expected) + 1]
    assert lin["shape"] == "256x64x1001" and lin["ms"] > 0 and lin["chunk_size"] == 256
    for key in ("loss_err", "grad_hidden_err", "grad_weight_err"):
        assert lin[key] < 1e-5, (key, lin[key])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is visible")
def test_gpu_quick_without_gpu_says_so(tmp_path, capsys):
    from tools import gpu_quick

    out = tmp_path / "quick.jsonl"
    assert gpu_quick.main(["--out", str(out)]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err
    assert not out.exists()  # nothing measured, nothing written
