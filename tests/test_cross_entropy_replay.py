"""The CUDA cross-entropy kernels' logic, run on the host against the CPU kernels (no GPU needed).

csrc/cuda/cross_entropy_row.h holds the per-row code of the CUDA kernels as __host__ __device__
functions; csrc/cross_entropy_replay.cpp replays with them, lane by lane, how ce_forward_kernel splits
a row between its threads (scalar head, 16-byte packs four at a time, the target's pack, scalar tail;
the warp butterfly and the cross-warp merge), the gradient pass, the split launch of few wide rows
and ce_forward_reduce's fixed-order reduction. Every thread count (32, 256, 512) and alignment the
launcher can meet is replayed; the references are the CPU ops. Only exp differs on purpose: the host
replay models the device's ex2.approx.ftz anywhere within its 2 ulp (csrc/cross_entropy_replay.cpp's
host_ex2), the CPU kernels use a polynomial. Accuracy against float64: test_cross_entropy_accuracy.py.
"""

import math

import pytest
import torch

import memcore  # noqa: F401  (loads the ops)
from memcore import _C

ops = torch.ops.memcore
TPRS = (32, 256, 512)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SIZES = (
    1,
    2,
    3,
    5,
    7,
    8,
    9,
    15,
    16,
    17,
    31,
    33,
    63,
    100,
    255,
    257,
    1000,
    2047,
    2048,
    2049,
    4099,
    16384,
    16385,
    50257,
    131072,
)


def _vec(dtype):
    return 128 // torch.finfo(dtype).bits


def _row_at(values, offset):
    """values (1-D) copied into a fresh buffer starting `offset` elements past a 16-byte boundary."""
    buf = torch.empty(values.numel() + 16, dtype=values.dtype)
    base = ((-buf.data_ptr()) % 16) // values.element_size()
    row = buf[base + offset : base + offset + values.numel()]
    row.copy_(values)
    assert (row.data_ptr() % 16) // values.element_size() == offset % _vec(values.dtype)
    return row


