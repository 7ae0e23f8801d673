"""accumulate's loss options. F.cross_entropy's weight= and label_smoothing=: the loss and the
logits' gradient are F.cross_entropy's (a parity grid over weight x label_smoothing x ignore_index x
reduction x dtype, classes last and in dim 1). Liger-Kernel's softcap= and z_loss= (its
lse_square_scale) with return_z_loss=: against hand-written float64 references of its formulas. The
tracker records the statistics of the softmax the model predicts (plain accumulate on the
soft-capped logits). Double backward, torch.compile and autocast, and the refusals."""

import pytest
import torch
import torch.nn.functional as F
from reference import assert_same_state, options_reference

import memcore

N, C = 10, 7
WEIGHTS = (False, True)
SMOOTHING = (0.0, 0.1, 1.0)
IGNORE = (-100, 2)  # the default, and a class id (rows of class 2 are ignored)


def _problem(dtype, ignore_index, seed=0, shape=(N, C)):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, C, (shape[0], *shape[2:]), generator=g)
    t.view(-1)[::4] = ignore_index  # some rows ignored whatever their class
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.1
    return z, t, w


def _tolerance(dtype, ref, peak=0.0):
    """fp64 / fp32: the kernels' loss and gradient bounds (docs/kernels.md, "Accuracy") plus the sums
    over at most N rows; bfloat16: the result rounded to bfloat16, twice for the gradient (the
    kernel's upstream * A * (p - onehot) term, of magnitude up to `peak`, then the smoothing
    correction), each half an ulp of a value at most max(peak, the largest reference entry)."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6)
    return dict(rtol=2**-8, atol=2**-8 * max(peak, float(ref.abs().max())))


def _peak(t, ignore_index, weight, eps, reduction, up):
    """Largest |dL/dloss_r| * A_r, A_r = (1 - eps) w_t + eps W / C: the size of the gradient's
    (p - onehot) term before the smoothing correction."""
    w = torch.ones(C, dtype=torch.float64) if weight is None else weight.double()
    keep = t != ignore_index
    a = (1 - eps) * w.max() + eps * w.sum() / C
    denom = w[t[keep]].sum() if reduction == "mean" else 1.0
    return float(up.abs().max() * a / denom)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_parity_grid_with_f_cross_entropy(dtype, reduction):
    for ignore_index in IGNORE:
        z, t, w = _problem(dtype, ignore_index)
        for weighted in WEIGHTS:
            for eps in SMOOTHING:
                weight = w.to(dtype) if weighted else None
                a = z.clone().requires_grad_()
                got = memcore.accumulate(
                    a,
                    t,
                    torch.arange(N),
                    memcore.Tracker(N),
                    reduction=reduction,
                    ignore_index=ignore_index,
                    weight=weight,
                    label_smoothing=eps,
                )
                # the reference in float64 (PyTorch's own bfloat16 path rounds its log-softmax)
                b = z.double().clone().requires_grad_()
                want = F.cross_entropy(
                    b,
                    t,
                    reduction=reduction,
                    ignore_index=ignore_index,
                    weight=None if weight is None else weight.double(),
                    label_smoothing=eps,
                )
                up = torch.linspace(0.5, 1.5, want.numel(), dtype=torch.float64).reshape(want.shape)
                (got.double() * up).sum().backward()
                (want * up).sum().backward()
                case = f"ignore_index={ignore_index} weighted={weighted} eps={eps}"
                assert got.dtype == dtype, case
                torch.testing.assert_close(got.double(), want.detach(), **_tolerance(dtype, want), msg=case)
                peak = _peak(t, ignore_index, weight, eps, reduction, up)
                torch.testing.assert_close(
                    a.grad.double(), b.grad, **_tolerance(dtype, b.grad, peak), msg=case
                )


def _liger(z, t, ignore_index, reduction, softcap=None, z_loss=0.0, label_smoothing=0.0):
    """Liger-Kernel's cross-entropy in float64, written out: logits soft-capped as
    softcap * tanh(z / softcap), the cross-entropy (label smoothing as F.cross_entropy's), plus
    z_loss * lse^2 per non-ignored row; "mean" divides both by the number of non-ignored rows.
    Returns (loss, z-loss term)."""
    x = z.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    keep = t != ignore_index
    ce = F.cross_entropy(x, t, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing)
    zl = torch.where(keep, z_loss * torch.logsumexp(x, 1) ** 2, 0.0)
    if reduction == "none":
        return ce + zl, zl
    if reduction == "sum":
        return (ce + zl).sum(), zl.sum()
    n = keep.sum()
    return (ce + zl).sum() / n, zl.sum() / n


def _half_ulp_bf16(x):
    """Half an ulp of bfloat16 at each |x| (8 significant bits)."""
    x = x.abs().clamp_min(2.0**-126)
    return torch.ldexp(torch.ones_like(x), torch.frexp(x).exponent - 9)


LIGER_CASES = [dict(softcap=20.0), dict(z_loss=1e-3), dict(softcap=15.0, z_loss=1e-2, label_smoothing=0.1)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_and_z_loss_match_liger_formulas(dtype, reduction):
    """fp32 at atol 1e-6 / rtol 1e-5; bfloat16 at half an ulp of bfloat16 around the float64
    reference (the result rounded once), plus the fp32 bound for the math before it; gradients
    the same."""
    z, t, _ = _problem(dtype, -100, seed=7)
    z = (z.double() * 10).to(dtype)  # logits up to ~+-60: the cap matters
    for case in LIGER_CASES:
        a = z.clone().requires_grad_()
        got, got_z = memcore.accumulate(
            a, t, torch.arange(N), memcore.Tracker(N), reduction=reduction, return_z_loss=True, **case
        )
        b = z.double().clone().requires_grad_()
        want, want_z = _liger(b, t, -100, reduction, **case)
        # an upstream gradient the loss's dtype holds exactly (it reaches the op in that dtype)
        up = (
            torch.linspace(0.5, 1.5, want.numel(), dtype=torch.float64).reshape(want.shape).to(dtype).double()
        )
        (got.double() * up).sum().backward()
        (want * up).sum().backward()
        assert got.dtype == got_z.dtype == dtype and not got_z.requires_grad, case
        for x, ref in ((got, want.detach()), (got_z, want_z), (a.grad, b.grad)):
            err = (x.double() - ref).abs()
            bound = 1e-6 + 1e-5 * ref.abs()
            if dtype == torch.bfloat16:
                bound = bound + _half_ulp_bf16(ref)
            assert (err <= bound).all(), (case, (err - bound).max())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_classes_in_dim_1(reduction):
    """[N, C, d] logits with [N, d] targets, as F.cross_entropy takes them (segmentation layout)."""
    z, t, w = _problem(torch.float64, -100, seed=1, shape=(3, C, 5))
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = memcore.accumulate(
        a, t, torch.arange(3), memcore.Tracker(3), reduction=reduction, weight=w, label_smoothing=0.2
    )
    want = F.cross_entropy(b, t, reduction=reduction, weight=w, label_smoothing=0.2)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_statistics_are_the_plain_softmax():
    """The tracker records -log p(target), p(target), margin and correctness of the plain softmax,
    whatever the options: bit for bit what plain accumulate records."""
    z, t, w = _problem(torch.float32, -100, seed=2)
    plain, opt = memcore.Tracker(N), memcore.Tracker(N)
    for _ in range(2):
        memcore.accumulate(z, t, torch.arange(N), plain)
        memcore.accumulate(z, t, torch.arange(N), opt, weight=w.float(), label_smoothing=0.3)
        plain.end_epoch()
        opt.end_epoch()
    assert_same_state(plain.state_dict(), opt.state_dict())


def test_statistics_with_softcap_are_those_of_the_capped_logits():
    """softcap / z_loss: the tracker records what plain accumulate records for the soft-capped
    logits (the softmax the model predicts). The CPU kernels cap each logit with their own tanh
    (a capped logit within 9 * 2^-24 * cap, docs/kernels.md), not torch.tanh's: a loss or margin
    moves by at most twice that, on top of the fp32 kernels' own bound; the counts (correct,
    forgetting) are the same."""
    z, t, w = _problem(torch.float32, -100, seed=8)
    z = z * 10
    cap = 20.0
    plain, opt = memcore.Tracker(N), memcore.Tracker(N)
    memcore.accumulate(torch.tanh(z / cap) * cap, t, torch.arange(N), plain)
    memcore.accumulate(
        z, t, torch.arange(N), opt, softcap=cap, z_loss=1e-3, label_smoothing=0.1, weight=w.float()
    )
    a, b = plain.state_dict(), opt.state_dict()
    for name in a["buffers"]:
        if a["buffers"][name].is_floating_point():
            torch.testing.assert_close(
                b["buffers"][name], a["buffers"][name], rtol=1e-5, atol=1e-6 + 2 * 9 * 2**-24 * cap
            )
        else:
            assert torch.equal(b["buffers"][name], a["buffers"][name]), name
    assert {k: v for k, v in a.items() if k != "buffers"} == {k: v for k, v in b.items() if k != "buffers"}


def test_double_backward_exact():
    z, t, w = _problem(torch.float64, -100, seed=3)
    z = z[:5].clone().requires_grad_()
    t = t[:5]

    def f(x):
        return memcore.accumulate(x, t, torch.arange(5), memcore.Tracker(5), weight=w, label_smoothing=0.25)

    assert torch.autograd.gradcheck(f, (z,))
    assert torch.autograd.gradgradcheck(f, (z,))

    def g(x):
        return memcore.accumulate(
            x, t, torch.arange(5), memcore.Tracker(5), weight=w, softcap=2.0, z_loss=0.1, reduction="none"
        )

    assert torch.autograd.gradcheck(g, (z,))
    assert torch.autograd.gradgradcheck(g, (z,))
    # and equal to F.cross_entropy's second derivative along a direction
    v = torch.randn_like(z)
    (ga,) = torch.autograd.grad(f(z), z, create_graph=True)
    (ha,) = torch.autograd.grad((ga * v).sum(), z)
    (gb,) = torch.autograd.grad(F.cross_entropy(z, t, weight=w, label_smoothing=0.25), z, create_graph=True)
    (hb,) = torch.autograd.grad((gb * v).sum(), z)
    torch.testing.assert_close(ha, hb, rtol=1e-10, atol=1e-12)


def test_autocast_result_dtype():
    """Under CPU autocast, bfloat16 logits give a float32 loss, as F.cross_entropy does."""
    z, t, w = _problem(torch.bfloat16, -100, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = memcore.accumulate(
            z, t, torch.arange(N), memcore.Tracker(N), weight=w.float(), label_smoothing=0.1
        )
        want = F.cross_entropy(z, t, weight=w.float(), label_smoothing=0.1)
    assert got.dtype == want.dtype == torch.float32
    ref = F.cross_entropy(z.double(), t, weight=w, label_smoothing=0.1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    z, t, w = _problem(torch.float32, -100, seed=5)
    tr, tr_eager = memcore.Tracker(N), memcore.Tracker(N)
    w = w.float()

    opts = dict(weight=w, label_smoothing=0.1, softcap=5.0, z_loss=1e-3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x):
        return memcore.accumulate(x, t, torch.arange(N), tr, **opts)

    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    la = step(a)
    la.backward()
    lb = memcore.accumulate(b, t, torch.arange(N), tr_eager, **opts)
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tr.scores()["csl"], tr_eager.scores()["csl"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
        (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
        (dict(weight=torch.ones(C + 1)), ValueError, "weight"),
        (dict(weight=torch.ones(C, dtype=torch.int64)), TypeError, "weight"),
        (dict(weight=[1.0] * C), TypeError, "weight"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(softcap="20"), TypeError, "softcap"),
        (dict(z_loss=-1e-4), ValueError, "z_loss"),
        (dict(return_z_loss=1), TypeError, "return_z_loss"),
        (dict(z_loss=1e-4, overwrite_logits=True, reduction="none"), ValueError, "overwrite_logits"),
        (dict(label_smoothing=0.1, inputs="x"), ValueError, "inputs"),
    ],
)
def test_bad_options_are_refused_without_state_change(kwargs, error, words):
    z, t, _ = _problem(torch.float32, -100, seed=6)
    tr = memcore.Tracker(N)
    memcore.accumulate(z, t, torch.arange(N), tr)
    before = tr.state_dict()
    if kwargs.get("inputs") == "x":
        x = torch.randn(N, 3, requires_grad=True)
        kwargs = dict(kwargs, inputs=x)
        z = (x @ torch.randn(3, C)).detach().requires_grad_()
    with pytest.raises(error, match=words):
        memcore.accumulate(z.clone().requires_grad_(), t, torch.arange(N), tr, **kwargs)
    assert_same_state(before, tr.state_dict())


def test_softcap_on_the_overwrite_and_input_gradient_routes():
    """softcap runs before every route: overwrite_logits=True (the options kernels in place) gives
    the options route's loss and gradient up to fp32 rounding (a few ulp of each value: the loss is
    summed in double there), and inputs= (the default kernels on a capped copy) records the
    input-gradient norms of the capped loss."""
    z, t, _ = _problem(torch.float32, -100, seed=9)
    z = z * 10
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    la = memcore.accumulate(a, t, torch.arange(N), memcore.Tracker(N), softcap=20.0, overwrite_logits=True)
    lb = memcore.accumulate(b, t, torch.arange(N), memcore.Tracker(N), softcap=20.0)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=2**-20, atol=0.0)
    # gradient (p_j - onehot) / N * (1 - tanh^2): p_j carries the capped logits' rounding, ~ softcap
    # * 2^-23 relative, and 1 - tanh^2 an absolute 2^-23: at most ~ 2^-22 / N absolute per entry
    torch.testing.assert_close(a.grad, b.grad, rtol=2**-16, atol=2**-21 / N)
    x = torch.randn(N, 3, dtype=torch.float64, requires_grad=True)
    head = torch.randn(3, C, dtype=torch.float64) * 10
    tr = memcore.Tracker(N)
    memcore.accumulate(x @ head, t, torch.arange(N), tr, softcap=20.0, inputs=x).backward()
    tr.end_epoch()
    # each row's own capped loss, differentiated row by row
    for r in range(N):
        if t[r] == -100:
            continue
        xr = x[r : r + 1].detach().requires_grad_()
        F.cross_entropy(20.0 * torch.tanh(xr @ head / 20.0), t[r : r + 1]).backward()
        want = float(xr.grad.square().sum())
        torch.testing.assert_close(float(tr.scores()["input_grad_norm"][r]), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cap, eps, weighted", [(0.0, 0.1, False), (5.0, 0.0, False), (5.0, 0.2, True)])
def test_options_ops_against_float64_reference(dtype, cap, eps, weighted):
    """Both options ops against their contracts in float64. Bounds: fp32 / bf16 rows carry the fp32
    rounding of the capped logits (softcap * 2^-23) and of lse (|lse| 2^-24) into every term: 2^-18
    relative on sums of |terms|; float64 2^-40."""
    g = torch.Generator().manual_seed(3)
    n, c = 24, 37
    z = (torch.randn(n, c, generator=g) * 6).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[::5] = -100
    w = torch.rand(c, generator=g) + 0.5 if weighted else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = None if w is None else w.to(acc)
    a, b, cc = (torch.randn(n, generator=g).to(acc) for _ in range(3))
    fwd = torch.ops.memcore.ce_forward_options
    bwd = torch.ops.memcore.ce_backward_options
    nll, lse, _stats, status, smooth = fwd(z, t, torch.arange(n), n, -100, cap, eps, w)
    cc = cc if eps else cc.new_empty(0)
    grad = bwd(a, b, cc, z, t, lse, -100, cap, w)
    ref_nll, ref_smooth, ref_grad = options_reference(z, t, -100, cap, eps, w, a, b, cc)
    tol = 2**-40 if dtype == torch.float64 else 2**-18
    assert int(status) == 0 and grad.dtype == dtype and grad.shape == z.shape
    torch.testing.assert_close(nll.double(), ref_nll, rtol=tol, atol=tol * 8)
    if eps:
        torch.testing.assert_close(smooth.double(), ref_smooth, rtol=tol, atol=tol * c * 8)
    else:
        assert smooth.numel() == 0
    gtol = 2**-8 if dtype == torch.bfloat16 else tol  # bf16 gradient: rounded to 8 bits
    torch.testing.assert_close(grad.double(), ref_grad, rtol=gtol, atol=gtol * 4)


def test_options_ops_opcheck():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 9, generator=g)
    t = torch.tensor([0, 3, -100, 8, 2, 2])
    w = torch.rand(9, generator=g)
    for args in [
        (z, t, torch.arange(6), 6, -100, 3.0, 0.1, w),
        (z, t, torch.arange(6), 6, -100, 0.0, 0.0, None),
    ]:
        torch.library.opcheck(torch.ops.memcore.ce_forward_options, args)
    lse = torch.ops.memcore.ce_forward_options(z, t, torch.arange(6), 6, -100, 3.0, 0.0, None)[1]
    a, b, c = torch.randn(6, generator=g), torch.randn(6, generator=g), torch.randn(6, generator=g)
    torch.library.opcheck(torch.ops.memcore.ce_backward_options, (a, b, c, z, t, lse, -100, 3.0, w))
    torch.library.opcheck(torch.ops.memcore.ce_backward_options, (a, b, c[:0], z, t, lse, -100, 0.0, None))
    # the options' loss, with its C++ autograd: every reduction, options on and off
    zg = z.clone().requires_grad_()
    for code in (0, 1, 2):
        for opts in ((w, 0.1, 3.0, 1e-2), (None, 0.0, 0.0, 0.0), (None, 0.2, 0.0, 1e-3)):
            torch.library.opcheck(
                torch.ops.memcore.ce_forward_reduce_options, (zg, t, torch.arange(6), 6, -100, code, *opts)
            )


def test_options_loss_op_checks_its_arguments_and_gradcheck():
    """memcore::ce_forward_reduce_options called directly: bad arguments raise naming them; its
    gradient and its double backward against finite differences in float64, every reduction."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, -100, 1, 2])
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.2
    op = torch.ops.memcore.ce_forward_reduce_options
    for args, words in [
        ((3, None, 0.0, 0.0, 0.0), "reduction"),
        ((1, torch.ones(5, dtype=torch.float64), 0.0, 0.0, 0.0), "weight"),
        ((1, w.float(), 0.0, 0.0, 0.0), "weight"),
        ((1, None, -0.5, 0.0, 0.0), "label_smoothing"),
        ((1, None, 0.0, float("inf"), 0.0), "softcap"),
        ((1, None, 0.0, 0.0, -1.0), "z_loss"),
    ]:
        with pytest.raises(RuntimeError, match=words):
            op(z, t, torch.arange(5), 5, -100, *args)
    for code in (0, 1, 2):

        def f(x, code=code):
            return op(x, t, torch.arange(5), 5, -100, code, w, 0.15, 2.5, 0.05)[0]

        x = z.clone().requires_grad_()
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))
