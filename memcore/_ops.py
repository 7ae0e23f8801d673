"""Loads memcore._C and gives its operators fake-tensor kernels for torch.compile.

The schemas live in csrc/memcore.cpp, the kernels in csrc/cpu and csrc/cuda, and the autograd
formula in csrc/autograd; with the fake kernels below the ops trace without graph breaks.
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


@torch.library.register_fake("memcore::ce_commit")
def _ce_commit_fake(stats, index, targets, loss, row_stats, status, ignore_index):
    return None


@torch.library.register_fake("memcore::sqnorm_commit")
def _sqnorm_commit_fake(stats, grad, scale, index):
    return None


# Autograd of ce_forward is registered in C++ (csrc/autograd/cross_entropy_autograd.cpp).


def with_cuda() -> bool:
    """True when this build of memcore contains the CUDA kernels."""
    return bool(_C.with_cuda())


from . import _curvature_ops  # noqa: E402,F401  (fake kernels / autograd of the curvature ops)
