"""Drop-in promises under double backward, autocast, overflow, misuse, threads and untrusted files."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import scores as reference_scores

import memcore
from memcore import export


def _same_state(a, b):
    """state_dict() equality, bitwise for every tensor."""
    assert a.keys() == b.keys()
    for k in a:
        if k == "buffers":
            assert a[k].keys() == b[k].keys()
            for name in a[k]:
                x, y = a[k][name], b[k][name]
                assert x.dtype == y.dtype and x.shape == y.shape, name
                assert torch.equal(
                    x.view(torch.uint8) if x.dtype != torch.bool else x,
                    y.view(torch.uint8) if y.dtype != torch.bool else y,
                ), name
        elif k == "grad_history":
            assert len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
        else:
            assert a[k] == b[k], k


def _trained(n=12, epochs=2, seed=0, inputs=False, tau=None):
    g = torch.Generator().manual_seed(seed)
    tr = memcore.Tracker(n, tau=tau)
    w = torch.randn(5, 4, generator=g)
    for _ in range(epochs):
        x = torch.randn(n, 5, generator=g).requires_grad_()
        y = torch.randint(0, 4, (n,), generator=g)
        loss = memcore.accumulate(x @ w, y, torch.arange(n), tr, inputs=x if inputs else None)
        if inputs:
            loss.backward()
        tr.end_epoch()
    # an open epoch too
    memcore.accumulate(
        torch.randn(n, 4, generator=g), torch.randint(0, 4, (n,), generator=g), torch.arange(n), tr
    )
    return tr


# ----------------------------------------------------------------------------- 1. double backward
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_inputs", [False, True])
def test_gradcheck_and_gradgradcheck_fp64(reduction, with_inputs):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, -100, 2, 2, 1])
    idx = torch.tensor([0, 1, 2, 3, 3, 4])

    def f(z):
        x = z * 1.0 if with_inputs else z
        tr = memcore.Tracker(5)
        if with_inputs:  # ce_forward's node (the route of inputs=) instead of ce_forward_reduce's
            xin = torch.randn(6, 2, dtype=torch.float64).requires_grad_()
            x = x + (xin * 0).sum(1, keepdim=True)
            return memcore.accumulate(x, y, idx, tr, reduction=reduction, inputs=xin)
        return memcore.accumulate(x, y, idx, tr, reduction=reduction)

    assert torch.autograd.gradcheck(f, (z,))
    assert torch.autograd.gradgradcheck(f, (z,))


def test_gradient_penalty_matches_f_cross_entropy():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    y = torch.randint(0, 6, (10,))
    y[3] = -100
    grads = []
    for use_memcore in (False, True):
        lin.zero_grad()
        z = lin(x)
        loss = (
            memcore.accumulate(z, y, torch.arange(10), memcore.Tracker(10))
            if use_memcore
            else F.cross_entropy(z, y)
        )
        (gw,) = torch.autograd.grad(loss, lin.weight, create_graph=True)
        (loss + gw.pow(2).sum()).backward()
        grads.append(lin.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_double_backward_low_precision(dtype):
    """Second derivatives in float32 math for 16-bit logits, returned in the logits' dtype."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(7, 9, generator=g).to(dtype)
    y = torch.randint(0, 9, (7,), generator=g)
    v = torch.randn(7, 9, generator=g).to(dtype).float()  # exact in dtype: both routes see the same v
    out = []
    for use_memcore in (False, True):
        z = (
            base.clone() if use_memcore else base.float().clone()
        ).requires_grad_()  # reference: float32 math
        loss = (
            memcore.accumulate(z, y, torch.arange(7), memcore.Tracker(7))
            if use_memcore
            else F.cross_entropy(z, y)
        )
        (gz,) = torch.autograd.grad(loss, z, create_graph=True)
        (gz.float() * v).sum().backward()
        out.append(z.grad)
    assert out[1].dtype == dtype
    # float32 math rounded once to dtype: within half an ulp of the float32 reference
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(out[1].float(), out[0], **tol)


