"""Two gloo processes on CPU: every rank ends with the scores of a single-process run."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
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
