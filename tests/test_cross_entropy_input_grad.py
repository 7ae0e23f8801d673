"""accumulate(..., inputs=x): per-sample input-gradient norms and the paper's learning time."""

import pytest
import torch
import torch.nn.functional as F
from reference import recorded

import memcore


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _per_sample_sqnorms(model, x, y):
    """Reference: gradient of each sample's own loss w.r.t. its input, one sample at a time."""
    out = []
    for i in range(len(x)):
        xi = x[i : i + 1].detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i : i + 1]), xi)
        out.append(g.double().pow(2).sum())
    return torch.stack(out)


def _data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("reduction,factor", [("mean", 1.0), ("sum", 1.0), ("mean", 3.7), ("none", 0.25)])
def test_norms_match_per_sample_reference(reduction, factor, device):
    model = _mlp().to(device)
    x, y = _data()
    x, y = x.to(device), y.to(device)
    tr = memcore.Tracker(len(x), device=device)
    idx = torch.arange(len(x), device=device)
    xb = x.clone().requires_grad_()
    loss = memcore.accumulate(model(xb), y, idx, tr, reduction=reduction, inputs=xb)
    (loss.sum() * factor).backward()  # any later scaling cancels
    assert xb.grad is None
    got = tr.scores()["input_grad_norm"]
    torch.testing.assert_close(got, _per_sample_sqnorms(model, x, y).cpu(), rtol=1e-4, atol=1e-10)


def test_ignored_rows_are_not_recorded(device):
    model = _mlp().to(device)
    x, y = _data(8)
    x, y = x.to(device), y.to(device)
    y[2] = -100
    tr = memcore.Tracker(8, device=device)
    xb = x.clone().requires_grad_()
    memcore.accumulate(model(xb), y, torch.arange(8, device=device), tr, inputs=xb).backward()
    s = tr.scores()["input_grad_norm"]
    assert torch.isnan(s[2]) and not torch.isnan(s[[0, 1, 3]]).any()


