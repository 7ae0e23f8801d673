"""The CUDA cross-entropy kernels' logic, run on the host against the CPU kernels (no GPU needed).

csrc/cuda/ce_row.h holds the per-row code of the CUDA kernels as __host__ __device__ functions;
csrc/kernel_logic.cpp replays with them, lane by lane, how ce_forward_kernel splits a row between
its threads (scalar head, 16-byte packs four at a time, the target's pack, scalar tail; the warp
butterfly and the cross-warp merge), the gradient pass, and ce_commit_kernel's segmented warp
reduction. Every thread count (32, 256, 512) and alignment the launcher can meet is replayed; the
references are the CPU ops. Only exp differs on purpose: the host replay uses exp2, the device
ex2.approx.ftz (2 ulp), the CPU kernels a polynomial.
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


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_ties_masks_nan(dtype):
    g = torch.Generator().manual_seed(1)
    for c in (9, 40, 2049, 16385):
        base = torch.randn(c, generator=g, dtype=torch.float64).round()  # many ties
        masked = base.clone()
        masked[torch.rand(c, generator=g) < 0.5] = -math.inf
        masked[c // 2] = 1.0
        nan = base.clone()
        nan[c // 3] = math.nan
        all_inf = torch.full((c,), -math.inf, dtype=torch.float64)
        tie = torch.zeros(c, dtype=torch.float64)  # every column ties: correct only for t == 0
        neg_target = base.clone()
        for values in (base, masked, nan, all_inf, tie, neg_target):
            targets = None
            if values is neg_target:
                targets = [c - 1]
                values[c - 1] = -math.inf  # target -inf, the rest finite: loss +inf
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


def _runs(index, values):
    """What each lane should add: the sum of its run of equal indices at the run's first lane."""
    out = torch.zeros(32, 6, dtype=torch.float64)
    lane = 0
    while lane < 32:
        end = lane + 1
        while end < 32 and index[end] == index[lane]:
            end += 1
        if index[lane] >= 0:
            out[lane] = values[lane:end].sum(0)
        lane = end
    return out


def test_segmented_commit():
    g = torch.Generator().manual_seed(2)
    patterns = [
        torch.arange(32),  # distinct: the reduction is skipped
        torch.zeros(32, dtype=torch.long),  # one sequence over the warp
        torch.arange(32) // 8,  # 4 sequences of 8 tokens
        torch.tensor([5, 5, 7, 5] * 8),  # equal indices that are not neighbours stay apart
        torch.tensor([-1] * 3 + [4] * 10 + [-1] + [4] * 10 + [-1] * 8),  # skipped rows split runs
        torch.full((32,), -1, dtype=torch.long),
    ]
    for _ in range(50):
        lengths = torch.randint(1, 12, (32,), generator=g)
        ids = torch.repeat_interleave(torch.randint(-1, 4, (32,), generator=g), lengths)[:32]
        patterns.append(ids)
    for ids in patterns:
        values = torch.randn(32, 6, generator=g, dtype=torch.float64)
        got = _C._seg_commit_replay(ids, values)
        want = _runs(ids.tolist(), values)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=str(ids.tolist()))
        # everything that is committed is committed once
        torch.testing.assert_close(got.sum(0), values[ids >= 0].sum(0), rtol=1e-12, atol=1e-12)


def test_replay_rejects_bad_arguments():
    row = torch.randn(10)
    with pytest.raises(RuntimeError, match="threads per row"):
        _C._ce_row_replay(row, 0, 64, True)
    with pytest.raises(RuntimeError, match="target"):
        _C._ce_row_replay(row, 10, 32, True)
