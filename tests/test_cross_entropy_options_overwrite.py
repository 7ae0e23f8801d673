"""accumulate(..., overwrite_logits=True) with the loss options (memcore::ce_forward_grad_options_):
the options' loss, reduced in the forward pass, and its logits gradient written over the logits by
the options' backward kernels run in place. Against the options' default route (the same kernels,
the gradient in a new tensor) and F.cross_entropy / Liger-Kernel's formulas in float64."""

import pytest
import torch
import torch.nn.functional as F
from reference import assert_same_state, recorded

import memcore
from benchmarks.memory import peak_cpu_mib

OPTIONS = [
    dict(weight="w"),
    dict(label_smoothing=0.1),
    dict(softcap=4.0),
    dict(z_loss=1e-2),
    dict(weight="w", label_smoothing=0.2, softcap=3.0, z_loss=1e-2),
]
# The two routes share the kernels and differ in where the per-row algebra rounds: the loss's sum
# (float32 on the default options route, double here) and the coefficients a, b, c (the same
# formulas, float32 in either order): a few float32 ulp of each value. 16-bit gradients are each
# rounded once from those float32 values: at most one ulp apart.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.float64: dict(rtol=1e-10, atol=1e-13),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
}


def _opts(kw, c, dtype, device, seed=0):
    if kw.get("weight") != "w":
        return kw
    g = torch.Generator().manual_seed(seed + 99)
    acc = torch.float64 if dtype == torch.float64 else dtype
    return dict(
        kw, weight=(torch.rand(c, generator=g, dtype=torch.float64) + 0.1).to(device=device, dtype=acc)
    )


