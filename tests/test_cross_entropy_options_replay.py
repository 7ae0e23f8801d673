"""The CUDA kernels of the options route (csrc/cuda/cross_entropy_options.cu), replayed on the host
from their own per-row code (cross_entropy_row.h, ex2.approx's error modelled), against the ops'
contracts in float64 (tests/reference.py options_reference): every launch shape (32 / 256 / 512
threads per row, 16-byte packs or scalar), dtype, soft-capping on / off, smoothing with and without
class weights, ignored rows, rows starting off a 16-byte boundary."""

import pytest
import torch
from reference import options_reference

import memcore  # noqa: F401  (loads memcore._C)
from memcore import _C

N = 12
OPTION_SETS = {  # softcap, label_smoothing, weighted
    "smooth": (0.0, 0.1, False),
    "cap": (7.0, 0.0, False),
    "cap+weighted smooth": (7.0, 0.2, True),
}


def _problem(dtype, c, offset, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N * c + offset, generator=g) * 5
    z[offset + 3] = 40.0  # a large logit: capped near 7, or a confident row
    z = z.to(dtype)[offset:].view(N, c)  # rows off a 16-byte boundary when offset > 0
    t = torch.randint(0, c, (N,), generator=g)
    t[::4] = -100
    return z, t, g


def _bounds(z, dtype, cap):
    """Absolute error of one capped fp32 logit: its own rounding (|z| 2^-24) and, capped, the tanh
    from ex2 (2 ulp of exp(-2|y|) plus the quotient's rounding: cap 2^-21 covers both). Every
    term exp(z'_j - lse) then carries at most 4 such errors (z'_j, and lse's max and log) plus
    lse's fp32 rounding; float64 rows 2^-45 relative."""
    if dtype == torch.float64:
        return 2**-45
    zmax = float(z.double().abs().max())
    return (cap * 2**-21 if cap else 0.0) + min(zmax, cap or zmax) * 2**-23


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("tpr, vec", [(32, True), (32, False), (256, True), (512, True)])
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("c, offset", [(5, 0), (37, 1), (300, 3)])
def test_options_kernels_replayed_against_float64(dtype, tpr, vec, options, c, offset):
    _check_replay(dtype, tpr, vec, options, c, offset)


@pytest.mark.parametrize("model", ["low", "high", "nearest"])
def test_options_kernels_hold_at_both_ends_of_the_approximate_instructions(model):
    """ex2.approx and rcp.approx anywhere within their documented errors: every float at the low
    or the high end of the bound, and correctly rounded."""
    before = _C._ce_ex2_model(model)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            _check_replay(dtype, 256, True, "cap+weighted smooth", 300, 3)
    finally:
        _C._ce_ex2_model(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("c, offset", [(37, 1), (3001, 2), (17000, 0)])
def test_options_ops_on_each_device_within_the_kernels_bounds(device, dtype, options, c, offset):
    """The ops themselves (the CUDA kernels on a GPU: warp, 256- and 512-thread launches) held to the
    replays' bounds."""

    def fwd(z, t, cap, eps, w):
        out = torch.ops.memcore.ce_forward_options(
            z.to(device),
            t.to(device),
            torch.arange(N, device=device),
            N,
            -100,
            cap,
            eps,
            None if w is None else w.to(device),
        )
        return [o.cpu() for o in out]

    def bwd(a, b, cc, z, t, lse, cap, w):
        dev = [x.to(device) for x in (a, b, cc, z, t, lse)]
        return torch.ops.memcore.ce_backward_options(
            *dev, -100, cap, None if w is None else w.to(device)
        ).cpu()

    _check_replay(dtype, 32, True, options, c, offset, fwd, bwd)


def _check_replay(dtype, tpr, vec, options, c, offset, fwd=None, bwd=None):
    cap, eps, weighted = OPTION_SETS[options]
    z, t, g = _problem(dtype, c, offset, seed=c + tpr)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(c, generator=g) + 0.5).to(acc) if weighted else None
    if fwd is None:
        loss, lse, _stats, status, smooth = _C._ce_forward_options_replay(
            z, t, torch.arange(N), N, -100, cap, eps, w, tpr, vec
        )
    else:
        loss, lse, _stats, status, smooth = fwd(z, t, cap, eps, w)
    a, b, cc = (torch.randn(N, generator=g).to(acc) for _ in range(3))
    cc = cc if eps else cc.new_empty(0)
    if bwd is None:
        grad = _C._ce_backward_options_replay(a, b, cc, z, t, lse, -100, cap, w, tpr, vec, False)
        # in place (ce_forward_grad_options_): the same values, bit for bit, the logits left as they were
        before = z.clone()
        over = _C._ce_backward_options_replay(a, b, cc, z, t, lse, -100, cap, w, tpr, vec, True)
        assert torch.equal(over.view(torch.uint8), grad.view(torch.uint8)) and torch.equal(z, before)
    else:
        grad = bwd(a, b, cc, z, t, lse, cap, w)
    ref_nll, ref_smooth, ref_grad = options_reference(z, t, -100, cap, eps, w, a, b, cc)
    e = _bounds(z, dtype, cap)
    lse_abs = float(lse.double().abs().max())
    ulp = 2**-52 if dtype == torch.float64 else 2**-23
    row_err = 6 * e + lse_abs * ulp  # one loss or one -log p_j
    assert int(status) == 0 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_nll, rtol=0, atol=row_err)
    if eps:
        u_total = c if w is None else float(w.double().sum())
        torch.testing.assert_close(smooth.double(), ref_smooth, rtol=2**-20, atol=u_total * row_err)
    # each entry (a p_j - b [j = t] - c u_j) (1 - th_j^2): p_j within row_err relative, the target's
    # p_t - 1 within row_err absolute; 16-bit gradients rounded to their dtype (2^-8 / 2^-11)
    scale = (a.abs() + b.abs() + (cc.abs() * (1 if w is None else float(w.max())) if eps else 0)).double()
    rnd = {torch.bfloat16: 2**-8, torch.float16: 2**-11}.get(dtype, 0.0)
    tol = scale[:, None] * (2 * row_err + ulp) + ref_grad.abs() * rnd
    assert bool(((grad.double() - ref_grad).abs() <= tol).all()), float(
        ((grad.double() - ref_grad).abs() - tol).max()
    )


