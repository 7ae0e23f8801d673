"""Tracker(shard=True) on 4 and 2 gloo processes (CPU): each rank holds ~N/world samples, rows are
routed to their owner, and the scores equal a single-process dense run; checkpoints reshard."""

import glob
import os
import shutil
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import init_gloo

import memcore
from memcore import export

S, C, D, EPOCHS, BATCHES = 37, 5, 3, 4, 8  # S not a multiple of the world size: a short last shard
IGNORE = -100
MID = 3  # mid-epoch scores after batches 0..3 of epoch 1: one accumulate call on each of 4 ranks
TIMEOUT_S = 60  # a collective that waits longer fails instead of hanging


def _epochs():
    """Per epoch, BATCHES batches (x, targets, index): repeated indices, ignored rows, unseen ids."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(EPOCHS):
        batches = []
        for _ in range(BATCHES):
            n = 9
            idx = torch.randint(0, S - 2, (n,), generator=g)  # the last two ids are never seen
            x = torch.randn(n, D, generator=g)
            t = torch.randint(0, C, (n,), generator=g)
            t[torch.rand(n, generator=g) < 0.15] = IGNORE
            batches.append((x, t, idx))
        out.append(batches)
    return out


def _weights():
    return torch.randn(D, C, generator=torch.Generator().manual_seed(9)) * 2


def _step(tr, x, t, idx, w):
    xb = x.clone().requires_grad_()
    memcore.accumulate(xb @ w, t, idx, tr, ignore_index=IGNORE, inputs=xb).backward()


def _run(tr, epochs, rank, world, w, mid=None, after=None):
    for e, batches in epochs:
        for b, (x, t, idx) in enumerate(batches):
            if b % world == rank:
                _step(tr, x, t, idx, w)
            if mid is not None and e == 1 and b == MID:
                mid.update(tr.scores())  # open epoch, read mid-way (every rank has made one call)
        tr.end_epoch()
        if after is not None:
            after(e)


def _dense():
    w, epochs = _weights(), list(enumerate(_epochs()))
    tr, mid = memcore.Tracker(S), {}
    for e, batches in epochs:
        for b, (x, t, idx) in enumerate(batches):
            _step(tr, x, t, idx, w)
            if e == 1 and b == MID:
                mid.update(tr.scores())
        tr.end_epoch()
    return tr.scores(), mid


def _init(rank, world, init_file):
    sys.path.insert(0, os.path.dirname(__file__))
    init_gloo(rank, world, init_file, TIMEOUT_S)


def _four(rank, world, init_file, tmp):
    _init(rank, world, init_file)
    out = {}
    try:
        # settings must agree: every rank gets the same clear error
        for kw in ({"num_samples": S + (rank == 1)}, {"correct_threshold": 1.0 if rank else 0.5}):
            try:
                memcore.Tracker(**{"num_samples": S, "device": "cpu", "shard": True, **kw})
                out.setdefault("agree_errors", []).append(None)
            except ValueError as e:
                out.setdefault("agree_errors", []).append(str(e))

        w, epochs = _weights(), list(enumerate(_epochs()))
        try:  # rank 3 without shard=True: it meets the others' check when it first routes rows
            if rank == 3:
                _step(memcore.Tracker(S, device="cpu", distributed=True), *epochs[0][1][0], w)
            else:
                memcore.Tracker(S, device="cpu", shard=True)
            out["agree_errors"].append(None)
        except ValueError as e:
            out["agree_errors"].append(str(e))

        tr = memcore.Tracker(S, device="cpu", shard=True, flush_every=1)
        out["rows_held"] = tr.state_dict()["buffers"]["sums"].shape[0]  # a collective: every rank is here
        out["bytes_before_grads"] = tr.state_bytes()
        mid = {}

        def after(e):
            tr.save(os.path.join(tmp, "resave"))  # the same directory every epoch: earlier files go
            if e == 1:
                tr.save(os.path.join(tmp, "ckpt"))

        _run(tr, epochs, rank, world, w, mid=mid, after=after)
        out["mid"], out["final"] = mid, tr.scores()
        out["parquet"] = export.to_parquet(tr, os.path.join(tmp, "parquet"), row_group_size=4)
        out["gathered"] = export.gather_scores(tr, dst=0)

        # resume at the same world size from the checkpoint of epoch 1 (default flush_every)
        again = memcore.Tracker(S, device="cpu", shard=True)
        again.load(os.path.join(tmp, "ckpt"))
        assert again.epochs == 2
        _run(again, epochs[2:], rank, world, w)
        out["resumed"] = again.scores()

        # an index out of range on one rank, errors deferred: every rank raises at end_epoch
        bad = memcore.Tracker(S, device="cpu", shard=True, strict=False)
        x, t, idx = epochs[0][1][rank]
        if rank == 2:
            idx = idx.clone()
            idx[0] = S
        _step(bad, x, t, idx, w)
        try:
            bad.end_epoch()
            out["bad_index"] = None
        except ValueError as e:
            out["bad_index"] = str(e)
        bad.end_epoch()  # reported once; the good rows of the other ranks were kept
        out["bad_rows"] = bad.scores()["rows"].sum().item()

        # N < world: ranks 1..3 own no ids; they record (rows for rank 0), export and save all the same
        small = memcore.Tracker(1, device="cpu", shard=True)
        for _ in range(2):
            memcore.accumulate(
                torch.tensor([[2.0, -1.0, 0.0]]), torch.tensor([rank % 3]), torch.tensor([0]), small
            )
            small.end_epoch()
        out["small"] = small.scores()
        # an open epoch whose rows only rank 0 holds: every rank must see the epoch as open
        memcore.accumulate(torch.tensor([[2.0, -1.0, 0.0]]), torch.tensor([0]), torch.tensor([0]), small)
        out["small_open"] = small.scores()
        small.end_epoch()
        export.to_parquet(small, os.path.join(tmp, "parquet_small"))
        small.save(os.path.join(tmp, "ckpt_small"))
    finally:
        torch.save(out, os.path.join(tmp, f"four.{rank}"))
        dist.destroy_process_group()


def _two(rank, world, init_file, tmp):
    _init(rank, world, init_file)
    out = {}
    try:
        w, epochs = _weights(), list(enumerate(_epochs()))
        tr = memcore.Tracker(S, device="cpu", shard=True, flush_every=3)
        tr.load(os.path.join(tmp, "ckpt"))  # written by 4 ranks
        _run(tr, epochs[2:], rank, world, w)
        out["resumed"] = tr.scores()
        before = tr.state_dict()
        for case in BROKEN:
            try:
                tr.load(os.path.join(tmp, case))
                out[case] = None
            except (FileNotFoundError, ValueError) as e:
                out[case] = f"{type(e).__name__}: {e}"
        out["unchanged"] = tr.state_dict()["buffers"]["sums"].equal(before["buffers"]["sums"])
        export.to_parquet(tr, os.path.join(tmp, "parquet"))  # over the 4-rank export
        tr.save(os.path.join(tmp, "resave"))  # over the 4-rank checkpoint

        small = memcore.Tracker(1, device="cpu", shard=True)  # rank 1 owns no ids
        small.load(os.path.join(tmp, "ckpt_small"))
        out["small"] = small.scores()
    finally:
        torch.save(out, os.path.join(tmp, f"two.{rank}"))
        dist.destroy_process_group()


BROKEN = ("missing", "mixed", "dtype", "cut_shard", "truncated", "binary")  # damaged copies of the checkpoint


def _close(got, want, msg):
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True, msg=msg)


def _check_shard(got, want, rank, world, what):
    lo, hi = rank * -(-S // world), min(S, (rank + 1) * -(-S // world))
    assert torch.equal(got["index"], torch.arange(lo, hi)), what
    for k in want:
        _close(got[k], want[k][lo:hi], f"{what} rank {rank}: {k}")


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_sharded_matches_dense_and_reshards(tmp_path):
    want, want_mid = _dense()
    assert not torch.isnan(want["learning_time_formal"][: S - 2]).any() and want["rows"][-2:].sum() == 0
    tmp = str(tmp_path)
    mp.spawn(_four, args=(4, str(tmp_path / "init4"), tmp), nprocs=4, join=True)
    res = [torch.load(os.path.join(tmp, f"four.{r}")) for r in range(4)]
    for r, got in enumerate(res):
        assert got["agree_errors"][0] is not None and "num_samples" in got["agree_errors"][0]
        assert "rank 1: 38" in got["agree_errors"][0]
        assert got["agree_errors"][1] is not None and "correct_threshold" in got["agree_errors"][1]
        assert got["agree_errors"][2] is not None and "shard (rank 0: 1" in got["agree_errors"][2]
        n = min(S, (r + 1) * 10) - r * 10
        assert got["rows_held"] == n and got["bytes_before_grads"] == n * 60  # ~N/world samples per rank
        _check_shard(got["final"], want, r, 4, "final")
        _check_shard(got["mid"], want_mid, r, 4, "mid-epoch")
        _check_shard(got["resumed"], want, r, 4, "resumed, 4 ranks")
        assert got["bad_index"] is not None and "index out of range" in got["bad_index"]
        assert got["bad_rows"] > 0
    gathered = res[0]["gathered"]
    assert all(r["gathered"] is None for r in res[1:])
    assert torch.equal(gathered["index"], torch.arange(S))
    for k in want:
        _close(gathered[k], want[k], f"gathered {k}")
    pq = export.read_parquet(os.path.join(tmp, "parquet"))
    assert sorted(os.listdir(os.path.join(tmp, "parquet"))) == [
        f"scores-{r:05d}-of-00004.parquet" for r in range(4)
    ]
    assert pq["index"].dtype == torch.int64 and torch.equal(pq["index"], torch.arange(S))
    for k in want:
        _close(pq[k], want[k], f"parquet {k}")

    # re-saving into one directory leaves only the last save's files
    resave = sorted(os.listdir(os.path.join(tmp, "resave")))
    assert len(resave) == 5 and resave[0] == "manifest.json" and len({f[6:22] for f in resave[1:]}) == 1, (
        resave
    )
    # N < world: the ranks that own no ids export empty parts
    small_want = res[0]["small"]
    assert torch.equal(small_want["index"], torch.tensor([0])) and small_want["rows"].item() == 8
    assert res[0]["small_open"]["rows"].item() == 12  # the open epoch's 4 rows counted
    small_want = {k: v for k, v in res[0]["small_open"].items()}  # what the export and checkpoint hold
    assert all(len(r["small"]["index"]) == 0 for r in res[1:])
    pq_small = export.read_parquet(os.path.join(tmp, "parquet_small"))
    assert torch.equal(pq_small["index"], torch.tensor([0])) and torch.equal(
        pq_small["csl"], small_want["csl"]
    )

    # damaged copies of the checkpoint: a missing shard, a shard from another save, a shard whose sums
    # were re-saved in float32 under the right save id and range, a cut shard file, a cut and a binary
    # manifest
    ckpt = os.path.join(tmp, "ckpt")
    shards = sorted(glob.glob(os.path.join(ckpt, "shard-*.pt")))
    assert len(shards) == 4
    for case in BROKEN:
        shutil.copytree(ckpt, os.path.join(tmp, case))
    os.remove(os.path.join(tmp, "missing", os.path.basename(shards[3])))
    other = torch.load(shards[1], weights_only=True)
    other["token"] = "0" * 16
    torch.save(other, os.path.join(tmp, "mixed", os.path.basename(shards[1])))
    first = torch.load(shards[0], weights_only=True)
    first["buffers"]["sums"] = first["buffers"]["sums"].float()
    torch.save(first, os.path.join(tmp, "dtype", os.path.basename(shards[0])))
    data = open(shards[3], "rb").read()  # a shard file cut short, as a crash while copying leaves it
    open(os.path.join(tmp, "cut_shard", os.path.basename(shards[3])), "wb").write(data[: len(data) // 2])
    manifest = open(os.path.join(ckpt, "manifest.json"), "rb").read()
    open(os.path.join(tmp, "truncated", "manifest.json"), "wb").write(manifest[: len(manifest) // 2])
    open(os.path.join(tmp, "binary", "manifest.json"), "wb").write(b"\x80\xff" + manifest)

    mp.spawn(_two, args=(2, str(tmp_path / "init2"), tmp), nprocs=2, join=True)
    two = [torch.load(os.path.join(tmp, f"two.{r}")) for r in range(2)]
    for r, got in enumerate(two):
        _check_shard(got["resumed"], want, r, 2, "resumed, 2 ranks from 4 shards")
        assert got["unchanged"]  # every refused load left the tracker as it was, on every rank
        for case in ("truncated", "binary"):
            assert "ValueError" in got[case] and "manifest.json" in got[case], got[case]
    # 2 ranks own [0, 19) and [19, 37); a rank whose part is fine learns that another's failed
    assert "FileNotFoundError" in two[1]["missing"] and "shard 3 of 4" in two[1]["missing"]
    assert "failed on another rank" in two[0]["missing"]
    assert all("does not belong" in got["mixed"] for got in two)  # both read shard 1 ([10, 20))
    assert "sums" in two[0]["dtype"] and "float32" in two[0]["dtype"] and shards[0][-30:] in two[0]["dtype"]
    assert "failed on another rank" in two[1]["dtype"]
    assert "ValueError" in two[1]["cut_shard"] and shards[3][-30:] in two[1]["cut_shard"], two[1]["cut_shard"]
    assert "not a readable" in two[1]["cut_shard"] and "failed on another rank" in two[0]["cut_shard"]
    # the 2-rank re-export and re-save replaced the 4-rank ones
    assert sorted(os.listdir(os.path.join(tmp, "parquet"))) == [
        f"scores-{r:05d}-of-00002.parquet" for r in range(2)
    ]
    pq = export.read_parquet(os.path.join(tmp, "parquet"))
    assert torch.equal(pq["index"], torch.arange(S))
    for k in want:
        _close(pq[k], want[k], f"re-exported parquet {k}")
    assert len(os.listdir(os.path.join(tmp, "resave"))) == 3
    # a rank that owns no ids loads an empty shard
    assert torch.equal(two[0]["small"]["csl"], small_want["csl"]) and len(two[1]["small"]["index"]) == 0


def _skipper(rank, world, init_file, tmp):
    """Rank 1 skips end_epoch(); rank 0's end_epoch() must fail with memcore's explanation once the
    process group's timeout passes, never hang."""
    init_gloo(rank, world, init_file, 20)  # long enough to meet on a loaded machine, short for the test
    try:
        w, epochs = _weights(), _epochs()
        tr = memcore.Tracker(S, device="cpu", shard=True)  # a collective: both ranks are here
        _step(tr, *epochs[0][rank], w)
        done = os.path.join(tmp, "skip.0")
        if rank == 0:
            err = None
            try:
                tr.end_epoch()
            except RuntimeError as e:
                err = str(e)
            torch.save({"err": err}, done + ".tmp")
            os.replace(done + ".tmp", done)
        else:  # leave without the collective, once rank 0 has its answer (or after a bound)
            import time

            deadline = time.monotonic() + 120
            while not os.path.exists(done) and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        # a process leaving with a live process group aborts at exit, at random: gloo's worker threads
        # may still hold the last collective's work, whose tensors are freed during interpreter teardown
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_rank_that_skips_a_collective_gets_a_clear_error(tmp_path):
    mp.spawn(_skipper, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    err = torch.load(os.path.join(str(tmp_path), "skip.0"))["err"]
    assert err is not None and "every rank must reach each of them" in err and "did a rank skip one" in err
    assert "destroy_process_group" in err
