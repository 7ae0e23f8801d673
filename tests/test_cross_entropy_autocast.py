"""accumulate under torch.autocast: float32 loss with F.cross_entropy's value and a 16-bit gradient
within one ulp of its, on every route (default, inputs=, overwrite_logits=True)."""

import pytest
import torch
import torch.nn.functional as F

import memcore


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_inputs", [False, True])
def test_autocast_value_and_dtype_match_f_cross_entropy(dtype, reduction, with_inputs, device):
    if device == "cpu" and dtype == torch.float16 and not hasattr(torch, "is_autocast_available"):
        pytest.skip("old torch without CPU float16 autocast")
    g = torch.Generator().manual_seed(3)
    n, c = 2048, 300
    x = torch.randn(n, 16, generator=g).to(device)
    w = (torch.randn(16, c, generator=g) * 3).to(device)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    y[::9] = -100
    idx = torch.arange(n, device=device)
    res = {}
    for use_memcore in (False, True):
        xb = x.clone().requires_grad_()
        wb = w.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype):
            z = xb @ wb
            assert z.dtype == dtype
            z.retain_grad()
            if use_memcore:
                loss = memcore.accumulate(
                    z,
                    y,
                    idx,
                    memcore.Tracker(n, device=device),
                    reduction=reduction,
                    inputs=xb if with_inputs else None,
                )
            else:
                loss = F.cross_entropy(z, y, reduction=reduction)
        loss.sum().backward()
        res[use_memcore] = (loss.detach(), z.grad)
    (l0, g0), (l1, g1) = res[False], res[True]
    assert l1.dtype == l0.dtype == torch.float32 and l1.shape == l0.shape
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    # both: float32 math rounded once to dtype, so at most one ulp apart; plus float32 noise on
    # entries near 0 (p - 1 at a confident target), of the order of eps32 * |logits| (~40 here)
    assert g1.dtype == g0.dtype == dtype
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(g1.float(), g0.float(), rtol=ulp, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_autocast_overwrite_route_matches_f_cross_entropy(dtype, reduction):
    """The third route (ce_forward_grad_, overwrite_logits=True) under autocast: float32 loss, and a
    gradient within one 16-bit ulp of F.cross_entropy's."""
    g = torch.Generator().manual_seed(4)
    n, c = 512, 200
    x, w = torch.randn(n, 16, generator=g), torch.randn(16, c, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    y[::7] = -100
    res = {}
    for use_memcore in (False, True):
        wb = w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            z = x @ wb
            assert z.dtype == dtype
            if use_memcore:
                loss = memcore.accumulate(
                    z, y, torch.arange(n), memcore.Tracker(n), reduction=reduction, overwrite_logits=True
                )
            else:
                loss = F.cross_entropy(z, y, reduction=reduction)
        loss.backward()
        res[use_memcore] = (loss.detach(), wb.grad)
    (l0, g0), (l1, g1) = res[False], res[True]
    assert l1.dtype == l0.dtype == torch.float32
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    # the weight gradient sums 16-bit logits gradients over rows: measured within 2e-4 of its max
    torch.testing.assert_close(g1, g0, rtol=ulp, atol=ulp / 2 * float(g0.abs().max()))


def test_autocast_fp16_sum_does_not_overflow():
    z = (torch.randn(8192, 100) * 4).half()
    y = torch.randint(0, 100, (8192,))
    with torch.autocast("cpu", dtype=torch.float16):
        got = memcore.accumulate(z, y, torch.arange(8192), memcore.Tracker(8192), reduction="sum")
        want = F.cross_entropy(z, y, reduction="sum")
    assert torch.isfinite(want) and float(want) > 65504  # beyond float16's range
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