def test_options_replay_flags_bad_targets_and_keeps_capped_infinities_finite():
    """A target outside [0, C) sets the bad-target bit (its row zero); +inf logits under softcap
    are capped to softcap (finite loss), as ATen's tanh gives; without softcap they are flagged."""
    z = torch.randn(4, 20)
    z[1, 3] = float("inf")
    t = torch.tensor([1, 2, 25, 0])
    loss, _lse, _s, status, _sm = _C._ce_forward_options_replay(
        z, t, torch.arange(4), 4, -100, 5.0, 0.0, None, 32, True
    )
    assert int(status) == 1 and float(loss[2]) == 0.0 and bool(torch.isfinite(loss).all())
    ref = torch.nn.functional.cross_entropy(torch.tanh(z[1:2].double() / 5) * 5, t[1:2])
    torch.testing.assert_close(loss[1].double(), ref, rtol=0, atol=1e-5)
    t[2] = 3
    status = _C._ce_forward_options_replay(z, t, torch.arange(4), 4, -100, 0.0, 0.1, None, 32, True)[3]
    assert int(status) == 4  # non-finite loss without the cap


@pytest.mark.parametrize("kernel", ["cuda replay", "op"])
def test_smoothing_term_keeps_its_accuracy_under_a_large_logit_offset(kernel):
    """Logits around 1000 (a common offset the softmax ignores): the smoothing term -sum_j log p_j
    is summed from differences of nearby logits, so its error scales with their spread and the
    loss, U (spread + loss) 2^-22, not with the offset (U lse - sum_j z_j would lose U 1000 2^-24,
    about 10 times that bound here)."""
    g = torch.Generator().manual_seed(11)
    c = 300
    z = torch.randn(N, c, generator=g) * 3 + 1000
    t = torch.randint(0, c, (N,), generator=g)
    if kernel == "op":
        out = torch.ops.memcore.ce_forward_options(z, t, torch.arange(N), N, -100, 0.0, 0.1, None)
    else:
        out = _C._ce_forward_options_replay(z, t, torch.arange(N), N, -100, 0.0, 0.1, None, 256, True)
    loss, smooth = out[0], out[4]
    _, ref_smooth, _ = options_reference(z, t, -100, 0.0, 0.1, None, *(torch.zeros(N),) * 2, torch.zeros(0))
    spread = float((z - z.mean(1, keepdim=True)).abs().max())
    bound = c * (2 * spread + float(loss.max())) * 2**-22
    assert float((smooth.double() - ref_smooth).abs().max()) <= bound
