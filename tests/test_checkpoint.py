"""The checkpoint format (memcore/_checkpoint.py): state_dict round trips, atomic and weights-only
files, validation of every malformed state (a rejected load changes nothing), format-1 conversion.
Sharded checkpoints on several world sizes: tests/test_shard.py."""

import os

import numpy as np
import pytest
import torch
from reference import assert_same_state, random_batches, run_concurrently, run_tracker, trained_tracker

import memcore


def _corruptions(st):
    s = lambda **kw: {**st, **kw}
    bufs = lambda **kw: {**st, "buffers": {**st["buffers"], **kw}}
    b = st["buffers"]
    n = st["num_samples"]
    yield "missing key", {k: v for k, v in st.items() if k != "grad_start"}, "missing keys"
    yield "negative epochs", s(epochs=-1, grad_start=-1, grad_history=[]), r"'epochs' must be an int in \[0, "
    yield "epochs not int", s(epochs=2.0), "'epochs' must be an int"
    yield "threshold", s(correct_threshold=1.5), "correct_threshold"
    yield "tau", s(tau=float("nan")), "tau"
    yield "grad_start", s(grad_start=st["epochs"] + 1), "grad_start"
    yield "history length", s(grad_history=st["grad_history"][:-1]), "grad_history"
    yield "history dtype", s(grad_history=[h.double() for h in st["grad_history"]]), "grad_history"
    yield "missing buffer", s(buffers={k: v for k, v in b.items() if k != "forgetting"}), "buffers"
    yield "extra buffer", bufs(formal_since=torch.full((n,), -1, dtype=torch.int16)), "buffers"
    yield "buffer shape", bufs(sums=b["sums"][:-1]), "'sums'"
    yield "buffer dtype", bufs(forgetting=b["forgetting"].int()), "'forgetting'"
    yield "buffer type", bufs(grad_sq_sum=[0.0] * n), "'grad_sq_sum'"
    yield "sparse buffer", bufs(sums=b["sums"].to_sparse()), "'sums'"
    yield "learned range", bufs(learned_since=b["learned_since"] - 5), "'learned_since'"
    yield "forgetting range", bufs(forgetting=b["forgetting"] + st["epochs"] + 1), "'forgetting'"
    yield "negative rows", bufs(counts=b["counts"] * -1 - 1), "'counts'"
    more_correct = b["counts"].clone()
    more_correct[0, 1] = more_correct[0, 0] + 1
    yield "correct > rows", bufs(counts=more_correct), "'counts'"
    yield "negative grad rows", bufs(grad_rows=b["grad_rows"] - 1000), "'grad_rows'"
    yield "status word", bufs(errors=torch.tensor([8], dtype=torch.int32)), "'errors'"
    for col, value in (
        (0, float("nan")),
        (0, float("inf")),
        (3, float("-inf")),
        (4, float("nan")),
        (4, -float("inf")),
    ):
        sums = b["sums"].clone()
        sums[1, col] = value
        yield f"sums[:, {col}] = {value}", bufs(sums=sums), "'sums'"
    grad = b["grad_sq_sum"].clone()
    grad[0] = float("inf")
    yield "infinite grad sum", bufs(grad_sq_sum=grad), "'grad_sq_sum'"
    yield (
        "infinite grad history",
        s(grad_history=[h.clone().fill_(float("inf")) for h in st["grad_history"]]),
        "grad_history",
    )
    yield "range", s(range=[0, n + 1]), "sample ids"
    yield "version", s(version=3), "format version"


def test_margin_sums_may_be_infinite():
    """A row whose other logits are all -inf has margin +inf (documented): such a state saves and loads."""
    tr = memcore.Tracker(2)
    memcore.accumulate(
        torch.tensor([[0.0, float("-inf")], [1.0, 0.0]]), torch.tensor([0, 0]), torch.arange(2), tr
    )
    tr.end_epoch()
    assert tr.state_dict()["buffers"]["sums"][0, memcore._state.S_MARGIN] == float("inf")
    back = memcore.Tracker(2)
    back.load_state_dict(tr.state_dict())
    assert_same_state(back.state_dict(), tr.state_dict())


