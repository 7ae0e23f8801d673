"""memcore.linear_accumulate: F.cross_entropy(F.linear(h, W, b)) chunk by chunk, with statistics.

Parity with the unfused PyTorch computation for the loss and the gradients w.r.t. hidden, weight
and bias; statistics identical to memcore.accumulate on the materialised logits; bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from reference import recorded

import memcore

SCORES = ("csl", "csl_mean", "rows", "last_loss", "confidence_mean", "confidence_std", "aum", "correctness")
REDUCTIONS = ("mean", "sum", "none")


def _problem(n, h, v, dtype=torch.float32, device="cpu", bias=True, ignore_every=5, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (scale / h**0.5)
    b = torch.randn(v, generator=g) * 0.1 if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    index = torch.randint(0, max(n // 3, 1), (n,), generator=g)  # repeated indices
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets.to(device), index.to(device)


def _upstream(reduction, n, seed=1, device="cpu"):
    if reduction != "none":
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(device)


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _fused(hidden, weight, bias, targets, index, reduction, upstream=None, samples=None, **kw):
    h, w, b = _leaves(hidden, weight, bias)
    tr = memcore.Tracker(samples or max(int(index.max()) + 1, 1), device=hidden.device)
    loss = memcore.linear_accumulate(h, w, targets, index, tr, bias=b, reduction=reduction, **kw)
    (loss * upstream.to(loss.dtype)).sum().backward() if upstream is not None else loss.backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad, tr


def _reference(hidden, weight, bias, targets, reduction, upstream=None, dtype=None):
    """F.linear + F.cross_entropy, optionally computed in another dtype (float64: ground truth)."""
    h, w, b = _leaves(
        *[None if t is None else (t if dtype is None else t.to(dtype)) for t in (hidden, weight, bias)]
    )
    loss = F.cross_entropy(F.linear(h, w, b), targets, reduction=reduction)
    (loss * upstream.to(loss.dtype)).sum().backward() if upstream is not None else loss.backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [None, 7, 64])
def test_fp32_parity(reduction, chunk_size, device):
    """N=50 is not a multiple of the chunks; V odd; some rows ignored; bias."""
    hidden, weight, bias, targets, index = _problem(50, 24, 301, device=device)
    up = _upstream(reduction, 50, device=device)
    got = _fused(hidden, weight, bias, targets, index, reduction, up, chunk_size=chunk_size)[:4]
    want = _reference(hidden, weight, bias, targets, reduction, up)
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def _fp32_bounds(hidden, weight, targets, reduction, upstream):
    """float64 loss, grad_hidden and grad_weight of F.cross_entropy(hidden @ weight.T) (no bias) and a
    first-order bound on the error of any fp32 computation of them that sums in fp32 (u = 2^-24).

    A sum of n terms in fp32 errs by at most n * u * (sum of the terms' magnitudes) (Higham, Accuracy
    and Stability of Numerical Algorithms, 2nd ed., section 3.1), whatever the order or chunking:
      logits  z_rv = sum_k h_rk W_vk (H terms):  |dz_rv| <= H u A_r, A_r = max_v sum_k |h_rk W_vk|
      lse_r (V terms, each exp(z - m) > 0):    |dlse_r| <= V u + H u A_r (each exp a few ulp more)
      loss_r = lse_r - z_t:                    |dloss_r| <= (V + 2 H A_r + 4) u
      G_rv = g_r (p_rv - [v = t]):             |dG_rv| <= |g_r| p_rv e_r, e_r = (V + 2 H A_r + 4) u
      grad_hidden_rj = sum_v G_rv W_vj (V terms): |d| <= sum_v |W_vj| (|dG_rv| + V u |G_rv|)
      grad_weight_vj = sum_r G_rv h_rj (N terms, across chunks): |d| <= sum_r |h_rj| (|dG_rv| + N u |G_rv|)
    so the bound scales with V: 50,257 terms make it ~3e-3 of each value's magnitude, still far below a
    wrong softmax, target column or chunk (an error of the order of the values themselves)."""
    u = 2.0**-24
    h, w = hidden.double(), weight.double()
    n, hdim = h.shape
    v = w.shape[0]
    keep = targets != -100
    safe = torch.where(keep, targets, 0)
    z = h @ w.t()
    p = z.softmax(1)
    onehot = torch.nn.functional.one_hot(safe, v).double()
    if reduction == "none":
        g = upstream.double()
    else:
        g = torch.full((n,), 1.0 / int(keep.sum()), dtype=torch.float64, device=h.device)
    g = torch.where(keep, g, 0.0)
    G = g[:, None] * (p - onehot)
    a = (h.abs() @ w.abs().t()).amax(1)  # A_r
    e = (v + 2 * hdim * a + 4) * u  # e_r
    loss_rows = torch.where(keep, z.logsumexp(1) - z.gather(1, safe[:, None]).squeeze(1), 0.0)
    loss_err = torch.where(keep, e, 0.0)
    if reduction == "none":
        loss, loss_bound = loss_rows, loss_err
    else:
        loss, loss_bound = loss_rows.sum() / keep.sum(), loss_err.sum() / keep.sum()
    dG = g.abs()[:, None] * p * e[:, None]
    grad_h = G @ w
    grad_h_bound = (dG + v * u * G.abs()) @ w.abs()
    grad_w = G.t() @ h
    grad_w_bound = (dG + n * u * G.abs()).t() @ h.abs()
    return (loss, grad_h, grad_w), (loss_bound, grad_h_bound, grad_w_bound)


def test_fp32_parity_large_odd_vocabulary(device):
    """V = 50,257 (GPT-2), several chunks, no bias: each fp32 result within the fp32 error bound of
    the exact (float64) value on the same inputs (_fp32_bounds)."""
    hidden, weight, _, targets, index = _problem(37, 8, 50257, device=device, bias=False, seed=3)
    for reduction in ("mean", "none"):
        up = _upstream(reduction, 37, device=device)
        got = _fused(hidden, weight, None, targets, index, reduction, up, chunk_size=16)[:3]
        exact, bounds = _fp32_bounds(hidden, weight, targets, reduction, up)
        for name, a, b, bound in zip(("loss", "grad_hidden", "grad_weight"), got, exact, bounds):
            assert a.dtype == torch.float32, name
            err = (a.double() - b).abs()
            assert (err <= bound).all(), (
                f"{reduction} {name}: worst error / bound {float((err / bound).max())}"
            )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_16bit_parity(dtype, reduction, device):
    """Against the float64 truth on the same 16-bit inputs: the fused results are within what
    rounding to 16 bits needs (the logits chunk and its gradient are 16-bit tensors, as in
    F.linear + F.cross_entropy, and the result is rounded: 3 ulps of the largest entry; every GEMM
    accumulates in fp32), and no further from the truth than PyTorch's own 16-bit computation plus
    one ulp of the largest entry. Measured (ulps of the largest entry): at most 2.6, PyTorch's 1.9."""
    hidden, weight, bias, targets, index = _problem(96, 32, 1001, dtype=dtype, device=device, scale=3.0)
    up = _upstream(reduction, 96, device=device)
    up = None if up is None else up.to(dtype).float()  # exactly representable: the same for all three
    got = _fused(hidden, weight, bias, targets, index, reduction, up, chunk_size=40)[:4]
    torch_16 = _reference(hidden, weight, bias, targets, reduction, up)
    truth = _reference(hidden, weight, bias, targets, reduction, up, dtype=torch.float64)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for name, a, t16, t in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, torch_16, truth):
        assert a.dtype == dtype, name
        err = (a.double() - t).abs().max().item()
        scale = t.abs().max().item()
        assert err <= 3 * ulp * scale, f"{name}: max error {err:.3g} vs largest entry {scale:.3g}"
        torch_err = (t16.double() - t).abs().max().item()
        assert err <= torch_err + ulp * scale, f"{name}: {err:.3g} vs PyTorch's {torch_err:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_cuda_parity_auto_chunks(dtype, reduction):
    """The CUDA path (cuBLAS GEMMs around memcore's kernels) where chunk_size=None makes several
    chunks, the last one partial (N=4,096, V=50,257: 2 chunks in fp32, 3 in bf16), with bias, ignored
    rows and repeated indices, against F.linear + F.cross_entropy on the GPU: the loss and the
    gradients of hidden, weight and bias, against the float64 truth, no further from it than
    PyTorch's own computation in the same dtype plus 1 ulp (bf16) or 16 ulps (fp32: the chunks sum
    in another order) of the largest entry. (The CPU path at N=1,024, same V, chunks of 400, measured
    in ulps of the largest entry: bf16 at most 3.3, PyTorch's 2.6; fp32 at most 9.4, PyTorch's 39.)"""
    from memcore.linear_cross_entropy import auto_chunk_size

    n, hdim, v = 4096, 256, 50257
    assert auto_chunk_size(n, v, dtype, torch.device("cuda")) < n  # several chunks
    hidden, weight, bias, targets, index = _problem(n, hdim, v, dtype=dtype, device="cuda", seed=5, scale=3.0)
    up = _upstream(reduction, n, device="cuda")
    up = None if up is None else up.to(dtype).float()  # exactly representable: the same for all three
    got = _fused(hidden, weight, bias, targets, index, reduction, up)[:4]
    torch_same = _reference(hidden, weight, bias, targets, reduction, up)
    truth = _reference(hidden, weight, bias, targets, reduction, up, dtype=torch.float64)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23
    slack = 1 if dtype == torch.bfloat16 else 16
    for name, a, t_same, t in zip(
        ("loss", "grad_hidden", "grad_weight", "grad_bias"), got, torch_same, truth
    ):
        assert a.dtype == dtype and a.shape == t.shape and a.is_cuda, name
        err = (a.double() - t).abs().max().item()
        scale = t.abs().max().item()
        torch_err = (t_same.double() - t).abs().max().item()
        assert err <= torch_err + slack * ulp * scale, f"{name}: {err:.3g} vs PyTorch's {torch_err:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_repeats_bit_for_bit(dtype):
    """The same call twice on one GPU: loss, gradients and scores to the last bit (fixed chunks, the
    kernels' fixed orders, cuBLAS's own reproducibility on one GPU model; docs/guarantees.md)."""
    n, hdim, v = 1024, 128, 50257
    hidden, weight, bias, targets, index = _problem(n, hdim, v, dtype=dtype, device="cuda", seed=6, scale=3.0)
    a, b = (_fused(hidden, weight, bias, targets, index, "mean", chunk_size=300) for _ in range(2))
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    sa, sb = a[4].scores(), b[4].scores()
    for key in ("csl", "confidence_mean", "aum"):
        assert torch.equal(sa[key].nan_to_num(), sb[key].nan_to_num()), key


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_fp64(reduction):
    hidden, weight, bias, targets, index = _problem(9, 5, 7, dtype=torch.float64, ignore_every=4)
    tr = memcore.Tracker(9)

    def f(h, w, b):
        return memcore.linear_accumulate(h, w, targets, index, tr, bias=b, reduction=reduction, chunk_size=4)

    # nondet_tol: gradcheck's second backward through the same graph recomputes (mean / sum), which
    # rounds differently from the gradient made in the forward pass, at fp64's last bits
    assert torch.autograd.gradcheck(f, tuple(_leaves(hidden, weight, bias)), nondet_tol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_statistics_match_accumulate(reduction, device):
    hidden, weight, bias, targets, index = _problem(61, 16, 203, device=device)
    samples = int(index.max()) + 1
    tr_ref = memcore.Tracker(samples, device=device)
    with torch.no_grad():
        memcore.accumulate(F.linear(hidden, weight, bias), targets, index, tr_ref, reduction=reduction)
    *_, tr = _fused(
        hidden,
        weight,
        bias,
        targets,
        index,
        reduction,
        _upstream(reduction, 61, device=device),
        samples=samples,
        chunk_size=16,
    )
    s, r = tr.scores(), tr_ref.scores()
    for key in SCORES:
        torch.testing.assert_close(s[key], r[key], rtol=1e-6, atol=1e-6, equal_nan=True, msg=key)
    # the raw per-sample sums too (loss, rows, correct, p, p^2, margin)
    torch.testing.assert_close(recorded(tr), recorded(tr_ref), rtol=1e-6, atol=1e-6)


def test_no_grad_records_statistics_only():
    hidden, weight, bias, targets, index = _problem(20, 8, 31)
    tr = memcore.Tracker(20)
    with torch.no_grad():
        loss = memcore.linear_accumulate(hidden, weight, targets, index, tr, bias=bias)
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(hidden, weight, bias), targets))
    assert not loss.requires_grad and tr.scores()["rows"].sum() == (targets != -100).sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(reduction, device):
    hidden, weight, bias, _, index = _problem(12, 8, 17, device=device)
    targets = torch.full((12,), -100, device=device)
    up = _upstream(reduction, 12, device=device)
    got = _fused(hidden, weight, bias, targets, index, reduction, up, chunk_size=5)
    want = _reference(hidden, weight, bias, targets, reduction, up)
    for a, b in zip(got[:4], want):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert got[4].scores()["rows"].sum() == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_empty_batch(reduction, smoothing, device):
    """N = 0: no chunk runs, so the weight gradient (which the first chunk's GEMM writes otherwise)
    is zero-filled; loss and gradients as F.cross_entropy's on an empty batch."""
    hidden, weight, bias, targets, index = _problem(0, 8, 17, device=device)
    h, w, b = _leaves(hidden, weight, bias)
    tr = memcore.Tracker(4, device=device)
    loss = memcore.linear_accumulate(
        h, w, targets, index, tr, bias=b, reduction=reduction, label_smoothing=smoothing
    )
    loss.sum().backward()
    rh, rw, rb = _leaves(hidden, weight, bias)
    ref = F.cross_entropy(F.linear(rh, rw, rb), targets, reduction=reduction, label_smoothing=smoothing)
    ref.sum().backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), equal_nan=True)
    for a, r in ((h.grad, rh.grad), (w.grad, rw.grad), (b.grad, rb.grad)):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


