"""The reference algorithm for input-loss curvature, re-implemented plainly the way the public
implementation of Garg et al. computes it, for benchmarks/bench_curvature.py only:

- a Python loop over probes;
- for each probe, the clean forward AND the perturbed forward, and one backward through both
  (the clean gradient is recomputed for every probe);
- Rademacher probes from torch.randint_like, with zeros turned into -1 by a loop over samples,
  then scaled by h (plus 1e-7, as the public code does);
- the mean-reduced batch loss (gradients carry a 1/B factor) and the trace term taken as the
  diagonal of a [B, B] matrix product.

Results are rescaled to memcore's units (per-sample loss, trace divided by h) so the two can be
compared directly; the probes differ, so only the estimates' distributions agree.
"""

from typing import Dict

import torch
import torch.nn.functional as F


def small_cnn(num_classes: int = 10) -> torch.nn.Module:
    """The benchmark model: a small CNN for 1x28x28 (MNIST-sized) inputs, ~220k parameters."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 7 * 7, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, num_classes),
    )


def reference_curvature(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n_probes: int = 10, h: float = 1e-3
) -> Dict[str, torch.Tensor]:
    """{"curvature": [B], "trace": [B]} float CPU tensors, the public implementation's way."""
    model.eval()
    b = x.shape[0]
    curv = torch.zeros(b)
    eigs = torch.zeros(b)
    x = x.clone()
    for _ in range(n_probes):
        v = torch.randint_like(x, high=2)
        for v_i in v:
            v_i[v_i == 0] = -1
        v = h * (v + 1e-7)
        x.requires_grad_()
        loss_pos = F.cross_entropy(model(x + v), y)
        loss_orig = F.cross_entropy(model(x), y)
        grad_diff = torch.autograd.grad(loss_pos - loss_orig, x)[0]
        curv += grad_diff.reshape(b, -1).norm(dim=1).detach().cpu()
        eigs += torch.diag(v.reshape(b, -1) @ grad_diff.reshape(b, -1).T).detach().cpu()
        model.zero_grad()
    # mean loss -> per-sample loss: x B; eigs = h v . grad_diff -> v . grad_diff / h: x 1 / h^2
    return {"curvature": curv / n_probes * b, "trace": eigs / n_probes * b / (h * h)}
