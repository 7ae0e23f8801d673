"""Property-based tests (hypothesis): random shapes, dtypes, reductions, ignore_index placement,
index repetition, strides and upstream gradients.

Properties: loss and gradients equal F.cross_entropy's; tracker statistics equal a plain-PyTorch
reference (tests/reference.py); a rejected batch leaves state_dict() bitwise unchanged;
save -> load gives identical scores().

Profiles (HYPOTHESIS_PROFILE): "ci" (default) is derandomized with a fixed example budget, so CI
runs the same examples every time within its time budget; "dev" draws many more, randomly:
    HYPOTHESIS_PROFILE=dev python -m pytest tests/test_cross_entropy_properties.py
"""

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from reference import scores as reference_scores  # noqa: E402

import memcore  # noqa: E402

_COMMON = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True
)
settings.register_profile("ci", derandomize=True, max_examples=30, **_COMMON)
settings.register_profile("dev", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# 16-bit results of float32 math against float32 math: one rounding (half an ulp) plus float32 noise
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-8, atol=1e-6),
    torch.float16: dict(rtol=2**-11, atol=1e-6),
}
MAX_ELEMENTS = 150_000  # N x C per batch: keeps an example in milliseconds


@st.composite
def batches(draw, max_rows=40):
    """(logits [N, C] of some layout, targets, index, num_samples, ignore_index), values from a seed."""
    c = draw(st.one_of(st.integers(2, 40), st.integers(41, 2100), st.integers(2100, 70_000)))
    n = draw(st.integers(0, max(0, min(max_rows, MAX_ELEMENTS // c))))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        z = torch.randn(n, c, generator=g) * scale
    elif layout == "transposed":
        z = (torch.randn(c, n, generator=g) * scale).t()
    elif layout == "sliced":  # every other row, and a column offset
        z = (torch.randn(2 * n, c + 3, generator=g) * scale)[::2, 3:]
    else:  # one row repeated with stride 0
        z = (torch.randn(1, c, generator=g) * scale).expand(n, c)
    z = z.to(dtype) if layout != "expanded" else z.to(dtype).expand(n, c)
    ignore_index = draw(st.sampled_from([-100, 0, c - 1, -1]))  # also a valid class id
    targets = torch.randint(0, c, (n,), generator=g)
    if n:
        ignored = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        targets[ignored] = ignore_index
    pattern = draw(st.sampled_from(["distinct", "random", "all same"]))
    num_samples = draw(st.integers(1, max(1, n + 3)))
    if pattern == "distinct" and n <= num_samples:
        index = torch.randperm(num_samples, generator=g)[:n]
    elif pattern == "all same":
        index = torch.full((n,), num_samples - 1, dtype=torch.int64)
    else:
        index = torch.randint(0, num_samples, (n,), generator=g)
    return z, targets, index, num_samples, ignore_index


def _ref_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@given(
    batch=batches(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    route=st.sampled_from(["default", "inputs", "overwrite"]),
    upstream_seed=st.integers(0, 1000),
)
def test_loss_and_gradients_equal_f_cross_entropy(batch, reduction, route, upstream_seed):
    z, targets, index, s, ii = batch
    if route == "overwrite" and reduction == "none":
        route = "default"
    n = len(targets)
    g = torch.Generator().manual_seed(upstream_seed)
    a = z.detach().requires_grad_()  # keeps the layout (strides) of z
    b = z.detach().to(_ref_dtype(z.dtype)).requires_grad_()
    x = torch.zeros(n, 1, requires_grad=True) if route == "inputs" else None
    za = a if route != "inputs" else a + x.to(a.dtype)
    if route == "overwrite":
        za = a.clone()  # model output, not a leaf (overwrite writes the gradient over its memory)
    tr = memcore.Tracker(s)
    got = memcore.accumulate(
        za,
        targets,
        index,
        tr,
        reduction=reduction,
        ignore_index=ii,
        inputs=x,
        overwrite_logits=route == "overwrite",
    )
    want = F.cross_entropy(b, targets, reduction=reduction, ignore_index=ii)
    assert got.dtype == z.dtype and got.shape == want.shape
    torch.testing.assert_close(
        got.float(), want.float(), equal_nan=True, **_grad_tol(z.dtype, torch.ones(()), z)
    )
    if n == 0 or (reduction == "mean" and bool((targets == ii).all())):
        return  # no gradient to compare (an empty or all-ignored mean is NaN, in both)
    up = (
        torch.randn(want.shape, generator=g)
        if reduction == "none"
        else torch.tensor(1.0 + upstream_seed / 100)
    )
    got.backward(up.to(got.dtype))
    want.backward(up.to(got.dtype).to(want.dtype))  # the same upstream values on both
    assert a.grad.dtype == z.dtype
    tol = _grad_tol(z.dtype, up, z)
    if route == "overwrite" and z.dtype in (torch.bfloat16, torch.float16):
        tol["rtol"] *= (
            2  # documented: stored in the logits' dtype, then scaled by the upstream (two roundings)
        )
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)


def _grad_tol(dtype, up, z):
    """TOL, with an absolute part for entries near 0 (p - 1 at a confident target): the log-sum-exp
    carries an absolute error of order eps * max|logit| in the math dtype, times the upstream."""
    tol = dict(TOL[dtype])
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    big = float(z.float().abs().max()) if z.numel() else 0.0
    tol["atol"] = (tol["atol"] + 2 * eps * big) * max(1.0, float(up.abs().max()) if up.numel() else 1.0)
    return tol


@given(
    epochs=st.lists(st.lists(batches(max_rows=24), min_size=1, max_size=3), min_size=1, max_size=3),
    num_samples=st.integers(1, 30),
)
def test_tracker_statistics_equal_the_reference(epochs, num_samples):
    """Several epochs of random batches (each with its own dtype, layout, ignore_index and index
    pattern, indices folded into one dataset): scores equal the plain-PyTorch reference."""
    tr = memcore.Tracker(num_samples)
    ref_epochs = []
    for batches_ in epochs:
        ref_batches = []
        for z, targets, index, _s, ii in batches_:
            index = index % num_samples
            # the reference works with one ignore_index: map this batch's to -100
            t = torch.where(targets == ii, torch.full_like(targets, -100), targets)
            memcore.accumulate(z, targets, index, tr, ignore_index=ii)
            ref_batches.append((z.float() if z.dtype != torch.float64 else z, t, index))
        tr.end_epoch()
        ref_epochs.append(ref_batches)
    got, want = tr.scores(), reference_scores(ref_epochs, num_samples)
    for k in ("rows", "correctness", "forgetting", "forgetting_events", "learning_time"):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True, msg=k)
    for k in ("csl", "csl_mean", "last_loss", "confidence_mean", "aum"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, equal_nan=True, msg=k)


def _state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "buffers":
            for name, t in a[k].items():
                u = b[k][name]
                assert t.dtype == u.dtype and t.shape == u.shape
                if t.dtype == torch.bool:
                    assert torch.equal(t, u), name
                else:
                    assert torch.equal(t.view(torch.uint8), u.view(torch.uint8)), name
        elif k == "grad_history":
            assert len(a[k]) == len(b[k]) and all(
                torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a[k], b[k])
            )
        else:
            assert a[k] == b[k], k


@given(
    batch=batches(max_rows=16),
    fault=st.sampled_from(
        ["target high", "target negative", "index high", "index negative", "nan", "+inf", "target -inf"]
    ),
    route=st.sampled_from(["default", "inputs", "overwrite"]),
    row_seed=st.integers(0, 10**6),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_rejected_batch_leaves_state_bitwise_unchanged(batch, fault, route, row_seed, reduction):
    z, targets, index, s, ii = batch
    n, c = z.shape
    keep = (targets != ii).nonzero().flatten()
    if n == 0 or len(keep) == 0:
        return
    if route == "overwrite" and reduction == "none":
        route = "default"
    tr = memcore.Tracker(s)
    # some history first: one good epoch and an open one
    memcore.accumulate(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.tensor([0, s - 1, 0]), tr)
    tr.end_epoch()
    memcore.accumulate(torch.randn(2, 4), torch.tensor([3, 1]), torch.tensor([s - 1, 0]), tr)
    before = tr.state_dict()
    r = int(keep[row_seed % len(keep)])
    z = z.clone()  # dense copy, writable
    targets, index = targets.clone(), index.clone()
    if fault == "target high":
        targets[r] = c if c != ii else c + 1
    elif fault == "target negative":
        targets[r] = -5 if ii != -5 else -6
    elif fault == "index high":
        index[r] = s
    elif fault == "index negative":
        index[r] = -1
    elif fault == "nan":
        z[r, row_seed % c] = float("nan")
    elif fault == "+inf":
        z[r, row_seed % c] = float("inf")
    else:
        z[r, targets[r]] = float("-inf")
    x = torch.zeros(n, 1, requires_grad=True) if route == "inputs" else None
    logits = z.requires_grad_() if route != "inputs" else z.requires_grad_() + x.to(z.dtype)
    if route == "overwrite":
        logits = logits.clone()
    with pytest.raises((IndexError, ValueError), match=rf"\[{r}\]|row {r}\b"):
        memcore.accumulate(
            logits,
            targets,
            index,
            tr,
            reduction=reduction,
            ignore_index=ii,
            inputs=x,
            overwrite_logits=route == "overwrite",
        )
    _state_equal(tr.state_dict(), before)


@given(
    epochs=st.lists(st.lists(batches(max_rows=12), min_size=1, max_size=2), min_size=1, max_size=3),
    num_samples=st.integers(1, 20),
    record_inputs=st.booleans(),
    open_epoch=st.booleans(),
)
def test_save_load_gives_identical_scores(epochs, num_samples, record_inputs, open_epoch):
    tr = memcore.Tracker(num_samples)
    for e, batches_ in enumerate(epochs):
        for z, targets, index, _s, ii in batches_:
            x = torch.zeros(len(targets), 1, requires_grad=True) if record_inputs else None
            logits = z.detach().requires_grad_()
            loss = memcore.accumulate(
                logits if x is None else logits + x.to(z.dtype),
                targets,
                index % num_samples,
                tr,
                ignore_index=ii,
                inputs=x,
                reduction="sum",
            )
            loss.backward()
        if e < len(epochs) - 1 or not open_epoch:
            tr.end_epoch()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tracker.pt")
        tr.save(path)
        back = memcore.Tracker(num_samples)
        back.load(path)
    _state_equal(back.state_dict(), tr.state_dict())
    a, b = tr.scores(), back.scores()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].nan_to_num(-7.0), b[k].nan_to_num(-7.0)), k
