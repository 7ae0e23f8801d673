"""Two gloo processes on CPU: every rank ends with the scores of a single-process run, input-gradient
statistics included; the documented patterns (a checkpoint or scores read on rank 0 alone after
end_epoch()) communicate nothing; every misuse (trackers that differ, unequal end_epoch() calls,
ranks in different calls, a rank whose tracker is refused) gives every rank the same clear error.
All cases run in one pair of processes (one start-up cost); each test checks its part. Sharded
trackers: test_shard.py."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
from reference import assert_same_state, init_gloo, single_rank_group

import memcore

S, EPOCHS, BATCHES = 24, 3, 4
# every test reads the results of one two-process run (multi-process: the full tier)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available"),
]


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


def _batch(n=4):
    return torch.randn(n, 3), torch.tensor([0, 1, 2, 0])[:n], torch.arange(n)


def _error(fn):
    """The ValueError message fn raises (None if it returns)."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _matching_run(rank, world, out):
    tracker = memcore.Tracker(S, device="cpu")
    for e, batches in enumerate(_epochs()):
        for b, (logits, targets, idx) in enumerate(batches):
            if b % world == rank:  # this rank's share, as a DistributedSampler would give
                memcore.accumulate(logits, targets, idx, tracker)
        if e == EPOCHS - 1:
            out["open"] = tracker.scores()  # open epoch: every rank has rows, so a collective
        tracker.end_epoch()
    out["scores"] = tracker.scores()
    return tracker


def _rank0_alone(rank, tracker, tmp, out):
    """The documented patterns after end_epoch(): rank 0 alone reads scores and saves (nothing is
    buffered on any rank, so neither communicates); then both ranks meet in a collective again."""
    if rank == 0:
        out["alone_state"] = tracker.state_dict()
        tracker.save(os.path.join(tmp, "rank0.pt"))
        out["alone_scores"] = tracker.scores()
    # mid-epoch, every rank has rows: state_dict() is a collective that gathers them all
    logits, targets, idx = _batch()
    memcore.accumulate(logits, targets, idx + 4 * rank, tracker)
    out["mid_state"] = tracker.state_dict()
    tracker.end_epoch()
    out["after"] = tracker.scores()
    out["pq_path"] = memcore.export.to_parquet(tracker, os.path.join(tmp, "pq"))  # rank 0 writes


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


def _misuses(rank, out):
    """Each misuse on a fresh tracker; every rank raises at the same collective, so the next case
    starts with the ranks in step."""
    # ranks disagree on num_samples: checked when the tracker first routes rows (the settings check)
    tr = memcore.Tracker(24 + rank)
    out["num_samples"] = _error(lambda: memcore.accumulate(*_batch(), tr))

    # tau=None on rank 0 (NaN in the settings check), a fixed tau on rank 1
    tr = memcore.Tracker(8, tau=None if rank == 0 else 0.5)
    out["tau"] = _error(lambda: memcore.accumulate(*_batch(), tr))

    # one rank resumed from a checkpoint of another epoch
    tr = memcore.Tracker(8)
    if rank == 1:
        done = memcore.Tracker(8, distributed=False)
        done.end_epoch()
        tr.load_state_dict(done.state_dict())
    memcore.accumulate(*_batch(), tr)
    out["epochs"] = _error(tr.end_epoch)

    # rank 1 calls end_epoch() once more than rank 0: its extra call meets rank 0's next end_epoch()
    # (reading scores alone in between is local), which had rows to send while rank 1 had none
    tr = memcore.Tracker(8)
    memcore.accumulate(*_batch(), tr)
    tr.end_epoch()
    if rank == 1:
        out["extra_end_epoch"] = _error(tr.end_epoch)
    else:
        tr.scores()
        memcore.accumulate(*_batch(), tr)
        out["extra_end_epoch"] = _error(tr.end_epoch)

    # mid-epoch, rank 0 reads scores while rank 1 closes the epoch
    tr = memcore.Tracker(8)
    memcore.accumulate(*_batch(), tr)
    out["different_calls"] = _error(tr.scores if rank == 0 else tr.end_epoch)

    # rank 1's Tracker(shard=True) is refused (its num_samples): rank 0 waits in the settings check
    out["refused"] = _error(lambda: memcore.Tracker(8 if rank == 0 else -1, device="cpu", shard=True))

    # a call rejected before recording (a float index) on rank 1 changes nothing, its flush schedule
    # included: rank 0 then flushes one call before rank 1, which closes the epoch there
    tr = memcore.Tracker(8, device="cpu", shard=True, flush_every=2)
    rejected = []

    def epoch():
        for k in range(4):
            logits, targets, idx = _batch()
            if rank == 1 and k == 1:
                try:
                    memcore.accumulate(logits, targets, idx.double(), tr)
                except TypeError as e:
                    rejected.append(str(e))
                continue
            memcore.accumulate(logits, targets, idx, tr)
        tr.end_epoch()

    out["schedule"] = _error(epoch)
    out["rejected_call"] = rejected