def test_fixed_tau_tracker_saves_and_resumes(tmp_path):
    """A Tracker with a fixed finite tau and input gradients: saved, loaded and trained on, it ends
    with the scores of the run that never stopped."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 4, generator=g)
    data = [(torch.randn(8, 5, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]

    def epoch(tr, x, y):
        x = x.clone().requires_grad_()
        memcore.accumulate(torch.tanh(x) @ w, y, torch.arange(8), tr, inputs=x).backward()
        tr.end_epoch()

    full = memcore.Tracker(8, tau=0.05)
    for x, y in data:
        epoch(full, x, y)
    part = memcore.Tracker(8, tau=0.05)
    for x, y in data[:2]:
        epoch(part, x, y)
    part.save(str(tmp_path / "t.pt"))
    resumed = memcore.Tracker(8, tau=0.05)
    resumed.load(str(tmp_path / "t.pt"))
    for x, y in data[2:]:
        epoch(resumed, x, y)
    assert_same_state(resumed.state_dict(), full.state_dict())
    assert not torch.isnan(full.scores()["learning_time_formal"]).any()


def test_load_state_dict_is_atomic():
    good = trained_tracker(inputs=True).state_dict()
    assert good["grad_start"] >= 0 and len(good["grad_history"]) == 2
    for _name, bad, match in _corruptions(good):
        tr = trained_tracker(seed=5)
        before = tr.state_dict()
        with pytest.raises(ValueError, match=match):
            tr.load_state_dict(bad)
        assert_same_state(tr.state_dict(), before)  # a rejected load changes nothing
    tr = trained_tracker(seed=5)
    tr.load_state_dict(good)
    assert_same_state(tr.state_dict(), good)


def _v1_corruptions(st):
    s = lambda **kw: {**st, **kw}
    bufs = lambda **kw: {**st, "buffers": {**st["buffers"], **kw}}
    b = st["buffers"]
    n = st["num_samples"]
    yield s(epochs=-1, grad_start=-1, grad_history=[]), r"'epochs' must be an int in \[0, "
    yield s(grad_history=st["grad_history"][:-1]), "grad_history"
    yield s(buffers={k: v for k, v in b.items() if k != "prev_correct"}), "buffers"
    yield bufs(total=b["total"][:-1]), "'total'"
    yield bufs(last_loss=[0.0] * n), "'last_loss'"
    yield bufs(learned_since=b["learned_since"] - 5), "'learned_since'"
    yield bufs(total=b["total"] * -1 - 1), "'total'"
    yield s(range=[0, n]), "unexpected keys"


@pytest.mark.parametrize("tau", ["None", "0.3"])
def test_load_of_a_bad_format_1_state_is_atomic(tau):
    """The format-1 conversion path checks the old layout first: a bad one changes nothing."""
    good = torch.load(os.path.join(os.path.dirname(__file__), "data", "tracker_v1.pt"), weights_only=True)[
        tau
    ]["state"]
    assert good["version"] == 1 and good["grad_start"] >= 0 and len(good["grad_history"]) > 0
    for bad, match in _v1_corruptions(good):
        tr = trained_tracker(seed=5)
        before = tr.state_dict()
        with pytest.raises(ValueError, match=match):
            tr.load_state_dict(bad)
        assert_same_state(tr.state_dict(), before)
    tr = trained_tracker(seed=5)
    tr.load_state_dict(good)
    assert tr.state_dict()["version"] == 2


class _Marker:
    """A pickled callable that would leave a file behind if it ever ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_load_refuses_pickled_callables_and_runs_nothing(tmp_path):
    tr = trained_tracker()
    marker = tmp_path / "ran"
    for payload in ({**tr.state_dict(), "tau": _Marker(str(marker))}, _Marker(str(marker))):
        path = tmp_path / "evil.pt"
        torch.save(payload, path)
        target = trained_tracker(seed=7)
        before = target.state_dict()
        with pytest.raises(ValueError, match="refused"):
            target.load(str(path))
        assert not marker.exists()
        assert_same_state(target.state_dict(), before)