def test_parameter_gradients_unchanged_by_recording():
    x, y = _data(32)
    runs = []
    for record in (False, True):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tr = memcore.Tracker(32)
        for step in range(4):
            xb = x[step * 8 : (step + 1) * 8].clone()
            if record:
                xb.requires_grad_()
            idx = torch.arange(step * 8, (step + 1) * 8)
            loss = memcore.accumulate(model(xb), y[idx], idx, tr, inputs=xb if record else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _train(model, x, y, epochs, tracker, batch=8):
    """SGD with tracking; returns the reference per-epoch sqnorms measured at the step's weights."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    ref = []
    for _ in range(epochs):
        norms = torch.zeros(len(x), dtype=torch.float64)
        for b in range(0, len(x), batch):
            idx = torch.arange(b, min(b + batch, len(x)))
            norms[idx] = _per_sample_sqnorms(model, x[idx], y[idx])
            xb = x[idx].clone().requires_grad_()
            loss = memcore.accumulate(model(xb), y[idx], idx, tracker, inputs=xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        tracker.end_epoch()
        ref.append(norms)
    return torch.stack(ref)


@pytest.mark.parametrize("tau", [None, 0.5])
def test_formal_learning_time_matches_reference(tau):
    # a learnable teacher task with a few flipped labels; large initial weights so input
    # gradients start big and shrink for the samples the network learns
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g)
    y = (x @ torch.randn(6, 4, generator=g)).argmax(1)
    y[:6] = (y[:6] + 1) % 4
    model = _mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    tr = memcore.Tracker(40, tau=tau)
    ref = _train(model, x, y, 5, tr)  # [E, S]
    running = ref.cumsum(0) / torch.arange(1, 6, dtype=torch.float64)[:, None]
    mean = running[-1]
    thr = mean.mean() if tau is None else torch.tensor(tau, dtype=torch.float64)
    below = running <= thr
    want = torch.full_like(mean, 5.0)  # first epoch from which `below` holds to the end
    for e in range(4, -1, -1):
        want = torch.where(below[e:].all(0), torch.full_like(mean, float(e)), want)
    s = tr.scores()
    torch.testing.assert_close(s["input_grad_norm"], mean, rtol=1e-4, atol=1e-10)
    assert torch.equal(s["learning_time_formal"], want)
    assert len(want.unique()) >= 2, "fixture should spread learning times"


def test_state_dict_keeps_history():
    x, y = _data(16)
    tr = memcore.Tracker(16)
    _train(_mlp(), x, y, 2, tr)
    other = memcore.Tracker(16)
    other.load_state_dict(tr.state_dict())
    for k, v in tr.scores().items():
        assert torch.equal(v.nan_to_num(-1), other.scores()[k].nan_to_num(-1)), k


@pytest.mark.parametrize("bad", ["nan", "index"])
def test_rejected_batch_records_no_input_grads(bad, device):
    """strict=False: a batch the forward rejects leaves the input-gradient statistics unchanged
    too (no error from inside backward; the deferred error comes at scores())."""
    model = _mlp().to(device)
    x, y = _data(8)
    x, y = x.to(device), y.to(device)
    tr = memcore.Tracker(8, device=device, strict=False)
    idx = torch.arange(8, device=device)
    xb = x.clone().requires_grad_()
    memcore.accumulate(model(xb), y, idx, tr, inputs=xb).backward()  # a good batch first
    before = recorded(tr)
    xb = x.clone().requires_grad_()
    logits = model(xb)
    if bad == "nan":
        logits = logits + torch.tensor([float("nan")] + [0.0] * 7, device=device)[:, None]
    else:
        idx = idx.clone()
        idx[3] = 8
    memcore.accumulate(logits, y, idx, tr, inputs=xb).backward()
    torch.testing.assert_close(recorded(tr), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rejected"):
        tr.scores()


def test_not_recorded_gives_nan():
    tr = memcore.Tracker(3)
    memcore.accumulate(torch.randn(3, 2), torch.tensor([0, 1, 0]), torch.arange(3), tr)
    s = tr.scores()
    assert torch.isnan(s["input_grad_norm"]).all() and torch.isnan(s["learning_time_formal"]).all()


def test_bad_inputs_raise():
    model = _mlp()
    x, y = _data(8)
    tr = memcore.Tracker(8)
    idx = torch.arange(8)
    xb = x.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"inputs must have one row per logits row: shape \[8"):
        memcore.accumulate(model(xb), y, idx, tr, inputs=xb[:4].detach().requires_grad_())
    with pytest.raises(ValueError, match="leaf"):
        memcore.accumulate(model(xb), y, idx, tr, inputs=xb * 2)
    with pytest.raises(ValueError, match="requires_grad_"):
        memcore.accumulate(model(x), y, idx, tr, inputs=x)
    with pytest.raises(TypeError, match="inputs"):
        memcore.accumulate(model(xb), y, idx, tr, inputs=torch.zeros(8, dtype=torch.long))
    assert recorded(tr).abs().sum() == 0


def test_opcheck_ce_input_sqnorm(device):
    grad = torch.randn(6, 3, 4, device=device)
    scale = torch.tensor([1.0, 0.0, 2.0, 1.0, -1.0, 0.5], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.memcore.ce_input_sqnorm.default, (grad, scale))
    got = torch.ops.memcore.ce_input_sqnorm(grad, scale)
    assert got.dtype == torch.float64 and got.shape == (6,) and got.device == grad.device
    want = grad.double().pow(2).flatten(1).sum(1) * scale**2
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("d", [0, 1, 7, 3000])
def test_ce_input_sqnorm_dtypes_and_widths(dtype, d, device):
    """Every dtype, rows of 0 elements, an odd width (no vector packs) and a long one (several
    float chunks summed in double). Against float64 sums of the same values: the float32 partial
    sums of m squares err by at most about m * eps32 relative (sums of positive terms), m <= 1024."""
    g = torch.Generator().manual_seed(d)
    grad = torch.randn(4, d, generator=g).to(device=device, dtype=dtype)
    scale = torch.tensor([1.0, 0.0, 3.0, 0.25], dtype=torch.float64, device=device)
    got = torch.ops.memcore.ce_input_sqnorm(grad, scale)
    want = grad.double().pow(2).sum(1) * scale**2
    rtol = 1e-12 if dtype == torch.float64 else 1024 * 2**-24
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert got[1] == 0


def test_ce_input_sqnorm_refuses_bad_arguments():
    """Direct op calls bypass the Python checks: the kernel still refuses what it cannot read."""
    grad = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="scale must be float64"):
        torch.ops.memcore.ce_input_sqnorm(grad, torch.ones(4))
    with pytest.raises(RuntimeError, match="scale must be float64"):
        torch.ops.memcore.ce_input_sqnorm(grad, torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.memcore.ce_input_sqnorm(grad.t(), torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ops.memcore.ce_input_sqnorm(
            torch.ones(4, 3, dtype=torch.long), torch.ones(4, dtype=torch.float64)
        )


def test_reused_input_tensor_collects_no_hooks():
    model = _mlp()
    x, y = _data(8)
    xb = x.clone().requires_grad_()
    tr = memcore.Tracker(8)
    for _ in range(3):
        memcore.accumulate(model(xb), y, torch.arange(8), tr, inputs=xb).backward()
    assert not xb._backward_hooks and not getattr(xb, "_post_accumulate_grad_hooks", None)
    assert tr.scores()["rows"].sum() == 24 and tr.state_dict()["buffers"]["grad_rows"].sum() == 24


def test_fixed_tau_online_equals_history_including_open_epoch():
    """tau given: one int16 per sample replaces the per-epoch history and gives the same learning
    time as the history at that tau (here the dataset mean a tau=None run used), mid-epoch too."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 6, generator=g)
    y = (x @ torch.randn(6, 4, generator=g)).argmax(1)
    hist = memcore.Tracker(32)
    _train(_mlp(), x, y, 4, hist)
    tau = float(hist.scores()["input_grad_norm"].mean())
    online = memcore.Tracker(32, tau=tau)
    _train(_mlp(), x, y, 4, online)
    on, hi = online.state_dict(), hist.state_dict()
    assert "formal_since" in on["buffers"] and not on["grad_history"] and len(hi["grad_history"]) == 4
    a, b = hist.scores(), online.scores()
    assert torch.equal(a["learning_time_formal"], b["learning_time_formal"])
    assert len(a["learning_time_formal"].unique()) >= 2, "fixture should spread learning times"
    n = 32
    assert online.state_bytes() == n * (60 + 8 + 4 + 2)
    assert hist.state_bytes() == n * (60 + 8 + 4) + n * 4 * 4  # + 4 epochs of float32 history
    with pytest.raises(ValueError, match="tau"):
        online.tau = 0.1