def _batch(n, c, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, c, generator=g)).to(device=device, dtype=dtype)
    targets = torch.randint(0, c, (n,), generator=g)
    targets[::7] = -100
    index = torch.randint(0, max(n // 2, 1), (n,), generator=g)  # repeated indices
    return logits, targets.to(device), index.to(device)


def _run(logits, targets, index, reduction, overwrite, opts, factor=1.0):
    a = logits.detach().clone().requires_grad_()
    tr = memcore.Tracker(len(targets), device=logits.device)
    loss, z = memcore.accumulate(
        a, targets, index, tr, reduction=reduction, overwrite_logits=overwrite, return_z_loss=True, **opts
    )
    (loss * factor).backward() if factor != 1.0 else loss.backward()
    return loss.detach(), z, a.grad.clone(), tr.state_dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", [3, 17, 1000, 5000])  # CUDA: warp and block rows, odd C
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: "+".join(kw))
def test_matches_the_options_default_route(kw, reduction, c, dtype, device):
    logits, targets, index = _batch(40, c, dtype, device)
    opts = _opts(kw, c, dtype if dtype == torch.float64 else torch.float32, device)
    l0, z0, g0, s0 = _run(logits, targets, index, reduction, False, opts)
    l1, z1, g1, s1 = _run(logits, targets, index, reduction, True, opts)
    assert l1.dtype == l0.dtype and g1.dtype == logits.dtype
    torch.testing.assert_close(l1, l0, **TOL[torch.float64 if dtype == torch.float64 else torch.float32])
    torch.testing.assert_close(z1, z0, **TOL[torch.float64 if dtype == torch.float64 else torch.float32])
    torch.testing.assert_close(g1, g0, **TOL[dtype])
    # the statistics are the same kernels' (the model's own softmax): recorded identically
    for key, value in s0.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(s1[key], value, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float64_against_f_cross_entropy_and_liger_formulas(reduction, device):
    """Loss, returned z-loss and gradient against the float64 formulas: F.cross_entropy(weight,
    label_smoothing) on the soft-capped logits plus Liger-Kernel's z-loss (z_loss * lse^2 per kept
    row; its mean over the kept rows)."""
    n, c, cap, zc = 30, 11, 3.0, 0.05
    logits, targets, index = _batch(n, c, torch.float64, device, seed=4)
    w = torch.rand(c, dtype=torch.float64, device=device) + 0.1
    a = logits.clone().requires_grad_()
    tr = memcore.Tracker(n, device=device)
    loss, z = memcore.accumulate(
        a, targets, index, tr, reduction=reduction, overwrite_logits=True, weight=w,
        label_smoothing=0.15, softcap=cap, z_loss=zc, return_z_loss=True,
    )  # fmt: skip
    loss.backward()
    b = logits.clone().requires_grad_()
    capped = cap * torch.tanh(b / cap)
    keep = targets != -100
    zterm = (zc * torch.logsumexp(capped, 1) ** 2 * keep).sum()
    zterm = zterm / keep.sum() if reduction == "mean" else zterm
    want = F.cross_entropy(capped, targets, weight=w, label_smoothing=0.15, reduction=reduction) + zterm
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z, zterm.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("factor", [1.0, 3.5, 0.25])
def test_layer_gradients_and_upstream_scaling(factor, device):
    """Logits from a layer (not a leaf), a scaled loss (GradScaler, loss / k): the parameter
    gradients are the options' default route's."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 300).to(device)
    x = torch.randn(24, 16, device=device)
    y = torch.randint(0, 300, (24,), device=device)
    idx = torch.arange(24, device=device)
    w = torch.rand(300, device=device) + 0.5
    grads = []
    for overwrite in (False, True):
        lin.zero_grad()
        loss = memcore.accumulate(
            lin(x), y, idx, memcore.Tracker(24, device=device), overwrite_logits=overwrite, weight=w,
            label_smoothing=0.1, softcap=5.0, z_loss=1e-3,
        )  # fmt: skip
        (loss * factor).backward()
        grads.append((lin.weight.grad.clone(), lin.bias.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-7)


def test_classes_in_dim_1_and_sequences(device):
    """F.cross_entropy's [N, C, d1] layout and [B, T, V] logits take the route too."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 6, 5, generator=g).to(device)
    t = torch.randint(0, 6, (3, 5), generator=g).to(device)
    t[0, 1] = -100
    for logits, kw in ((z, dict(class_dim=1)), (z.transpose(1, 2).contiguous(), {})):
        out = []
        for overwrite in (False, True):
            a = logits.clone().requires_grad_()
            tr = memcore.Tracker(3, device=device)
            loss = memcore.accumulate(
                a,
                t,
                torch.arange(3, device=device),
                tr,
                overwrite_logits=overwrite,
                label_smoothing=0.1,
                **kw,
            )
            loss.backward()
            out.append((loss.detach(), a.grad, tr.scores()["csl"]))
        for x, y in zip(*out):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_refusals_change_nothing(device):
    logits, targets, index = _batch(8, 5, torch.float32, device)
    tr = memcore.Tracker(8, device=device)
    memcore.accumulate(logits, targets, index, tr)
    before = tr.state_dict()
    a = logits.clone().requires_grad_()
    with pytest.raises(ValueError, match="overwrite_logits"):
        memcore.accumulate(a, targets, index, tr, reduction="none", overwrite_logits=True, z_loss=1e-3)
    x = torch.randn(8, 3, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="inputs"):
        memcore.accumulate(a, targets, index, tr, overwrite_logits=True, label_smoothing=0.1, inputs=x)
    assert torch.equal(a.detach(), logits)  # refused before any kernel ran
    # a target out of range is found by the forward kernel: the tracker is left as it was (the
    # logits, as on every overwrite route, already hold the gradient's rows)
    bad = targets.clone()
    bad[2] = 5
    with pytest.raises(IndexError, match="targets"):
        memcore.accumulate(a, bad, index, tr, overwrite_logits=True, weight=torch.ones(5, device=device))
    assert_same_state(before, tr.state_dict())


def test_second_and_double_backward_raise(device):
    logits, targets, index = _batch(8, 5, torch.float32, device)
    a = logits.clone().requires_grad_()
    loss = memcore.accumulate(
        a, targets, index, memcore.Tracker(8, device=device), overwrite_logits=True, z_loss=1e-3
    )
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()
    b = logits.clone().requires_grad_()
    loss = memcore.accumulate(
        b, targets, index, memcore.Tracker(8, device=device), overwrite_logits=True, softcap=2.0
    )
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, b, create_graph=True)


def test_no_gradient_needed_takes_the_options_route(device):
    logits, targets, index = _batch(10, 7, torch.float32, device)
    a = logits.clone().requires_grad_()
    tr0, tr1 = memcore.Tracker(10, device=device), memcore.Tracker(10, device=device)
    with torch.no_grad():
        got = memcore.accumulate(a, targets, index, tr0, overwrite_logits=True, label_smoothing=0.1)
    assert torch.equal(a.detach(), logits)
    want = memcore.accumulate(logits, targets, index, tr1, label_smoothing=0.1)
    torch.testing.assert_close(got, want)
    assert torch.equal(recorded(tr0), recorded(tr1))


def test_all_rows_ignored(device):
    logits, _, index = _batch(5, 4, torch.float32, device)
    targets = torch.full((5,), -100, device=device)
    w = torch.rand(4, device=device) + 0.1
    for reduction in ("mean", "sum"):
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        la = memcore.accumulate(
            a, targets, index, memcore.Tracker(5, device=device), reduction=reduction, overwrite_logits=True,
            weight=w, label_smoothing=0.1,
        )  # fmt: skip
        lb = F.cross_entropy(b, targets, reduction=reduction, weight=w, label_smoothing=0.1)
        la.backward()
        torch.testing.assert_close(la, lb.detach(), equal_nan=True)
        assert torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, device):
    logits, targets, index = _batch(9, 6, dtype, device)
    w = torch.rand(6, device=device) + 0.1
    for code in (1, 2):
        for args in ((w, 0.1, 3.0, 1e-3), (None, 0.0, 2.0, 0.0), (w, 0.0, 0.0, 0.0)):
            torch.library.opcheck(
                torch.ops.memcore.ce_forward_grad_options_.default,
                (logits.clone(), targets, index, 9, -100, code, *args),
            )