def _hf_saves(rank, world, tmp, out):
    """The Hugging Face callback's save hook on every rank, mid-epoch (rows buffered): a sharded
    tracker as one file per rank + manifest, a replicated one as rank 0's file."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from memcore.integrations.huggingface import MemcoreCallback

    args = TrainingArguments(output_dir=os.path.join(tmp, "hf"), report_to=[], use_cpu=True)
    for step, shard in ((1, True), (2, False)):
        tr = memcore.Tracker(S, device="cpu", shard=shard)
        for e, batches in enumerate(_epochs()[:2]):
            for b, (logits, targets, idx) in enumerate(batches):
                if b % world == rank:
                    memcore.accumulate(logits, targets, idx, tr)
            if e == 0:
                tr.end_epoch()
        state = TrainerState(global_step=step, is_world_process_zero=rank == 0)
        MemcoreCallback(tr).on_save(args, state, TrainerControl())
        out[f"hf_{step}"] = memcore.export.gather_scores(tr)


def _worker(rank, world, init_file, tmp):
    sys.path.insert(0, os.path.dirname(__file__))
    init_gloo(rank, world, init_file)
    out = {}
    try:
        tracker = _matching_run(rank, world, out)
        _rank0_alone(rank, tracker, tmp, out)
        out["grads"] = _grad_run(rank, world).scores()
        _misuses(rank, out)
        _hf_saves(rank, world, tmp, out)
    finally:
        torch.save(out, os.path.join(tmp, f"out.{rank}"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import time

    import torch.multiprocessing as mp

    tmp = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=False)
    end = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish within 300 s")
    return tmp, [torch.load(os.path.join(tmp, f"out.{r}"), weights_only=False) for r in range(2)]


def _close(got, want, **tol):
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12, equal_nan=True, msg=k, **tol)


def test_two_ranks_match_single_process(ranks):
    single = memcore.Tracker(S)
    for batches in _epochs():
        for logits, targets, idx in batches:
            memcore.accumulate(logits, targets, idx, single)
        single.end_epoch()
    want = single.scores()
    for got in ranks[1]:
        _close(got["scores"], want)
        _close(got["open"], want)


def test_checkpoint_and_scores_on_rank_0_alone(ranks):
    """docs/distributed.md's recipe: after end_epoch() every rank holds the same state, so rank 0 alone
    may save it and read scores: local calls, and the ranks stay in step for the next collective."""
    tmp, res = ranks
    r0 = res[0]
    _close(r0["alone_scores"], r0["scores"])
    back = memcore.Tracker(S)
    back.load(os.path.join(tmp, "rank0.pt"))
    assert_same_state(back.state_dict(), r0["alone_state"])
    # mid-epoch state_dict() on every rank: both ranks' rows, the same state on each
    assert_same_state(res[1]["mid_state"], r0["mid_state"])
    assert int(r0["mid_state"]["buffers"]["counts"][:8, memcore._state.C_ROWS_E].sum()) == 8
    _close(res[1]["after"], r0["after"])
    # every rank holds the scores, every rank called to_parquet, rank 0 wrote the one file
    assert os.listdir(os.path.join(tmp, "pq")) == ["scores.parquet"]
    pq = memcore.export.read_parquet(os.path.join(tmp, "pq"))
    _close({k: v for k, v in pq.items() if k != "index"}, r0["after"])


def test_input_gradient_statistics_are_merged_across_ranks(ranks):
    want = _grad_run(0, 1).scores()
    assert not torch.isnan(want["input_grad_norm"]).any()
    for got in ranks[1]:
        for k in ("input_grad_norm", "learning_time_formal", "csl", "rows"):
            torch.testing.assert_close(got["grads"][k], want[k], rtol=1e-10, atol=1e-12, msg=k)


def _every_rank_says(ranks, case, *parts):
    """Every rank raised a ValueError in `case` whose message holds each of `parts`."""
    for got in ranks[1]:
        msg = got[case]
        assert msg and all(p in msg for p in parts), msg


def test_ranks_with_different_num_samples_get_a_clear_error(ranks):
    _every_rank_says(ranks, "num_samples", "differ across ranks", "num_samples (rank 0: 24, rank 1: 25)")


def test_ranks_with_different_tau_get_a_clear_error(ranks):
    """tau=None on one rank and a number on another differ (None is not a wildcard)."""
    _every_rank_says(ranks, "tau", "tau (rank 0: None, rank 1: 0.5)")


def test_ranks_with_different_epoch_counts_get_a_clear_error(ranks):
    _every_rank_says(ranks, "epochs", "differ across ranks", "from 0 to 1", "end_epoch()")


def test_unequal_end_epoch_calls_give_every_rank_a_clear_error(ranks):
    """The extra call meets the other rank's next end_epoch(): a ValueError on both, never an abort."""
    _every_rank_says(ranks, "extra_end_epoch", "out of step", "called end_epoch() more often")


