"""The loss options' two routes (memcore::ce_forward_reduce_options, and ce_forward_grad_options_
with overwrite_logits=True) over every combination of weight x label_smoothing x softcap x z_loss x
reduction x ignore_index (the default, and a class id with a weight of its own), against the
float64 definition: F.cross_entropy on the soft-capped logits plus z_loss * lse^2 per kept row (its
mean over the kept rows). The loss, the returned z-loss, the logits' gradient for a non-uniform
upstream gradient, the second derivative; the edges: every row ignored, an empty batch, targets out
of range with Tracker(strict=False), torch.compile and autocast."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from reference import recorded

import memcore

N, C = 12, 6
IGNORES = (-100, 2)  # the default, and class 2 (its rows ignored, its weight still in W)
COMBOS = [
    dict(weight=w, label_smoothing=eps, softcap=cap, z_loss=zc)
    for w, eps, cap, zc in itertools.product((False, True), (0.0, 0.2), (None, 3.0), (0.0, 0.05))
    if w or eps or cap or zc
]


def _case(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items() if v)


def _problem(dtype, ignore_index, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, C, (n,), generator=g)
    t[::5] = ignore_index
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.1
    return z, t, w


def _reference(z, t, ignore_index, reduction, weight, label_smoothing, softcap, z_loss):
    """(loss, z-loss part) in float64 torch ops, differentiable in z."""
    x = z.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    w = None if weight is None else weight.double()
    ce = F.cross_entropy(
        x, t, weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )
    keep = t != ignore_index
    zl = torch.where(keep, z_loss * torch.logsumexp(x, 1) ** 2, 0.0)
    if reduction == "sum":
        zl = zl.sum()
    elif reduction == "mean":
        zl = zl.sum() / keep.sum()
    return ce + zl, zl


def _accumulate(z, t, ignore_index, reduction, overwrite, opts, **kw):
    n = t.shape[0]
    return memcore.accumulate(
        z, t, torch.arange(n), memcore.Tracker(n), reduction=reduction, ignore_index=ignore_index,
        overwrite_logits=overwrite, return_z_loss=True, **opts, **kw,
    )  # fmt: skip


def _upstream(reduction, n):
    """A non-uniform upstream gradient for "none", a scale other than 1 for the reduced losses (the
    overwrite route's scale_unless_one_)."""
    if reduction == "none":
        return torch.linspace(-0.5, 2.0, n, dtype=torch.float64)
    return torch.tensor(0.7, dtype=torch.float64)


def _opts(kw, w, dtype):
    return dict(kw, weight=w.to(dtype) if kw["weight"] else None)


ROUTES = [("none", False), ("mean", False), ("sum", False), ("mean", True), ("sum", True)]


@pytest.mark.parametrize("ignore_index", IGNORES)
@pytest.mark.parametrize("reduction, overwrite", ROUTES)
def test_float64_grid_against_the_definition(reduction, overwrite, ignore_index):
    """float64 throughout (exact-double kernels): loss, z-loss and gradient to 1e-10 relative."""
    z, t, w = _problem(torch.float64, ignore_index)
    up = _upstream(reduction, N)
    for kw in COMBOS:
        opts = _opts(kw, w, torch.float64)
        a = z.clone().requires_grad_()
        loss, zl = _accumulate(a, t, ignore_index, reduction, overwrite, opts)
        (loss * up).sum().backward()
        b = z.clone().requires_grad_()
        want, want_z = _reference(b, t, ignore_index, reduction, **opts)
        (want * up).sum().backward()
        case = _case(kw)
        assert loss.dtype == torch.float64 and loss.shape == want.shape, case
        assert not zl.requires_grad, case
        torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12, msg=case)
        torch.testing.assert_close(zl, want_z.detach(), rtol=1e-10, atol=1e-12, msg=case)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=case)


