"""Memory: the peak-memory probe the scaling benchmark reports (benchmarks/memory.py) measures what
it says, and memcore's fused loss allocates no more than the logits gradient on the CPU (no
softmax or log-probability tensor), the overwrite route nothing of that size."""

import pytest
import torch
import torch.nn.functional as F

import memcore
from benchmarks.memory import peak_cpu_mib

MIB = 2**20


def _probe(fn):
    peak = peak_cpu_mib(fn)
    if peak is None:
        pytest.skip("this torch's profiler exposes no allocation events: CPU peak memory not measurable")
    return peak


def test_probe_counts_live_allocations_only():
    def one_at_a_time():
        for _ in range(3):
            torch.empty(4 * MIB, dtype=torch.uint8).fill_(1)

    def together():
        keep = [torch.empty(4 * MIB, dtype=torch.uint8) for _ in range(3)]
        return len(keep)

    assert _probe(one_at_a_time) == pytest.approx(4.0, abs=0.05)
    assert _probe(together) == pytest.approx(12.0, abs=0.05)
    assert _probe(lambda: None) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_allocates_about_the_gradient_only(dtype):
    n, c = 256, 8192
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, c, (n,), generator=g)
    index = torch.arange(n)
    tracker = memcore.Tracker(n)
    grad_mib = logits.numel() * logits.element_size() / MIB

    def fused():
        memcore.accumulate(logits, targets, index, tracker).backward()

    def plain():
        F.cross_entropy(logits, targets).backward()

    logits.grad = None
    fused_peak = _probe(fused)
    logits.grad = None
    plain_peak = _probe(plain)
    assert grad_mib <= fused_peak <= 1.05 * grad_mib + 0.5, (fused_peak, grad_mib)
    assert plain_peak >= 2 * grad_mib  # log-probabilities (and their gradient) besides the result

    fresh = logits.detach().clone().requires_grad_()
    logits.grad = None
    overwrite_peak = _probe(
        lambda: memcore.accumulate(fresh, targets, index, tracker, overwrite_logits=True).backward()
    )
    assert overwrite_peak < 0.1 * grad_mib, overwrite_peak  # the gradient is the logits' own storage
