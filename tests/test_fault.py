"""A fault on a real engine: torchrun (gloo, CPU) runs tests/torchrun_train.py on 4 processes with a
sharded Tracker and a checkpoint every few steps; one rank SIGKILLs itself mid-epoch; torchrun
restarts the group, which resumes from the last complete checkpoint; the final scores equal a
fault-free run's, bitwise. The same checkpoint resumed on 2 processes ends with them too. Every
launch runs under a timeout: a hang fails the test."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import memcore

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torchrun_train as run  # noqa: E402

pytestmark = [
    pytest.mark.slow,  # torchrun processes: the full tier
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available"),
]


def _torchrun(nproc, out, *args, restarts=0, timeout=240):
    root = os.path.dirname(os.path.dirname(os.path.abspath(memcore.__file__)))  # the memcore under test
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        # torchrun shares its rendezvous store with the workers by default, where a restarted group can
        # read the previous attempt's gloo addresses and fail to connect: a store per attempt instead
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={restarts}",
        "--monitor-interval=0.2",
        os.path.join(HERE, "torchrun_train.py"),
        "--out",
        out,
        *args,
    ]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish within {timeout} s: {e.stderr[-3000:] if e.stderr else ''}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return torch.load(os.path.join(out, "scores.pt"), weights_only=True)


def test_killed_rank_restarts_and_resumes_to_the_fault_free_scores(tmp_path):
    want = memcore.Tracker(run.N)
    run.train(want, 0, 1, torch.zeros(run.D, run.C))
    want = want.scores()
    assert want["forgetting"].sum() > 0 and not torch.isnan(want["csl_mean"]).any()

    out = str(tmp_path / "four")
    got = _torchrun(4, out, "--kill", "2:9", restarts=1)
    # the first attempt started at step 0 and died at step 9; the restart resumed after the save of step 7
    assert (
        open(os.path.join(out, "attempt-0")).read() == "0"
        and open(os.path.join(out, "attempt-1")).read() == "8"
    )
    assert torch.equal(got["index"], torch.arange(run.N))
    for k in want:
        assert torch.equal(got[k].nan_to_num(-1), want[k].nan_to_num(-1)), k

    # the checkpoint of step 7 (4 shards) resumed on 2 processes
    two = _torchrun(2, str(tmp_path / "two"), "--resume-from", os.path.join(out, "ckpt", "step-0007"))
    for k in want:
        assert torch.equal(two[k].nan_to_num(-1), want[k].nan_to_num(-1)), k
