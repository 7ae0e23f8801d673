"""fp32 and fp64 accuracy of the cross-entropy kernels. The CPU ops run as they are (ce_forward,
ce_backward from its stored lse, the in-place overwrite of ce_forward_grad_; the narrow rows under
16 classes, the blocks of up to 1024 and the rows streamed in pieces beyond; the ISA copy this
process loaded, the narrower ones through test_cross_entropy.py's subprocess test). The CUDA
kernels are checked on the host: their own row logic
(csrc/cuda/cross_entropy_row.h) replayed lane by lane as each launch runs it, with ex2.approx.ftz.f32
modelled at its documented error (2 ulp; csrc/cross_entropy_replay.cpp's host_ex2), against float64.

Every route that computes a loss or a gradient: the block-per-row forward (ce_forward's kernel,
16-byte packs and scalar), ce_backward's gradient pass from the stored fp32 lse, the overwrite pass
of ce_forward_grad_ (in place), and the split launch of few wide rows (forward, finish, gradient,
overwrite) where the launcher would take it on a 132-SM GPU. Logits of scale 1 to 30 (LLM logits
reach +-30) over 10 to 256,000 classes; half the rows have the target at the row's max (a confident
prediction: small loss, p_t near 1, where rounding at the scale of the max shows). A row fails when
its loss or any gradient element misses atol 1e-6 + rtol 1e-5 (fp64: 1e-12 + 1e-10); a route may
fail only rows that PyTorch's own CPU F.cross_entropy in the same dtype fails too. On a GPU the
sweep runs the compiled kernels as well (test_cuda_kernels_as_exact_as_pytorch, marker cuda).
"""

import pytest
import torch
import torch.nn.functional as F

import memcore  # noqa: F401  (loads the ops)
from memcore import _C

SCALES = (1, 3, 10, 30)
ROWS = {10: 64, 1000: 32, 32000: 4, 256000: 2}  # classes: rows (few for the wide ones: cost)
CPU_ROWS = {**ROWS, 100: 32, 4000: 8}  # and a block row of two vector lengths, a streamed one of four pieces
TOL = {torch.float32: (1e-6, 1e-5), torch.float64: (1e-12, 1e-10)}  # atol, rtol
SMS = 132  # the split decision as on an H100 / H200
EX2 = ("hashed", "low", "high")


def _threads(c):
    """Threads per row of the block-per-row launch (dispatch_shape in csrc/cuda/cross_entropy.cu)."""
    return 32 if c <= 2048 else 256 if c <= 16384 else 512


def _batch(scale, c, dtype):
    g = torch.Generator().manual_seed(1000 * scale + c)
    n = CPU_ROWS[c]
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[::2] = z[::2].argmax(1)
    return z, t


def _reference(z, t):
    """float64 loss [N] and gradient of the summed loss [N, C]."""
    z64 = z.double()
    lse = torch.logsumexp(z64, 1)
    grad = torch.softmax(z64, 1)
    grad[torch.arange(len(t)), t] -= 1
    return lse - z64[torch.arange(len(t)), t], grad


def _bad_rows(loss, grad, ref_loss, ref_grad, dtype):
    atol, rtol = TOL[dtype]
    bad_loss = (loss.double() - ref_loss).abs() > atol + rtol * ref_loss.abs()
    bad_grad = ((grad.double() - ref_grad).abs() > atol + rtol * ref_grad.abs()).any(1)
    return bad_loss | bad_grad


def _torch(z, t):
    x = z.clone().requires_grad_()
    loss = F.cross_entropy(x, t, reduction="none")
    loss.sum().backward()
    return loss.detach(), x.grad


def _block_routes(z, t):
    """Per route name: (loss [N], gradient [N, C]) of the block-per-row launch, replayed."""
    n, c = z.shape
    tpr = _threads(c)
    out = {}
    for vec in (True, False):
        loss, lse = torch.empty(n, dtype=z.dtype), torch.empty(n, dtype=z.dtype)
        back, over = torch.empty_like(z), z.clone()
        for r in range(n):
            row, target = z[r].contiguous(), int(t[r])
            got = _C._ce_row_replay(row, target, tpr, vec)
            lse[r], loss[r] = got[0], got[1]  # the kernel's stored opmath values
            _C._ce_grad_replay(row, back[r], target, float(lse[r]), 1.0, tpr, vec)
            _C._ce_grad_replay(over[r], over[r], target, float(lse[r]), 1.0, tpr, vec)
        kind = "packs" if vec else "scalar"
        out[f"forward + backward ({kind})"] = (loss, back)
        out[f"forward + overwrite ({kind})"] = (loss, over)
    return out