def _targets(c, offset, vec):
    """Target columns in the head, the first pack, a middle pack, the last pack and the tail."""
    head = min((vec - offset) % vec, c)
    tail0 = head + (c - head) // vec * vec
    return sorted({0, min(head, c - 1), c // 2, max(tail0 - 1, 0), min(tail0, c - 1), c - 1})


def _cpu_forward(row, t):
    loss, lse, rs, status = ops.ce_forward(row.view(1, -1), torch.tensor([t]), torch.tensor([0]), 1, -100)
    return torch.stack([lse[0], loss[0], rs[0, 0], rs[0, 1], rs[0, 2]]).double()


def _check_forward(values, dtype, offsets=None, targets=None):
    vec = _vec(dtype)
    c = values.numel()
    for off in range(vec) if offsets is None else offsets:
        row = _row_at(values.to(dtype), off)
        for t in _targets(c, off, vec) if targets is None else targets:
            want = _cpu_forward(row, t)
            for tpr in TPRS:
                for use_vec in (False, True):
                    got = _C._ce_row_replay(row, t, tpr, use_vec)
                    msg = f"C={c} offset={off} target={t} threads={tpr} packs={use_vec}"
                    if math.isnan(want[1]):  # NaN logits or an all -inf row: lse and loss NaN
                        assert got[:2].isnan().all(), msg
                        continue
                    tol = (
                        dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
                    )
                    torch.testing.assert_close(got[:3], want[:3], **tol, msg=msg)
                    # maxima and the argmax test are exact
                    torch.testing.assert_close(got[3:], want[3:], rtol=0, atol=0, msg=msg)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_every_split(dtype):
    """Random rows of every size, every alignment (small rows) and thread count, target in head,
    pack and tail."""
    for c in SIZES:
        values = torch.randn(c, dtype=torch.float64) * 4
        big = c > 4099
        _check_forward(values, dtype, offsets=(0, 1, _vec(dtype) - 1) if big else None)


def _special_rows(c, g):
    """Six float64 rows of c logits: many ties (rounded normals), half masked to -inf, a NaN, all
    -inf, all equal (correct only for target 0), and finite but -inf at column c - 1 (with target
    c - 1: loss +inf)."""
    base = torch.randn(c, generator=g, dtype=torch.float64).round()
    masked = base.clone()
    masked[torch.rand(c, generator=g) < 0.5] = -math.inf
    masked[c // 2] = 1.0
    nan = base.clone()
    nan[c // 3] = math.nan
    all_inf = torch.full((c,), -math.inf, dtype=torch.float64)
    tie = torch.zeros(c, dtype=torch.float64)
    neg_target = base.clone()
    neg_target[c - 1] = -math.inf
    return [base, masked, nan, all_inf, tie, neg_target]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_ties_masks_nan(dtype):
    g = torch.Generator().manual_seed(1)
    for c in (9, 40, 2049, 16385):
        rows = _special_rows(c, g)
        for k, values in enumerate(rows):
            targets = [c - 1] if k == len(rows) - 1 else None  # the -inf target row
            _check_forward(values, dtype, offsets=(0, 1), targets=targets)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("inplace", [False, True])
def test_gradient_every_split(dtype, inplace):
    """The gradient pass (ce_backward, and ce_forward_grad_'s second pass when in place) against
    the CPU ce_backward."""
    for c in (1, 3, 8, 17, 255, 2049, 16385, 50257):
        values = (torch.randn(c, dtype=torch.float64) * 3).to(dtype)
        vec = _vec(dtype)
        for off in (0, 1, vec - 1) if c > 255 else range(vec):
            row = _row_at(values, off)
            for t in _targets(c, off, vec):
                _, lse, _, _ = ops.ce_forward(row.view(1, -1), torch.tensor([t]), torch.tensor([0]), 1, -100)
                g = torch.tensor([-0.75], dtype=lse.dtype)
                want = ops.ce_backward(g, row.view(1, -1), torch.tensor([t]), lse, -100)[0]
                for tpr in TPRS:
                    for use_vec in (False, True):
                        out = _row_at(values, off) if inplace else _row_at(torch.zeros_like(values), off)
                        _C._ce_grad_replay(
                            out if inplace else row, out, t, float(lse[0]), float(g[0]), tpr, use_vec
                        )
                        tol = {
                            torch.float64: dict(rtol=1e-10, atol=1e-12),
                            torch.float32: dict(rtol=1e-5, atol=1e-7),
                            torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
                            torch.float16: dict(rtol=1e-3, atol=1e-6),
                        }
                        torch.testing.assert_close(
                            out,
                            want,
                            **tol[dtype],
                            msg=f"C={c} offset={off} target={t} threads={tpr} packs={use_vec}",
                        )


def test_replay_rejects_bad_arguments():
    row = torch.randn(10)
    with pytest.raises(RuntimeError, match="threads per row"):
        _C._ce_row_replay(row, 0, 64, True)
    with pytest.raises(RuntimeError, match="target"):
        _C._ce_row_replay(row, 10, 32, True)


# ---- the split launch: few rows of many classes, each row over S blocks (kernel threads 256)

SPLIT_SHAPES = (  # (N, C, S): odd C, C not a multiple of the slice, more slices than packs
    (3, 17, 5),
    (4, 1000, 3),
    (2, 4099, 7),
    (3, 16385, 4),
    (3, 50257, 6),
    (2, 131072, 32),
    (5, 20001, 32),
)


def _logits_at(values, offset):
    """values [N, C] in a fresh buffer starting `offset` elements past a 16-byte boundary (rows
    then start at other offsets where C is odd)."""
    return _row_at(values.reshape(-1), offset).view(values.shape)


def _split_columns(logits, s):
    """Per row, target columns in the head, the first, a middle and the last slice, at slice
    boundaries, and in the tail (by the row's own alignment)."""
    n, c = logits.shape
    vec = _vec(logits.dtype)
    out = []
    for r in range(n):
        mis = (logits[r].data_ptr() % 16) // logits.element_size()
        head = min((vec - mis) % vec, c)
        nv = (c - head) // vec
        tail0 = head + nv * vec
        starts = [head + nv * k // s * vec for k in range(s + 1)]
        cols = {
            0,
            head,
            starts[1] - 1,
            starts[1],
            starts[s // 2],
            starts[s // 2] + vec // 2,
            starts[-2],
            tail0 - 1,
        }
        cols |= {tail0, c - 1}
        out.append(sorted({min(max(x, 0), c - 1) for x in cols}))
    return out


def _split_target_sets(logits, s):
    """Target vectors covering every row's columns of _split_columns, rotated over the rows."""
    cols = _split_columns(logits, s)
    k = max(len(x) for x in cols)
    return [torch.tensor([x[(j + r) % len(x)] for r, x in enumerate(cols)]) for j in range(k)]


def _check_split_forward(logits, targets, s, tprs, index=None, num_samples=None, ignore_index=-100):
    n = logits.shape[0]
    index = torch.arange(n) if index is None else index
    num_samples = n if num_samples is None else num_samples
    want = ops.ce_forward(logits, targets, index, num_samples, ignore_index)
    for tpr in tprs:
        got = _C._ce_split_forward_replay(
            logits, targets, index, num_samples, ignore_index, s, tpr, False, False
        )
        msg = f"{tuple(logits.shape)} {logits.dtype} S={s} threads={tpr} targets={targets.tolist()}"
        _compare_forward(got, want, logits.dtype, msg)


def _compare_forward(got, want, dtype, msg):
    (gl, glse, grs, gst), (wl, wlse, wrs, wst) = got, want
    assert int(gst) == int(wst), msg
    nan = wl.isnan()  # NaN logits or an all -inf row: lse and loss NaN
    assert gl[nan].isnan().all() and glse[nan].isnan().all(), msg
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    ok = ~nan
    for a, b in ((gl, wl), (glse, wlse), (grs[:, 0], wrs[:, 0])):
        torch.testing.assert_close(a[ok], b[ok], **tol, msg=msg)
    # maxima and the argmax test are exact, also on rows of NaN loss (NaN skipped by the maxima)
    torch.testing.assert_close(grs[:, 1:], wrs[:, 1:], rtol=0, atol=0, equal_nan=True, msg=msg)


def test_split_decision():
    """The launcher's slices per row: split only while rows < SMs, about 2 blocks per SM, slices
    of at least 16 KiB, at most 32."""
    assert _C._ce_split_slices(16, 256000, 2, 132) == 17
    assert _C._ce_split_slices(4, 131072, 4, 132) == 32
    assert _C._ce_split_slices(64, 131072, 2, 132) == 5
    assert _C._ce_split_slices(16, 50257, 2, 132) == 6
    assert _C._ce_split_slices(132, 256000, 2, 132) == 1  # every SM has a row already
    assert _C._ce_split_slices(16, 16383, 2, 132) == 1  # under two minimal slices
    assert _C._ce_split_slices(0, 256000, 2, 132) == 1
    for n in (1, 2, 3, 7, 16, 33, 64, 100, 131, 132, 500):
        for c in (1, 2048, 8191, 8192, 16384, 32768, 50257, 131072, 262144):
            for esize in (2, 4, 8):
                for sms in (16, 108, 132, 148):
                    s = _C._ce_split_slices(n, c, esize, sms)
                    assert 1 <= s <= 32
                    if s == 1:
                        continue
                    assert n < sms
                    assert c * esize // s >= 16384  # every slice at least 16 KiB
                    # about two blocks per SM, unless the slices' size or number bounds S
                    assert n * s <= 2 * sms + n
                    if s < min(32, c * esize // 16384):
                        assert n * s >= 2 * sms


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_split_forward(dtype):
    """The split forward (slices walked and merged per block, parts merged by the finish warp)
    against the CPU ce_forward, for row starts at every alignment class and targets in the head,
    every kind of slice and the tail."""
    g = torch.Generator().manual_seed(3)
    for n, c, s in SPLIT_SHAPES:
        values = torch.randn(n, c, generator=g, dtype=torch.float64) * 4
        for off in (0, 1, _vec(dtype) - 1):
            logits = _logits_at(values.to(dtype), off)
            tprs = TPRS if c <= 4099 else (256,)
            for targets in _split_target_sets(logits, s):
                _check_split_forward(logits, targets, s, tprs)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_split_forward_ties_masks_nan(dtype):
    """-inf masks, NaN, all -inf rows, ties, a -inf target; ignored rows, bad targets and a bad
    index give ce_forward's zeros and status bits."""
    g = torch.Generator().manual_seed(4)
    for n, c, s in ((6, 4099, 3), (6, 50257, 8)):
        values = torch.stack(_special_rows(c, g))
        for off in (0, 1):
            logits = _logits_at(values.to(dtype), off)
            for targets in _split_target_sets(logits, s):
                _check_split_forward(logits, targets, s, (256,))
                t = targets.clone()
                t[5] = c - 1
                _check_split_forward(logits, t, s, (256,))
            # ignored rows, targets outside [0, C), an index outside [0, num_samples)
            t = torch.tensor([-100, c, -1, 0, c - 1, 5])
            _check_split_forward(logits, t, s, (256,))
            _check_split_forward(logits, torch.full((n,), -100), s, (256,))
            _check_split_forward(
                logits,
                torch.tensor([1, 2, 3, 4, 5, 6]),
                s,
                (256,),
                index=torch.tensor([0, 1, 2, 3, 4, 9]),
                num_samples=6,
            )
            _check_split_forward(
                logits,
                torch.tensor([1, -100, 3, 4, 5, 6]),
                s,
                (256,),
                index=torch.tensor([0, 9, 2, 3, 4, 5]),
                num_samples=6,
            )


GRAD_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-6),
}


def _grad_close(got, want, dtype, msg):
    """assert_close with GRAD_TOL, its element-wise test first (assert_close alone is slow on rows of
    10^5 elements; it runs to report a failure)."""
    tol = GRAD_TOL[dtype]
    a, b = got.double(), want.double()
    same = (a - b).abs() <= tol["atol"] + tol["rtol"] * b.abs()
    if not bool(same.all()) or got.dtype != want.dtype:
        torch.testing.assert_close(got, want, **tol, msg=msg)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_split_backward(dtype):
    """The split gradient kernel as ce_backward runs it (out at the logits' offset, lse given)
    against the CPU ce_backward; an ignored row and a bad target get zeros."""
    g = torch.Generator().manual_seed(5)
    for n, c, s in SPLIT_SHAPES:
        values = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
        values[0, torch.rand(c, generator=g) < 0.3] = -math.inf  # a masked vocabulary
        for off in (0, 1, _vec(dtype) - 1):
            logits = _logits_at(values.to(dtype), off)
            tprs = TPRS if c <= 4099 else (256,)
            sets = _split_target_sets(logits, s)
            bad = torch.tensor([c] + [0] * (n - 1))
            ign = torch.tensor([0] * (n - 1) + [-100])
            for targets in sets + [sets[0].where(bad == 0, bad), sets[0].where(ign == 0, ign)]:
                _, lse, _, _ = ops.ce_forward(logits, targets.clamp(0, c - 1), torch.arange(n), n, -100)
                gl = torch.randn(n, generator=g, dtype=lse.dtype)
                want = ops.ce_backward(gl, logits, targets, lse, -100)
                for tpr in tprs:
                    out = _C._ce_split_backward_replay(gl, logits, targets, lse, -100, s, tpr)
                    assert (out.data_ptr() - logits.data_ptr()) % 16 == 0
                    msg = f"{(n, c)} S={s} offset={off} threads={tpr} targets={targets.tolist()}"
                    _grad_close(out, want, dtype, msg)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduction", [1, 2], ids=["mean", "sum"])
def test_split_forward_grad_overwrite(dtype, reduction):
    """ce_forward_grad_'s split launch: forward, finish (saving the target logits), then the
    gradient written over the logits, against the CPU ce_forward_grad_ on a copy."""
    g = torch.Generator().manual_seed(6)
    for n, c, s in SPLIT_SHAPES:
        values = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype)
        for off in (0, 1, _vec(dtype) - 1):
            tprs = TPRS if c <= 4099 else (256,)
            sets = _split_target_sets(_logits_at(values, off), s)
            ign = torch.tensor([-100] + [0] * (n - 1))
            for targets in sets[:: max(1, len(sets) // 4)] + [sets[0].where(ign == 0, ign)]:
                ref = _logits_at(values, off)
                want = ops.ce_forward_grad_(ref, targets, torch.arange(n), n, -100, reduction)
                for tpr in tprs:
                    logits = _logits_at(values, off)
                    got = _C._ce_split_forward_replay(
                        logits, targets, torch.arange(n), n, -100, s, tpr, True, reduction == 1
                    )
                    msg = f"{(n, c)} S={s} offset={off} threads={tpr} targets={targets.tolist()}"
                    _compare_forward(got, want[2:], dtype, msg)
                    _grad_close(logits, ref, dtype, msg)


def test_split_replay_rejects_bad_arguments():
    logits, t, ix = torch.randn(2, 100), torch.tensor([0, 1]), torch.arange(2)
    with pytest.raises(RuntimeError, match="slices"):
        _C._ce_split_forward_replay(logits, t, ix, 2, -100, 33, 256, False, False)
    with pytest.raises(RuntimeError, match="slices"):
        _C._ce_split_forward_replay(logits, t, ix, 2, -100, 0, 256, False, False)
    with pytest.raises(RuntimeError, match="threads per row"):
        _C._ce_split_forward_replay(logits, t, ix, 2, -100, 2, 64, False, False)
    with pytest.raises(RuntimeError, match="targets"):
        _C._ce_split_forward_replay(logits, t[:1], ix, 2, -100, 2, 256, False, False)
    with pytest.raises(RuntimeError, match="2-D"):
        _C._ce_split_backward_replay(torch.ones(2), logits[:, ::2], t, torch.ones(2), -100, 2, 256)
    with pytest.raises(RuntimeError, match="grad_loss"):
        _C._ce_split_backward_replay(
            torch.ones(2, dtype=torch.float64), logits, t, torch.ones(2), -100, 2, 256
        )


def _ordered_reduce(loss, targets, ignore_index, mean, threads):
    """The kernels' order written out in Python floats (IEEE double adds, as the kernels'): thread
    tid sums rows tid, tid + threads, ... in row order, then the tree s[i] += s[i + stride]."""
    lv, tv = loss.double().tolist(), targets.tolist()
    s, c = [0.0] * threads, [0] * threads
    for tid in range(threads):
        for i in range(tid, len(lv), threads):
            s[tid] += lv[i]
            c[tid] += tv[i] != ignore_index
    stride = threads // 2
    while stride:
        for i in range(stride):
            s[i] += s[i + stride]
            c[i] += c[i + stride]
        stride //= 2
    if not mean:
        return s[0], c[0]
    return (s[0] / c[0] if c[0] else math.nan), c[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("threads", [32, 1024])
def test_reduce_order(dtype, threads):
    """ce_forward_reduce's out and count as the kernels compute them (ce_reduce_kernel: 1024
    threads; the split finish kernel's fold: 32), against the CPU op and the order written out:
    every row once (n below, at and past the threads), ignored rows and bad targets counted as the
    CPU op counts them, the mean of no rows NaN."""
    g = torch.Generator().manual_seed(threads)
    c = 7
    for n in [0, 1, 31, 33, 1000, 1024, 2500]:
        logits = (3 * torch.randn(n, c, generator=g)).to(dtype)
        targets = torch.randint(0, c, (n,), generator=g)
        for case in ["some ignored", "all ignored", "bad target"]:
            t = targets.clone()
            if case == "some ignored":
                t[torch.rand(n, generator=g) < 0.3] = -100
            elif case == "all ignored":
                t[:] = -100
            elif n:
                t[n // 2] = c  # past C: loss 0, counted (its target is not ignore_index)
            for reduction, mean in [(1, True), (2, False)]:
                want_out, want_count, loss, *_ = ops.ce_forward_reduce(
                    logits, t, torch.arange(n), n, -100, reduction
                )
                out, count = _C._ce_reduce_replay(loss, t, -100, mean, threads)
                assert out.dtype == loss.dtype and out.dim() == 0 and count.dtype == torch.int64
                assert int(count) == int(want_count)
                torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12, equal_nan=True)
                value, cnt = _ordered_reduce(loss, t, -100, mean, threads)
                assert cnt == int(count)
                assert torch.equal(out, torch.tensor(value, dtype=loss.dtype)) or (
                    math.isnan(value) and out.isnan()
                )
                if case == "all ignored":
                    assert int(count) == 0 and (out.isnan() if mean else out == 0)


def test_reduce_replay_rejects_bad_arguments():
    loss, t = torch.zeros(4), torch.zeros(4, dtype=torch.long)
    for threads in [16, 48, 2048]:
        with pytest.raises(RuntimeError, match="threads"):
            _C._ce_reduce_replay(loss, t, -100, True, threads)
    with pytest.raises(RuntimeError, match="1-D CPU"):
        _C._ce_reduce_replay(loss, t[:3], -100, True, 32)
