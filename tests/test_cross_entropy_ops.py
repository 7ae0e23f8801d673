"""The cross_entropy family's ops as operators: opcheck of ce_forward / ce_forward_reduce /
ce_backward, direct op calls that bypass the Python checks, determinism, and torch.compile
(fullgraph=True) of a training step through memcore.accumulate."""

import pytest
import torch
import torch.nn.functional as F
from reference import recorded

import memcore


def _inputs(device, n=8, c=5, dtype=torch.float32):
    logits = torch.randn(n, c, device=device, dtype=dtype)
    targets = torch.randint(0, c, (n,), device=device)
    targets[0] = -100
    index = torch.randint(0, 4, (n,), device=device)
    return logits, targets, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_ce_forward(dtype, device):
    logits, targets, index = _inputs(device, dtype=dtype)
    torch.library.opcheck(torch.ops.memcore.ce_forward.default, (logits, targets, index, 4, -100))
    logits.requires_grad_()
    torch.library.opcheck(torch.ops.memcore.ce_forward.default, (logits, targets, index, 4, -100))


@pytest.mark.parametrize("reduction", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_ce_forward_reduce(dtype, reduction, device):
    logits, targets, index = _inputs(device, dtype=dtype)
    args = (logits, targets, index, 4, -100, reduction)
    torch.library.opcheck(torch.ops.memcore.ce_forward_reduce.default, args)
    logits.requires_grad_()
    torch.library.opcheck(torch.ops.memcore.ce_forward_reduce.default, args)


def test_ce_forward_reduce_matches_cross_entropy(device):
    logits, targets, index = _inputs(device, n=40, c=7, dtype=torch.float64)
    for reduction, name in ((1, "mean"), (2, "sum")):
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        out, count, *_ = torch.ops.memcore.ce_forward_reduce(a, targets, index, 4, -100, reduction)
        ref = F.cross_entropy(b, targets, reduction=name)
        torch.testing.assert_close(out, ref)
        assert int(count) == int((targets != -100).sum())
        out.backward()
        ref.backward()
        torch.testing.assert_close(a.grad, b.grad)
    torch.autograd.gradcheck(
        lambda z: torch.ops.memcore.ce_forward_reduce(z, targets, index, 4, -100, 1)[0],
        (logits.cpu().clone().requires_grad_() if device == "cpu" else logits.clone().requires_grad_(),),
    )


def test_opcheck_ce_backward(device):
    logits, targets, index = _inputs(device)
    loss, lse, _, _ = torch.ops.memcore.ce_forward(logits, targets, index, 4, -100)
    args = (torch.randn_like(loss), logits, targets, lse, -100)
    torch.library.opcheck(torch.ops.memcore.ce_backward.default, args)
    # with gradients: the autograd of the double backward
    args = (args[0].clone().requires_grad_(), logits.clone().requires_grad_(), targets, lse, -100)
    torch.library.opcheck(torch.ops.memcore.ce_backward.default, args)


def test_direct_op_calls_check_their_arguments(device):
    """Bypassing the Python checks still cannot read or write out of bounds: the kernels refuse
    shapes and codes that do not fit, and flag indices outside [0, num_samples)."""
    logits, targets, index = _inputs(device)
    index = index.clone()
    index[3] = 7
    *_, status = torch.ops.memcore.ce_forward(logits, targets, index, 4, -100)
    assert int(status) & 2  # bad index bit
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.memcore.ce_forward(logits[0], targets, index, 4, -100)
    with pytest.raises(RuntimeError, match="targets must be 1-D"):
        torch.ops.memcore.ce_forward(logits, targets[:-1], index, 4, -100)
    with pytest.raises(RuntimeError, match="index must be 1-D"):
        torch.ops.memcore.ce_forward(logits, targets, index[:-1], 4, -100)
    with pytest.raises(RuntimeError, match="reduction must be"):
        torch.ops.memcore.ce_forward_reduce(logits, targets, index, 4, -100, 0)
    lse = torch.zeros(8, device=device)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.memcore.ce_backward(torch.ones(8, device=device), logits, targets, lse[:-1], -100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_op_call_zero_classes(dtype, device):
    """[N, 0] logits (rejected by accumulate) reach the kernels only by a direct op call: every row
    is flagged (on every device) with zero outputs, and nothing crashes."""
    z = torch.randn(3, 0, dtype=dtype, device=device)
    t, ix = torch.zeros(3, dtype=torch.long, device=device), torch.zeros(3, dtype=torch.long, device=device)
    loss, _, row_stats, status = torch.ops.memcore.ce_forward(z, t, ix, 3, -100)
    assert int(status) & 1  # bad target bit
    assert loss.abs().sum() == 0 and row_stats.abs().sum() == 0
    g = torch.ones(3, device=device)
    assert torch.ops.memcore.ce_backward(g, z, t, torch.zeros(3, device=device), -100).shape == (3, 0)


def _repeated_index_batch(device, n, c, samples=5):
    """A batch with repeated indices, ignored rows and a NaN-free forward."""
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(n, c, generator=g)).to(device)
    targets = torch.randint(0, c, (n,), generator=g)
    targets[::5] = -100
    index = torch.randint(0, samples, (n,), generator=g)
    return logits, targets.to(device), index.to(device), samples


def test_deterministic_mode_repeats_bit_for_bit(device):
    """torch.use_deterministic_algorithms(True): no error, and the same batch twice gives the same
    float64 sums to the last bit, repeated indices included."""
    logits, targets, index, samples = _repeated_index_batch(device, n=4096, c=50)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            tr = memcore.Tracker(samples, device=device)
            memcore.accumulate(logits, targets, index, tr)
            runs.append(tr.scores())
    finally:
        torch.use_deterministic_algorithms(was)
    for key in ("csl", "confidence_mean", "aum"):
        assert torch.equal(runs[0][key], runs[1][key]), key
    ref = memcore.Tracker(samples)
    memcore.accumulate(logits.cpu(), targets.cpu(), index.cpu(), ref)
    torch.testing.assert_close(runs[0]["csl"], ref.scores()["csl"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_compile_fullgraph_training_step(reduction):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    ref_model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    ref_model.load_state_dict(model.state_dict())
    tracker = memcore.Tracker(32, device="cpu")

    def step(x, y, idx):  # AOTAutograd compiles the backward of this graph too
        return memcore.accumulate(model(x), y, idx, tracker, reduction=reduction)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(32, 12), torch.randint(0, 5, (32,))
    idx = torch.arange(32)
    for _ in range(2):  # second call reuses the graph
        for b in range(0, 32, 16):
            loss = compiled(x[b : b + 16], y[b : b + 16], idx[b : b + 16])
            loss.sum().backward()
            ref = F.cross_entropy(ref_model(x[b : b + 16]), y[b : b + 16], reduction=reduction)
            ref.sum().backward()
            torch.testing.assert_close(loss, ref)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        tracker.end_epoch()
    s = tracker.scores()
    assert s["rows"].tolist() == [2.0] * 32
    assert (s["csl"] > 0).all()


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    tracker = memcore.Tracker(16, device="cpu")
    lin = torch.nn.Linear(6, 4)

    @torch.compile(fullgraph=True)
    def step(x, y, idx):
        return memcore.accumulate(lin(x), y, idx, tracker)

    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    loss = step(x, y, torch.arange(16))
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(lin(x), y))
    tracker.end_epoch()
    assert tracker.scores()["rows"].sum() == 16


def test_compiled_step_defers_errors():
    torch._dynamo.reset()
    tracker = memcore.Tracker(4, device="cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(z, y, idx):
        return memcore.accumulate(z, y, idx, tracker)

    step(torch.randn(2, 3), torch.tensor([0, 7]), torch.tensor([0, 1]))
    assert recorded(tracker).abs().sum() == 0
    with pytest.raises(ValueError, match="target out of range"):
        tracker.end_epoch()