def test_custom_ignore_index(device):
    hidden, weight, bias, targets, index = _problem(30, 8, 19, device=device, ignore_every=0)
    targets[::3] = 7  # a valid class id used as ignore_index
    h, w, b = _leaves(hidden, weight, bias)
    tr = memcore.Tracker(30, device=device)
    loss = memcore.linear_accumulate(h, w, targets, index, tr, bias=b, ignore_index=7, chunk_size=4)
    loss.backward()
    rh, rw, rb = _leaves(hidden, weight, bias)
    ref = F.cross_entropy(F.linear(rh, rw, rb), targets, ignore_index=7)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach())
    for a, r in ((h.grad, rh.grad), (w.grad, rw.grad), (b.grad, rb.grad)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
    assert tr.scores()["rows"].sum() == (targets != 7).sum()


def test_tied_weight_used_elsewhere(device):
    """GPT-2 style: the embedding matrix is also the head; both gradients accumulate."""
    torch.manual_seed(0)
    v, hdim, n = 53, 12, 40
    emb = torch.randn(v, hdim, device=device)
    ids = torch.randint(0, v, (n,), device=device)
    targets = torch.randint(0, v, (n,), device=device)
    index = torch.arange(n, device=device)
    grads = []
    for fused in (True, False):
        w = emb.clone().requires_grad_()
        hidden = torch.tanh(F.embedding(ids, w) * 2)  # the tied weight before the head too
        if fused:
            loss = memcore.linear_accumulate(
                hidden, w, targets, index, memcore.Tracker(n, device=device), chunk_size=16
            )
        else:
            loss = F.cross_entropy(F.linear(hidden, w), targets)
        (loss + (w**2).sum() * 1e-3).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_sequences_non_contiguous_view_and_per_sequence_index(device):
    """[B, T, H] hidden sliced to h[:, :-1] (a view that cannot be flattened), targets [B, T-1],
    one dataset index per sequence [B]."""
    torch.manual_seed(0)
    bsz, t, hdim, v = 4, 9, 16, 97
    base = torch.randn(bsz, t, hdim, device=device, requires_grad=True)
    weight = (torch.randn(v, hdim, device=device) / 4).requires_grad_()
    labels = torch.randint(0, v, (bsz, t), device=device)
    labels[1, 5:] = -100  # padding
    seq_index = torch.tensor([3, 0, 2, 1], device=device)
    hidden = base * 1.5  # non-leaf
    view = hidden[:, :-1]
    assert not view.is_contiguous()
    tr = memcore.Tracker(4, device=device)
    loss = memcore.linear_accumulate(view, weight, labels[:, 1:], seq_index, tr, chunk_size=5)
    loss.backward()
    g_base, g_w = base.grad.clone(), weight.grad.clone()
    base.grad = weight.grad = None
    logits = F.linear(base * 1.5, weight)[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, v), labels[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach())
    torch.testing.assert_close(g_base, base.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_w, weight.grad, rtol=1e-5, atol=1e-7)
    tr_ref = memcore.Tracker(4, device=device)
    memcore.accumulate(logits.detach(), labels[:, 1:], seq_index, tr_ref)
    for key in SCORES:
        torch.testing.assert_close(
            tr.scores()[key], tr_ref.scores()[key], rtol=1e-6, atol=1e-6, equal_nan=True
        )
    none = memcore.linear_accumulate(
        view.detach(),
        weight.detach(),
        labels[:, 1:],
        seq_index,
        memcore.Tracker(4, device=device),
        reduction="none",
    )
    assert none.shape == (bsz, t - 1)


def test_upstream_scaling_and_second_backward(device):
    """loss * k (GradScaler, accumulation divisors) scales every gradient made in the forward pass;
    a second backward through the retained graph with another factor gets its own factor's result."""
    hidden, weight, bias, targets, index = _problem(20, 8, 31, device=device)
    h, w, b = _leaves(hidden, weight, bias)
    loss = memcore.linear_accumulate(h, w, targets, index, memcore.Tracker(20, device=device), bias=b)
    (loss * 3.5).backward(retain_graph=True)
    want = _reference(hidden, weight, bias, targets, "mean", torch.tensor(3.5, device=device))
    for a, r in zip((h.grad, w.grad, b.grad), want[1:]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
    (loss * -2.0).backward()
    want2 = _reference(hidden, weight, bias, targets, "mean", torch.tensor(1.5, device=device))
    for a, r in zip((h.grad, w.grad, b.grad), want2[1:]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_only_some_inputs_need_grad():
    """A frozen head (LoRA) or a frozen body: only the requested gradients are made."""
    hidden, weight, bias, targets, index = _problem(20, 8, 31)
    want = _reference(hidden, weight, bias, targets, "sum")
    for reduction in ("sum", "none"):
        h = hidden.clone().requires_grad_()
        loss = memcore.linear_accumulate(
            h, weight, targets, index, memcore.Tracker(20), bias=bias, reduction=reduction
        )
        loss.sum().backward()
        torch.testing.assert_close(h.grad, want[1], rtol=1e-5, atol=1e-7)
        w = weight.clone().requires_grad_()
        memcore.linear_accumulate(
            hidden, w, targets, index, memcore.Tracker(20), reduction=reduction
        ).sum().backward()
        torch.testing.assert_close(
            w.grad, _reference(hidden, weight, None, targets, "sum")[2], rtol=1e-5, atol=1e-7
        )


@pytest.mark.slow
def test_torch_compile_fullgraph():
    hidden, weight, bias, targets, index = _problem(24, 8, 37)
    tr = memcore.Tracker(24)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(h, w, b):
        return memcore.linear_accumulate(h, w, targets, index, tr, bias=b, chunk_size=10)

    h, w, b = _leaves(hidden, weight, bias)
    loss = step(h, w, b)
    loss.backward()
    want = _reference(hidden, weight, bias, targets, "mean")
    for a, r in zip((loss.detach(), h.grad, w.grad, b.grad), want):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
    tr_ref = memcore.Tracker(24)
    with torch.no_grad():
        memcore.accumulate(F.linear(hidden, weight, bias), targets, index, tr_ref)
    torch.testing.assert_close(tr.scores()["csl"], tr_ref.scores()["csl"], rtol=1e-6, atol=1e-6)

    tr_none = memcore.Tracker(24)  # made outside: a tracker is state, not something to trace

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=True)
    def step_none(h, w):
        return memcore.linear_accumulate(h, w, targets, index, tr_none, reduction="none", chunk_size=10)

    h, w = _leaves(hidden, weight)
    up = _upstream("none", 24)
    (step_none(h, w) * up).sum().backward()
    want = _reference(hidden, weight, None, targets, "none", up)
    torch.testing.assert_close(h.grad, want[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, want[2], rtol=1e-5, atol=1e-7)


def test_auto_chunk_size():
    from memcore.linear_cross_entropy import auto_chunk_size

    assert auto_chunk_size(4096, 32000, torch.float32, torch.device("cpu")) == 1048
    assert auto_chunk_size(100, 32000, torch.float32, torch.device("cpu")) == 100
    assert auto_chunk_size(8192, 128256, torch.bfloat16, torch.device("cuda")) == 697
    assert auto_chunk_size(10, 10**12, torch.float32, torch.device("cpu")) == 1
    # on the CPU at least H / 2 rows per chunk (the weight's re-reads per chunk), at most N
    assert auto_chunk_size(2048, 128256, torch.float32, torch.device("cpu"), 2048) == 1024
    assert auto_chunk_size(2048, 128256, torch.float32, torch.device("cpu")) == 261
    assert auto_chunk_size(500, 128256, torch.float32, torch.device("cpu"), 2048) == 500
    assert auto_chunk_size(4096, 32000, torch.float32, torch.device("cpu"), 1024) == 1048
    assert auto_chunk_size(8192, 128256, torch.bfloat16, torch.device("cuda"), 4096) == 697
    # ... while the chunk stays within 512 MiB (H = 8,192: 1,046 rows, not 4,096)
    assert auto_chunk_size(8192, 128256, torch.float32, torch.device("cpu"), 8192) == 1046


# ------------------------------------------------------------------------------------ bad input
def _bad_cases():
    hidden, weight, bias, targets, index = _problem(10, 8, 13)
    ok = dict(hidden=hidden, weight=weight, targets=targets, index=index, bias=bias)
    t_bad = targets.clone()
    t_bad[4] = 13
    i_bad = index.clone()
    i_bad[6] = 99
    h_nan = hidden.clone()
    h_nan[3, 2] = float("nan")
    w_inf = weight.clone()
    w_inf[0, 0] = float("inf")
    return ok, [
        (dict(hidden=hidden[0]), ValueError, "hidden must have shape"),
        (dict(hidden=hidden.long()), TypeError, "hidden must be float"),
        (dict(weight=weight[:, :5]), ValueError, r"weight must have shape \[V, H=8\]"),
        (dict(weight=weight.double()), TypeError, "weight must have hidden's dtype"),
        (dict(weight=weight[:1]), ValueError, "weight must have at least 2 rows"),
        (dict(bias=bias[:5]), ValueError, r"bias must have shape \[V=13\]"),
        (dict(bias=bias.double()), TypeError, "bias must have hidden's dtype"),
        (dict(targets=targets[:5]), ValueError, "targets must have shape"),
        (dict(targets=targets.float()), TypeError, "targets must be an integer"),
        (dict(index=index[:3]), ValueError, "index must have shape"),
        (dict(targets=t_bad), IndexError, r"targets\[4\] = 13"),
        (dict(index=i_bad), IndexError, r"index\[6\] = 99"),
        (dict(hidden=h_nan), ValueError, "hidden row 3 holds NaN"),
        (dict(weight=w_inf), ValueError, "weight holds NaN or inf"),
        (dict(chunk_size=0), ValueError, r"chunk_size must be an int in \[1, inf\]"),
        (dict(chunk_size=2.0), TypeError, "chunk_size must be an int"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases()[1])))
def test_bad_input_names_argument_and_leaves_tracker_unchanged(case):
    ok, cases = _bad_cases()
    change, exc, pattern = cases[case]
    args = {**ok, **change}
    tr = memcore.Tracker(10)
    memcore.linear_accumulate(ok["hidden"], ok["weight"], ok["targets"], ok["index"], tr, bias=ok["bias"])
    before = tr.state_dict()
    with pytest.raises(exc, match=pattern):
        memcore.linear_accumulate(
            args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("index"), tr, **args
        )
    after = tr.state_dict()
    assert before.keys() == after.keys() and before["buffers"].keys() == after["buffers"].keys()
    for key, t in before["buffers"].items():  # bit for bit (last_loss starts as NaN)
        torch.testing.assert_close(after["buffers"][key], t, rtol=0, atol=0, equal_nan=True, msg=key)
    for key in before.keys() - {"buffers", "grad_history"}:
        assert after[key] == before[key], key
    assert len(after["grad_history"]) == len(before["grad_history"])


def test_deferred_error_not_strict():
    hidden, weight, bias, targets, index = _problem(10, 8, 13)
    targets[2] = 40
    tr = memcore.Tracker(10, strict=False)
    memcore.linear_accumulate(hidden, weight, targets, index, tr, bias=bias)
    assert recorded(tr).abs().sum() == 0
    with pytest.raises(ValueError, match="target out of range"):
        tr.end_epoch()


def test_tracker_device_mismatch():
    hidden, weight, _, targets, index = _problem(10, 8, 13)
    with pytest.raises(TypeError, match="tracker must be a memcore.Tracker"):
        memcore.linear_accumulate(hidden, weight, targets, index, None)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(reduction, device):
    hidden, weight, bias, targets, index = _problem(13, 6, 11, device=device)
    leaves = _leaves(hidden, weight, bias)
    # mean / sum: the op's gradient outputs are buffers for its own backward, not differentiable
    # results, which opcheck's AOT test (cotangents for every output) cannot express; the AOT path
    # is covered by the torch.compile tests (static and dynamic shapes)
    utils = None if reduction == 0 else ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(
        torch.ops.memcore.linear_ce_forward.default,
        (*leaves, targets, index, 13, -100, reduction, 5, [True, True, True]),
        **kw,
    )
    torch.library.opcheck(
        torch.ops.memcore.linear_ce_forward.default,
        (hidden, weight, None, targets, index, 13, -100, reduction, 5, [False, True, False]),
    )
    if reduction == 0:
        lse = torch.ops.memcore.linear_ce_forward(
            hidden, weight, bias, targets, index, 13, -100, 0, 5, [False, False, False]
        )[3]
        torch.library.opcheck(
            torch.ops.memcore.linear_ce_backward.default,
            (
                torch.randn(13, device=device),
                hidden,
                weight,
                bias,
                targets,
                lse,
                -100,
                5,
                [True, False, True],
            ),
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mixed", [False, True])
def test_autocast_matches_f_linear_and_cross_entropy(dtype, reduction, mixed, device):
    """Under torch.autocast (forward and backward inside it), as F.cross_entropy(F.linear(...)): the
    inputs cast as F.linear's are (`mixed`: 16-bit hidden with a float32 weight and bias, which F.linear
    accepts there), float32 loss, gradients in each input's dtype. Both sides round the logits to
    `dtype` once, from GEMMs whose blocking may differ: one 16-bit ulp of the largest logit bounds the
    loss difference, one ulp of the largest entry each gradient's."""
    hidden, weight, bias, targets, index = _problem(96, 32, 200, device=device, scale=4.0)
    if mixed:
        hidden = hidden.to(dtype)
    up = _upstream(reduction, 96, device=device)
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    res = []
    for fused in (False, True):
        h, w, b = _leaves(hidden, weight, bias)
        with torch.autocast(device, dtype=dtype):
            if fused:
                tr = memcore.Tracker(96, device=device)
                loss = memcore.linear_accumulate(h, w, targets, index, tr, bias=b, reduction=reduction)
            else:
                logits = F.linear(h, w, b)
                loss = F.cross_entropy(logits, targets, reduction=reduction)
            (loss if up is None else loss * up).sum().backward()
        res.append((loss.detach(), h.grad, w.grad, b.grad))
    bound = ulp * float(logits.detach().float().abs().max())
    (l0, *g0), (l1, *g1) = res
    assert l1.dtype == l0.dtype == torch.float32 and l1.shape == l0.shape
    torch.testing.assert_close(l1, l0, rtol=0, atol=bound * (2 if reduction != "sum" else 2 * 96))
    for a, r in zip(g1, g0):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a.float(), r.float(), rtol=ulp, atol=ulp * float(r.float().abs().max()))
    assert tr.scores()["rows"].sum() == int((targets != -100).sum())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float32_head_inside_an_autocast_region(reduction, device):
    """A head kept in float32 (autocast disabled around it) inside an autocast region, the backward
    run inside the region: the op's backward then meets autocast with float32 inputs, and must not let
    it cast the GEMMs inside (the same results as without autocast, bitwise)."""
    hidden, weight, bias, targets, index = _problem(64, 16, 50, device=device)
    up = _upstream(reduction, 64, device=device)
    res = []
    for region in (False, True):
        h, w, b = _leaves(hidden, weight, bias)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=region):
            with torch.autocast(device, enabled=False):
                tr = memcore.Tracker(64, device=device)
                loss = memcore.linear_accumulate(h, w, targets, index, tr, bias=b, reduction=reduction)
            (loss if up is None else loss * up).sum().backward()
        res.append((loss.detach(), h.grad, w.grad, b.grad))
    for a, r in zip(res[1], res[0]):
        assert a.dtype == r.dtype == torch.float32 and torch.equal(a, r)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_is_refused(reduction):
    """A gradient penalty through create_graph=True raises, instead of a gradient that is not a
    function of the inputs (silently wrong second derivatives)."""
    hidden, weight, bias, targets, index = _problem(12, 8, 20)
    h, w, b = _leaves(hidden, weight, bias)
    loss = memcore.linear_accumulate(h, w, targets, index, memcore.Tracker(12), bias=b, reduction=reduction)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss.sum(), (h, w), create_graph=True)
