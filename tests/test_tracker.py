"""Tracker statistics against a plain-PyTorch reference, repeated indices, epochs, checkpoints."""

import numpy as np
import pytest
import torch
from reference import epoch_sums
from reference import scores as ref_scores

import memcore
from memcore import _layout as L


def _run(epochs, num_samples, device, **kw):
    tr = memcore.Tracker(num_samples, device=device, **kw)
    for batches in epochs:
        for logits, targets, index in batches:
            memcore.accumulate(logits.to(device), targets.to(device), index.to(device), tr)
        tr.end_epoch()
    return tr


def _batches(n, c, num_samples, nb, scale=2.0, gen=None):
    out = []
    for _ in range(nb):
        logits = torch.randn(n, c, generator=gen) * scale
        targets = torch.randint(0, c, (n,), generator=gen)
        index = torch.randint(0, num_samples, (n,), generator=gen)
        out.append((logits, targets, index))
    return out


def test_epoch_buffer_matches_reference_with_repeated_indices(device):
    batches = _batches(64, 7, 10, 3)  # 192 rows into 10 samples: many repeats per batch
    tr = memcore.Tracker(10, device=device)
    for lg, tg, ix in batches:
        memcore.accumulate(lg.to(device), tg.to(device), ix.to(device), tr)
    want = epoch_sums(batches, 10)
    sums, counts = tr._state()["sums"].cpu(), tr._state()["counts"].cpu()
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
    tr = _run(epochs, s, device)
    got, want = tr.scores(), ref_scores(epochs, s)
    assert set(got) == set(memcore.SCORE_NAMES) == set(want) | {"input_grad_norm", "learning_time_formal"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, equal_nan=True, msg=k)
        assert got[k].dtype == torch.float64 and got[k].device.type == "cpu"
    assert got["forgetting"].sum() > 0, "fixture should produce forgetting events"
    assert len(got["learning_time"].unique()) >= 3, "fixture should spread learning times"


def test_unseen_samples_and_open_epoch(device):
    tr = memcore.Tracker(5, device=device)
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]], device=device)
    memcore.accumulate(logits, torch.tensor([0, 0], device=device), torch.tensor([1, 3], device=device), tr)
    s = tr.scores()  # open epoch counted as if ended, without closing it
    assert tr.epochs == 0 and tr._state()["counts"][:, L.C_ROWS_E].sum() == 2
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


def test_state_dict_round_trip_gives_identical_scores(tmp_path, device):
    epochs = [_batches(16, 4, 12, 2, gen=torch.Generator().manual_seed(e)) for e in range(4)]
    full = _run(epochs, 12, device)
    part = _run(epochs[:2], 12, device)
    path = tmp_path / "tracker.pt"
    torch.save(part.state_dict(), path)
    resumed = memcore.Tracker(12, device=device)
    resumed.load_state_dict(torch.load(path))
    assert resumed.epochs == 2
    for batches in epochs[2:]:
        for lg, tg, ix in batches:
            memcore.accumulate(lg.to(device), tg.to(device), ix.to(device), resumed)
        resumed.end_epoch()
    a, b = full.scores(), resumed.scores()
    for k in a:
        assert torch.equal(a[k].nan_to_num(-1), b[k].nan_to_num(-1)), k


def test_load_state_dict_rejects_other_sizes_and_versions():
    st = memcore.Tracker(5).state_dict()
    with pytest.raises(ValueError, match="num_samples=5"):
        memcore.Tracker(6).load_state_dict(st)
    with pytest.raises(ValueError, match="version"):
        memcore.Tracker(5).load_state_dict({**st, "version": 99})
    with pytest.raises(ValueError, match="state_dict"):
        memcore.Tracker(5).load_state_dict({"foo": 1})


def test_device_none_adopts_first_batch_device(device):
    tr = memcore.Tracker(4)
    assert tr.device is None
    memcore.accumulate(
        torch.randn(2, 3, device=device),
        torch.tensor([0, 1], device=device),
        torch.tensor([0, 1], device=device),
        tr,
    )
    assert tr.device.type == device and tr._state()["sums"].device.type == device


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


