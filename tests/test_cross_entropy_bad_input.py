"""Bad input raises a clear exception naming the argument and leaves the tracker unchanged."""

import pytest
import torch
from reference import recorded

import memcore
from memcore import _state as S


def _ok(device, n=6, c=4, s=10):
    return (
        torch.randn(n, c, device=device),
        torch.randint(0, c, (n,), device=device),
        torch.arange(n, device=device),
        memcore.Tracker(s, device=device),
    )


def _unchanged(tr, before):
    assert torch.equal(recorded(tr), before)


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("logits_1d", ValueError, "logits"),
        ("logits_int", TypeError, "logits"),
        ("one_class", ValueError, "at least 2 classes"),
        ("targets_float", TypeError, "targets must be an integer tensor of class ids"),
        ("targets_bool", TypeError, "targets"),
        ("targets_shape", ValueError, "targets"),
        ("index_float", TypeError, "index must be an integer tensor of the samples' dataset indices"),
        ("index_shape", ValueError, "index"),
        ("not_tensor", TypeError, "targets"),
        ("tracker_type", TypeError, "tracker"),
        ("reduction", ValueError, "reduction"),
        ("ignore_index", TypeError, "ignore_index"),
    ],
)
def test_metadata_errors(case, exc, match, device):
    logits, targets, index, tr = _ok(device)
    kw = {}
    if case == "logits_1d":
        logits = logits[:, 0]
    elif case == "logits_int":
        logits = logits.long()
    elif case == "one_class":
        logits, targets = logits[:, :1], torch.zeros_like(targets)
    elif case == "targets_float":
        targets = targets.float()
    elif case == "targets_bool":
        targets = targets > 0
    elif case == "targets_shape":
        targets = targets[:-1]
    elif case == "index_float":
        index = index.float()
    elif case == "index_shape":
        index = index[:3]
    elif case == "not_tensor":
        targets = targets.tolist()
    elif case == "tracker_type":
        tr = {"num_samples": 10}
    elif case == "reduction":
        kw["reduction"] = "avg"
    elif case == "ignore_index":
        kw["ignore_index"] = -100.0
    before = recorded(tr).clone() if isinstance(tr, memcore.Tracker) else None
    with pytest.raises(exc, match=match):
        memcore.accumulate(logits, targets, index, tr, **kw)
    if before is not None:
        _unchanged(tr, before)


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("target_high", IndexError, r"targets\[2\] = 4 is outside \[0, 4\)"),
        ("target_negative", IndexError, r"targets\[0\] = -1"),
        ("index_high", IndexError, r"index\[5\] = 10 is outside \[0, 10\)"),
        ("index_negative", IndexError, r"index\[1\] = -3"),
        ("nan", ValueError, "row 3 .*non-finite"),
        ("inf", ValueError, "row 4 .*non-finite"),
        ("target_minus_inf", ValueError, "row 0 .*non-finite"),
    ],
)
def test_value_errors_leave_tracker_unchanged(case, exc, match, device):
    logits, targets, index, tr = _ok(device)
    memcore.accumulate(logits, targets, index, tr)  # some state to preserve
    before = recorded(tr).clone()
    logits, targets, index = logits.clone(), targets.clone(), index.clone()
    if case == "target_high":
        targets[2] = 4
    elif case == "target_negative":
        targets[0] = -1
    elif case == "index_high":
        index[5] = 10
    elif case == "index_negative":
        index[1] = -3
    elif case == "nan":
        logits[3, 1] = float("nan")
    elif case == "inf":
        logits[4, 0] = float("inf")
    elif case == "target_minus_inf":
        logits[0, targets[0]] = float("-inf")
    with pytest.raises(exc, match=match):
        memcore.accumulate(logits, targets, index, tr)
    _unchanged(tr, before)


def test_nan_anywhere_in_long_row_is_caught(device):
    for c in (3000, 70000):
        logits, targets, index, tr = _ok(device, n=3, c=c)
        logits[1, c - 5] = float("nan")
        logits[2, : c // 2] = float("-inf")  # -inf prefix, then a NaN after it
        logits[2, c // 2 + 1] = float("nan")
        targets[2] = c - 1
        with pytest.raises(ValueError, match="row 1"):
            memcore.accumulate(logits, targets, index, tr)
        logits[1, c - 5] = 0.0
        with pytest.raises(ValueError, match="row 2"):
            memcore.accumulate(logits, targets, index, tr)
        assert recorded(tr).abs().sum() == 0


def test_ignored_rows_are_not_validated_or_read(device):
    logits, targets, index, tr = _ok(device)
    targets[0] = -100
    index[0] = -1  # padding rows may carry any index
    logits[0] = float("nan")
    memcore.accumulate(logits, targets, index, tr)
    assert tr.scores()["rows"].sum() == 5


def test_deferred_errors_raise_at_end_epoch(device):
    logits, targets, index, _ = _ok(device)
    tr = memcore.Tracker(10, device=device, strict=False)
    bad = targets.clone()
    bad[1] = 99
    memcore.accumulate(logits, bad, index, tr)  # no exception yet, batch skipped
    memcore.accumulate(logits, targets, index, tr)
    assert tr.state_dict()["buffers"]["counts"][:, S.C_ROWS_E].sum() == 6
    with pytest.raises(ValueError, match="target out of range"):
        tr.end_epoch()
    tr.end_epoch()  # error reported once; state has only the good batch
    assert tr.scores()["rows"].sum() == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_names_argument():
    logits, targets, index, tr = _ok("cuda")
    with pytest.raises(ValueError, match="targets is on cpu"):
        memcore.accumulate(logits, targets.cpu(), index, tr)
    with pytest.raises(ValueError, match="index is on cpu"):
        memcore.accumulate(logits, targets, index.cpu(), tr)
    with pytest.raises(ValueError, match="tracker lives on cpu"):
        memcore.accumulate(logits, targets, index, memcore.Tracker(10, device="cpu"))


def test_tracker_device_mismatch_cpu_meta():
    tr = memcore.Tracker(10, device="meta")
    with pytest.raises(ValueError, match="tracker lives on meta"):
        memcore.accumulate(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([0, 1]), tr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "c", [7, 1000, 5000, 40000]
)  # a warp, a warp with vector loads, a block, a wide block
def test_all_minus_inf_row_has_nan_lse_on_every_device(device, dtype, c):
    """A row with no finite logit has no log-sum-exp: the op's lse is NaN (as for NaN rows), the
    row's loss is not finite, and accumulate rejects the batch naming that row."""
    logits, targets, index, tr = _ok(device, n=4, c=c)
    logits = logits.to(dtype)
    logits[2] = float("-inf")
    loss, lse, _, status = torch.ops.memcore.ce_forward(logits, targets, index, 10, -100)
    assert torch.isnan(lse[2]) and not torch.isfinite(loss[2])
    assert torch.isfinite(lse[[0, 1, 3]]).all() and int(status) != 0
    before = recorded(tr).clone()
    with pytest.raises(ValueError, match="row 2"):
        memcore.accumulate(logits, targets, index, tr)
    _unchanged(tr, before)
