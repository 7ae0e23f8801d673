"""Two gloo processes on CPU: every rank ends with the scores of a single-process run, input-gradient
statistics included; ranks whose trackers differ get a clear error. Sharded trackers: test_shard.py."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import init_gloo

import memcore

S, EPOCHS, BATCHES = 24, 3, 4


def _epochs():
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(EPOCHS):
        perm = torch.randperm(S, generator=g)
        batches = []
        for idx in perm.chunk(BATCHES):
            logits = torch.randn(len(idx), 5, generator=g) * 2
            targets = torch.randint(0, 5, (len(idx),), generator=g)
            batches.append((logits, targets, idx))
        out.append(batches)
    return out


def _worker(rank, world, init_file, out_file):
    sys.path.insert(0, os.path.dirname(__file__))
    init_gloo(rank, world, init_file)
    try:
        tracker = memcore.Tracker(S, device="cpu")
        for e, batches in enumerate(_epochs()):
            for b, (logits, targets, idx) in enumerate(batches):
                if b % world == rank:  # this rank's share, as a DistributedSampler would give
                    memcore.accumulate(logits, targets, idx, tracker)
            if e == EPOCHS - 1:
                open_scores = tracker.scores()  # open epoch, merged without closing it
            tracker.end_epoch()
        torch.save({"scores": tracker.scores(), "open": open_scores}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_match_single_process(tmp_path):
    single = memcore.Tracker(S)
    for batches in _epochs():
        for logits, targets, idx in batches:
            memcore.accumulate(logits, targets, idx, single)
        single.end_epoch()
    want = single.scores()

    out = str(tmp_path / "scores")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        for k in want:
            torch.testing.assert_close(
                got["scores"][k], want[k], rtol=1e-12, atol=1e-12, equal_nan=True, msg=k
            )
            torch.testing.assert_close(got["open"][k], want[k], rtol=1e-12, atol=1e-12, equal_nan=True, msg=k)


def _dist_worker(rank, world, init_file, out_file, mode):
    init_gloo(rank, world, init_file)
    try:
        if mode == "mismatch":
            tr = memcore.Tracker(24 + rank)  # the misuse: ranks disagree on num_samples
            try:  # the ranks' settings are checked when the tracker first routes rows (one all_gather)
                memcore.accumulate(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4), tr)
                tr.end_epoch()
                result = "no error"
            except ValueError as e:
                result = str(e)
        elif mode == "epochs":
            tr = memcore.Tracker(8)
            if rank == 1:
                tr.end_epoch()  # the misuse: one rank closes an extra epoch
            memcore.accumulate(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4), tr)
            try:
                tr.end_epoch()
                result = "no error"
            except ValueError as e:
                result = str(e)
        else:  # inputs=: the input-gradient statistics are merged across ranks too
            tr = _grad_run(rank, world)
            result = tr.scores()
        torch.save(result, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def _grad_run(rank, world, s=16, epochs=3):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(5, 4, generator=g)
    tr = memcore.Tracker(s, device="cpu", tau=0.05)
    for _ in range(epochs):
        perm = torch.randperm(s, generator=g)
        for b, idx in enumerate(perm.chunk(4)):
            x = torch.randn(len(idx), 5, generator=g)
            y = torch.randint(0, 4, (len(idx),), generator=g)
            if b % world == rank:
                xb = x.requires_grad_()
                memcore.accumulate(torch.tanh(xb) @ w, y, idx, tr, inputs=xb).backward()
        tr.end_epoch()
    return tr


def _spawn(tmp_path, mode, deadline_s=120.0):
    import time

    import torch.multiprocessing as mp

    out = str(tmp_path / "out")
    ctx = mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), out, mode), nprocs=2, join=False)
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=5):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {deadline_s} s")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_ranks_with_different_num_samples_get_a_clear_error(tmp_path):
    for msg in _spawn(tmp_path, "mismatch"):
        assert "differ across ranks" in msg and "num_samples (rank 0: 24, rank 1: 25)" in msg, msg


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_ranks_with_different_epoch_counts_get_a_clear_error(tmp_path):
    for msg in _spawn(tmp_path, "epochs"):
        assert "differ across ranks" in msg and "from 0 to 1" in msg and "end_epoch()" in msg, msg


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_input_gradient_statistics_are_merged_across_ranks(tmp_path):
    want = _grad_run(0, 1).scores()
    assert not torch.isnan(want["input_grad_norm"]).any()
    for got in _spawn(tmp_path, "grads"):
        for k in ("input_grad_norm", "learning_time_formal", "csl", "rows"):
            torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)