def _split_routes(z, t):
    """The split launch's routes, where the launcher takes it ({} otherwise)."""
    n, c = z.shape
    s = _C._ce_split_slices(n, c, z.element_size(), SMS)
    if s == 1:
        return {}
    index = torch.arange(n)
    loss, lse, _, status = _C._ce_split_forward_replay(z.clone(), t, index, n, -100, s, 256, False, False)
    assert int(status) == 0
    back = _C._ce_split_backward_replay(torch.ones(n, dtype=z.dtype), z, t, lse, -100, s, 256)
    over = z.clone()
    loss_o, *_ = _C._ce_split_forward_replay(over, t, index, n, -100, s, 256, True, False)
    return {f"split forward + backward (S={s})": (loss, back), f"split overwrite (S={s})": (loss_o, over)}


def _cpu_routes(z, t):
    """Per route name: (loss [N], gradient [N, C]) of the CPU ops themselves."""
    n = len(t)
    index = torch.arange(n)
    ops = torch.ops.memcore
    loss, lse, _, status = ops.ce_forward(z, t, index, n, -100)
    assert int(status) == 0
    back = ops.ce_backward(torch.ones(n, dtype=lse.dtype), z, t, lse, -100)
    over = z.clone()
    loss_o = ops.ce_forward_grad_(over, t, index, n, -100, 2)[2]  # sum: upstream gradient 1 per row
    return {"cpu forward + backward": (loss, back), "cpu overwrite": (loss_o, over)}


def _cuda_routes(z, t):
    """The CUDA kernels themselves (their own ex2.approx), on the launch this GPU takes for the shape
    (the split launch for the few wide rows): ce_forward + ce_backward, and ce_forward_grad_ (sum:
    the gradient of the summed loss) over a copy of the logits."""
    n = len(t)
    zc, tc, index = z.cuda(), t.cuda(), torch.arange(n, device="cuda")
    loss, lse, _, status = torch.ops.memcore.ce_forward(zc, tc, index, n, -100)
    assert int(status) == 0
    back = torch.ops.memcore.ce_backward(torch.ones_like(lse), zc, tc, lse, -100)
    over = zc.clone()
    loss_o = torch.ops.memcore.ce_forward_grad_(over, tc, index, n, -100, 2)[2]
    return {"CUDA forward + backward": (loss.cpu(), back.cpu()), "CUDA overwrite": (loss_o.cpu(), over.cpu())}


def _check(dtype, scale, c, where="replay"):
    """where: "replay" (the CUDA row logic on the host), "cpu" or "cuda" (the ops themselves)."""
    z, t = _batch(scale, c, dtype)
    ref_loss, ref_grad = _reference(z, t)
    torch_bad = _bad_rows(*_torch(z, t), ref_loss, ref_grad, dtype)
    if where == "cpu":
        routes = _cpu_routes(z, t)
    elif where == "cuda":
        routes = _cuda_routes(z, t)
    else:
        routes = {**_block_routes(z, t), **_split_routes(z, t)}
    assert routes
    failures = []
    for name, (loss, grad) in routes.items():
        worse = _bad_rows(loss, grad, ref_loss, ref_grad, dtype) & ~torch_bad
        if worse.any():
            failures.append(f"{name}: rows {worse.nonzero().flatten().tolist()}")
    assert not failures, f"{dtype} scale {scale} C={c}, rows PyTorch passes: " + "; ".join(failures)


@pytest.fixture(params=EX2)
def ex2(request):
    """The replays' model of ex2.approx.ftz.f32 for one test, restored afterwards."""
    before = _C._ce_ex2_model(request.param)
    yield request.param
    _C._ce_ex2_model(before)


