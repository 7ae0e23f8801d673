"""memcore.accumulate as a loss: parity with F.cross_entropy, gradients, dtypes, reductions."""

import pytest
import torch
import torch.nn.functional as F

import memcore

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
}
# a 16-bit result of float32 math, against the float32 reference: one rounding, at most half an ulp
# (relative 2^-8 for bfloat16, 2^-11 for float16), plus float32 noise on entries near 0 (p - 1 at the
# target cancels). A 2% (or 0.5%) systematic error fails these.
HALF = {torch.bfloat16: dict(rtol=2**-8, atol=1e-7), torch.float16: dict(rtol=2**-11, atol=1e-7)}


def _pair(n, c, dtype, device, scale=3.0):
    logits = (torch.randn(n, c, dtype=torch.float32) * scale).to(device=device, dtype=dtype)
    targets = torch.randint(0, c, (n,), device=device)
    return logits, targets


def _both(logits, targets, reduction="mean", ignore_index=-100, index=None):
    a = logits.detach().clone().requires_grad_()
    b = logits.detach().clone().requires_grad_()
    idx = torch.arange(len(targets), device=logits.device) if index is None else index
    tr = memcore.Tracker(max(len(targets), 1))
    la = memcore.accumulate(a, targets, idx, tr, reduction=reduction, ignore_index=ignore_index)
    lb = F.cross_entropy(b, targets, reduction=reduction, ignore_index=ignore_index)
    g = torch.randn_like(la)
    la.backward(g)
    lb.backward(g)
    return la, lb, a.grad, b.grad


