"""linear_accumulate's loss options (ce_weight, label_smoothing, softcap, z_loss, return_z_loss):
exactly accumulate's on the logits F.linear gives. Every option and combination against accumulate
on F.linear's logits (loss, z-loss term, the gradients of hidden, weight and bias, the statistics
recorded) at float64 / float32 / bfloat16, every reduction, ignore_index, chunking, autocast,
torch.compile, opcheck of the extended ops, and the refusals."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from reference import assert_same_state, recorded

import memcore

N, H, V = 23, 16, 37  # N odd: chunks of 7 leave a remainder
S = 9  # samples: indices repeat
U32 = 2.0**-24
REDUCTIONS = ("mean", "sum", "none")
IGNORE = (-100, 3)  # the default, and a class id (rows of class 3 are ignored)
SOFTCAP = 4.0
# every subset of the four options, with values where each one matters at logits up to ~+-12
OPTIONS = [
    {k: v for k, v in zip(("ce_weight", "label_smoothing", "softcap", "z_loss"), vals) if v is not None}
    for vals in itertools.product((None, True), (None, 0.2), (None, SOFTCAP), (None, 1e-2))
][1:]


def _problem(dtype, ignore_index=-100, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (3.0 / H**0.5)
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (n,), generator=g)
    targets[::5] = ignore_index
    index = torch.randint(0, S, (n,), generator=g)
    ce_weight = torch.rand(V, generator=g, dtype=torch.float64) + 0.1
    return [t.to(dtype) for t in (hidden, weight, bias)] + [targets, index, ce_weight]


def _kwargs(case, ce_weight):
    kw = dict(case)
    if kw.get("ce_weight"):
        kw["ce_weight"] = ce_weight
    return kw


def _upstream(reduction, dtype, seed=1, n=N):
    """An upstream gradient the loss's dtype holds exactly (it reaches the ops in that dtype)."""
    g = torch.Generator().manual_seed(seed)
    if reduction == "none":
        return (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(dtype).double()
    return torch.tensor(1.5, dtype=torch.float64)


def _run(fused, inputs, reduction, ignore_index, kw, up, dtype=None, chunk_size=7):
    """Loss, z-loss term, grads of hidden / weight / bias and the tracker: fused (linear_accumulate)
    or the reference (accumulate on F.linear's logits, whose weight is ce_weight), on the inputs cast
    to `dtype` (None: as they are). Also the float64 logits' gradient of the reference."""
    hidden, weight, bias, targets, index, _ = inputs
    h, w, b = (t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in (hidden, weight, bias))
    tr = memcore.Tracker(S)
    opts = dict(kw)
    if fused:
        loss, z = memcore.linear_accumulate(
            h,
            w,
            targets,
            index,
            tr,
            bias=b,
            reduction=reduction,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
            return_z_loss=True,
            **opts,
        )
        g_logits = None
    else:
        logits = F.linear(h, w, b)
        logits.retain_grad()
        opts["weight"] = opts.pop("ce_weight", None)
        loss, z = memcore.accumulate(
            logits,
            targets,
            index,
            tr,
            reduction=reduction,
            ignore_index=ignore_index,
            return_z_loss=True,
            **opts,
        )
        g_logits = logits
    (loss.double() * up).sum().backward()
    return loss.detach(), z, h.grad, w.grad, b.grad, tr, (None if g_logits is None else g_logits.grad)


def _truth(inputs, reduction, ignore_index, kw, up):
    """The float64 truth, written out from the definitions without memcore (Liger-Kernel's fused
    linear cross-entropy and F.cross_entropy's weight / label_smoothing): logits F.linear(h, W, b),
    soft-capped as softcap * tanh(z / softcap); the cross-entropy F.cross_entropy's per row; the
    z-loss z_loss * lse^2 on non-ignored rows; "mean" divides the cross-entropy part by the summed
    class weights of the non-ignored rows and the z-loss part by their number. Returns the loss, the
    z-loss term and the gradients of hidden, weight and bias for upstream `up`."""
    hidden, weight, bias, targets = inputs[:4]
    h, w, b = (t.detach().double().clone().requires_grad_() for t in (hidden, weight, bias))
    ce_weight = kw.get("ce_weight")
    cap, zc = kw.get("softcap"), kw.get("z_loss", 0.0)
    z = F.linear(h, w, b)
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    keep = targets != ignore_index
    ce = F.cross_entropy(
        z,
        targets,
        weight=None if ce_weight is None else ce_weight.double(),
        ignore_index=ignore_index,
        label_smoothing=kw.get("label_smoothing", 0.0),
        reduction="none",
    )
    zl = torch.where(keep, zc * torch.logsumexp(z, 1) ** 2, 0.0)
    if reduction == "none":
        loss, zterm = ce + zl, zl
    elif reduction == "sum":
        loss, zterm = (ce + zl).sum(), zl.sum()
    else:
        w_t = (
            keep.double() if ce_weight is None else torch.where(keep, ce_weight.double()[targets * keep], 0.0)
        )
        zterm = zl.sum() / keep.sum()
        loss = ce.sum() / w_t.sum() + zterm
    (loss * up).sum().backward()
    return loss.detach(), zterm.detach(), h.grad, w.grad, b.grad


def _bounds(inputs, reduction, ignore_index, kw, up, dtype):
    """First-order bounds on the error of any evaluation in `dtype` (float32 or bfloat16, math in
    fp32, u = 2^-24; r: the result dtype's rounding, u or 2^-9) of the loss, z-loss term and the
    gradients of hidden, weight and bias against the float64 truth on the same inputs, and e [N], that
    of each row's nll, as tests/test_linear_cross_entropy.py derives them (Higham, section 3.1):
      logit z_rv: the GEMM's H terms, H u A (A = max_r,v sum_k |h_rk W_vk| + |b_v|), plus in bf16 its
        rounding to bf16, r max_v |z_rv|; soft-capped, the tanh's few ulps of |z'| <= softcap;
      lse_r and nll_r: e_r = (V + 4) u + 2 (that logit error + 4 softcap u);
      cross-entropy part: B_r e_r + (eps / V)(W e_r + V u W L_r) (B_r = (1 - eps) w_t; the
        smoothing sum -sum_j w_j log p_j, L_r = max_j |log p_rj|); z-loss part: 2 zc |lse_r| e_r;
      the logits' gradient G_rv = a p_rv - b [v = t] - c w_v: (e_r + r + 4u) times its magnitude
        M_rv = |g| (A_r p_rv + B_r [v = t] + (eps / V) w_v) + |g_z| 2 zc |lse_r| p_rv
        (A_r = B_r + (eps / V) W), r for its rounding to the logits' dtype;
      the gradient GEMMs: V u (hidden's) or N u (weight's, bias's) times what they sum, and r times
        it for the result's rounding; the loss and the z-loss term: r times their size."""
    hidden, weight, bias, targets, _index, ce_weight = (
        t.double() if t is not None and t.is_floating_point() else t for t in inputs
    )
    u = U32
    r = 2.0**-9 if dtype == torch.bfloat16 else u
    eps, cap, zc = kw.get("label_smoothing", 0.0), kw.get("softcap", 0.0), kw.get("z_loss", 0.0)
    w = ce_weight if "ce_weight" in kw else torch.ones(V, dtype=torch.float64)
    big_w = float(w.sum())
    keep = targets != ignore_index
    safe = torch.where(keep, targets, 0)
    a_bound = float((hidden.abs() @ weight.abs().t() + bias.abs()).max())
    z = F.linear(hidden, weight, bias)
    logit_err = H * u * a_bound + (r * z.abs().amax(1) if dtype == torch.bfloat16 else 0.0)
    e = (V + 4) * u + 2 * (logit_err + 4 * cap * u) * torch.ones(z.shape[0], dtype=torch.float64)
    if cap:
        z = cap * torch.tanh(z / cap)
    lse = torch.logsumexp(z, 1)
    logp = torch.log_softmax(z, 1)
    p = logp.exp()
    w_t = torch.where(keep, w[safe], 0.0)
    big_b = (1 - eps) * w_t
    big_a = big_b + keep * (eps / V) * big_w
    ce_row = torch.where(keep, big_b * e + (eps / V) * (big_w * e + V * u * big_w * logp.abs().amax(1)), 0.0)
    ce_val = torch.where(
        keep, big_b * -logp.gather(1, safe[:, None]).squeeze(1) - (eps / V) * (logp * w).sum(1), 0.0
    )
    z_val = torch.where(keep, zc * lse**2, 0.0)
    z_row = 2 * zc * lse.abs() * e * keep
    if reduction == "none":
        g = gz = torch.where(keep, up, 0.0)
        loss_bound, z_bound = ce_row + z_row + r * (ce_val + z_val).abs(), z_row + r * z_val
    elif reduction == "sum":
        g = gz = keep * float(up)
        loss_bound = (ce_row + z_row).sum() + r * (ce_val + z_val).sum().abs()
        z_bound = z_row.sum() + r * z_val.sum()
    else:
        wsum, count = float(w_t.sum()), float(keep.sum())
        g, gz = keep * float(up) / wsum, keep * float(up) / count
        z_bound = z_row.sum() / count + r * z_val.sum() / count
        loss_bound = ce_row.sum() / wsum + z_bound + r * abs(float(ce_val.sum()) / wsum)
    onehot = F.one_hot(safe, V).double()
    m = (
        g.abs()[:, None] * (big_a[:, None] * p + big_b[:, None] * onehot + (eps / V) * w)
        + (gz.abs() * 2 * zc * lse.abs())[:, None] * p
    )
    dm = (e[:, None] + r + 4 * u) * m
    gh = (dm + (V * u + r) * m) @ weight.abs()
    gw = (dm + (N * u + r) * m).t() @ hidden.abs()
    gb = (dm + (N * u + r) * m).sum(0)
    return [x + 1e-30 for x in (loss_bound, z_bound, gh, gw, gb)], e


def _assert_within(got, want, bound, what):
    err = (got.double() - want.double()).abs()
    assert (err <= bound).all(), f"{what}: worst error / bound {float((err / bound).max()):.3g}"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_option_matches_accumulate_on_f_linear(dtype, reduction):
    """fp64 at 1e-10 relative, against accumulate and the written-out truth (_truth); fp32: the fused
    results and accumulate's each within the fp32 error bounds (_bounds) of that float64 truth. The statistics recorded as accumulate records them
    (within those bounds)."""
    for ignore_index, case in itertools.product(IGNORE, OPTIONS):
        inputs = _problem(dtype, ignore_index)
        kw = _kwargs(case, inputs[-1].to(dtype))
        up = _upstream(reduction, dtype)
        got = _run(True, inputs[:5] + [None], reduction, ignore_index, kw, up)
        want = _run(False, inputs[:5] + [None], reduction, ignore_index, kw, up)
        what = f"{case} ignore_index={ignore_index}"
        names = ("loss", "z-loss term", "grad_hidden", "grad_weight", "grad_bias")
        for name, a, b in zip(names, got[:5], want[:5]):
            assert a.dtype == b.dtype and a.shape == b.shape, (what, name)
        assert not got[1].requires_grad
        if dtype == torch.float64:
            for name, a, b in zip(names, got[:5], want[:5]):
                torch.testing.assert_close(
                    a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{what} {n}: {m}"
                )
            for name, a, t in zip(names, got[:5], _truth(inputs, reduction, ignore_index, kw, up)):
                torch.testing.assert_close(
                    a, t, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{what} {n} (truth): {m}"
                )
            torch.testing.assert_close(recorded(got[5]), recorded(want[5]), rtol=1e-12, atol=1e-12)
            continue
        truth = _truth(inputs, reduction, ignore_index, _kwargs(case, inputs[-1]), up)
        bounds, e = _bounds(inputs, reduction, ignore_index, _kwargs(case, inputs[-1]), up, dtype)
        for name, a, b, t, bound in zip(names, got[:5], want[:5], truth[:5], bounds):
            # each within its bound of the truth, so the two within twice it of each other
            _assert_within(a, t, bound, f"{what} {name} (fused vs float64)")
            _assert_within(b, t, bound, f"{what} {name} (accumulate vs float64)")
        # the statistics: per sample, sums over at most N rows of nll, p, p^2, margin, each within
        # 2 e of the other side's (p = exp(-nll): within p e; the margin's two logits: 2 H u A < e)
        torch.testing.assert_close(recorded(got[5]), recorded(want[5]), rtol=0, atol=4 * float(e.max()) * N)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bfloat16_within_the_error_bounds(reduction):
    """bf16 inputs (the logits chunk and its gradient bf16 tensors, as F.linear's, the math in fp32):
    the fused results, and accumulate's on F.linear's bf16 logits, each within the bf16 error bounds
    (_bounds) of the float64 truth on the same inputs."""
    for case in OPTIONS:
        inputs = _problem(torch.bfloat16, -100, seed=2)
        kw = _kwargs(case, inputs[-1].float())
        up = _upstream(reduction, torch.bfloat16)
        got = _run(True, inputs[:5] + [None], reduction, -100, kw, up)
        plain = _run(False, inputs[:5] + [None], reduction, -100, kw, up)
        truth = _truth(inputs, reduction, -100, _kwargs(case, inputs[-1]), up)
        bounds, _ = _bounds(inputs, reduction, -100, _kwargs(case, inputs[-1]), up, torch.bfloat16)
        names = ("loss", "z-loss term", "grad_hidden", "grad_weight", "grad_bias")
        for name, a, p, t, bound in zip(names, got, plain, truth, bounds):
            assert a.dtype == p.dtype == torch.bfloat16, (case, name)
            _assert_within(a, t, bound, f"{case} {name} (fused vs float64)")
            _assert_within(p, t, bound, f"{case} {name} (accumulate vs float64)")


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunking_changes_nothing_but_rounding(chunk_size, reduction):
    """Chunks of 1 row, an odd size leaving a remainder, and one chunk larger than N: fp64, every
    option at once, against accumulate on F.linear's logits."""
    inputs = _problem(torch.float64, 3, seed=4)
    kw = _kwargs(OPTIONS[-1], inputs[-1])
    up = _upstream(reduction, torch.float64)
    got = _run(True, inputs[:5] + [None], reduction, 3, kw, up, chunk_size=chunk_size)
    want = _run(False, inputs[:5] + [None], reduction, 3, kw, up)
    for a, b in zip(got[:5], want[:5]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(recorded(got[5]), recorded(want[5]), rtol=1e-12, atol=1e-12)


def test_statistics_are_the_models_own():
    """Whatever the options, the tracker records what plain linear_accumulate records for the
    soft-capped logits' softmax: the same state as accumulate on softcap * tanh(F.linear / softcap)."""
    hidden, weight, bias, targets, index, w = _problem(torch.float64, seed=5)
    rows = (hidden, weight, targets, index)
    others = dict(bias=bias, chunk_size=7, ce_weight=w, label_smoothing=0.3, z_loss=0.1)
    plain, opt = memcore.Tracker(S), memcore.Tracker(S)
    with torch.no_grad():
        z = F.linear(hidden, weight, bias)
        memcore.accumulate(SOFTCAP * torch.tanh(z / SOFTCAP), targets, index, plain)
    memcore.linear_accumulate(*rows, opt, softcap=SOFTCAP, **others)
    torch.testing.assert_close(recorded(opt), recorded(plain), rtol=1e-12, atol=1e-12)
    # without softcap: the plain statistics, bit for bit (same GEMM, same kernel per row)
    plain, opt = memcore.Tracker(S), memcore.Tracker(S)
    memcore.linear_accumulate(*rows, plain, bias=bias, chunk_size=7)
    memcore.linear_accumulate(*rows, opt, **others)
    assert_same_state(plain.state_dict(), opt.state_dict())


def test_return_z_loss_without_z_loss_is_zero():
    hidden, weight, bias, targets, index, _ = _problem(torch.float32)
    rows = (hidden, weight, targets, index)
    for reduction in REDUCTIONS:
        kw = dict(bias=bias, reduction=reduction)
        loss, z = memcore.linear_accumulate(*rows, memcore.Tracker(S), return_z_loss=True, **kw)
        assert z.shape == loss.shape and z.dtype == loss.dtype and not z.any()
        assert torch.equal(loss, memcore.linear_accumulate(*rows, memcore.Tracker(S), **kw))


def test_retained_graph_second_backward():
    """A second backward through a retained graph recomputes (the first handed its buffers out):
    the weighted mean's and the z-loss's different denominators give the same gradients twice."""
    hidden, weight, bias, targets, index, w = _problem(torch.float64, seed=6)
    for reduction in ("mean", "sum"):
        h = hidden.clone().requires_grad_()
        opts = dict(bias=bias, reduction=reduction, ce_weight=w, z_loss=0.05)
        loss = memcore.linear_accumulate(h, weight, targets, index, memcore.Tracker(S), **opts)
        (g1,) = torch.autograd.grad(loss, h, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, h)
        torch.testing.assert_close(g2, g1, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast(reduction):
    """Under CPU autocast (bf16): the inputs cast as F.linear's, a float32 loss, as accumulate on
    F.linear's logits inside the same region gives; the logits are the same bf16 GEMM's on both
    sides, so the two agree to one bf16 ulp of the largest entry."""
    hidden, weight, bias, targets, index, w = _problem(torch.float32, seed=7)
    kw = dict(ce_weight=w.float(), label_smoothing=0.1, softcap=SOFTCAP, z_loss=1e-2)
    up = _upstream(reduction, torch.float32)
    res = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res.append(_run(fused, [hidden, weight, bias, targets, index, None], reduction, -100, kw, up))
    (lf, zf, *gf), (lr, zr, *gr) = res[0][:5], res[1][:5]
    assert lf.dtype == lr.dtype == zf.dtype == torch.float32
    ulp = 2.0**-7
    for a, b in [(lf, lr), (zf, zr)] + list(zip(gf, gr)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=ulp, atol=ulp * float(b.abs().max()))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    hidden, weight, bias, targets, index, w = _problem(torch.float32, seed=8)
    kw = dict(ce_weight=w.float(), label_smoothing=0.1, softcap=SOFTCAP, z_loss=1e-2)
    for reduction in ("mean", "none"):
        tr, tr_eager = memcore.Tracker(S), memcore.Tracker(S)
        up = _upstream(reduction, torch.float32).float()

        @torch.compile(fullgraph=True, backend="aot_eager")
        def step(h, wt, b):
            return memcore.linear_accumulate(
                h,
                wt,
                targets,
                index,
                tr,
                bias=b,
                reduction=reduction,
                chunk_size=10,
                return_z_loss=True,
                **kw,
            )

        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, z = step(*leaves)
        (loss * up).sum().backward()
        eager = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss_e, z_e = memcore.linear_accumulate(
            eager[0],
            eager[1],
            targets,
            index,
            tr_eager,
            bias=eager[2],
            reduction=reduction,
            chunk_size=10,
            return_z_loss=True,
            **kw,
        )
        (loss_e * up).sum().backward()
        torch.testing.assert_close(loss, loss_e)
        torch.testing.assert_close(z, z_e)
        for a, b in zip(leaves, eager):
            torch.testing.assert_close(a.grad, b.grad)
        torch.testing.assert_close(recorded(tr), recorded(tr_eager))


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(reduction):
    hidden, weight, bias, targets, index, w = _problem(torch.float32, seed=9, n=13)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    options = (w.float(), 0.1, SOFTCAP, 1e-2)
    utils = None if reduction == 0 else ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(
        torch.ops.memcore.linear_ce_forward.default,
        (*leaves, targets, index, S, -100, reduction, 5, [True, True, True], *options),
        **kw,
    )
    torch.library.opcheck(
        torch.ops.memcore.linear_ce_forward.default,
        (
            hidden,
            weight,
            None,
            targets,
            index,
            S,
            -100,
            reduction,
            5,
            [False, True, False],
            None,
            0.0,
            SOFTCAP,
            0.0,
        ),
    )
    if reduction == 0:
        lse = torch.ops.memcore.linear_ce_forward(
            hidden, weight, bias, targets, index, S, -100, 0, 5, [False, False, False], *options
        )[3]
        g = torch.randn(13)
        for grad_z in (None, torch.randn(13)):
            torch.library.opcheck(
                torch.ops.memcore.linear_ce_backward.default,
                (g, hidden, weight, bias, targets, lse, -100, 5, [True, True, True], *options, grad_z),
            )


# (argument, bad value, exception): each refused by name
BAD_OPTIONS = [
    *[("label_smoothing", v, ValueError) for v in (-0.1, 1.5, float("nan"))],
    *[("softcap", v, ValueError) for v in (0.0, -1.0, float("inf"))],
    *[("z_loss", v, ValueError) for v in (-1e-4, float("inf"))],
    ("ce_weight", torch.ones(V + 1), ValueError),
    ("ce_weight", torch.ones(V, dtype=torch.int64), TypeError),
    ("ce_weight", [1.0] * V, TypeError),
    ("label_smoothing", "0.1", TypeError),
    ("softcap", "20", TypeError),
    ("return_z_loss", 1, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD_OPTIONS)
def test_bad_options_are_refused_without_state_change(name, value, error):
    hidden, weight, bias, targets, index, _ = _problem(torch.float32, seed=10)
    tr = memcore.Tracker(S)
    memcore.linear_accumulate(hidden, weight, targets, index, tr, bias=bias)
    before = tr.state_dict()
    with pytest.raises(error, match=name):
        memcore.linear_accumulate(
            hidden.clone().requires_grad_(), weight, targets, index, tr, bias=bias, **{name: value}
        )
    assert_same_state(before, tr.state_dict())
