"""Loads memcore._C and gives its operators fake-tensor kernels and autograd.

The schemas live in csrc/memcore.cpp and the kernels in csrc/cpu and csrc/cuda; this module adds
what torch.compile and autograd need, so the ops trace without graph breaks.
"""
import torch

from . import _C  # noqa: F401  (registers torch.ops.memcore.*)


def _opmath(dtype: torch.dtype) -> torch.dtype:
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


@torch.library.register_fake("memcore::ce_backward")
def _ce_backward_fake(grad_loss, logits, targets, lse, ignore_index):
    return torch.empty_like(logits)


@torch.library.register_fake("memcore::ce_commit")
def _ce_commit_fake(stats, index, targets, loss, row_stats, status, ignore_index):
    return None


def _ce_forward_setup(ctx, inputs, output):
    logits, targets, _index, _num_samples, ignore_index = inputs
    _loss, lse, row_stats, status = output
    ctx.save_for_backward(logits, targets, lse)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(lse, row_stats, status)


def _ce_forward_backward(ctx, grad_loss, _grad_lse, _grad_row_stats, _grad_status):
    logits, targets, lse = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.memcore.ce_backward(grad_loss, logits, targets, lse, ctx.ignore_index)
    return grad, None, None, None, None


torch.library.register_autograd(
    "memcore::ce_forward", _ce_forward_backward, setup_context=_ce_forward_setup
)


def with_cuda() -> bool:
    """True when this build of memcore contains the CUDA kernels."""
    return bool(_C.with_cuda())


from . import _curvature_ops  # noqa: E402,F401  (fake kernels / autograd of the curvature ops)