@pytest.mark.parametrize("c", sorted(ROWS))
@pytest.mark.parametrize("scale", SCALES)
def test_fp32_as_exact_as_pytorch(ex2, scale, c):
    _check(torch.float32, scale, c)


@pytest.mark.parametrize("c", sorted(ROWS))
@pytest.mark.parametrize("scale", SCALES)
def test_fp64_as_exact_as_pytorch(scale, c):
    _check(torch.float64, scale, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", sorted(CPU_ROWS))
@pytest.mark.parametrize("scale", SCALES)
def test_cpu_as_exact_as_pytorch(scale, c, dtype):
    _check(dtype, scale, c, where="cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("c", sorted(ROWS))
@pytest.mark.parametrize("scale", SCALES)
def test_cuda_kernels_as_exact_as_pytorch(scale, c, dtype):
    """The same sweep on a GPU: the compiled kernels, not their replay."""
    _check(dtype, scale, c, where="cuda")


@pytest.mark.parametrize("c", [1000, 131072])
def test_fp32_target_gradient_of_unconfident_rows(ex2, c):
    """Where p_t <= 1/2 the fp32 target gradient p_t - 1 comes from exp(z_t - lse) - 1, so lse's
    rounding to fp32 (ulp(lse) / 2, relative to every p_j) reaches it scaled by p_t, not by 1 as
    minus the others' sum would carry it. Per row: |error| <= p_t (|lse| + 4) 2^-24 + 2^-24 (lse
    rounding, ex2's 2 ulp, the subtraction), doubled for the other roundings; logits shifted by 40
    so |lse| is in [32, 64), where minus the others' sum errs by ~|lse| 2^-24 ~ 2.4e-6."""
    g = torch.Generator().manual_seed(c)
    n = 4 if c > 4096 else 64
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * 2 + 40).float()
    t = torch.randint(0, c, (n,), generator=g)
    _, ref_grad = _reference(z, t)
    rows = torch.arange(n)
    p_t = (ref_grad[rows, t] + 1).clamp(min=0)
    lse = torch.logsumexp(z.double(), 1)
    bound = 2 * (p_t * (lse.abs() + 4) * 2.0**-24 + 2.0**-24)
    routes = {**_block_routes(z, t), **_split_routes(z, t)} if c <= 4096 else _split_routes(z, t)
    assert routes, "the split launch should take these rows"
    unconfident = p_t <= 0.5
    assert unconfident.sum() >= n // 2, "fixture should hold unconfident rows"
    for name, (_, grad) in routes.items():
        err = (grad[rows, t].double() - ref_grad[rows, t]).abs()
        bad = unconfident & (err > bound)
        assert not bad.any(), f"{name}: rows {bad.nonzero().flatten().tolist()}, errors {err[bad].tolist()}"


def test_ex2_model_stays_within_two_ulp():
    """host_ex2 under every model: within 2 ulp of 2^x for normal results, the low and high models
    at the bound's two ends for some x, and flushed to +0 below the smallest normal (.ftz)."""
    x = torch.linspace(-126, 127.9, 200001)
    want = torch.exp2(x.double())
    ulp = torch.ldexp(torch.ones_like(want), torch.frexp(want).exponent - 24)
    seen = {}
    for model in ("nearest", *EX2):
        before = _C._ce_ex2_model(model)
        try:
            got = torch.tensor([_C._ce_host_ex2(v) for v in x[::50].tolist()], dtype=torch.float64)
        finally:
            _C._ce_ex2_model(before)
        err = (got - want[::50]) / ulp[::50]
        assert err.abs().max() <= 2, model
        seen[model] = err
    assert seen["nearest"].abs().max() <= 0.5
    assert seen["low"].min() < -1.5 and seen["high"].max() > 1.5
    assert seen["hashed"].min() < -1 and seen["hashed"].max() > 1  # both ends, not one bias
    before = _C._ce_ex2_model("hashed")
    try:
        assert _C._ce_host_ex2(-126.5) == 0.0 and _C._ce_host_ex2(float("-inf")) == 0.0
        assert abs(_C._ce_host_ex2(0.0) - 1.0) <= 2**-22
    finally:
        _C._ce_ex2_model(before)
    with pytest.raises(RuntimeError, match="model"):
        _C._ce_ex2_model("exact")
