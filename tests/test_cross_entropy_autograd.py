"""accumulate under autograd: first and second derivatives equal F.cross_entropy's (gradcheck,
gradient penalties, 16-bit logits), overwrite_logits' refusal of double backward and its leaf
semantics, and inputs= (ignored rows, one inputs tensor per loss)."""

import pytest
import torch
import torch.nn.functional as F

import memcore


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_inputs", [False, True])
def test_gradcheck_and_gradgradcheck_fp64(reduction, with_inputs):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, -100, 2, 2, 1])
    idx = torch.tensor([0, 1, 2, 3, 3, 4])

    def f(z):
        x = z * 1.0 if with_inputs else z
        tr = memcore.Tracker(5)
        if with_inputs:  # ce_forward's node (the route of inputs=) instead of ce_forward_reduce's
            xin = torch.randn(6, 2, dtype=torch.float64).requires_grad_()
            x = x + (xin * 0).sum(1, keepdim=True)
            return memcore.accumulate(x, y, idx, tr, reduction=reduction, inputs=xin)
        return memcore.accumulate(x, y, idx, tr, reduction=reduction)

    assert torch.autograd.gradcheck(f, (z,))
    assert torch.autograd.gradgradcheck(f, (z,))


def test_gradient_penalty_matches_f_cross_entropy():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    y = torch.randint(0, 6, (10,))
    y[3] = -100
    grads = []
    for use_memcore in (False, True):
        lin.zero_grad()
        z = lin(x)
        loss = (
            memcore.accumulate(z, y, torch.arange(10), memcore.Tracker(10))
            if use_memcore
            else F.cross_entropy(z, y)
        )
        (gw,) = torch.autograd.grad(loss, lin.weight, create_graph=True)
        (loss + gw.pow(2).sum()).backward()
        grads.append(lin.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_double_backward_low_precision(dtype):
    """Second derivatives in float32 math for 16-bit logits, returned in the logits' dtype."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(7, 9, generator=g).to(dtype)
    y = torch.randint(0, 9, (7,), generator=g)
    v = torch.randn(7, 9, generator=g).to(dtype).float()  # exact in dtype: both routes see the same v
    out = []
    for use_memcore in (False, True):
        z = (
            base.clone() if use_memcore else base.float().clone()
        ).requires_grad_()  # reference: float32 math
        loss = (
            memcore.accumulate(z, y, torch.arange(7), memcore.Tracker(7))
            if use_memcore
            else F.cross_entropy(z, y)
        )
        (gz,) = torch.autograd.grad(loss, z, create_graph=True)
        (gz.float() * v).sum().backward()
        out.append(z.grad)
    assert out[1].dtype == dtype
    # float32 math rounded once to dtype: within half an ulp of the float32 reference
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(out[1].float(), out[0], **tol)


def test_overwrite_logits_refuses_double_backward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 5)
    z = lin(torch.randn(3, 4))
    loss = memcore.accumulate(
        z, torch.tensor([0, 1, 2]), torch.arange(3), memcore.Tracker(3), overwrite_logits=True
    )
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, lin.weight, create_graph=True)


def test_overwrite_logits_on_a_leaf_writes_its_values():
    """Documented: on a leaf the gradient is written over the leaf's values and is its .grad."""
    a = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    want = torch.autograd.grad(F.cross_entropy(a, y), a)[0]
    memcore.accumulate(a, y, torch.arange(3), memcore.Tracker(3), overwrite_logits=True).backward()
    assert a.grad.data_ptr() == a.data_ptr()
    torch.testing.assert_close(a.detach(), want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_with_inputs_and_ignored_rows(reduction):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4)
    x = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([0, -100, 3, -100, 1, 2])
    z = lin(x)
    got = memcore.accumulate(z, y, torch.arange(6), memcore.Tracker(6), reduction=reduction, inputs=x)
    torch.testing.assert_close(got, F.cross_entropy(z, y, reduction=reduction))


def test_inputs_shared_by_two_accumulate_calls_raises():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    tr1, tr2 = memcore.Tracker(5), memcore.Tracker(5)
    h = lin(x)
    loss = memcore.accumulate(h, y, torch.arange(5), tr1, inputs=x) + memcore.accumulate(
        h * 2, y, torch.arange(5), tr2, inputs=x
    )
    with pytest.raises(RuntimeError, match="feeds two memcore.accumulate losses"):
        loss.backward()
    for tr in (tr1, tr2):
        assert int(tr.state_dict()["buffers"].get("grad_rows", torch.zeros(1)).sum()) == 0  # nothing recorded
    # one inputs= per x: exact, and the same x works again in the next step
    for _ in range(2):
        memcore.accumulate(lin(x), y, torch.arange(5), tr1, inputs=x).backward()
    assert int(tr1.state_dict()["buffers"]["grad_rows"].sum()) == 10
