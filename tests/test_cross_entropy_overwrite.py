"""accumulate(..., overwrite_logits=True): the gradient is written over the logits in the forward
pass (memcore::ce_forward_grad_) and handed back by the backward (memcore::scale_unless_one_)."""

import pytest
import torch
import torch.nn.functional as F
from reference import recorded

import memcore

# two routes that each round float32 math once to a 16-bit dtype: at most one ulp apart (relative
# 2^-7 bfloat16, 2^-10 float16); against the float64 reference, half an ulp. Plus float32 noise on
# entries near 0 (p - 1 at a confident target): ~eps32 * |logits|.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
}
REF_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.bfloat16: dict(rtol=2**-8, atol=1e-6),
    torch.float16: dict(rtol=2**-11, atol=1e-6),
}


def _batch(n, c, dtype, device, ignore=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, c, generator=g)).to(device=device, dtype=dtype)
    targets = torch.randint(0, c, (n,), generator=g)
    if ignore:
        targets[::7] = -100
    index = torch.randint(0, max(n // 2, 1), (n,), generator=g)  # repeated indices
    return logits, targets.to(device), index.to(device)


def _run(logits, targets, index, reduction, overwrite, factor=1.0, samples=None):
    a = logits.detach().clone().requires_grad_()
    tr = memcore.Tracker(samples or len(targets), device=logits.device)
    loss = memcore.accumulate(a, targets, index, tr, reduction=reduction, overwrite_logits=overwrite)
    (loss * factor).backward() if factor != 1.0 else loss.backward()
    return loss.detach(), a.grad.clone(), tr.scores()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", [3, 17, 1000, 1025, 5000, 20001])  # every CUDA row shape, odd C
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_default_route(c, dtype, reduction, device):
    logits, targets, index = _batch(40, c, dtype, device)
    l0, g0, s0 = _run(logits, targets, index, reduction, overwrite=False)
    l1, g1, s1 = _run(logits, targets, index, reduction, overwrite=True)
    assert l1.dtype == logits.dtype and g1.dtype == logits.dtype
    torch.testing.assert_close(l1, l0, **TOL[dtype])
    torch.testing.assert_close(g1, g0, **TOL[dtype])
    for key in ("csl", "rows", "confidence_mean", "aum", "correctness"):
        torch.testing.assert_close(s1[key], s0[key], equal_nan=True)
    ref = logits.detach().double().requires_grad_()
    F.cross_entropy(ref, targets, reduction=reduction).backward()
    torch.testing.assert_close(g1.double(), ref.grad, **REF_TOL[dtype])


@pytest.mark.parametrize("factor", [1.0, 3.5, 0.25])
def test_layer_gradients_and_upstream_scaling(factor, device):
    """The realistic case: logits from a layer (not a leaf). Parameter gradients equal the
    default route's for a plain backward and for a scaled loss (GradScaler, loss / k)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 300).to(device)
    x = torch.randn(24, 16, device=device)
    y = torch.randint(0, 300, (24,), device=device)
    idx = torch.arange(24, device=device)
    grads = []
    for overwrite in (False, True):
        lin.zero_grad()
        loss = memcore.accumulate(
            lin(x), y, idx, memcore.Tracker(24, device=device), overwrite_logits=overwrite
        )
        (loss * factor).backward()
        grads.append((lin.weight.grad.clone(), lin.bias.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-7)


def test_logits_hold_the_gradient_afterwards(device):
    logits, targets, index = _batch(12, 9, torch.float32, device)
    a = logits.clone().requires_grad_()
    loss = memcore.accumulate(a, targets, index, memcore.Tracker(12, device=device), overwrite_logits=True)
    ref = logits.clone().requires_grad_()
    F.cross_entropy(ref, targets).backward()
    torch.testing.assert_close(a.detach(), ref.grad, rtol=1e-5, atol=1e-7)  # before backward, too
    loss.backward()
    torch.testing.assert_close(a.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_sequence_logits(device):
    """[B, T, V] logits, one id per sequence, padding ignored."""
    torch.manual_seed(1)
    emb = torch.nn.Embedding(50, 8).to(device)
    head = torch.nn.Linear(8, 50).to(device)
    tokens = torch.randint(0, 50, (3, 10), device=device)
    labels = torch.randint(0, 50, (3, 10), device=device)
    labels[:, -3:] = -100
    seq = torch.tensor([4, 0, 2], device=device)
    out = []
    for overwrite in (False, True):
        head.zero_grad()
        tr = memcore.Tracker(5, device=device)
        memcore.accumulate(head(emb(tokens)), labels, seq, tr, overwrite_logits=overwrite).backward()
        out.append((head.weight.grad.clone(), tr.scores()["csl"]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[1][1], out[0][1])


def test_second_backward_raises(device):
    logits, targets, index = _batch(8, 5, torch.float32, device)
    a = logits.clone().requires_grad_()
    loss = memcore.accumulate(a, targets, index, memcore.Tracker(8, device=device), overwrite_logits=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_logits_saved_elsewhere_is_caught(device):
    """Another node that saved the logits for its backward sees them modified: autograd raises
    instead of computing a wrong gradient."""
    lin = torch.nn.Linear(4, 6).to(device)
    z = lin(torch.randn(5, 4, device=device))
    penalty = (z**2).mean()  # pow saves z
    loss = memcore.accumulate(
        z,
        torch.randint(0, 6, (5,), device=device),
        torch.arange(5, device=device),
        memcore.Tracker(5, device=device),
        overwrite_logits=True,
    )
    with pytest.raises(RuntimeError, match="inplace"):
        (loss + penalty).backward()


def test_no_gradient_needed_leaves_logits_alone(device):
    logits, targets, index = _batch(10, 7, torch.float32, device)
    a = logits.clone().requires_grad_()
    with torch.no_grad():
        loss = memcore.accumulate(
            a, targets, index, memcore.Tracker(10, device=device), overwrite_logits=True
        )
    assert torch.equal(a.detach(), logits)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))


def test_bad_arguments(device):
    logits, targets, index = _batch(6, 4, torch.float32, device, ignore=False)
    tr = memcore.Tracker(6, device=device)
    a = logits.clone().requires_grad_()
    with pytest.raises(ValueError, match="mean"):
        memcore.accumulate(a, targets, index, tr, reduction="none", overwrite_logits=True)
    x = torch.randn(6, 3, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="inputs"):
        memcore.accumulate(a, targets, index, tr, overwrite_logits=True, inputs=x)
    bad = targets.clone()
    bad[2] = 4
    with pytest.raises(IndexError, match="targets"):
        memcore.accumulate(a, bad, index, tr, overwrite_logits=True)
    nan = logits.clone()
    nan[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        memcore.accumulate(nan.requires_grad_(), targets, index, tr, overwrite_logits=True)
    assert recorded(tr).abs().sum() == 0  # rejected batches change nothing


def test_all_rows_ignored(device):
    logits, _, index = _batch(5, 4, torch.float32, device)
    targets = torch.full((5,), -100, device=device)
    for reduction in ("mean", "sum"):
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        la = memcore.accumulate(
            a, targets, index, memcore.Tracker(5, device=device), reduction=reduction, overwrite_logits=True
        )
        lb = F.cross_entropy(b, targets, reduction=reduction)
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb, equal_nan=True)
        assert torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, device):
    logits, targets, index = _batch(9, 6, dtype, device)
    for code in (1, 2):
        torch.library.opcheck(
            torch.ops.memcore.ce_forward_grad_.default, (logits.clone(), targets, index, 9, -100, code)
        )
    torch.library.opcheck(
        torch.ops.memcore.scale_unless_one_.default, (logits.clone(), torch.tensor(2.0, device=device))
    )
    g = logits.clone()
    torch.ops.memcore.scale_unless_one_(g, torch.tensor(1.0, device=device))
    assert torch.equal(g, logits)
    torch.ops.memcore.scale_unless_one_(g, torch.tensor(2.0, device=device))
    torch.testing.assert_close(g, logits * 2)


def test_compiled_step_takes_the_default_route():
    """Under torch.compile the flag is ignored (the graph takes the default ops) and the step
    traces without graph breaks."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5)
    x, y, idx = torch.randn(6, 8), torch.randint(0, 5, (6,)), torch.arange(6)
    tr = memcore.Tracker(6)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, y, idx):
        return memcore.accumulate(lin(x), y, idx, tr, overwrite_logits=True)

    loss = step(x, y, idx)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(lin(x), y))
