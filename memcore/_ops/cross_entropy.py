"""Python side of the cross-entropy op family (ce_forward, ce_forward_reduce, ce_forward_grad_,
ce_backward, ce_commit, ce_accumulate, scale_unless_one_) and of sqnorm_commit: fake-tensor
kernels for torch.compile, the autograd of ce_forward_grad_ (``OverwriteLogitsCE``) and the guard
that refuses its double backward (``no_double_backward``).

The schemas live in csrc/memcore.cpp, the kernels in csrc/cpu and csrc/cuda, the autograd of
ce_forward / ce_forward_reduce (csrc/autograd/cross_entropy_autograd.cpp) and of ce_backward (its
double backward, csrc/autograd/ce_backward_autograd.cpp) in C++; with the fake kernels below the ops
trace without graph breaks. The wrapper is ``memcore.accumulate``.
"""

import torch

from .. import _C  # noqa: F401  (registers torch.ops.memcore.*)


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


# ---------------------------------------------------------------- autograd of ce_forward_grad_


class OverwriteLogitsCE(torch.autograd.Function):
    """Autograd of memcore::ce_forward_grad_, the route of ``accumulate(..., overwrite_logits=True)``:
    (logits [N, C], targets, index, num_samples, ignore_index, reduction code) ->
    (out 0-d opmath, loss [N], row_stats [N, 3], status [1]); only out is differentiable.

    The forward op computes the loss and statistics and writes the gradient of the reduced loss
    (upstream gradient 1) over the logits' memory, as Liger-Kernel's cross-entropy does: no N x C
    buffer is allocated, and the backward makes no pass over the logits (the default route's
    backward reads them again and writes a new gradient tensor). The forward's gradient pass
    re-reads each row right after its statistics pass: from cache while the rows in flight fit
    there (on a GPU, L2; very wide rows may not, which only a GPU run can tell), else from memory.
    The backward hands that memory back as the gradient, multiplied by the upstream gradient
    unless it is 1 (decided on the device).

    Safety: the logits' version counter is bumped, so autograd catches any other node that saved
    them for its backward ("modified by an inplace operation"); reading the logits after the call
    reads the gradient. The gradient exists once: a second backward through the same loss
    (retain_graph=True) raises.
    """

    @staticmethod
    def forward(ctx, logits, targets, index, num_samples, ignore_index, reduction):
        z = logits.detach()  # same memory and version counter as logits
        out, _count, loss, _lse, row_stats, status = torch.ops.memcore.ce_forward_grad_(
            z, targets, index, num_samples, ignore_index, reduction
        )
        # a C++ op does not bump the version counter itself: without this a node that saved the
        # logits would silently use the gradient in their place
        torch.autograd.graph.increment_version(z)
        ctx.grad = z
        ctx.mark_non_differentiable(loss, row_stats, status)
        return out, loss, row_stats, status

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "memcore.accumulate(..., overwrite_logits=True) keeps the logits gradient once, in the "
                "logits' own memory; a second backward through the same loss (retain_graph=True) "
                "cannot recompute it. Use overwrite_logits=False for that."
            )
        torch.ops.memcore.scale_unless_one_(grad, grad_out)
        return grad, None, None, None, None, None


# ---------------------------------------------------------------- double backward of the overwrite route
# The default route's double backward is exact: memcore::ce_backward has its own autograd
# (csrc/autograd/ce_backward_autograd.cpp). The overwrite_logits route cannot have one: its backward
# hands back a gradient the forward already wrote over the logits, a stored tensor rather than a
# function of them, so a second backward through it would silently miss the curvature term.


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a 0-d loss whose backward raises when a graph of the backward is being built
    (``create_graph=True``: grad mode is on inside the backward exactly then)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "memcore.accumulate(..., overwrite_logits=True) does not support double backward "
                "(create_graph=True, e.g. a gradient penalty): its gradient was written in the forward pass "
                "and is not a function of the logits. Use overwrite_logits=False, whose double backward "
                "is exact."
            )
        return grad


def no_double_backward(out: torch.Tensor) -> torch.Tensor:
    """``out`` unchanged, with a backward that refuses create_graph=True (see _NoDoubleBackward)."""
    return _NoDoubleBackward.apply(out)