def test_op_checks_its_arguments():
    logits, targets, index = _batch(6, 4, torch.float32, "cpu")
    op = torch.ops.memcore.ce_forward_grad_options_
    for args, words in [
        ((1, torch.ones(5), 0.0, 0.0, 0.0), "weight"),
        ((1, None, 1.5, 0.0, 0.0), "label_smoothing"),
        ((1, None, 0.0, -1.0, 0.0), "softcap"),
        ((1, None, 0.0, 0.0, float("nan")), "z_loss"),
        ((0, None, 0.1, 0.0, 0.0), "reduction"),
    ]:
        z = logits.clone()
        with pytest.raises(RuntimeError, match=words):
            op(z, targets, index, 6, -100, *args)
        assert torch.equal(z, logits)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(logits.t().contiguous().t(), targets, index, 6, -100, 1, None, 0.1, 0.0, 0.0)


def test_no_gradient_sized_allocation():
    """The gradient is the logits' own storage: the step allocates nothing of the logits' size."""
    n, c = 256, 8192
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, c, generator=g).requires_grad_()
    targets, index = torch.randint(0, c, (n,), generator=g), torch.arange(n)
    tr = memcore.Tracker(n)
    grad_mib = logits.numel() * logits.element_size() / 2**20
    for kw in OPTIONS:
        opts = _opts(kw, c, torch.float32, "cpu")
        fresh = logits.detach().clone().requires_grad_()
        peak = peak_cpu_mib(
            lambda: memcore.accumulate(fresh, targets, index, tr, overwrite_logits=True, **opts).backward()
        )
        if peak is None:
            pytest.skip("this torch's profiler exposes no allocation events: CPU peak memory not measurable")
        assert peak < 0.1 * grad_mib, (kw, peak)
