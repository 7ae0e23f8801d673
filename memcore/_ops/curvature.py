"""The curvature family's ops on the Python side: fake kernels and the autograd of
rademacher_perturb (schemas in csrc/memcore.cpp, kernels in csrc/cpu/curvature.cpp and
csrc/cuda/curvature.cu). The public wrappers are ``memcore.curvature`` and ``CurvatureTracker``
(memcore/curvature.py)."""

import torch

from .. import _C  # noqa: F401  (registers torch.ops.memcore.*)


@torch.library.register_fake("memcore::rademacher")
def _rademacher_fake(index, seed, probe_start, n_probes, sample_shape, dtype):
    return index.new_empty((n_probes, index.shape[0], *sample_shape), dtype=dtype)


@torch.library.register_fake("memcore::rademacher_perturb")
def _rademacher_perturb_fake(x, index, seed, probe_start, n_probes, h):
    return x.new_empty((n_probes, *x.shape))


@torch.library.register_fake("memcore::probe_reduce")
def _probe_reduce_fake(grad_perturbed, grad_clean, index, seed, probe_start):
    shape = (grad_perturbed.shape[0], grad_clean.shape[0])
    return (
        grad_clean.new_empty(shape, dtype=torch.float64),
        grad_clean.new_empty(shape, dtype=torch.float64),
    )


# x + h v is the identity in x for every probe: the gradient sums over the probe dimension.
def _perturb_setup(ctx, inputs, output):
    ctx.x_dtype = inputs[0].dtype


def _perturb_backward(ctx, grad):
    return grad.sum(0).to(ctx.x_dtype), None, None, None, None, None


torch.library.register_autograd(
    "memcore::rademacher_perturb", _perturb_backward, setup_context=_perturb_setup
)