@pytest.mark.parametrize("n,c", [(1, 2), (7, 2), (64, 10), (33, 1000), (5, 4099), (3, 70000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_fp32_fp64(n, c, dtype, device):
    logits, targets = _pair(n, c, dtype, device)
    la, lb, ga, gb = _both(logits, targets)
    assert la.dtype == lb.dtype
    torch.testing.assert_close(la, lb, **TOL[dtype])
    torch.testing.assert_close(ga, gb, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", [10, 1000, 32000])
def test_parity_half(dtype, c, device):
    logits, targets = _pair(16, c, dtype, device, scale=2.0)
    la, _, ga, _ = _both(logits, targets)
    # F.cross_entropy on half inputs rounds intermediates; compare with fp32 math on the same values
    ref = logits.float().detach().requires_grad_()
    lr = F.cross_entropy(ref, targets)
    lr.backward(torch.ones_like(lr) * 1.0)
    assert la.dtype == dtype and ga.dtype == dtype
    torch.testing.assert_close(la.float(), lr, **HALF[dtype])
    # gradient: scale by the same upstream grad used in _both is random; recompute with ones
    a = logits.detach().clone().requires_grad_()
    memcore.accumulate(a, targets, torch.arange(16, device=device), memcore.Tracker(16)).backward()
    torch.testing.assert_close(a.grad.float(), ref.grad, **HALF[dtype])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_ignore_index(reduction, device):
    logits, targets = _pair(50, 7, torch.float32, device)
    targets[::3] = -100
    la, lb, ga, gb = _both(logits, targets, reduction=reduction)
    torch.testing.assert_close(la, lb, **TOL[torch.float32])
    torch.testing.assert_close(ga, gb, **TOL[torch.float32])
    assert (ga[::3] == 0).all()


def test_custom_ignore_index(device):
    logits, targets = _pair(20, 5, torch.float32, device)
    targets[:4] = 3
    la, lb, ga, gb = _both(logits, targets, ignore_index=3)
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(ga, gb)


def test_all_ignored_mean_is_nan_like_torch(device):
    logits, _ = _pair(4, 5, torch.float32, device)
    targets = torch.full((4,), -100, device=device)
    la, lb, ga, _ = _both(logits, targets)
    assert torch.isnan(la) and torch.isnan(lb)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction, device):
    logits = torch.zeros(0, 10, device=device, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long, device=device)
    tr = memcore.Tracker(3)
    out = memcore.accumulate(logits, targets, targets, tr, reduction=reduction)
    ref = F.cross_entropy(logits, targets, reduction=reduction)
    torch.testing.assert_close(out, ref, equal_nan=True)
    out.sum().backward()
    assert logits.grad.shape == (0, 10)
    assert tr.scores()["rows"].sum() == 0


def test_sequence_shapes(device):
    """[B, T, C] logits with per-token targets and a per-sequence index of shape [B]."""
    b, t, c = 3, 5, 11
    logits = torch.randn(b, t, c, device=device, requires_grad=True)
    targets = torch.randint(0, c, (b, t), device=device)
    targets[0, 3:] = -100
    tr = memcore.Tracker(10)
    seq = torch.tensor([7, 2, 7], device=device)
    loss = memcore.accumulate(logits, targets, seq, tr, reduction="none")
    ref = F.cross_entropy(logits.reshape(-1, c), targets.reshape(-1), reduction="none").reshape(b, t)
    torch.testing.assert_close(loss, ref)
    s = tr.scores()
    assert s["rows"][7] == 3 + 5 and s["rows"][2] == 5
    torch.testing.assert_close(
        s["csl"][7], (ref[0].sum() + ref[2].sum()).double().cpu(), rtol=1e-6, atol=1e-6
    )


def test_gradcheck_fp64():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 4, -100, 2, 2, 1])
    idx = torch.arange(6)

    def f(z):
        return memcore.accumulate(z, targets, idx, memcore.Tracker(6), reduction="none")

    assert torch.autograd.gradcheck(f, (logits,))


def test_noncontiguous_logits(device):
    base = torch.randn(10, 24, device=device)
    logits = base[:, ::2]  # stride 2
    targets = torch.randint(0, 12, (10,), device=device)
    la, lb, ga, gb = _both(logits, targets)
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c,offset", [(9, 0), (1001, 3), (4099, 1), (50257, 0), (50257, 5)])
def test_unaligned_rows(c, offset, dtype, device):
    """Rows that do not start on a 16-byte boundary: odd C (GPT-2's 50257) and logits that are a
    view at an odd storage offset. The CUDA kernels read such rows as a scalar head, 16-byte packs
    and a scalar tail; every column must be counted once."""
    n = 6
    base = (2.0 * torch.randn(n * c + offset)).to(device=device, dtype=dtype)
    logits = base[offset:].view(n, c)
    assert logits.storage_offset() == offset
    targets = torch.randint(0, c, (n,), device=device)
    targets[1] = 0  # the target in the head
    targets[2] = c - 1  # the target in the tail
    ref = logits.detach().float().requires_grad_()
    lr = F.cross_entropy(ref, targets, reduction="sum")
    lr.backward()
    a = logits.detach().requires_grad_()
    tr = memcore.Tracker(n)
    la = memcore.accumulate(a, targets, torch.arange(n, device=device), tr, reduction="sum")
    la.backward()
    tol = TOL[torch.float32] if dtype == torch.float32 else HALF[dtype]
    torch.testing.assert_close(la.float(), lr, **tol)
    torch.testing.assert_close(a.grad.float(), ref.grad, **tol)
    tol = dict(rtol=1e-5, atol=1e-5)  # the statistics: float32 math on the same 16-bit values
    z = logits.detach().float().cpu()
    t = targets.cpu()
    other = z.scatter(1, t[:, None], float("-inf")).amax(1)
    s = tr.scores()
    torch.testing.assert_close(s["aum"], (z.gather(1, t[:, None]).squeeze(1) - other).double(), **tol)
    torch.testing.assert_close(
        s["confidence_mean"], z.softmax(1).gather(1, t[:, None]).squeeze(1).double(), **tol
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_logits_give_nan_gradient_rows_when_not_strict(dtype, device):
    """strict=False lets a NaN batch through to backward: its gradient is NaN on the NaN rows and
    equal to F.cross_entropy's elsewhere, on every device (the error is raised at scores())."""
    logits, targets = _pair(6, 40, dtype, device)
    logits[2, 7] = float("nan")
    a = logits.detach().clone().requires_grad_()
    b = logits.detach().float().requires_grad_()  # float32 math on the same values
    tr = memcore.Tracker(6, device=device, strict=False)
    memcore.accumulate(a, targets, torch.arange(6, device=device), tr, reduction="sum").backward()
    F.cross_entropy(b, targets, reduction="sum").backward()
    assert torch.isnan(a.grad[2]).all()
    tol = {} if dtype == torch.float32 else HALF[dtype]
    torch.testing.assert_close(a.grad.float(), b.grad, equal_nan=True, **tol)
    with pytest.raises(ValueError, match="rejected"):
        tr.scores()


def test_masked_vocab_minus_inf(device):
    """-inf logits (masked classes) are legal as long as the target's logit is finite."""
    logits, targets = _pair(8, 20, torch.float32, device)
    logits[:, 10:] = float("-inf")
    targets = targets % 10
    la, lb, ga, gb = _both(logits, targets)
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(ga, gb)


def test_only_logits_get_gradients(device):
    logits, targets = _pair(6, 4, torch.float32, device)
    logits.requires_grad_()
    loss = memcore.accumulate(logits, targets, torch.arange(6, device=device), memcore.Tracker(6))
    (g,) = torch.autograd.grad(loss, logits)
    assert g.shape == logits.shape


@pytest.mark.parametrize("c", [2, 3, 15, 16, 17, 31, 33, 100, 1024, 1025])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_paths_statistics(c, dtype, device):
    """Every CPU row path (narrow C < 16, lane blocks with an overlapping tail, streamed C > 1024)
    and partial blocks (130 rows = 2 x 64 + 2; partial 16-row groups) give the reference per-row
    statistics. Integer logits make ties, so the argmax tie rule is exercised too."""
    from reference import row_stats

    n = 130
    g = torch.Generator().manual_seed(c)
    logits = torch.randint(-3, 4, (n, c), generator=g).float().to(device=device, dtype=dtype)
    targets = torch.randint(0, c, (n,), generator=g)
    targets[::7] = -100
    targets[1], targets[2] = 0, c - 1
    targets = targets.to(device)
    tracker = memcore.Tracker(n, device=device)
    z = logits.clone().requires_grad_()
    loss = memcore.accumulate(z, targets, torch.arange(n, device=device), tracker, reduction="sum")
    loss.backward()
    keep, ref_loss, p, margin, correct = row_stats(logits.cpu(), targets.cpu())
    s = tracker.scores()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s["csl"][keep], ref_loss, **tol)
    torch.testing.assert_close(s["confidence_mean"][keep], p, **tol)
    torch.testing.assert_close(s["aum"][keep], margin, **tol)
    assert torch.equal(s["correctness"][keep], correct)
    assert torch.equal(s["rows"], keep.double())
    ref = logits.float().cpu().requires_grad_()
    F.cross_entropy(ref, targets.cpu(), reduction="sum").backward()
    gtol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else HALF[dtype]
    torch.testing.assert_close(z.grad.float().cpu(), ref.grad, **gtol)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_row_paths_narrower_isa(isa, tmp_path):
    """The AVX2 and baseline copies of the CPU block kernels (a wider machine picks AVX-512 at
    load; MEMCORE_CPU_ISA caps it) pass the row-path and accuracy tests too."""
    import os
    import subprocess
    import sys

    order = ["baseline", "avx2", "avx512"]
    here_isa = memcore.cpu_isa()
    if order.index(isa) >= order.index(here_isa):
        pytest.skip(
            f"this process runs the {here_isa} copy; the {isa} copy needs a wider CPU to be a separate test"
        )
    # the children import this very build (an in-place or an out-of-tree one), from a neutral cwd
    build = os.path.dirname(os.path.dirname(os.path.abspath(memcore.__file__)))
    path = os.pathsep.join([build] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, MEMCORE_CPU_ISA=isa, PYTHONPATH=path)
    here = os.path.dirname(os.path.abspath(__file__))
    probe = subprocess.run(
        [sys.executable, "-c", "import memcore; print(memcore.cpu_isa())"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == isa, probe.stdout + probe.stderr[-2000:]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",  # this build first, not pyproject's pythonpath (the source tree, maybe another build)
            f"pythonpath={build}",
            os.path.join(here, "test_cross_entropy.py"),
            os.path.join(here, "test_cross_entropy_accuracy.py"),
            os.path.join(here, "test_cross_entropy_options_kernels.py"),
            "-k",
            "row_paths_statistics and cpu or test_cpu_as_exact or options_kernels_against_reference",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


# Few rows of many classes: on CUDA each row goes over several blocks (the split launch:
# ce_split_forward_kernel + ce_split_finish_kernel, ce_split_grad_kernel), chosen by the device's SM
# count. These shapes split on any GPU of more than 16 SMs; on the CPU they check the same contract.
SPLIT_CASES = [
    (4, 131072, torch.float32),
    (16, 50257, torch.bfloat16),
    (16, 256000, torch.bfloat16),
    (3, 70001, torch.float16),
    (8, 131072, torch.float64),
]
OPS = torch.ops.memcore


def _split_logits(n, c, dtype, device, offset, seed):
    g = torch.Generator().manual_seed(seed)
    base = (2.0 * torch.randn(n * c + offset, generator=g)).to(device=device, dtype=dtype)
    logits = base[offset:].view(n, c)
    targets = torch.randint(0, c, (n,), generator=g).to(device)
    targets[0], targets[1], targets[2] = 0, c - 1, c // 2  # head, tail, a middle slice
    targets[-1] = -100  # an ignored row: zero loss and gradient, never read
    return logits, targets


def _takes_split(n, c, dtype, device):
    if device != "cuda":
        return True
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return memcore._C._ce_split_slices(n, c, torch.finfo(dtype).bits // 8, sms) > 1


@pytest.mark.parametrize(
    "n,c,dtype", SPLIT_CASES, ids=lambda x: str(x)[6:] if isinstance(x, torch.dtype) else x
)
@pytest.mark.parametrize("offset", [0, 3])
def test_split_rows(n, c, dtype, offset, device):
    """ce_forward, ce_backward and ce_forward_grad_ (overwrite) on few wide rows against
    F.cross_entropy in float32 (float64 for float64 logits) on the same values."""
    assert _takes_split(n, c, dtype, device), "the shape must take the split launch"
    logits, targets = _split_logits(n, c, dtype, device, offset, seed=n + c)
    idx = torch.arange(n, device=device)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    ref = logits.detach().to(wide).requires_grad_()
    lr = F.cross_entropy(ref, targets, reduction="none")
    keep = targets != -100
    loss, lse, rs, status = OPS.ce_forward(logits, targets, idx, n, -100)
    assert int(status) == 0
    tol = TOL[torch.float64] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, lr.detach(), **tol)
    torch.testing.assert_close(lse[keep], ref.detach()[keep].logsumexp(1), **tol)
    z = ref.detach()[keep]
    t = targets[keep]
    zt = z.gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(rs[keep, 0], (-lr.detach()[keep]).exp(), **tol)
    torch.testing.assert_close(
        rs[keep, 1], zt - z.scatter(1, t[:, None], float("-inf")).amax(1), rtol=0, atol=0
    )
    torch.testing.assert_close(rs[keep, 2], (z.argmax(1) == t).to(rs.dtype), rtol=0, atol=0)
    assert (loss[~keep] == 0).all() and (rs[~keep] == 0).all()
    # ce_backward with a per-row upstream gradient
    g = torch.randn(n, dtype=wide, generator=torch.Generator().manual_seed(1)).to(device)
    (lr * g).sum().backward()
    grad = OPS.ce_backward(g.to(loss.dtype), logits, targets, lse, -100)
    gtol = tol if dtype in (torch.float32, torch.float64) else HALF[dtype]
    torch.testing.assert_close(grad.to(wide), ref.grad, **gtol)
    # ce_forward_grad_: the mean's gradient written over (a copy of) the logits
    over = logits.clone() if offset == 0 else torch.cat([logits.new_zeros(offset), logits.flatten()])[offset:]
    over = over.view(n, c)
    out, count, loss2, _, _, status2 = OPS.ce_forward_grad_(over, targets, idx, n, -100, 1)
    assert int(status2) == 0 and int(count) == int(keep.sum())
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    ref.grad = None
    F.cross_entropy(ref, targets).backward()
    torch.testing.assert_close(over.to(wide), ref.grad, **gtol)
    torch.testing.assert_close(out.to(wide), lr.detach().sum() / keep.sum(), **tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_rows_status(dtype):
    """Bad targets, a bad index and NaN / all -inf rows on a split shape: the status bits and
    outputs of the CPU kernels."""
    n, c, device = 8, 65536, "cuda"
    assert _takes_split(n, c, dtype, device)
    logits, targets = _split_logits(n, c, dtype, "cpu", 0, seed=7)
    logits[3, 100] = float("nan")
    logits[4] = float("-inf")
    logits[5, torch.arange(0, c, 3)] = float("-inf")  # a masked vocabulary, finite row
    cases = [
        (targets, torch.arange(n)),
        (torch.where(torch.arange(n) == 2, c, targets), torch.arange(n)),  # a target past C
        (torch.where(torch.arange(n) == 2, -5, targets), torch.arange(n)),  # a negative target
        (targets, torch.where(torch.arange(n) == 1, n, torch.arange(n))),  # an index past num_samples
    ]
    for t, ix in cases:
        want = OPS.ce_forward(logits, t, ix, n, -100)
        got = OPS.ce_forward(logits.to(device), t.to(device), ix.to(device), n, -100)
        assert int(got[3]) == int(want[3]) != 0
        for a, b in zip(got[:3], want[:3]):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "n,c,dtype",
    [
        (300, 1000, torch.float32),
        (1500, 20000, torch.bfloat16),
        (8, 131072, torch.float32),
        (16, 50257, torch.bfloat16),
    ],
    ids=lambda x: str(x)[6:] if isinstance(x, torch.dtype) else x,
)
def test_kernels_repeat_bit_for_bit_cuda(n, c, dtype):
    """ce_forward, ce_backward and ce_forward_grad_ give the same bits on a second call, on the
    block-per-row launch and the split launch (which also runs ce_split_target_kernel for fp32): no
    atomics on values, every merge and sum in a fixed order (docs/guarantees.md, per GPU model)."""
    logits, targets = _split_logits(n, c, dtype, "cuda", 0, seed=n)
    idx = torch.arange(n, device="cuda")
    g = torch.randn(n, generator=torch.Generator().manual_seed(2)).cuda()
    runs = []
    for _ in range(2):
        loss, lse, rs, status = OPS.ce_forward(logits, targets, idx, n, -100)
        grad = OPS.ce_backward(g, logits, targets, lse, -100)
        over = logits.clone()
        out, count, *_ = OPS.ce_forward_grad_(over, targets, idx, n, -100, 1)
        runs.append([loss, lse, rs, status, grad, over, out, count])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# (n, c, dtype, split): one block per row (warp rows, past 1024 rows, 512-thread rows, float64) and
# the split launch (few wide rows), each path's out and count written on the device
REDUCE_CASES = [
    (300, 1000, torch.bfloat16, False),
    (3000, 1000, torch.float32, False),
    (1500, 20000, torch.bfloat16, False),
    (64, 2000, torch.float64, False),
    (16, 50257, torch.bfloat16, True),
    (8, 131072, torch.float32, True),
]


def _bits(x):
    x = x.detach().cpu().reshape(1)
    return x.view(torch.int64 if x.element_size() == 8 else torch.int32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "n,c,dtype,split", REDUCE_CASES, ids=lambda x: str(x)[6:] if isinstance(x, torch.dtype) else x
)
def test_reduce_out_count_cuda(n, c, dtype, split):
    """out and count of ce_forward_reduce and ce_forward_grad_ as the kernels write them
    (ce_reduce_kernel after the forward, or the split finish kernel's last row): against the CPU op
    on the same values, with ignored rows and with every row ignored (count 0, mean NaN, sum 0);
    bit for bit the host replay of the kernels' order over the device's own losses, and the same
    bits on a second call and under torch.use_deterministic_algorithms."""
    assert _takes_split(n, c, dtype, "cuda") == split
    threads = 32 if split else 1024  # the split fold's warp, or ce_reduce_kernel's block
    logits, targets = _split_logits(n, c, dtype, "cpu", 0, seed=n + 1)
    idx = torch.arange(n)
    wide = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for case in ["some ignored", "all ignored"]:
        t = targets.clone()
        if case == "all ignored":
            t[:] = -100
        else:
            t[::5] = -100
        args = (logits.cuda(), t.cuda(), idx.cuda(), n, -100)
        for reduction in (1, 2):
            mean = reduction == 1
            want_out, want_count, *_ = OPS.ce_forward_reduce(logits, t, idx, n, -100, reduction)
            out, count, loss, _, _, status = OPS.ce_forward_reduce(*args, reduction)
            assert out.dim() == 0 and out.dtype == want_out.dtype and out.device.type == "cuda"
            assert count.dim() == 0 and count.dtype == torch.int64 and int(status) == 0
            assert int(count) == int(want_count) == int((t != -100).sum())
            torch.testing.assert_close(out.cpu(), want_out, **wide, equal_nan=True)
            if case == "all ignored":
                assert out.isnan() if mean else out == 0
            replay, rcount = memcore._C._ce_reduce_replay(loss.cpu(), t, -100, mean, threads)
            assert torch.equal(_bits(out), _bits(replay)) and int(rcount) == int(count)
            again = OPS.ce_forward_reduce(*args, reduction)
            assert torch.equal(_bits(again[0]), _bits(out)) and int(again[1]) == int(count)
            torch.use_deterministic_algorithms(True)
            try:
                det = OPS.ce_forward_reduce(*args, reduction)
            finally:
                torch.use_deterministic_algorithms(False)
            assert torch.equal(_bits(det[0]), _bits(out))
            # ce_forward_grad_: count from its own kernel before the forward, out after it
            gout, gcount, gloss, *_ = OPS.ce_forward_grad_(logits.cuda(), *args[1:], reduction)
            assert int(gcount) == int(count)
            greplay, _ = memcore._C._ce_reduce_replay(gloss.cpu(), t, -100, mean, threads)
            assert torch.equal(_bits(gout), _bits(greplay))
            torch.testing.assert_close(gout.cpu(), want_out, **wide, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reduce_no_rows_cuda():
    """No rows: nothing launches but the fills; the CPU op's values (mean NaN, sum 0, count 0)."""
    logits, targets, idx = (
        torch.zeros(0, 10),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
    )
    for reduction in (1, 2):
        want = OPS.ce_forward_reduce(logits, targets, idx, 1, -100, reduction)
        for op in (OPS.ce_forward_reduce, OPS.ce_forward_grad_):
            got = op(logits.cuda(), targets.cuda(), idx.cuda(), 1, -100, reduction)
            torch.testing.assert_close(got[0].cpu(), want[0], equal_nan=True)
            assert got[0].dim() == 0 and int(got[1]) == 0 == int(want[1])
