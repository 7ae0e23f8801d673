"""The cross_entropy family's ops on the Python side: fake kernels for torch.compile of ce_forward,
ce_forward_reduce, ce_forward_grad_, ce_backward, scale_unless_one_, ce_input_sqnorm and the options
ops ce_forward_options / ce_backward_options / ce_forward_reduce_options / ce_forward_grad_options_.

Schemas: csrc/memcore.cpp; kernels: csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy.cu,
csrc/cuda/cross_entropy_options.cu; autograd (ce_forward, ce_forward_reduce, ce_forward_grad_,
ce_forward_reduce_options, ce_forward_grad_options_ and the double backward of ce_backward): C++,
csrc/autograd/cross_entropy.cpp, so a training step's backward never enters Python. The public
wrapper is ``memcore.accumulate`` (memcore/cross_entropy.py).
"""

import torch

from .. import _C  # noqa: F401  (registers torch.ops.memcore.*)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The ops' accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("memcore::ce_forward")
def _ce_forward_fake(logits, targets, index, num_samples, ignore_index):
    n, acc = logits.shape[0], _opmath(logits.dtype)
    return (
        logits.new_empty(n, dtype=acc),
        logits.new_empty(n, dtype=acc),
        logits.new_empty(n, 3, dtype=acc),
        logits.new_empty(1, dtype=torch.int32),
    )


@torch.library.register_fake("memcore::ce_forward_reduce")
def _ce_forward_reduce_fake(logits, targets, index, num_samples, ignore_index, reduction):
    loss, lse, row_stats, status = _ce_forward_fake(logits, targets, index, num_samples, ignore_index)
    return loss.new_empty(()), targets.new_empty((), dtype=torch.int64), loss, lse, row_stats, status


@torch.library.register_fake("memcore::ce_forward_grad_")
def _ce_forward_grad_fake(logits, targets, index, num_samples, ignore_index, reduction):
    return _ce_forward_reduce_fake(logits, targets, index, num_samples, ignore_index, reduction)


@torch.library.register_fake("memcore::scale_unless_one_")
def _scale_unless_one_fake(grad, scale):
    return None


@torch.library.register_fake("memcore::ce_backward")
def _ce_backward_fake(grad_loss, logits, targets, lse, ignore_index):
    return torch.empty_like(logits)


@torch.library.register_fake("memcore::ce_input_sqnorm")
def _ce_input_sqnorm_fake(grad, scale):
    return grad.new_empty(grad.shape[0], dtype=torch.float64)


@torch.library.register_fake("memcore::ce_forward_options")
def _ce_forward_options_fake(
    logits, targets, index, num_samples, ignore_index, softcap, label_smoothing, weight
):
    loss, lse, row_stats, status = _ce_forward_fake(logits, targets, index, num_samples, ignore_index)
    return loss, lse, row_stats, status, lse.new_empty(logits.shape[0] if label_smoothing > 0 else 0)


@torch.library.register_fake("memcore::ce_backward_options")
def _ce_backward_options_fake(a, b, c, logits, targets, lse, ignore_index, softcap, weight):
    return torch.empty_like(logits)


@torch.library.register_fake("memcore::ce_forward_reduce_options")
def _ce_forward_reduce_options_fake(
    logits, targets, index, num_samples, ignore_index, reduction, weight, label_smoothing, softcap, z_loss
):
    loss, lse, row_stats, status = _ce_forward_fake(logits, targets, index, num_samples, ignore_index)
    shape = (logits.shape[0],) if reduction == 0 else ()
    return loss.new_empty(shape), loss.new_empty(shape), loss, lse, row_stats, status


@torch.library.register_fake("memcore::ce_forward_grad_options_")
def _ce_forward_grad_options_fake(
    logits, targets, index, num_samples, ignore_index, reduction, weight, label_smoothing, softcap, z_loss
):
    loss, lse, row_stats, status = _ce_forward_fake(logits, targets, index, num_samples, ignore_index)
    return loss.new_empty(()), loss.new_empty(()), loss, lse, row_stats, status
