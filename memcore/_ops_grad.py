"""Autograd guards of the Python layer.

The default route's double backward is exact: memcore::ce_backward has its own autograd
(csrc/autograd/ce_backward_autograd.cpp). The overwrite_logits route cannot have one: its backward
hands back a gradient the forward already wrote over the logits, a stored tensor rather than a
function of them, so a second backward through it would silently miss the curvature term.
"""
import torch


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
                "is exact.")
        return grad


def no_double_backward(out: torch.Tensor) -> torch.Tensor:
    """``out`` unchanged, with a backward that refuses create_graph=True (see _NoDoubleBackward)."""
    return _NoDoubleBackward.apply(out)
