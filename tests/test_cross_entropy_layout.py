"""memcore.accumulate on F.cross_entropy's class-dimension-1 layout: logits [N, C, d1, ...] with
targets [N, d1, ...] (segmentation [N, C, H, W], [N, C, L]), contiguous or with the classes innermost
in memory (channels-last), against F.cross_entropy; the class_dim choice where both readings fit."""

import pytest
import torch
import torch.nn.functional as F

import memcore
from memcore._validate import rows_of

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
# a 16-bit result of float32 math against the float32 reference: one rounding, half an ulp
HALF = {torch.bfloat16: dict(rtol=2**-8, atol=1e-7), torch.float16: dict(rtol=2**-11, atol=1e-7)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = {"NCHW": (4, 5, 3, 6), "NCL": (3, 7, 9)}


def _logits(shape, layout, dtype, device):
    """Logits of `shape` [N, C, d...], contiguous or with the classes innermost in memory."""
    z = (torch.randn(shape) * 3).to(device=device, dtype=dtype)
    if layout == "classes_last":  # channels-last for 4-D; for [N, C, L] the transpose of [N, L, C]
        z = z.movedim(1, -1).contiguous().movedim(-1, 1)
        assert z.movedim(1, -1).is_contiguous()
    else:
        assert z.is_contiguous()
    return z


def _targets(shape, device):
    t = torch.randint(0, shape[1], shape[:1] + shape[2:], device=device)
    t.view(-1)[::7] = -100  # ignored positions
    return t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "classes_last"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_class_dim_1_equals_f_cross_entropy(name, layout, dtype, reduction, device):
    """Loss, dtype and gradient of F.cross_entropy(logits [N, C, d...], targets [N, d...]); the
    gradient arrives in the logits' own layout (strides)."""
    shape = SHAPES[name]
    z = _logits(shape, layout, dtype, device).requires_grad_()
    x = z * 1  # a non-leaf: autograd.grad returns the gradient as the backward made it
    t = _targets(shape, device)
    tr = memcore.Tracker(shape[0], device=device)
    got = memcore.accumulate(x, t, torch.arange(shape[0], device=device), tr, reduction=reduction)
    half = dtype in HALF
    # 16-bit: the reference is float32 math on the same values (F.cross_entropy rounds in between)
    ref = z.detach().float() if half else z.detach()
    ref = ref.requires_grad_()
    want = F.cross_entropy(ref, t, reduction=reduction)
    upstream = (
        torch.randn(want.shape, device=device) if reduction == "none" else torch.ones((), device=device)
    )
    upstream = upstream.to(dtype)  # the same values for both sides
    (g,) = torch.autograd.grad(got, x, upstream)
    (gw,) = torch.autograd.grad(want, ref, upstream.to(ref.dtype))
    assert got.dtype == dtype and got.shape == want.shape == (() if reduction != "none" else t.shape)
    assert g.shape == z.shape and g.stride() == x.stride(), "the gradient comes in the logits' layout"
    tol = HALF[dtype] if half else TOL[dtype]
    # a row's loss lse - z[target] near 0 carries float32's absolute error, a few ulps of the logits'
    # magnitude (8 allowed), before its rounding to 16 bits
    ltol = dict(rtol=tol["rtol"], atol=2**-21 * float(z.detach().abs().max())) if half else tol
    torch.testing.assert_close(got.to(ref.dtype), want, **ltol)
    # 16-bit gradient: float32 math, one rounding to 16 bits, one more for the upstream factor of
    # "none"; at the target, p - 1 for p near 1 carries float32's absolute error, a few ulps of 1
    # (2^-24 each: 8 allowed), times the upstream
    scale = max(1.0, float(upstream.abs().max()))
    gtol = dict(rtol=2 * tol["rtol"], atol=2**-21 * scale) if half else tol
    torch.testing.assert_close(g.to(ref.dtype), gw, **gtol)
    assert (g.movedim(1, -1)[t == -100] == 0).all()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_classes_innermost_are_read_without_a_copy(name, device):
    """Channels-last logits are already rows [N * d..., C] in memory: the kernel reads them in place;
    contiguous [N, C, d...] logits are copied once into that order."""
    shape = SHAPES[name]
    t, i = _targets(shape, device), torch.arange(shape[0], device=device)
    z = _logits(shape, "classes_last", torch.float32, device)
    rows, t1, i1 = rows_of(z, t, i, -100, None)
    assert rows.data_ptr() == z.data_ptr() and rows.is_contiguous() and rows.shape == (t.numel(), shape[1])
    c = _logits(shape, "contiguous", torch.float32, device)
    copy, _, _ = rows_of(c, t, i, -100, None)
    assert copy.data_ptr() != c.data_ptr() and torch.equal(copy, c.movedim(1, -1).reshape(-1, shape[1]))
    assert torch.equal(t1, t.reshape(-1)) and t1.shape == i1.shape


def test_one_id_per_image_gathers_its_pixels(device):
    """index [N] gives one id per image: its rows are the H * W pixels (less the ignored ones), its
    csl their summed loss, its statistics over its pixels."""
    n, c, h, w = 3, 4, 5, 2
    z = _logits((n, c, h, w), "classes_last", torch.float32, device)
    t = _targets((n, c, h, w), device)
    ids = torch.tensor([2, 0, 5], device=device)
    tr = memcore.Tracker(6, device=device)
    memcore.accumulate(z, t, ids, tr)
    tr.end_epoch()
    s = tr.scores()
    per_pixel = F.cross_entropy(z.double(), t, reduction="none")  # [N, H, W], 0 where ignored
    keep = t != -100
    p = torch.exp(-per_pixel)
    for k, sample in enumerate(ids.tolist()):
        assert s["rows"][sample] == int(keep[k].sum()) and int(keep[k].sum()) > h * w // 2
        torch.testing.assert_close(s["csl"][sample], per_pixel[k].sum().cpu(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            s["confidence_mean"][sample], p[k][keep[k]].mean().cpu(), rtol=1e-6, atol=1e-6
        )
    assert s["rows"][[1, 3, 4]].tolist() == [0.0, 0.0, 0.0]
    # one id per pixel works too: index shaped like the targets
    tr2 = memcore.Tracker(n * h * w, device=device)
    memcore.accumulate(z, t, torch.arange(n * h * w, device=device).view(n, h, w), tr2)
    assert tr2.scores()["rows"].tolist() == keep.reshape(-1).double().tolist()


@pytest.mark.parametrize("shape", [(2, 4, 4), (2, 3, 3, 3)])
def test_shapes_both_layouts_fit_need_class_dim(shape, device):
    """[N, A, A] with targets [N, A] reads as [B, T, V] or as [N, C, L]: the call names class_dim,
    records nothing, and each explicit choice gives its own F.cross_entropy."""
    z = torch.randn(shape, device=device)
    t = torch.randint(0, shape[1], shape[:-1], device=device)
    i = torch.arange(shape[0], device=device)
    tr = memcore.Tracker(2, device=device)
    with pytest.raises(ValueError, match=r"class_dim=1 .*class_dim=-1"):
        memcore.accumulate(z, t, i, tr)
    assert tr.scores()["rows"].sum() == 0
    c = shape[-1]
    want_last = F.cross_entropy(z.reshape(-1, c), t.reshape(-1))
    torch.testing.assert_close(memcore.accumulate(z, t, i, tr, class_dim=-1), want_last)
    torch.testing.assert_close(memcore.accumulate(z, t, i, tr, class_dim=len(shape) - 1), want_last)
    torch.testing.assert_close(memcore.accumulate(z, t, i, tr, class_dim=1), F.cross_entropy(z, t))
    assert not torch.allclose(want_last, F.cross_entropy(z, t))  # the two readings differ


def test_class_dim_is_checked(device):
    z = torch.randn(2, 5, 3, 4, device=device)
    t = torch.randint(0, 5, (2, 3, 4), device=device)
    i = torch.arange(2, device=device)
    tr = memcore.Tracker(2, device=device)
    for bad in (0, 2, -2, 4):
        with pytest.raises(ValueError, match="class_dim must be 1"):
            memcore.accumulate(z, t, i, tr, class_dim=bad)
    for bad in (1.0, "1", True):
        with pytest.raises(TypeError, match="class_dim"):
            memcore.accumulate(z, t, i, tr, class_dim=bad)
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 5, 3\)"):
        memcore.accumulate(z, t, i, tr, class_dim=-1)  # classes last: targets [2, 5, 3]
    with pytest.raises(ValueError, match=r"classes in dim 1, as F.cross_entropy"):
        memcore.accumulate(z, t[:, :2], i, tr)  # fits neither reading: both are named
    with pytest.raises(
        ValueError, match=r"index must have shape \(2, 3, 4\) or \(2,\) \(one sample id per input\)"
    ):
        memcore.accumulate(z, t, torch.arange(3, device=device), tr)
    with pytest.raises(ValueError, match="at least 2 classes in dim 1"):
        memcore.accumulate(torch.randn(2, 1, 3, device=device), t[:, :, 0], i, tr)
    assert tr.scores()["rows"].sum() == 0
    # 2-D logits read the same either way
    z2, t2 = torch.randn(4, 3, device=device), torch.tensor([0, 2, 1, 0], device=device)
    for cd in (None, 1, -1):
        torch.testing.assert_close(
            memcore.accumulate(z2, t2, torch.arange(4, device=device) % 2, tr, class_dim=cd),
            F.cross_entropy(z2, t2),
        )


@pytest.mark.parametrize("layout", ["contiguous", "classes_last"])
def test_class_dim_1_overwrite_compile_and_double_backward(layout, device):
    """overwrite_logits=True (on the copy where there is one), torch.compile(fullgraph=True) and
    double backward in fp64 on both layouts."""
    shape = (2, 3, 4, 5)
    base = _logits(shape, layout, torch.float32, device)
    t = _targets(shape, device)
    i = torch.arange(2, device=device)
    ref = base.clone(memory_format=torch.preserve_format).requires_grad_()
    F.cross_entropy(ref * 1, t).backward()
    for run in ("overwrite", "compiled"):
        leaf = base.clone(memory_format=torch.preserve_format).requires_grad_()
        tr = memcore.Tracker(2, device=device)
        if run == "overwrite":
            loss = memcore.accumulate(leaf * 1, t, i, tr, overwrite_logits=True)
        else:
            step = torch.compile(lambda x: memcore.accumulate(x, t, i, tr), fullgraph=True)
            loss = step(leaf * 1)
        loss.backward()
        torch.testing.assert_close(leaf.grad, ref.grad, **TOL[torch.float32])
        assert tr.scores()["rows"].tolist() == (t != -100).sum((1, 2)).double().tolist()
    z = _logits((2, 3, 2, 2), layout, torch.float64, device).requires_grad_()
    tz = torch.tensor([[[0, 2], [-100, 1]], [[1, 1], [2, 0]]], device=device)

    def f(x):
        return memcore.accumulate(x, tz, i, memcore.Tracker(2, device=device), reduction="none")

    assert torch.autograd.gradcheck(f, (z,)) and torch.autograd.gradgradcheck(f, (z,))


@pytest.mark.parametrize("shape", [(0, 4, 3, 2), (2, 4, 0, 2)])
@pytest.mark.parametrize("layout", ["contiguous", "classes_last"])
def test_class_dim_1_with_no_positions(shape, layout, device):
    """No rows (N = 0 or a zero-size spatial dim): F.cross_entropy's values (NaN mean), an empty
    gradient of the logits' shape, nothing recorded."""
    z = _logits(shape, layout, torch.float32, device).requires_grad_()
    t = torch.zeros(shape[:1] + shape[2:], dtype=torch.long, device=device)
    tr = memcore.Tracker(3, device=device)
    for reduction in ("mean", "sum", "none"):
        got = memcore.accumulate(
            z, t, torch.zeros(shape[0], dtype=torch.long, device=device), tr, reduction=reduction
        )
        torch.testing.assert_close(got, F.cross_entropy(z, t, reduction=reduction), equal_nan=True)
        (g,) = torch.autograd.grad(got.sum(), z)
        assert g.shape == z.shape
    assert tr.scores()["rows"].sum() == 0
