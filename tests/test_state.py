"""The per-sample state's commit (memcore/_state.py): rows added in a fixed order, so scores are bitwise
reproducible with repeated ids; no op that torch.use_deterministic_algorithms refuses on the commit,
close and score paths; a flush issues a bounded number of ATen ops and never copies the state."""

import pytest
import torch
from reference import assert_same_state
from torch.profiler import ProfilerActivity, profile

import memcore
from memcore import _state as S

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")],
)


def _rows(n, num_samples, per_id, g):
    """n random rows whose ids come in runs of `per_id` (every token of a sequence shares its id)."""
    index = torch.randint(0, num_samples, (n // per_id,), generator=g).repeat_interleave(per_id)
    vals = torch.stack(
        [
            torch.rand(n, generator=g, dtype=torch.float64) * 5,  # loss
            torch.rand(n, generator=g, dtype=torch.float64),  # p(target)
            torch.randn(n, generator=g, dtype=torch.float64) * 3,  # margin
            torch.randint(0, 2, (n,), generator=g).double(),  # correct
        ],
        1,
    )
    keep = torch.rand(n, generator=g) > 0.2
    index[~keep & (torch.rand(n, generator=g) > 0.5)] = -7  # a masked row's id may be anything
    return index, vals, keep


def test_cpu_commit_adds_each_samples_rows_serially_in_row_order():
    """The documented CPU order, bitwise: per sample, ((state + row 1) + row 2) + ..., masked rows
    adding nothing, and last_loss replaced by the epoch's loss sum at the sample's first rows."""
    g = torch.Generator().manual_seed(0)
    s, n = 7, 96
    st = S.allocate(s, torch.device("cpu"))
    st["sums"][:, S.S_LAST] = torch.arange(s, dtype=torch.float64) + 0.5  # last_loss of an earlier epoch
    st["counts"][3, S.C_ROWS_E] = 2  # sample 3 already has rows this epoch
    st["sums"][3, S.S_LAST] = 1.25
    want_sums, want_counts = st["sums"].clone(), st["counts"].clone()
    for _ in range(3):  # several commits: the state carries over
        index, vals, keep = _rows(n, s, 4, g)
        for i, v, k in zip(index.tolist(), vals.tolist(), keep.tolist()):
            if not k:
                continue
            loss, p, margin, correct = v
            if want_counts[i, S.C_ROWS_E] == 0:
                want_sums[i, S.S_LAST] = 0.0
            for col, x in ((S.S_LAST, loss), (S.S_PROB, p), (S.S_PROB_SQ, p * p), (S.S_MARGIN, margin)):
                want_sums[i, col] = float(want_sums[i, col]) + x  # Python float: IEEE double, in order
            want_counts[i, S.C_ROWS_E] += 1
            want_counts[i, S.C_CORRECT_E] += int(correct)
        S.commit(st, index, vals, keep)
        assert torch.equal(st["sums"].view(torch.int64), want_sums.view(torch.int64))
        assert torch.equal(st["counts"], want_counts)


def _run(device, steps=10, flush_every=3):
    """Two epochs of sequence-like batches (64 rows per id, ignored rows, input gradients), several
    flushes per epoch; returns the tracker's scores and state_dict()."""
    g = torch.Generator().manual_seed(1)
    s, n, c = 40, 512, 7
    tr = memcore.Tracker(s, device=device, flush_every=flush_every)
    w = torch.randn(c, generator=g).to(device)
    for _ in range(2):
        for _ in range(steps):
            index = torch.randint(0, s, (n // 64,), generator=g).repeat_interleave(64).to(device)
            x = torch.randn(n, c, generator=g).to(device).requires_grad_()
            y = torch.randint(0, c, (n,), generator=g).to(device)
            y[torch.rand(n, generator=g).to(device) < 0.1] = -100
            memcore.accumulate(x * w, y, index, tr, inputs=x).backward()  # elementwise: no cuBLAS
        tr.end_epoch()
    return tr.scores(), tr.state_dict()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_scores_are_bitwise_reproducible_with_repeated_ids(device):
    (s1, st1), (s2, st2) = _run(device), _run(device)
    for k in s1:
        assert torch.equal(s1[k].view(torch.int64), s2[k].view(torch.int64)), k
    assert_same_state(st1, st2)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_no_op_refused_under_deterministic_algorithms(device, tmp_path):
    """Recording (flushes, input gradients, a rejected batch), end_epoch, scores, state_dict,
    load_state_dict, save and load under torch.use_deterministic_algorithms(True): nothing raises,
    and the results are bitwise those of the default mode."""

    def run():
        g = torch.Generator().manual_seed(2)
        tr = memcore.Tracker(16, device=device, strict=False, flush_every=2)
        for step in range(5):
            x = torch.randn(32, 6, generator=g).to(device).requires_grad_()
            y = torch.randint(0, 6, (32,), generator=g).to(device)
            if step == 3:
                y[0] = 99  # rejected: reported at end_epoch
            memcore.accumulate(x * 2, y, torch.arange(32, device=device) % 16, tr, inputs=x).backward()
        with pytest.raises(ValueError, match="rejected"):
            tr.end_epoch()
        tr.end_epoch()
        path = str(tmp_path / f"t{torch.are_deterministic_algorithms_enabled()}.pt")
        tr.save(path)
        back = memcore.Tracker(16, device=device)
        back.load(path)
        back.load_state_dict(back.state_dict())
        return back.scores(), back.state_dict()

    want = run()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = run()
    finally:
        torch.use_deterministic_algorithms(before)
    for k in want[0]:
        assert torch.equal(got[0][k].nan_to_num(-1), want[0][k].nan_to_num(-1)), k
    assert_same_state(got[1], want[1])


# op calls one flush may issue, whatever the number of buffered batches (gathering the buffered rows,
# then the commit), and one accumulate + backward that only buffers its rows: budgets, not measurements
FLUSH_OPS = 64
STEP_OPS = 16
COPIES = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::empty_like"}


def _ops(fn, nested=False):
    """The ATen / memcore op calls fn makes itself (with `nested`, also those the ops make), with shapes."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    out = []
    for e in prof.events():
        if "::" not in e.name:
            continue
        p = e.cpu_parent
        while p is not None and "::" not in p.name:
            p = p.cpu_parent
        if p is None or nested:
            out.append(e)
    return out


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("buffered", [2, 16])
def test_a_flush_issues_a_bounded_number_of_ops_and_copies_no_state(buffered, device):
    s = 1 << 17  # the state: far more rows than a flush commits (buffered * 512)
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(512, 10, generator=g), torch.randint(0, 10, (512,), generator=g)
    idx = torch.randint(0, s, (512,), generator=g)
    y[::5] = -100  # ignored rows: masked in the commit
    z, y, idx = z.to(device), y.to(device), idx.to(device)
    tr = memcore.Tracker(s, device=device, flush_every=buffered)
    memcore.accumulate(z, y, idx, tr)
    tr.scores()  # warm: every later call sees a state that exists
    for _ in range(buffered - 2):
        memcore.accumulate(z, y, idx, tr)
    only_buffers = _ops(lambda: memcore.accumulate(z, y, idx, tr))
    assert tr.buffered_bytes() > 0
    flushes = _ops(lambda: memcore.accumulate(z, y, idx, tr))
    assert tr.buffered_bytes() == 0
    for _ in range(buffered - 1):
        memcore.accumulate(z, y, idx, tr)
    every = _ops(lambda: memcore.accumulate(z, y, idx, tr), nested=True)  # flushes again
    flush_ops = len(flushes) - len(only_buffers)
    assert 0 < flush_ops <= FLUSH_OPS, [e.name for e in flushes]
    puts = {tuple(e.input_shapes[0]) for e in flushes if e.name == "aten::_index_put_impl_"}
    scatters = {tuple(e.input_shapes[0]) for e in flushes if e.name == "aten::scatter_"}
    adds = [tuple(e.input_shapes[0]) for e in flushes if e.name == "aten::index_add_"]
    # the last_loss reset writes into the flat sums (CPU: a scatter_, CUDA: an index_put_); the CPU
    # accumulates each column with a serial 1-D index_add_ on its view (no copy), CUDA with one
    # index_put_ per whole contiguous state tensor (it would copy a strided column view whole, twice
    # per call)
    if device == "cpu":
        assert scatters == {(s * S.NUM_SUMS,)} and not puts and adds == [(s,)] * 6, (scatters, puts, adds)
    else:
        assert puts == {(s, S.NUM_SUMS), (s, S.NUM_COUNTS), (s * S.NUM_SUMS,)} and not adds, (puts, adds)
    for e in every:
        if e.name in COPIES:
            numel = [torch.Size(sh).numel() for sh in e.input_shapes if sh]
            assert max(numel, default=0) < s, f"{e.name} {e.input_shapes}: a copy of the whole state"
    xb = z.clone().requires_grad_()
    step = _ops(lambda: memcore.accumulate(xb, y, idx, tr).backward())
    assert len([e for e in step if not e.name.startswith("autograd::")]) <= STEP_OPS, [e.name for e in step]