def test_overwrite_logits_refuses_double_backward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 5)
    z = lin(torch.randn(3, 4))
    loss = memcore.accumulate(
        z, torch.tensor([0, 1, 2]), torch.arange(3), memcore.Tracker(3), overwrite_logits=True
    )
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, lin.weight, create_graph=True)


# ----------------------------------------------------------------------------- 2. autocast
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_inputs", [False, True])
def test_autocast_value_and_dtype_match_f_cross_entropy(dtype, reduction, with_inputs, device):
    if device == "cpu" and dtype == torch.float16 and not hasattr(torch, "is_autocast_available"):
        pytest.skip("old torch without CPU float16 autocast")
    g = torch.Generator().manual_seed(3)
    n, c = 2048, 300
    x = torch.randn(n, 16, generator=g).to(device)
    w = (torch.randn(16, c, generator=g) * 3).to(device)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    y[::9] = -100
    idx = torch.arange(n, device=device)
    res = {}
    for use_memcore in (False, True):
        xb = x.clone().requires_grad_()
        wb = w.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype):
            z = xb @ wb
            assert z.dtype == dtype
            z.retain_grad()
            if use_memcore:
                loss = memcore.accumulate(
                    z,
                    y,
                    idx,
                    memcore.Tracker(n, device=device),
                    reduction=reduction,
                    inputs=xb if with_inputs else None,
                )
            else:
                loss = F.cross_entropy(z, y, reduction=reduction)
        loss.sum().backward()
        res[use_memcore] = (loss.detach(), z.grad)
    (l0, g0), (l1, g1) = res[False], res[True]
    assert l1.dtype == l0.dtype == torch.float32 and l1.shape == l0.shape
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    # both: float32 math rounded once to dtype, so at most one ulp apart; plus float32 noise on
    # entries near 0 (p - 1 at a confident target), of the order of eps32 * |logits| (~40 here)
    assert g1.dtype == g0.dtype == dtype
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(g1.float(), g0.float(), rtol=ulp, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_autocast_overwrite_route_matches_f_cross_entropy(dtype, reduction):
    """The third route (ce_forward_grad_, overwrite_logits=True) under autocast: float32 loss, and a
    gradient within one 16-bit ulp of F.cross_entropy's."""
    g = torch.Generator().manual_seed(4)
    n, c = 512, 200
    x, w = torch.randn(n, 16, generator=g), torch.randn(16, c, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    y[::7] = -100
    res = {}
    for use_memcore in (False, True):
        wb = w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            z = x @ wb
            assert z.dtype == dtype
            if use_memcore:
                loss = memcore.accumulate(
                    z, y, torch.arange(n), memcore.Tracker(n), reduction=reduction, overwrite_logits=True
                )
            else:
                loss = F.cross_entropy(z, y, reduction=reduction)
        loss.backward()
        res[use_memcore] = (loss.detach(), wb.grad)
    (l0, g0), (l1, g1) = res[False], res[True]
    assert l1.dtype == l0.dtype == torch.float32
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    # the weight gradient sums 16-bit logits gradients over rows: measured within 2e-4 of its max
    torch.testing.assert_close(g1, g0, rtol=ulp, atol=ulp / 2 * float(g0.abs().max()))


def test_autocast_fp16_sum_does_not_overflow():
    z = (torch.randn(8192, 100) * 4).half()
    y = torch.randint(0, 100, (8192,))
    with torch.autocast("cpu", dtype=torch.float16):
        got = memcore.accumulate(z, y, torch.arange(8192), memcore.Tracker(8192), reduction="sum")
        want = F.cross_entropy(z, y, reduction="sum")
    assert torch.isfinite(want) and float(want) > 65504  # beyond float16's range
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_autocast_direct_op_returns_float32():
    z = torch.randn(4, 6).bfloat16()
    stats = torch.zeros(4, 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, status = torch.ops.memcore.ce_accumulate(
            stats, z, torch.tensor([0, 1, 2, 3]), torch.arange(4), -100, 1
        )
    assert out.dtype == torch.float32 and int(status) == 0
    torch.testing.assert_close(out, F.cross_entropy(z.float(), torch.tensor([0, 1, 2, 3])))
    out, _ = torch.ops.memcore.ce_accumulate(stats, z, torch.tensor([0, 1, 2, 3]), torch.arange(4), -100, 1)
    assert out.dtype == torch.bfloat16  # outside autocast: the logits' dtype, as F.cross_entropy


# ----------------------------------------------------------------------------- 3. overflow
@pytest.mark.parametrize("with_inputs", [False, True])
def test_finite_logits_whose_loss_overflows_float32(with_inputs):
    z = torch.tensor([[1.0, 2.0, 0.5], [3e38, -3e38, 0.0], [0.0, 1.0, 2.0]])
    y = torch.tensor([0, 1, 2])
    assert torch.isinf(F.cross_entropy(z, y, reduction="none")[1])  # what torch gives: inf
    tr = memcore.Tracker(3)
    before = tr.state_dict()
    x = torch.zeros(3, 1, requires_grad=True)
    zz = z + x if with_inputs else z
    with pytest.raises(ValueError, match=r"row 1 gives a loss of 6e\+38.*overflows"):
        memcore.accumulate(zz, y, torch.arange(3), tr, inputs=x if with_inputs else None)
    _same_state(tr.state_dict(), before)


# ----------------------------------------------------------------------------- 4, 9, 10. load
def _corruptions(st):
    s = lambda **kw: {**st, **kw}
    bufs = lambda **kw: {**st, "buffers": {**st["buffers"], **kw}}
    b = st["buffers"]
    n = st["num_samples"]
    yield "missing key", {k: v for k, v in st.items() if k != "grad_start"}, "missing keys"
    yield "negative epochs", s(epochs=-1, grad_start=-1, grad_history=[]), "'epochs' must be >= 0"
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
    yield "range", s(range=[0, n + 1]), "sample ids"
    yield "version", s(version=3), "format version"


def test_load_state_dict_is_atomic():
    good = _trained(inputs=True).state_dict()
    assert good["grad_start"] >= 0 and len(good["grad_history"]) == 2
    for _name, bad, match in _corruptions(good):
        tr = _trained(seed=5)
        before = tr.state_dict()
        with pytest.raises(ValueError, match=match):
            tr.load_state_dict(bad)
        _same_state(tr.state_dict(), before)  # a rejected load changes nothing
    tr = _trained(seed=5)
    tr.load_state_dict(good)
    _same_state(tr.state_dict(), good)


def _v1_corruptions(st):
    s = lambda **kw: {**st, **kw}
    bufs = lambda **kw: {**st, "buffers": {**st["buffers"], **kw}}
    b = st["buffers"]
    n = st["num_samples"]
    yield s(epochs=-1, grad_start=-1, grad_history=[]), "'epochs' must be >= 0"
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
        tr = _trained(seed=5)
        before = tr.state_dict()
        with pytest.raises(ValueError, match=match):
            tr.load_state_dict(bad)
        _same_state(tr.state_dict(), before)
    tr = _trained(seed=5)
    tr.load_state_dict(good)
    assert tr.state_dict()["version"] == 2


class _Marker:
    """A pickled callable that would leave a file behind if it ever ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_load_refuses_pickled_callables_and_runs_nothing(tmp_path):
    tr = _trained()
    marker = tmp_path / "ran"
    for payload in ({**tr.state_dict(), "tau": _Marker(str(marker))}, _Marker(str(marker))):
        path = tmp_path / "evil.pt"
        torch.save(payload, path)
        target = _trained(seed=7)
        before = target.state_dict()
        with pytest.raises(ValueError, match="refused"):
            target.load(str(path))
        assert not marker.exists()
        _same_state(target.state_dict(), before)


def test_save_load_weights_only_round_trip(tmp_path):
    tr = _trained(inputs=True, tau=np.float64(0.5))  # a numpy scalar is saved as a plain float
    assert type(tr.state_dict()["tau"]) is float
    path = str(tmp_path / "t.pt")
    tr.save(path)
    torch.load(path, weights_only=True)
    back = memcore.Tracker(tr.num_samples)
    back.load(path)
    _same_state(back.state_dict(), tr.state_dict())


# ----------------------------------------------------------------------------- 5, 5b. threads
def test_concurrent_saves_to_one_path(tmp_path):
    tr = _trained()
    path = str(tmp_path / "t.pt")
    errors = []
    start = threading.Barrier(6)

    def worker():
        start.wait()
        for _ in range(5):
            try:
                tr.save(path)
            except Exception as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.listdir(tmp_path) == ["t.pt"]  # no temporary files left behind
    back = memcore.Tracker(tr.num_samples)
    back.load(path)
    _same_state(back.state_dict(), tr.state_dict())


# flush_every=1: every call commits (large batches, so that two commits overlap: without the lock they
# lose rows or fail); None: the calls only fill the row buffer
@pytest.mark.parametrize("flush_every, n, calls", [(1, 65536, 20), (None, 4096, 50)])
@pytest.mark.parametrize("with_inputs", [False, True])
def test_concurrent_accumulate_loses_no_rows(with_inputs, flush_every, n, calls):
    s = 64
    tr = memcore.Tracker(s, flush_every=flush_every)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 8, (n,), generator=g)
    idx = torch.randint(0, s, (n,), generator=g)  # heavy repetition: n / 64 rows per sample
    start = threading.Barrier(2)
    errors = []

    def worker():
        try:
            start.wait()
            for _ in range(calls):
                if with_inputs:
                    x = torch.zeros(n, 1, requires_grad=True)
                    memcore.accumulate(z + x, y, idx, tr, inputs=x).backward()
                else:
                    memcore.accumulate(z, y, idx, tr)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    sc = tr.scores()
    assert int(sc["rows"].sum()) == 2 * calls * n
    want = torch.zeros(s, dtype=torch.float64).index_add_(
        0, idx, F.cross_entropy(z.double(), y, reduction="none")
    )
    torch.testing.assert_close(sc["csl"], want * 2 * calls, rtol=1e-6, atol=0)  # float32 losses
    if with_inputs:
        assert int(tr._state()["grad_rows"].sum()) == 2 * calls * n


# ----------------------------------------------------------------------------- 6. inputs= shared
def test_inputs_shared_by_two_accumulate_calls_raises():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    tr1, tr2 = memcore.Tracker(5), memcore.Tracker(5)
    h = lin(x)
    loss = memcore.accumulate(h, y, torch.arange(5), tr1, inputs=x) + memcore.accumulate(
        h * 2, y, torch.arange(5), tr2, inputs=x
    )
    with pytest.raises(RuntimeError, match="feeds two memcore.accumulate losses"):
        loss.backward()
    for tr in (tr1, tr2):
        assert int(tr._state().get("grad_rows", torch.zeros(1)).sum()) == 0  # nothing recorded
    # one inputs= per x: exact, and the same x works again in the next step
    for _ in range(2):
        memcore.accumulate(lin(x), y, torch.arange(5), tr1, inputs=x).backward()
    assert int(tr1._state()["grad_rows"].sum()) == 10


# ----------------------------------------------------------------------------- 9. smaller ones
def test_numpy_integer_ignore_index():
    z = torch.randn(4, 3)
    y = torch.tensor([0, 7, 1, 2])
    for ii in (np.int64(7), np.int32(7), torch.tensor(7)):
        got = memcore.accumulate(z, y, torch.arange(4), memcore.Tracker(4), ignore_index=ii)
        torch.testing.assert_close(got, F.cross_entropy(z, y, ignore_index=7))
    for bad in (7.0, True, "7"):
        with pytest.raises(TypeError, match="ignore_index"):
            memcore.accumulate(z, y, torch.arange(4), memcore.Tracker(4), ignore_index=bad)


def test_meta_first_batch_leaves_tracker_usable():
    tr = memcore.Tracker(4)
    with pytest.raises(ValueError, match="meta"):
        memcore.accumulate(
            torch.randn(2, 3, device="meta"),
            torch.tensor([0, 1], device="meta"),
            torch.tensor([0, 1], device="meta"),
            tr,
        )
    assert tr.device is None
    memcore.accumulate(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([0, 1]), tr)
    assert tr.device == torch.device("cpu") and int(tr.scores()["rows"].sum()) == 2


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


def test_to_csv_checks_lengths_before_writing(tmp_path):
    sc = _trained().scores()
    path = tmp_path / "s.csv"
    with pytest.raises(ValueError, match="labels"):
        export.to_csv(sc, str(path), labels=torch.arange(5))
    assert not path.exists()
    with pytest.raises(ValueError, match="different lengths"):
        export.to_csv({"a": torch.zeros(3), "b": torch.zeros(4)}, str(path))
    assert not path.exists()
    export.to_csv(sc, str(path), labels=torch.arange(12))
    assert len(path.read_text().splitlines()) == 13


def test_ranked_issues_refuses_negative_top():
    sc = _trained().scores()
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="top"):
            export.ranked_issues(sc, top=bad)
    assert len(export.ranked_issues(sc, top=0)) == 0 and len(export.ranked_issues(sc, top=np.int64(3))) == 3


def test_overwrite_logits_on_a_leaf_writes_its_values():
    """Documented: on a leaf the gradient is written over the leaf's values and is its .grad."""
    a = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    want = torch.autograd.grad(F.cross_entropy(a, y), a)[0]
    memcore.accumulate(a, y, torch.arange(3), memcore.Tracker(3), overwrite_logits=True).backward()
    assert a.grad.data_ptr() == a.data_ptr()
    torch.testing.assert_close(a.detach(), want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_strict_tracker_inside_cuda_graph_capture_defers_errors():
    tr = memcore.Tracker(8, device="cuda")  # strict=True
    z = torch.randn(8, 5, device="cuda")
    y = torch.randint(0, 5, (8,), device="cuda")
    idx = torch.arange(8, device="cuda")
    memcore.accumulate(z, y, idx, tr)  # warm-up outside capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        memcore.accumulate(z, y, idx, tr)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        memcore.accumulate(z, y, idx, tr)
    graph.replay()
    torch.cuda.synchronize()
    assert int(tr.scores()["rows"].sum()) == 8 * 3  # warm-up, side stream and replay (capture runs nothing)
    y.fill_(99)  # out of range: the replay's error surfaces at the next check
    graph.replay()
    with pytest.raises(ValueError, match="rejected"):
        tr.end_epoch()


def _pretend_capture(monkeypatch):
    """Makes torch report a CUDA-graph capture in progress (the two torch calls memcore asks), and
    makes every host read of a tensor fail, as a capture would."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def sync(self, *args):
        raise AssertionError("host sync inside a CUDA-graph capture")

    for name in ("item", "__bool__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, sync)


def test_strict_tracker_defers_errors_while_a_stream_captures(monkeypatch):
    """Strict mode syncs per step; during a capture it must not (the capture would break): the bad
    batch is skipped on the device and its error raised at the next end_epoch, as under compile."""
    tr = memcore.Tracker(8, flush_every=2)  # strict; a flush every 2 calls would sync (keep.all())
    z, y, idx = torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.arange(8)
    memcore.accumulate(z, y, idx, tr)  # the warm-up step, outside the capture: buffered
    pending = len(tr._router.ce)
    ref = memcore.Tracker(8)
    for _ in range(3):
        memcore.accumulate(z, y, idx, ref)
    _pretend_capture(monkeypatch)
    memcore.accumulate(z, y, idx, tr)
    memcore.accumulate(z, torch.full((8,), 7), idx, tr)  # targets out of range: no raise here
    memcore.accumulate(z, y, idx, tr, reduction="none")
    # committed on the device at once: a row buffered for the next flush would be read once, not
    # once per replay of the graph
    assert len(tr._router.ce) == pending
    monkeypatch.undo()
    with pytest.raises(ValueError, match="rejected"):
        tr.end_epoch()
    assert torch.equal(tr._recorded(), ref._recorded())  # the bad batch added nothing


def test_capture_refuses_a_tracker_without_state_or_distributed(monkeypatch):
    z, y, idx = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4)
    fresh, ranks = memcore.Tracker(4), memcore.Tracker(4, distributed=True)
    _pretend_capture(monkeypatch)
    with pytest.raises(RuntimeError, match="warm-up"):  # device=None: it would move inside the graph
        memcore.accumulate(z, y, idx, fresh)
    with pytest.raises(RuntimeError, match="distributed"):
        memcore.accumulate(z, y, idx, ranks)
    x = torch.randn(4, 3, requires_grad=True)
    memcore.accumulate(x * 2, y, idx, fresh.to("cpu"))  # state ready, but no input-gradient fields
    loss = memcore.accumulate(x * 2, y, idx, fresh, inputs=x)
    with pytest.raises(RuntimeError, match="inputs="):
        loss.backward()


def test_cpu_run_does_not_initialize_cuda():
    """The capture check asks torch.cuda only once CUDA is initialized (asking would initialize it)."""
    code = (
        "import torch, memcore\n"
        "tr = memcore.Tracker(4)\n"
        "x = torch.randn(4, 3, requires_grad=True)\n"
        "memcore.accumulate(x, torch.tensor([0, 1, 2, 0]), torch.arange(4), tr, inputs=x).backward()\n"
        "tr.end_epoch(); tr.scores()\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(memcore.__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("route", [{}, {"inputs": True}, {"overwrite_logits": True}])
def test_captured_training_step_records_every_replay(route):
    """A whole step (forward, accumulate, backward) in one CUDA graph: every replay records its rows
    (and input-gradient norms), as the same steps run eagerly do."""
    torch.manual_seed(0)
    n, d, c, replays = 16, 8, 5, 3
    model = torch.nn.Linear(d, c).cuda()
    x = torch.randn(n, d, device="cuda", requires_grad=True)
    y = torch.randint(0, c, (n,), device="cuda")
    idx = torch.arange(n, device="cuda")
    tr, ref = memcore.Tracker(n, device="cuda"), memcore.Tracker(n, device="cuda")

    def step(tracker):
        kw = {**route, "inputs": x} if route.get("inputs") else route
        memcore.accumulate(model(x), y, idx, tracker, **kw).backward()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(tr)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(tr)
    for _ in range(replays):
        graph.replay()
    for _ in range(1 + replays):  # the model is not updated: every step sees the same values
        step(ref)
    a, b = tr.scores(), ref.scores()
    assert int(a["rows"].sum()) == n * (1 + replays)
    keys = ["csl", "rows", "confidence_mean", "aum"] + (["input_grad_norm"] if route.get("inputs") else [])
    for k in keys:
        torch.testing.assert_close(a[k], b[k], equal_nan=True, msg=k)


# ----------------------------------------------------------------------------- 11. surviving mutants
def _epoch_batches(logits_per_epoch, targets, n):
    return [[(z, targets, torch.arange(n))] for z in logits_per_epoch]


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
    want, got = reference_scores(epochs, n), tr.scores()
    assert want["forgetting"].sum() > 0 and (want["learning_time"] < 5).any()
    for k in want:
        exact = k in ("rows", "correctness", "forgetting", "learning_time")
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


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_with_inputs_and_ignored_rows(reduction):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4)
    x = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([0, -100, 3, -100, 1, 2])
    z = lin(x)
    got = memcore.accumulate(z, y, torch.arange(6), memcore.Tracker(6), reduction=reduction, inputs=x)
    torch.testing.assert_close(got, F.cross_entropy(z, y, reduction=reduction))


# ----------------------------------------------------------------------------- 7, 11. distributed
def _dist_worker(rank, world, init_file, out_file, mode):
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
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


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_ranks_with_different_num_samples_get_a_clear_error(tmp_path):
    for msg in _spawn(tmp_path, "mismatch"):
        assert "differ across ranks" in msg and "num_samples (rank 0: 24, rank 1: 25)" in msg, msg


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_ranks_with_different_epoch_counts_get_a_clear_error(tmp_path):
    for msg in _spawn(tmp_path, "epochs"):
        assert "differ across ranks" in msg and "from 0 to 1" in msg and "end_epoch()" in msg, msg


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_input_gradient_statistics_are_merged_across_ranks(tmp_path):
    want = _grad_run(0, 1).scores()
    assert not torch.isnan(want["input_grad_norm"]).any()
    for got in _spawn(tmp_path, "grads"):
        for k in ("input_grad_norm", "learning_time_formal", "csl", "rows"):
            torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


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
