"""accumulate's inputs at the edges: finite logits whose loss overflows float32, numpy / tensor
integers as ignore_index, logits on the meta device."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import assert_same_state

import memcore


@pytest.mark.parametrize("with_inputs", [False, True])
def test_finite_logits_whose_loss_overflows_float32(with_inputs):
    z = torch.tensor([[1.0, 2.0, 0.5], [3e38, -3e38, 0.0], [0.0, 1.0, 2.0]])
    y = torch.tensor([0, 1, 2])
    assert torch.isinf(F.cross_entropy(z, y, reduction="none")[1])  # what torch gives: inf
    tr = memcore.Tracker(3)
    before = tr.state_dict()
    x = torch.zeros(3, 1, requires_grad=True)
    zz = z + x if with_inputs else z
    with pytest.raises(ValueError, match=r"row 1 gives a loss of 6e\+38.*overflows"):
        memcore.accumulate(zz, y, torch.arange(3), tr, inputs=x if with_inputs else None)
    assert_same_state(tr.state_dict(), before)


def test_numpy_integer_ignore_index():
    z = torch.randn(4, 3)
    y = torch.tensor([0, 7, 1, 2])
    for ii in (np.int64(7), np.int32(7), torch.tensor(7)):
        got = memcore.accumulate(z, y, torch.arange(4), memcore.Tracker(4), ignore_index=ii)
        torch.testing.assert_close(got, F.cross_entropy(z, y, ignore_index=7))
    for bad in (7.0, True, "7"):
        with pytest.raises(TypeError, match="ignore_index"):
            memcore.accumulate(z, y, torch.arange(4), memcore.Tracker(4), ignore_index=bad)


def test_meta_first_batch_leaves_tracker_usable():
    tr = memcore.Tracker(4)
    with pytest.raises(ValueError, match="meta"):
        memcore.accumulate(
            torch.randn(2, 3, device="meta"),
            torch.tensor([0, 1], device="meta"),
            torch.tensor([0, 1], device="meta"),
            tr,
        )
    assert tr.device is None
    memcore.accumulate(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([0, 1]), tr)
    assert tr.device == torch.device("cpu") and int(tr.scores()["rows"].sum()) == 2