def test_save_is_atomic_and_resumes(tmp_path, monkeypatch):
    path = str(tmp_path / "tracker.pt")
    tr = memcore.Tracker(4)
    memcore.accumulate(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4), tr)
    tr.end_epoch()
    tr.save(path)
    good = open(path, "rb").read()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        tr.save(path)
    monkeypatch.undo()
    assert open(path, "rb").read() == good  # the previous checkpoint survived
    back = memcore.Tracker(4)
    back.load(path)
    assert torch.equal(back.scores()["csl"], tr.scores()["csl"]) and back.epochs == 1


def test_state_is_compact_and_loads_with_weights_only(tmp_path):
    tr = memcore.Tracker(1000)
    assert tr.state_bytes() == 1000 * 60  # 5 float64 sums, 4 int32 counts, 2 int16 epoch fields
    memcore.accumulate(torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6), tr)
    tr.end_epoch()
    memcore.accumulate(torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6), tr)  # open epoch
    path = str(tmp_path / "t.pt")
    tr.save(path)
    state = torch.load(path, weights_only=True)
    assert state["version"] == 2
    assert sum(v.numel() * v.element_size() for v in state["buffers"].values()) == 1000 * 60 + 4
    back = memcore.Tracker(1000)
    back.load(path)
    for k, v in tr.scores().items():
        assert torch.equal(v.nan_to_num(-1), back.scores()[k].nan_to_num(-1)), k


def test_rows_are_committed_at_every_flush_point():
    """Rows wait in the buffer for flush_every calls; scores(), end_epoch() and state_dict() see them
    all whatever flush_every is, with the same result."""
    batches = _batches(8, 4, 10, 7, gen=torch.Generator().manual_seed(3))
    runs = []
    for every in (1, 3, None):
        tr = memcore.Tracker(10, flush_every=every)
        for i, (lg, tg, ix) in enumerate(batches):
            memcore.accumulate(lg, tg, ix, tr)
            if i == 3:
                mid = tr.scores()
        assert len(tr._router.ce) == {1: 0, 3: 0, None: 3}[every]  # calls 4..6 since scores() flushed
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


@pytest.mark.parametrize("tau", ["None", "0.3"])
def test_format_1_checkpoint_is_converted(tau):
    """A checkpoint of memcore 0.1.0 (float64 [S, 6] buffers, tests/data/make_tracker_v1.py) loads into
    the compact layout and gives the scores 0.1.0 computed from it, open epoch included."""
    import os

    fixture = torch.load(os.path.join(os.path.dirname(__file__), "data", "tracker_v1.pt"), weights_only=True)[
        tau
    ]
    assert fixture["state"]["version"] == 1
    tr = memcore.Tracker(12)
    tr.load_state_dict(fixture["state"])
    got = tr.scores()
    for k, want in fixture["scores"].items():
        torch.testing.assert_close(got[k], want, rtol=1e-12, atol=1e-12, equal_nan=True, msg=k)
    assert tr.state_dict()["version"] == 2 and (("formal_since" in tr._st) == (tau != "None"))


def test_epoch_close_in_blocks_equals_one_block(monkeypatch):
    """end_epoch folds the state in place, FOLD_ROWS rows at a time: block edges change nothing."""
    epochs = [_batches(16, 4, 30, 3, gen=torch.Generator().manual_seed(e)) for e in range(3)]
    whole = _run(epochs, 30, "cpu").scores()
    monkeypatch.setattr(L, "FOLD_ROWS", 7)
    for k, v in _run(epochs, 30, "cpu").scores().items():
        assert torch.equal(v.nan_to_num(-1), whole[k].nan_to_num(-1)), k


def test_storage_memory_maps_the_state(tmp_path):
    import os

    epochs = [_batches(16, 4, 12, 2, gen=torch.Generator().manual_seed(e)) for e in range(3)]
    want = _run(epochs, 12, "cpu").scores()
    tr = _run(epochs, 12, "cpu", storage=str(tmp_path / "st"))
    folder = tmp_path / "st" / "state"
    assert sorted(os.listdir(folder)) == ["counts.bin", "forgetting.bin", "learned_since.bin", "sums.bin"]
    assert os.path.getsize(folder / "sums.bin") == 12 * 5 * 8
    on_disk = torch.from_file(str(folder / "sums.bin"), size=60, dtype=torch.float64)
    assert torch.equal(on_disk, tr._st["sums"].flatten())  # the state is the file
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