def test_load_of_a_cut_or_foreign_file_names_it(tmp_path):
    """A checkpoint cut short (a crash while copying it), an empty file or another format: ValueError
    naming the file, whatever torch.load raised, and the tracker unchanged."""
    tr = trained_tracker()
    good = str(tmp_path / "good.pt")
    tr.save(good)
    data = open(good, "rb").read()
    target = trained_tracker(seed=7)
    before = target.state_dict()
    for name, content in (("cut", data[: len(data) // 2]), ("empty", b""), ("text", b"epochs: 3\n" * 20)):
        path = str(tmp_path / f"{name}.pt")
        open(path, "wb").write(content)
        with pytest.raises(ValueError, match=f"{path} is not a readable memcore Tracker checkpoint"):
            target.load(path)
        assert_same_state(target.state_dict(), before)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        target.load(str(tmp_path / "absent.pt"))


def test_save_load_weights_only_round_trip(tmp_path):
    tr = trained_tracker(inputs=True, tau=np.float64(0.5))  # a numpy scalar is saved as a plain float
    assert type(tr.state_dict()["tau"]) is float
    path = str(tmp_path / "t.pt")
    tr.save(path)
    torch.load(path, weights_only=True)
    back = memcore.Tracker(tr.num_samples)
    back.load(path)
    assert_same_state(back.state_dict(), tr.state_dict())


def test_concurrent_saves_to_one_path(tmp_path):
    tr = trained_tracker()
    path = str(tmp_path / "t.pt")

    def saves():
        for _ in range(5):
            tr.save(path)

    assert run_concurrently(saves, 6) == []
    assert os.listdir(tmp_path) == ["t.pt"]  # no temporary files left behind
    back = memcore.Tracker(tr.num_samples)
    back.load(path)
    assert_same_state(back.state_dict(), tr.state_dict())


def test_resume_keeps_prev_correct():
    """Saved where samples are correct: a resumed run must count the forgetting that follows."""
    y = torch.tensor([0, 1, 2])
    right = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    wrong = torch.tensor([[0, 5.0, 0], [0, 5.0, 0], [5.0, 0, 0]])
    epochs = [right, right, wrong]
    full = memcore.Tracker(3)
    part = memcore.Tracker(3)
    for e, z in enumerate(epochs):
        memcore.accumulate(z, y, torch.arange(3), full)
        full.end_epoch()
        if e < 2:
            memcore.accumulate(z, y, torch.arange(3), part)
            part.end_epoch()
    resumed = memcore.Tracker(3)
    resumed.load_state_dict(part.state_dict())
    memcore.accumulate(epochs[2], y, torch.arange(3), resumed)
    resumed.end_epoch()
    a, b = full.scores(), resumed.scores()
    assert a["forgetting"].tolist() == [1.0, 0.0, 1.0]
    for k in a:
        assert torch.equal(a[k].nan_to_num(-1), b[k].nan_to_num(-1)), k


def test_state_dict_round_trip_gives_identical_scores(tmp_path, device):
    epochs = [random_batches(16, 4, 12, 2, gen=torch.Generator().manual_seed(e)) for e in range(4)]
    full = run_tracker(epochs, 12, device)
    part = run_tracker(epochs[:2], 12, device)
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
    old = dict(fixture["scores"])
    # 0.1.0's forgetting is the raw transition count, forgetting_events here; forgetting adds +inf for a
    # seen sample never correct in an epoch: not learned at the end (learning_time = the 3 epochs) and
    # never forgotten
    events = old.pop("forgetting")
    torch.testing.assert_close(got["forgetting_events"], events, rtol=0, atol=0)
    seen = old["rows"] > 0
    never = seen & (old["learning_time"] == 3) & (events == 0)
    assert never.any() and (seen & ~never).any()
    want = torch.where(never, float("inf"), torch.where(seen, events, float("nan")))
    torch.testing.assert_close(got["forgetting"], want, rtol=0, atol=0, equal_nan=True)
    for k, want in old.items():
        torch.testing.assert_close(got[k], want, rtol=1e-12, atol=1e-12, equal_nan=True, msg=k)
    assert tr.state_dict()["version"] == 2 and (
        ("formal_since" in tr.state_dict()["buffers"]) == (tau != "None")
    )
