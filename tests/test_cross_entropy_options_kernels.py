"""The CPU kernels of the options ops (memcore::ce_forward_options / ce_backward_options): the
default row kernels with the options compiled in. Every CPU route (rows under 16 classes, blocks of
up to 1,024, rows streamed beyond; float64 rows; half / bf16 rows widened to float) x dtype x option
combination (softcap, label smoothing with and without class weights, z-loss through a / b / c,
ignored rows) against the ops' contracts in float64 torch ops, opcheck, and the same bits run to run
and at any thread count."""

import pytest
import torch
from reference import options_reference

import memcore  # noqa: F401  (loads memcore._C: torch.ops.memcore.*)

U = 2.0**-24  # float's unit roundoff
CLASSES = (3, 10, 17, 1000, 1025, 5000)  # narrow, narrow, block, block, streamed, streamed
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (softcap, label_smoothing, weighted); weights without smoothing are not read
OPTIONS = [(cap, eps, w) for cap in (0.0, 30.0) for eps in (0.0, 0.1) for w in (False, True)]


def _problem(dtype, c, n=24, seed=0):
    """Logits of scale 8, half the rows with the target at the max, a few far beyond the softcap
    (tanh saturates), every fifth row ignored; z-loss coefficients a / b / c as accumulate makes
    them for random upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 8
    t = torch.randint(0, c, (n,), generator=g)
    rows = torch.arange(0, n, 2)
    z[rows, t[rows]] = z[rows].max(1).values + 2.0  # confident rows
    z[1, 0], z[3, c - 1] = 200.0, -200.0
    t[::5] = -100
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.1).to(acc)
    return z.to(dtype), t, w, g


def _coefficients(t, lse, w, eps, g, c_all, zc=1e-3):
    """a, b, c of the options' backward for upstream gradients gr (CE part) and h (z-loss part)."""
    n, acc = t.shape[0], lse.dtype
    gr = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    h = torch.rand(n, generator=g, dtype=torch.float64)
    keep = t != -100
    wt = torch.where(keep, w.double()[torch.where(keep, t, 0)], 0.0) if w is not None else torch.ones(n)
    big_w = float(w.double().sum()) if w is not None else float(c_all)
    a = gr * ((1 - eps) * wt + eps / c_all * big_w) + h * 2 * zc * lse.double()
    b = gr * (1 - eps) * wt
    c = gr * eps / c_all if eps else torch.empty(0, dtype=torch.float64)
    return a.to(acc), b.to(acc), c.to(acc)


def _tolerances(dtype, cap, z, ref_grad, p, a, b, c, u):
    """Per-entry bounds. float64: exact math (std::exp, std::tanh), 2^-40 relative. fp32 and 16-bit
    logits (computed in float): the default kernels' fp32 bounds, atol 1e-6 + rtol 1e-5 on loss,
    lse, p(target), margin and each p_j (tests/test_cross_entropy_accuracy.py, docs/kernels.md),
    plus the softcap's rounding: a capped logit is off by at most delta = 9 u cap (the tanh's
    6.9 u |tanh| on any ISA, csrc/cpu/vec.inc, and the roundings of z / cap and of the product by
    cap), which moves lse, a loss or a margin by at most 2 delta and p_j by 2 delta relative. The
    gradient's a / b / c terms add their own roundings (2 u each), the softcap factor 1 - tanh^2 is
    within 14 u absolute; 16-bit gradients are rounded to their dtype (half an ulp, fp16's subnormals
    2^-25). The smoothing sum adds C such terms: U (1e-6 + 2 delta), U the weights' sum."""
    if dtype == torch.float64:
        return 2**-40, 2**-40, 2**-40 * (ref_grad.abs() + a.abs()[:, None] + 1e-300)
    delta = 9 * U * cap
    stat_atol = 1e-6 + 2 * delta
    d = (1 - (torch.tanh(z.double() / cap)) ** 2) if cap else torch.ones_like(p)
    terms = (
        a.double().abs()[:, None] * (p + 1)
        + (a.double() - b.double()).abs()[:, None]
        + (c.double().abs()[:, None] * u[None, :] if c.numel() else 0.0)
    )
    grad_tol = (
        (
            a.double().abs()[:, None] * (1e-6 + p * 1e-5 + 2 * delta * p)
            + (a.double() - b.double()).abs()[:, None] * 2 * U
            + (c.double().abs()[:, None] * u[None, :] * 2 * U if c.numel() else 0.0)
        )
        * d
        + (14 * U * terms if cap else 0.0)
        + 1e-5 * ref_grad.abs()
    )
    if dtype == torch.bfloat16:
        grad_tol = grad_tol + 2**-8 * ref_grad.abs()
    elif dtype == torch.float16:
        grad_tol = grad_tol + 2**-11 * ref_grad.abs() + 2**-25
    return stat_atol, 1e-5, grad_tol


def _stats_reference(z, t, cap):
    zc = z.double()
    if cap:
        zc = torch.tanh(zc / cap) * cap
    keep = t != -100
    ts = torch.where(keep, t, 0)
    lse = torch.logsumexp(zc, 1)
    zt = zc.gather(1, ts[:, None])[:, 0]
    other = zc.scatter(1, ts[:, None], float("-inf")).max(1).values
    first = zc.argmax(1)
    zero = torch.zeros((), dtype=torch.float64)
    return (
        torch.where(keep, lse, zero),
        torch.where(keep, torch.exp(zt - lse), zero),
        torch.where(keep, zt - other, zero),
        torch.where(keep, (first == ts).double(), zero),
        zc,
    )