def test_ranks_in_different_calls_get_a_clear_error(ranks):
    _every_rank_says(ranks, "different_calls", "out of step", "end_epoch()", "scores()")


def test_refused_sharded_tracker_reaches_every_rank(ranks):
    """The refused rank raises its own error; the rank waiting in the settings check learns of it at
    once (not from the backend's timeout)."""
    r0, r1 = ranks[1]
    assert r1["refused"] and "num_samples must be an int in [1, inf], got -1" in r1["refused"]
    assert r0["refused"] and "refused on rank 1" in r0["refused"]


def test_rejected_call_changes_no_flush_schedule(ranks):
    """A call rejected before recording is not counted (it changes nothing); ranks whose schedules
    then differ meet in different calls and both get the out-of-step error, not an epoch-count one."""
    r0, r1 = ranks[1]
    assert r0["rejected_call"] == [] and len(r1["rejected_call"]) == 1 and "index" in r1["rejected_call"][0]
    for msg in (r0["schedule"], r1["schedule"]):
        assert msg and "out of step" in msg and "end_epoch()" in msg and "flush_every" in msg, msg


def test_hf_callback_saves_sharded_trackers_loadable_at_any_world_size(ranks, tmp_path):
    """MemcoreCallback.on_save on 2 ranks wrote checkpoint-1/memcore_tracker/ (sharded, one file per
    rank + manifest) and checkpoint-2/memcore_tracker.pt (replicated, rank 0's file); load_tracker
    restores them here, the sharded one at world size 1."""
    pytest.importorskip("transformers")
    from memcore.integrations.huggingface import load_tracker

    tmp, res = ranks
    sharded = os.path.join(tmp, "hf", "checkpoint-1")
    assert sorted(os.listdir(os.path.join(sharded, "memcore_tracker")))[0] == "manifest.json"
    assert len(os.listdir(os.path.join(sharded, "memcore_tracker"))) == 3
    with single_rank_group(str(tmp_path / "init")):
        back = memcore.Tracker(S, device="cpu", shard=True)
        load_tracker(back, sharded)
        _close(back.scores(), res[0]["hf_1"])
        with pytest.raises(ValueError, match="holds a non-sharded"):
            load_tracker(back, os.path.join(tmp, "hf", "checkpoint-2"))
    plain = memcore.Tracker(S)
    load_tracker(plain, os.path.join(tmp, "hf", "checkpoint-2"))
    _close(plain.scores(), res[1]["hf_2"])
    with pytest.raises(ValueError, match="holds a sharded"):
        load_tracker(plain, sharded)