def _half_ulp(x, dtype):
    """Half an ulp of dtype at each |x| (float32 for float32)."""
    bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[dtype]
    x = x.abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.ldexp(torch.ones_like(x), torch.frexp(x).exponent - bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction, overwrite", ROUTES)
def test_low_precision_every_option_against_the_definition(reduction, overwrite, dtype):
    """Every option at once, class 2 ignored, on the logits as given (the reference upcasts the same
    values). The kernels work in float32: each value within a few float32 ulp relative, plus the
    result's rounding to the logits' dtype, at most half an ulp of the value; the gradient's
    entries p_t - 1 and the smoothing correction are differences of terms up to the row's
    coefficient a = up * A_r, so their float32 rounding is bounded against that peak."""
    z, t, w = _problem(dtype, 2, seed=1)
    opts = dict(weight=w.float(), label_smoothing=0.1, softcap=4.0, z_loss=0.02)
    up = _upstream(reduction, N)
    a = z.clone().requires_grad_()
    loss, zl = _accumulate(a, t, 2, reduction, overwrite, opts)
    (loss.double() * up).sum().backward()
    b = z.double().clone().requires_grad_()
    want, want_z = _reference(b, t, 2, reduction, **opts)
    (want * up).sum().backward()
    f32 = 64 * 2.0**-24  # a few float32 ulp of each value: exp / log / tanh approximations, lse rounding
    assert loss.dtype == dtype and a.grad.dtype == dtype
    # the loss's error: a few float32 ulp of the magnitudes it is formed from (lse and the capped
    # logits, weighted; lse^2 for the z-loss), per row and then summed or averaged
    keep = t != 2
    wt = torch.where(keep, w[torch.where(keep, t, 0)], 0.0)
    capped = 4.0 * torch.tanh(z.double() / 4.0)
    lse = torch.logsumexp(capped, 1)
    size = (w.max() * (lse.abs() + capped.abs().amax(1)) + 0.02 * lse**2) * keep
    size = {"none": size, "sum": size.sum(), "mean": size.sum() / wt.sum()}[reduction]
    for got, ref in ((loss, want), (zl, want_z)):
        bound = _half_ulp(ref.detach(), dtype) + f32 * size
        assert ((got.double() - ref.detach()).abs() <= bound).all(), (got, ref)
    # the peak: each row's |up| * (A_r + 2 z_loss |lse_r|) over its reduction's denominators
    ce_part, z_part = (0.9 * wt + 0.1 * w.sum() / C) * keep, 2 * 0.02 * lse.abs() * keep
    if reduction == "mean":
        ce_part, z_part = ce_part / wt.sum(), z_part / keep.sum()
    peak = ((ce_part + z_part) * up.abs()).unsqueeze(1)
    # the float32 value's error, then its rounding to dtype (an ulp of a value that may be off by it)
    bound = 2 * _half_ulp(b.grad, dtype) + 2 * f32 * (b.grad.abs() + peak)
    err = (a.grad.double() - b.grad).abs()
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("ignore_index", IGNORES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_double_backward_matches_the_definition(reduction, ignore_index):
    """create_graph=True on the default route: the Hessian-vector product, and the derivative of the
    gradient with respect to the upstream gradient, are the definition's (float64)."""
    z, t, w = _problem(torch.float64, ignore_index, seed=2)
    v = torch.randn(N, C, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for kw in COMBOS:
        opts = _opts(kw, w, torch.float64)
        res = []
        for fn in (
            lambda x: _accumulate(x, t, ignore_index, reduction, False, opts)[0],
            lambda x: _reference(x, t, ignore_index, reduction, **opts)[0],
        ):
            x = z.clone().requires_grad_()
            up = _upstream(reduction, N).requires_grad_()
            (g,) = torch.autograd.grad((fn(x) * up).sum(), x, create_graph=True)
            hv, gu = torch.autograd.grad((g * v).sum(), (x, up))
            res.append((g.detach(), hv, gu))
        for got, want in zip(*res):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=_case(kw))


def test_gradgradcheck_every_option_with_a_class_ignored():
    z, t, w = _problem(torch.float64, 2, seed=3, n=5)
    t[1] = 2
    for reduction in ("none", "mean", "sum"):

        def f(x, reduction=reduction):
            return _accumulate(
                x, t, 2, reduction, False, dict(weight=w, label_smoothing=0.2, softcap=2.5, z_loss=0.1)
            )[0]

        x = z.clone().requires_grad_()
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("reduction, overwrite", ROUTES)
def test_classes_in_dim_1_with_every_option(reduction, overwrite):
    """[B, C, T] logits (class_dim=1): the loss of "none" comes back shaped like the targets, the
    gradient in the logits' layout."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, C, 4, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, C, (3, 4), generator=g)
    t[1, 2] = 2
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.1
    opts = dict(weight=w, label_smoothing=0.1, softcap=3.0, z_loss=0.05)
    a = z.clone().requires_grad_()
    loss, zl = memcore.accumulate(
        a, t, torch.arange(3), memcore.Tracker(3), reduction=reduction, ignore_index=2, class_dim=1,
        overwrite_logits=overwrite, return_z_loss=True, **opts,
    )  # fmt: skip
    up = torch.linspace(-1.0, 1.5, 12, dtype=torch.float64).reshape(3, 4) if reduction == "none" else 0.7
    (loss * up).sum().backward()
    b = z.clone().requires_grad_()
    flat = b.movedim(1, -1).reshape(-1, C)
    want, want_z = _reference(flat, t.reshape(-1), 2, reduction, **opts)
    if reduction == "none":
        want, want_z = want.reshape(3, 4), want_z.reshape(3, 4)
    (want * up).sum().backward()
    assert loss.shape == want.shape and zl.shape == want.shape
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(zl, want_z.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction, overwrite", ROUTES)
def test_every_row_ignored(reduction, overwrite):
    """Every row ignored: the loss is F.cross_entropy's (NaN for "mean"), the gradient zero, also
    when the backward builds a graph (create_graph=True on the default route)."""
    z, _, w = _problem(torch.float64, -100, seed=5)
    t = torch.full((N,), 2)
    for kw in COMBOS:
        opts = _opts(kw, w, torch.float64)
        a = z.clone().requires_grad_()
        loss, zl = _accumulate(a, t, 2, reduction, overwrite, opts)
        want, want_z = _reference(z, t, 2, reduction, **opts)
        torch.testing.assert_close(loss, want, equal_nan=True, msg=_case(kw))
        torch.testing.assert_close(zl, want_z, equal_nan=True, msg=_case(kw))
        if overwrite:
            loss.backward()
            grad = a.grad
        else:
            (grad,) = torch.autograd.grad(loss.sum(), a, create_graph=True)
            (hv,) = torch.autograd.grad((grad * z).sum(), a)  # and the second derivative
            assert torch.equal(hv, torch.zeros_like(z)), _case(kw)
        assert torch.equal(grad, torch.zeros_like(z)), _case(kw)


@pytest.mark.parametrize("overwrite", [False, True])
def test_zero_total_weight_is_nan_as_in_f_cross_entropy(overwrite):
    """Every kept row's class weighted 0: F.cross_entropy's weighted mean is 0 / 0 = NaN, with label
    smoothing too (its smoothing part alone would be x / 0 = inf), and so is the gradient."""
    z = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0, 0, 1, 1])
    w = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    for eps in (0.0, 0.1):
        a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
        got = memcore.accumulate(
            a,
            t,
            torch.arange(4),
            memcore.Tracker(4),
            weight=w,
            label_smoothing=eps,
            overwrite_logits=overwrite,
        )
        want = F.cross_entropy(b, t, weight=w, label_smoothing=eps)
        assert torch.isnan(got) and torch.isnan(want)
        got.backward()
        want.backward()
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


@pytest.mark.parametrize("reduction, overwrite", ROUTES)
def test_empty_batch(reduction, overwrite):
    """N = 0 on either route: what the default route gives (F.cross_entropy's values: NaN for
    "mean", 0 for "sum", an empty "none"), an empty gradient, nothing recorded."""
    z = torch.zeros(0, C, dtype=torch.float64)
    t = torch.zeros(0, dtype=torch.int64)
    w = torch.rand(C, dtype=torch.float64) + 0.1
    for kw in COMBOS:
        opts = _opts(kw, w, torch.float64)
        a = z.clone().requires_grad_()
        tr = memcore.Tracker(4)
        loss, zl = memcore.accumulate(
            a, t, t, tr, reduction=reduction, overwrite_logits=overwrite, return_z_loss=True, **opts
        )
        want, want_z = _reference(z, t, -100, reduction, **opts)
        torch.testing.assert_close(loss, want, equal_nan=True, msg=_case(kw))
        torch.testing.assert_close(zl, want_z, equal_nan=True, msg=_case(kw))
        loss.sum().backward()
        assert a.grad.shape == z.shape
        assert torch.equal(recorded(tr), recorded(memcore.Tracker(4)))


@pytest.mark.parametrize("overwrite", [False, True])
def test_targets_out_of_range_not_strict(overwrite):
    """Tracker(strict=False): a target out of range (above and below) is found by the forward kernel
    on either route without a crash, the batch is not recorded, and the next scores() raises."""
    z, t, w = _problem(torch.float32, -100, seed=6)
    opts = dict(weight=w.float(), label_smoothing=0.1, softcap=3.0, z_loss=1e-2)
    for bad_value in (C, C + 1000, -1, -(10**9)):
        bad = t.clone()
        bad[3] = bad_value
        tr = memcore.Tracker(N, strict=False)
        a = z.clone().requires_grad_()
        loss = memcore.accumulate(a, bad, torch.arange(N), tr, overwrite_logits=overwrite, **opts)
        loss.backward()
        assert a.grad.shape == z.shape and torch.isfinite(a.grad).all()
        assert not a.grad[3].any()  # the row's gradient is zero: it holds no class
        assert torch.equal(recorded(tr), recorded(memcore.Tracker(N)))
        with pytest.raises(ValueError, match="rejected"):
            tr.scores()


@pytest.mark.slow
def test_torch_compile_overwrite_falls_back():
    """Under torch.compile(fullgraph=True) overwrite_logits=True takes the options' default route:
    the logits are left as they were, loss and gradients are eager's."""
    z, t, w = _problem(torch.float32, 2, seed=8)
    opts = dict(weight=w.float(), label_smoothing=0.1, softcap=4.0, z_loss=1e-2)
    tr, tr_eager = memcore.Tracker(N), memcore.Tracker(N)
    idx = torch.arange(N)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x):
        loss, zl = memcore.accumulate(
            x, t, idx, tr, ignore_index=2, overwrite_logits=True, return_z_loss=True, **opts
        )
        return loss, zl

    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    la, za = step(a)
    la.backward()
    lb, zb = memcore.accumulate(b, t, idx, tr_eager, ignore_index=2, return_z_loss=True, **opts)
    lb.backward()
    assert torch.equal(a.detach(), z)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(za, zb, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(tr.scores()["csl"], tr_eager.scores()["csl"], rtol=0, atol=0)


@pytest.mark.slow
def test_torch_compile_reduction_none_with_upstream():
    z, t, w = _problem(torch.float32, -100, seed=9)
    opts = dict(weight=w.float(), label_smoothing=0.2, z_loss=1e-2)
    up = torch.linspace(0.1, 2.0, N)
    idx = torch.arange(N)
    tr, tr_eager = memcore.Tracker(N), memcore.Tracker(N)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x):
        return (memcore.accumulate(x, t, idx, tr, reduction="none", **opts) * up).sum()

    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    step(a).backward()
    (memcore.accumulate(b, t, idx, tr_eager, reduction="none", **opts) * up).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)


def test_autocast_bf16_layer_on_both_routes():
    """A bfloat16 layer under CPU autocast: the loss is float32 on both routes and the layer's
    gradients agree (the same kernels; one bfloat16 rounding of each logits-gradient entry)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 50)
    x = torch.randn(N, 16)
    t = torch.randint(0, 50, (N,))
    t[::4] = -100
    w = torch.rand(50) + 0.5
    res = []
    for overwrite in (False, True):
        lin.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = lin(x)
            loss = memcore.accumulate(
                logits, t, torch.arange(N), memcore.Tracker(N), overwrite_logits=overwrite, weight=w,
                label_smoothing=0.1, softcap=5.0, z_loss=1e-3,
            )  # fmt: skip
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        loss.backward()
        res.append((loss.detach(), lin.weight.grad.clone(), lin.bias.grad.clone()))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-6, atol=0)
    # the weight gradient is a bfloat16 GEMM of the logits' gradient: each entry differs by at most
    # half a bfloat16 ulp between the routes, summed over N rows of |x| <= 5
    for got, want in zip(res[1][1:], res[0][1:]):
        torch.testing.assert_close(got, want, rtol=2**-7, atol=N * 5 * 2**-9 * float(want.abs().max()))