def _check_against_reference(dtype, c, options=OPTIONS):
    z, t, w, g = _problem(dtype, c)
    n = z.shape[0]
    for cap, eps, weighted in options:
        wt = w if weighted else None
        loss, lse, stats, status, smooth = torch.ops.memcore.ce_forward_options(
            z, t, torch.arange(n), n, -100, cap, eps, wt
        )
        a, b, cc = _coefficients(t, lse, wt if eps else None, eps, g, c)
        grad = torch.ops.memcore.ce_backward_options(a, b, cc, z, t, lse, -100, cap, wt)
        ref_nll, ref_smooth, ref_grad = options_reference(z, t, -100, cap, eps, wt if eps else None, a, b, cc)
        ref_lse, ref_p, ref_margin, ref_correct, zc = _stats_reference(z, t, cap)
        p = torch.softmax(zc, 1)
        u = w.double() if (weighted and eps) else torch.ones(c, dtype=torch.float64)
        atol, rtol, gtol = _tolerances(dtype, cap, z, ref_grad, p, a, b, cc, u)
        where = f"C={c} {dtype} softcap={cap} label_smoothing={eps} weighted={weighted}"
        assert int(status) == 0, where
        assert grad.dtype == dtype and grad.shape == z.shape, where
        for name, got, want in [
            ("loss", loss, ref_nll),
            ("lse", lse, ref_lse),
            ("p(target)", stats[:, 0], ref_p),
            ("margin", stats[:, 1], ref_margin),
        ]:
            torch.testing.assert_close(
                got.double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{where} {name}: {m}"
            )
        # correctness where the margin is clear of the bound (a tie can fall either way)
        clear = ref_margin.abs() > 2 * atol
        assert torch.equal(stats[clear, 2].double(), ref_correct[clear]), where
        if eps:
            big_u = float(u.sum())
            torch.testing.assert_close(
                smooth.double(),
                ref_smooth,
                atol=big_u * atol,
                rtol=rtol,
                msg=lambda m: f"{where} smooth: {m}",
            )
        else:
            assert smooth.numel() == 0, where
        err = (grad.double() - ref_grad).abs()
        worst = int((err - gtol).flatten().argmax())
        assert bool((err <= gtol).all()), (
            f"{where} gradient: entry {divmod(worst, c)} off by {err.flatten()[worst]:.3g} > "
            f"{gtol.flatten()[worst]:.3g} (want {ref_grad.flatten()[worst]:.6g})"
        )


@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_options_kernels_against_reference(dtype, c):
    _check_against_reference(dtype, c)


def test_options_kernels_opcheck():
    """opcheck on the fused CPU kernels of both ops, one call per route and instance."""
    for c in (5, 40, 1100):
        z, t, w, g = _problem(torch.float32, c, n=6, seed=2)
        for dtype in (torch.float32, torch.bfloat16):
            x = z.to(dtype)
            for cap, eps, weighted in [(0.0, 0.1, True), (3.0, 0.0, False), (3.0, 0.2, False)]:
                wt = w if weighted else None
                args = (x, t, torch.arange(6), 6, -100, cap, eps, wt)
                torch.library.opcheck(torch.ops.memcore.ce_forward_options, args)
                lse = torch.ops.memcore.ce_forward_options(*args)[1]
                a, b, cc = _coefficients(t, lse, wt if eps else None, eps, g, c)
                torch.library.opcheck(
                    torch.ops.memcore.ce_backward_options, (a, b, cc, x, t, lse, -100, cap, wt)
                )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_options_kernels_same_bits_any_thread_count(dtype):
    """Rows are independent and each row's sums run in a fixed order: the same bits run to run and
    with 1 or 2 threads, on rows enough for several threads' ranges on every route."""
    before = torch.get_num_threads()
    try:
        for c in (10, 1000, 5000):
            z, t, w, g = _problem(dtype, c, n=600, seed=3)
            a, b, cc = (torch.rand(600, generator=g).to(w.dtype) for _ in range(3))
            runs = []
            for threads in (1, 2, 2):
                torch.set_num_threads(threads)
                out = torch.ops.memcore.ce_forward_options(z, t, torch.arange(600), 600, -100, 30.0, 0.1, w)
                grad = torch.ops.memcore.ce_backward_options(a, b, cc, z, t, out[1], -100, 30.0, w)
                runs.append([*out, grad])
            for other in runs[1:]:
                for x, y in zip(runs[0], other):
                    assert torch.equal(x, y), (c, dtype)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_options_kernels_statistics_without_softcap_are_the_default_ops(dtype):
    """Without a softcap the options' forward is ce_forward plus the smoothing sum: loss, lse,
    statistics and status bit for bit the default op's, on every route."""
    for c in CLASSES:
        z, t, w, _ = _problem(dtype, c, seed=4)
        n = z.shape[0]
        want = torch.ops.memcore.ce_forward(z, t, torch.arange(n), n, -100)
        for eps, weight in [(0.0, None), (0.1, None), (0.1, w)]:
            got = torch.ops.memcore.ce_forward_options(z, t, torch.arange(n), n, -100, 0.0, eps, weight)
            for x, y in zip(got[:4], want):
                assert torch.equal(x, y), (c, dtype, eps)
