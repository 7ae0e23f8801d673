"""Autograd of memcore::ce_forward_grad_, the route of ``accumulate(..., overwrite_logits=True)``.

The forward op computes the loss and statistics and writes the gradient of the reduced loss
(upstream gradient 1) over the logits' memory, as Liger-Kernel's cross-entropy does: no N x C
buffer is allocated, and the backward makes no pass over the logits (the default route's
backward reads them again and writes a new gradient tensor). The forward's gradient pass re-reads
each row right after its statistics pass: from cache while the rows in flight fit there (on a GPU,
L2; very wide rows may not, which only a GPU run can tell), else from memory. The backward hands that memory
back as the gradient, multiplied by the upstream gradient unless it is 1 (decided on the device).

Safety: the logits' version counter is bumped, so autograd catches any other node that saved
them for its backward ("modified by an inplace operation"); reading the logits after the call
reads the gradient. The gradient exists once: a second backward through the same loss
(retain_graph=True) raises.
"""
import torch

from . import _ops  # noqa: F401  (operator registration)


class OverwriteLogitsCE(torch.autograd.Function):
    """(logits [N, C], targets, index, num_samples, ignore_index, reduction code) ->
    (out 0-d opmath, loss [N], row_stats [N, 3], status [1]); only out is differentiable."""

    @staticmethod
    def forward(ctx, logits, targets, index, num_samples, ignore_index, reduction):
        z = logits.detach()  # same memory and version counter as logits
        out, _count, loss, _lse, row_stats, status = torch.ops.memcore.ce_forward_grad_(
            z, targets, index, num_samples, ignore_index, reduction)
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
                "cannot recompute it. Use overwrite_logits=False for that.")
        torch.ops.memcore.scale_unless_one_(grad, grad_out)
        return grad, None, None, None, None, None
