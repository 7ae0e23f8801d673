"""Tracker statistics against a plain-PyTorch reference: repeated indices, epochs, samples missing from
epochs, flushes, threads, memory-mapped storage. Checkpoints: tests/test_checkpoint.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import (
    assert_same_state,
    epoch_sums,
    random_batches,
    run_concurrently,
    run_tracker,
    trained_tracker,
)
from reference import scores as ref_scores

import memcore
from memcore import _state as L
from memcore import export


def test_epoch_buffer_matches_reference_with_repeated_indices(device):
    batches = random_batches(64, 7, 10, 3)  # 192 rows into 10 samples: many repeats per batch
    tr = memcore.Tracker(10, device=device)
    for lg, tg, ix in batches:
        memcore.accumulate(lg.to(device), tg.to(device), ix.to(device), tr)
    want = epoch_sums(batches, 10)
    state = tr.state_dict()["buffers"]
    sums, counts = state["sums"], state["counts"]
    got = torch.stack(
        [
            sums[:, L.S_LAST],
            counts[:, L.C_ROWS_E].double(),
            counts[:, L.C_CORRECT_E].double(),
            sums[:, L.S_PROB],
            sums[:, L.S_PROB_SQ],
            sums[:, L.S_MARGIN],
        ],
        1,
    )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_scores_match_reference_over_epochs(device):
    gen = torch.Generator().manual_seed(1)
    s = 40
    # logits drift towards the labels so samples get learned, forgotten, relearned
    labels = torch.randint(0, 5, (s,), generator=gen)
    epochs = []
    for e in range(6):
        perm = torch.randperm(s, generator=gen)
        batches = []
        for chunk in perm.split(16):
            logits = torch.randn(len(chunk), 5, generator=gen) * 1.5
            logits[torch.arange(len(chunk)), labels[chunk]] += 1.0 * e
            batches.append((logits, labels[chunk], chunk))
        epochs.append(batches)
    tr = run_tracker(epochs, s, device)
    got, want = tr.scores(), ref_scores(epochs, s)
    assert set(got) == set(memcore.SCORE_NAMES) == set(want) | {"input_grad_norm", "learning_time_formal"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, equal_nan=True, msg=k)
        assert got[k].dtype == torch.float64 and got[k].device.type == "cpu"
    assert got["forgetting_events"].sum() > 0, "fixture should produce forgetting events"
    assert len(got["learning_time"].unique()) >= 3, "fixture should spread learning times"


def test_unseen_samples_and_open_epoch(device):
    tr = memcore.Tracker(5, device=device)
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]], device=device)
    memcore.accumulate(logits, torch.tensor([0, 0], device=device), torch.tensor([1, 3], device=device), tr)
    s = tr.scores()  # open epoch counted as if ended, without closing it
    assert tr.epochs == 0 and tr.state_dict()["buffers"]["counts"][:, L.C_ROWS_E].sum() == 2
    assert s["rows"].tolist() == [0, 1, 0, 1, 0]
    assert torch.isnan(s["csl_mean"][0]) and s["csl"][0] == 0
    assert s["learning_time"][1] == 0 and s["learning_time"][3] == 1  # 3 is wrong: never learned
    assert torch.isnan(s["learning_time"][0])
    tr.end_epoch()
    assert tr.scores()["rows"].tolist() == s["rows"].tolist()


def test_forgetting_and_learning_time_definitions():
    tr = memcore.Tracker(1)
    right = torch.tensor([[2.0, 0.0]])
    wrong = torch.tensor([[0.0, 2.0]])
    t, i = torch.tensor([0]), torch.tensor([0])
    for z in (wrong, right, wrong, right, right):  # epochs 0..4
        memcore.accumulate(z, t, i, tr)
        tr.end_epoch()
    s = tr.scores()
    assert s["forgetting"][0] == 1  # right (ep 1) -> wrong (ep 2)
    assert s["learning_time"][0] == 3  # correct from epoch 3 on
    assert s["correctness"][0] == pytest.approx(3 / 5)


def test_correct_threshold_for_sequences():
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])  # 2 of 3 tokens right
    targets = torch.zeros(3, dtype=torch.long)
    seq = torch.zeros(3, dtype=torch.long)
    strict = memcore.Tracker(1)
    loose = memcore.Tracker(1, correct_threshold=0.5)
    for tr in (strict, loose):
        memcore.accumulate(logits, targets, seq, tr)
        tr.end_epoch()
    assert strict.scores()["learning_time"][0] == 1
    assert loose.scores()["learning_time"][0] == 0


def test_device_none_adopts_first_batch_device(device):
    tr = memcore.Tracker(4)
    assert tr.device is None
    memcore.accumulate(
        torch.randn(2, 3, device=device),
        torch.tensor([0, 1], device=device),
        torch.tensor([0, 1], device=device),
        tr,
    )
    assert tr.device.type == device and tr.scores()["rows"].sum() == 2


def test_constructor_validation():
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_samples"):
            memcore.Tracker(bad)
    for bad in (2.5, True, "3", None):
        with pytest.raises(TypeError, match="num_samples"):
            memcore.Tracker(bad)
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="correct_threshold"):
            memcore.Tracker(3, correct_threshold=bad)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="tau"):
            memcore.Tracker(3, tau=bad)
    with pytest.raises(TypeError, match="flush_every"):
        memcore.Tracker(3, flush_every=2.0)
    # numpy and 0-d tensor integers are integers
    assert memcore.Tracker(np.int64(3)).num_samples == 3
    assert memcore.Tracker(torch.tensor(3)).num_samples == 3


def test_rows_are_committed_at_every_flush_point():
    """Rows wait in the buffer for flush_every calls; scores(), end_epoch() and state_dict() see them
    all whatever flush_every is, with the same result."""
    batches = random_batches(8, 4, 10, 7, gen=torch.Generator().manual_seed(3))
    runs = []
    for every in (1, 3, None):
        tr = memcore.Tracker(10, flush_every=every)
        for i, (lg, tg, ix) in enumerate(batches):
            memcore.accumulate(lg, tg, ix, tr)
            if i == 3:
                mid = tr.scores()
        # calls 4..6 since scores() flushed: buffered only without a flush every 1 or 3 calls
        assert (tr.buffered_bytes() > 0) == (every is None)
        st = tr.state_dict()
        tr.end_epoch()
        runs.append((mid, tr.scores(), st))
    for mid, final, st in runs[1:]:
        for k in final:
            assert torch.equal(final[k].nan_to_num(-1), runs[0][1][k].nan_to_num(-1)), k
            assert torch.equal(mid[k].nan_to_num(-1), runs[0][0][k].nan_to_num(-1)), k
        assert all(torch.equal(st["buffers"][k], runs[0][2]["buffers"][k]) for k in st["buffers"])
    with pytest.raises(ValueError, match="flush_every"):
        memcore.Tracker(3, flush_every=0)


def test_epoch_close_in_blocks_equals_one_block(monkeypatch):
    """end_epoch folds the state in place, FOLD_ROWS rows at a time: block edges change nothing."""
    epochs = [random_batches(16, 4, 30, 3, gen=torch.Generator().manual_seed(e)) for e in range(3)]
    whole = run_tracker(epochs, 30, "cpu").scores()
    monkeypatch.setattr(L, "FOLD_ROWS", 7)
    for k, v in run_tracker(epochs, 30, "cpu").scores().items():
        assert torch.equal(v.nan_to_num(-1), whole[k].nan_to_num(-1)), k


def test_storage_memory_maps_the_state(tmp_path):
    import os

    epochs = [random_batches(16, 4, 12, 2, gen=torch.Generator().manual_seed(e)) for e in range(3)]
    want = run_tracker(epochs, 12, "cpu").scores()
    tr = run_tracker(epochs, 12, "cpu", storage=str(tmp_path / "st"))
    folder = tmp_path / "st" / "state"
    assert sorted(os.listdir(folder)) == [
        "counts.bin",
        "forgetting.bin",
        "learned_since.bin",
        "lock",
        "sums.bin",
    ]
    assert os.path.getsize(folder / "sums.bin") == 12 * 5 * 8
    on_disk = torch.from_file(str(folder / "sums.bin"), size=60, dtype=torch.float64)
    assert torch.equal(on_disk, tr.state_dict()["buffers"]["sums"].flatten())  # the state is the file
    for k, v in tr.scores().items():
        assert torch.equal(v.nan_to_num(-1), want[k].nan_to_num(-1)), k
    tr.save(str(tmp_path / "ck.pt"))
    back = memcore.Tracker(12, storage=str(tmp_path / "st2"))
    back.load(str(tmp_path / "ck.pt"))
    assert torch.equal(
        torch.from_file(str(tmp_path / "st2" / "state" / "sums.bin"), size=60, dtype=torch.float64), on_disk
    )
    with pytest.raises(ValueError, match="storage"):
        memcore.Tracker(3, device="meta", storage=str(tmp_path / "x"))


def test_rejected_batch_among_batches_of_other_ignore_index_records_nothing():
    """Buffered batches with different ignore_index values, one of them rejected (deferred, strict=False):
    the flush drops every row of the rejected batch, whichever ignore_index the others use."""
    g = torch.Generator().manual_seed(8)
    batches = [
        (torch.randn(6, 3, generator=g), torch.randint(0, 3, (6,), generator=g), torch.arange(6))
        for _ in range(3)
    ]
    tr = memcore.Tracker(6, strict=False)
    want = memcore.Tracker(6)
    for k, (logits, targets, idx) in enumerate(batches):
        if k == 1:  # rejected: an index out of range
            memcore.accumulate(logits, targets, idx + 1, tr, ignore_index=-1)
            continue
        memcore.accumulate(logits, targets, idx, tr, ignore_index=-100 - k)
        memcore.accumulate(logits, targets, idx, want)
    with pytest.raises(ValueError, match="index out of range"):
        tr.end_epoch()
    tr.end_epoch()
    want.end_epoch()
    assert torch.equal(tr.scores()["csl"], want.scores()["csl"]) and tr.scores()["rows"].sum() == 12


def test_storage_directory_holds_one_live_tracker(tmp_path):
    """A second tracker on a directory in use raises instead of zeroing the first one's state; the lock
    goes with the first tracker (and with its process: the OS drops it, so a crash leaves none)."""
    import gc

    epochs = [random_batches(16, 4, 12, 2, gen=torch.Generator().manual_seed(e)) for e in range(2)]
    first = run_tracker(epochs, 12, "cpu", storage=str(tmp_path / "st"))
    before = first.state_dict()
    with pytest.raises(ValueError, match="in use by another live Tracker"):
        memcore.Tracker(12, storage=str(tmp_path / "st"))
    assert_same_state(first.state_dict(), before)
    copy = __import__("copy").deepcopy(first)  # an in-memory copy: it owns no directory
    assert copy._storage is None and torch.equal(copy.scores()["csl"], first.scores()["csl"])
    del first, copy
    gc.collect()
    again = memcore.Tracker(12, storage=str(tmp_path / "st"))
    assert again.scores()["rows"].sum() == 0


def test_lost_storage_directory_keeps_the_state_readable(tmp_path):
    """The directory removed mid-run: the batch that needs new files raises, and the state so far
    stays readable in memory and savable elsewhere, input-gradient fields all or none."""
    import shutil

    g = torch.Generator().manual_seed(1)
    tr = memcore.Tracker(8, storage=str(tmp_path / "st"))
    memcore.accumulate(
        torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g), torch.arange(8), tr
    )
    tr.end_epoch()
    want = tr.scores()
    shutil.rmtree(tmp_path / "st")
    x = torch.randn(8, 3, generator=g, requires_grad=True)
    loss = memcore.accumulate(x * 2, torch.randint(0, 3, (8,), generator=g), torch.arange(8), tr, inputs=x)
    with pytest.raises(OSError, match="storage directory removed"):
        loss.backward()
    assert tr._grad_start == -1 and "grad_sq_sum" not in tr._st  # no half-made fields
    tr.end_epoch()  # the forward's rows were recorded; the input gradients of that batch were not
    got = tr.scores()
    assert torch.equal(got["rows"], want["rows"] * 2) and torch.isnan(got["input_grad_norm"]).all()
    tr.save(str(tmp_path / "ck.pt"))
    back = memcore.Tracker(8)
    back.load(str(tmp_path / "ck.pt"))
    assert_same_state(back.state_dict(), tr.state_dict())


def test_storage_tracker_drops_fields_the_loaded_state_lacks(tmp_path):
    """Loading a state without input-gradient fields into a storage tracker that has them leaves it
    with exactly the loaded buffers (no stale fields)."""
    with_grads = trained_tracker(inputs=True)
    plain = trained_tracker(seed=3)
    tr = memcore.Tracker(12, storage=str(tmp_path / "st"))
    tr.load_state_dict(with_grads.state_dict())
    assert "grad_sq_sum" in tr.state_dict()["buffers"]
    tr.load_state_dict(plain.state_dict())
    assert_same_state(tr.state_dict(), plain.state_dict())
    for k, v in plain.scores().items():
        assert torch.equal(tr.scores()[k].nan_to_num(-1), v.nan_to_num(-1)), k


def test_samples_missing_from_an_epoch_keep_their_history():
    """README: forgetting and learning_time are over the epochs a sample was seen."""
    g = torch.Generator().manual_seed(4)
    n, c = 6, 3
    y = torch.randint(0, c, (n,), generator=g)
    epochs = []
    for e in range(5):
        z = torch.randn(n, c, generator=g) * 3
        keep = torch.arange(n)[(torch.arange(n) + e) % 3 != 0]  # every sample misses some epochs
        epochs.append([(z[keep], y[keep], keep)])
    tr = memcore.Tracker(n)
    for batches in epochs:
        for z, t, ix in batches:
            memcore.accumulate(z, t, ix, tr)
        tr.end_epoch()
    want, got = ref_scores(epochs, n), tr.scores()
    assert want["forgetting_events"].sum() > 0 and (want["learning_time"] < 5).any()
    for k in want:
        exact = k in ("rows", "correctness", "forgetting", "forgetting_events", "learning_time")
        torch.testing.assert_close(
            got[k], want[k], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6, equal_nan=True, msg=k
        )


def test_constructed_prev_correct_and_learned_since_across_a_gap():
    y = torch.tensor([0])
    right, wrong = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    tr = memcore.Tracker(2)
    plan = [right, None, wrong, None, right, None, right]  # sample 0; sample 1 is seen every epoch
    for z in plan:
        if z is not None:
            memcore.accumulate(z, y, torch.tensor([0]), tr)
        memcore.accumulate(torch.tensor([[1.0, 0.0]]), y, torch.tensor([1]), tr)
        tr.end_epoch()
    s = tr.scores()
    assert s["forgetting"][0] == 1  # right (e0) -> wrong (e2) across the unseen e1
    assert s["learning_time"][0] == 4  # learned at e4 and still right at e6, across the unseen e5


def test_infinite_margin_gives_infinite_aum():
    """Contract: a presentation with every non-target logit -inf has margin +inf, so the sample's
    aum (the mean margin) is +inf from then on; its loss (0) and other scores stay finite."""
    inf = float("inf")
    tr = memcore.Tracker(2)
    memcore.accumulate(
        torch.tensor([[2.0, -inf, -inf], [1.0, 2.0, 0.0]]), torch.tensor([0, 1]), torch.arange(2), tr
    )
    tr.end_epoch()
    memcore.accumulate(
        torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0]]), torch.tensor([0, 1]), torch.arange(2), tr
    )
    s = tr.scores()
    assert s["aum"][0] == inf and s["aum"][1] == 1.0
    assert torch.isfinite(s["csl"]).all() and torch.isfinite(s["confidence_mean"]).all()
    assert export.ranked_issues(s, by="aum")[-1] == 0  # the largest margin is the least suspicious


def test_scores_after_only_empty_batches_with_inputs():
    """Found by tests/test_properties.py: input-gradient recording started by an empty batch, no
    epoch with rows since: scores() gives NaN learning_time_formal instead of failing."""
    tr = memcore.Tracker(3)
    x = torch.zeros(0, 1, requires_grad=True)
    memcore.accumulate(
        torch.zeros(0, 4) + x,
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
        tr,
        inputs=x,
        reduction="sum",
    ).backward()
    s = tr.scores()
    assert torch.isnan(s["learning_time_formal"]).all() and torch.isnan(s["input_grad_norm"]).all()


@pytest.mark.parametrize("flush_every, n, calls", [(1, 65536, 20), (None, 4096, 50)])
@pytest.mark.parametrize("with_inputs", [False, True])
def test_concurrent_accumulate_loses_no_rows(with_inputs, flush_every, n, calls):
    s = 64
    tr = memcore.Tracker(s, flush_every=flush_every)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 8, (n,), generator=g)
    idx = torch.randint(0, s, (n,), generator=g)  # heavy repetition: n / 64 rows per sample

    def steps():
        for _ in range(calls):
            if with_inputs:
                x = torch.zeros(n, 1, requires_grad=True)
                memcore.accumulate(z + x, y, idx, tr, inputs=x).backward()
            else:
                memcore.accumulate(z, y, idx, tr)

    assert run_concurrently(steps, 2) == []
    sc = tr.scores()
    assert int(sc["rows"].sum()) == 2 * calls * n
    want = torch.zeros(s, dtype=torch.float64).index_add_(
        0, idx, F.cross_entropy(z.double(), y, reduction="none")
    )
    torch.testing.assert_close(sc["csl"], want * 2 * calls, rtol=1e-6, atol=0)  # float32 losses
    if with_inputs:
        assert int(tr.state_dict()["buffers"]["grad_rows"].sum()) == 2 * calls * n


def test_rejected_call_under_a_transform_leaves_no_row():
    """accumulate under torch.vmap or torch.func.grad raises before anything runs: no transformed row
    is buffered, and the tracker's later flushes, scores and checkpoints work."""
    g = torch.Generator().manual_seed(6)
    tr = memcore.Tracker(8)
    logits, targets = torch.randn(3, 4, 5, generator=g), torch.randint(0, 5, (3, 4), generator=g)
    index = torch.randint(0, 8, (3, 4), generator=g)
    with pytest.raises(TypeError, match="torch.func transform"):
        torch.vmap(lambda a, b, c: memcore.accumulate(a, b, c, tr))(logits, targets, index)
    with pytest.raises(TypeError, match="torch.func transform"):
        torch.func.grad(lambda z: memcore.accumulate(z, targets[0], index[0], tr))(logits[0])
    hidden, weight = torch.randn(3, 4, 6, generator=g), torch.randn(5, 6, generator=g)
    with pytest.raises(TypeError, match="torch.func transform"):
        torch.vmap(lambda h, b, c: memcore.linear_accumulate(h, weight, b, c, tr))(hidden, targets, index)
    assert tr.buffered_bytes() == 0
    with pytest.warns(UserWarning, match="no batch recorded"):  # none of the calls counted as a batch
        tr.end_epoch()
    assert tr.scores()["rows"].sum() == 0 and tr.state_dict()["epochs"] == 1


def _one_batch(tracker, n=4):
    torch.manual_seed(0)
    memcore.accumulate(torch.randn(n, 3), torch.randint(0, 3, (n,)), torch.arange(n), tracker)


def test_scores_before_any_recorded_epoch_warns_once():
    import warnings

    tracker = memcore.Tracker(4)
    with pytest.warns(UserWarning, match=r"scores\(\) before any recorded epoch") as caught:
        scores = tracker.scores()
    assert caught[0].filename == __file__  # attributed to the caller, not to memcore's internals
    assert torch.isnan(scores["csl_mean"]).all() and (scores["csl"] == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.scores()  # once per tracker
        fresh = memcore.Tracker(4)
        _one_batch(fresh)
        fresh.scores()  # an epoch in progress counts as recorded
        fresh.end_epoch()
        fresh.scores()


def test_end_epoch_without_a_batch_since_the_last_warns_once():
    import warnings

    tracker = memcore.Tracker(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _one_batch(tracker)
        tracker.end_epoch()
    with pytest.warns(UserWarning, match=r"end_epoch\(\) with no batch recorded since the last") as caught:
        tracker.end_epoch()
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.end_epoch()  # once per tracker
    assert tracker.epochs == 3
