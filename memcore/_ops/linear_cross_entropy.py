"""The linear_cross_entropy family's ops on the Python side: fake kernels and autograd of
memcore::linear_ce_forward / linear_ce_backward (schemas in csrc/memcore.cpp, one implementation for
CPU and CUDA in csrc/composite/linear_cross_entropy.cpp), the fused linear + cross-entropy behind
``memcore.linear_accumulate`` (memcore/linear_cross_entropy.py). Autograd is Python here: the
backward only scales the gradients the forward made (or recomputes, for "none"), so its per-call
cost is small beside the GEMMs.

Reductions "mean" and "sum": the forward op already made the gradients of the summed loss (one
pass, logits chunk by chunk); the backward multiplies them by grad_out (/ count for "mean", the
whole batch's non-ignored rows). In eager mode that scaling happens in place on the saved buffers
(no second V x H buffer, no pass at all when the factor is 1); a second backward through a retained
graph, whose buffers the first one handed out, recomputes like "none". Reduction "none": the upstream
gradient differs per row, so linear_ce_backward recomputes every logits chunk and applies it inside
ce_backward, exactly as F.cross_entropy's backward does.

Loss options (class weights, label smoothing, soft-capping, z-loss): the forward op makes the
gradients of the reduced loss itself ("mean" has two denominators, the summed class weights and the
number of rows), so the backward scales by grad_out alone; "none" and a retained graph's second
backward recompute through ce_backward_options with each row's upstream gradients.

Double backward (``create_graph=True``, a gradient penalty) is refused: the gradients come out of the
fused ops as stored tensors, not as functions of the inputs, so their own gradient would be
silently wrong.

Autocast: both ops have an autocast kernel (CPU and CUDA). Without one the ops would fall through
to their CPU / CUDA kernels with autocast still on, which would then cast the GEMMs inside them. The
forward casts hidden, weight and bias as autocast casts F.linear's inputs (floating, not float64,
to the autocast dtype) and runs the op with autocast off; the backward only turns autocast off (its
inputs are the forward's).
"""

import torch

from .cross_entropy import _opmath  # also registers torch.ops.memcore.*


def _any_option(ce_weight, label_smoothing, softcap, z_loss) -> bool:
    """Whether linear_ce_forward / linear_ce_backward take the options route."""
    return ce_weight is not None or label_smoothing != 0.0 or softcap != 0.0 or z_loss != 0.0


@torch.library.register_fake("memcore::linear_ce_forward")
def _linear_ce_forward_fake(
    hidden,
    weight,
    bias,
    targets,
    index,
    num_samples,
    ignore_index,
    reduction,
    chunk_size,
    grad_mask,
    ce_weight=None,
    label_smoothing=0.0,
    softcap=0.0,
    z_loss=0.0,
):
    n, h = hidden.shape
    acc = _opmath(hidden.dtype)
    grads = reduction != 0 and any(grad_mask)
    options = _any_option(ce_weight, label_smoothing, softcap, z_loss)
    return (
        hidden.new_empty((), dtype=acc),
        targets.new_empty((), dtype=torch.int64),
        hidden.new_empty(n, dtype=acc),
        hidden.new_empty(n, dtype=acc),
        hidden.new_empty(n, 3, dtype=acc),
        hidden.new_empty(1, dtype=torch.int32),
        hidden.new_empty((n, h) if grads and grad_mask[0] else (0,)),
        hidden.new_empty(tuple(weight.shape) if grads and grad_mask[1] else (0,), dtype=acc),
        hidden.new_empty(
            (weight.shape[0],) if grads and grad_mask[2] and bias is not None else (0,), dtype=acc
        ),
        hidden.new_empty(n if options else 0, dtype=acc),
        hidden.new_empty(n if options and z_loss != 0.0 else 0, dtype=acc),
    )


@torch.library.register_fake("memcore::linear_ce_backward")
def _linear_ce_backward_fake(
    grad_loss, hidden, weight, bias, targets, lse, ignore_index, chunk_size, grad_mask, *_options
):
    return (
        torch.empty_like(hidden) if grad_mask[0] else hidden.new_empty(0),
        torch.empty_like(weight) if grad_mask[1] else weight.new_empty(0),
        torch.empty_like(bias) if grad_mask[2] and bias is not None else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, _index, _s, ignore_index, reduction, chunk_size, grad_mask, *options = (
        inputs
    )
    _out, count, _loss, lse, _rs, _status, grad_h, grad_w, grad_b, _nll, _zloss = output
    ctx.reduction, ctx.ignore_index, ctx.chunk_size = reduction, ignore_index, chunk_size
    # (ce_weight, label_smoothing, softcap, z_loss) as the op took them (defaults where omitted)
    ce_weight, *ctx.options = list(options) + [None, 0.0, 0.0, 0.0][len(options) :]
    ctx.with_options = _any_option(ce_weight, *ctx.options)
    ctx.grad_mask = tuple(grad_mask)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.has_bias = bias is not None
    # the gradient outputs (and lse, row_stats) never receive gradients: without this autograd would
    # allocate and zero-fill [V, H] and [N, H] cotangents for them before every backward
    ctx.set_materialize_grads(False)
    # hidden / weight / bias are alive anyway (leaves or activations): saving them costs no memory
    ctx.buffers = None
    if reduction == 0 or torch.compiler.is_compiling():
        ctx.save_for_backward(hidden, weight, bias, targets, lse, count, ce_weight, grad_h, grad_w, grad_b)
    else:
        # eager mean / sum: the gradient buffers as detached attributes that the backward pops, so
        # that it hands autograd the only reference (AccumulateGrad then adopts a buffer as .grad
        # instead of copying it: one [V, H] buffer less at the backward's peak). None once handed out.
        ctx.save_for_backward(hidden, weight, bias, targets, lse, count, ce_weight)
        ctx.buffers = [grad_h.detach(), grad_w.detach(), grad_b.detach()]


_NO_GRADS = (None,) * 14  # one per input of linear_ce_forward


def _recompute(ctx, grad_rows, hidden, weight, bias, targets, lse, ce_weight, mask, grad_z=None):
    """Gradients of sum_r grad_rows[r] * loss_r, recomputing every logits chunk (grad_z: the upstream
    gradient of the rows' z-loss parts where it is not grad_rows)."""
    if not any(mask):
        return _NO_GRADS
    gh, gw, gb = torch.ops.memcore.linear_ce_backward(
        grad_rows,
        hidden,
        weight,
        bias,
        targets,
        lse,
        ctx.ignore_index,
        ctx.chunk_size,
        mask,
        ce_weight,
        *ctx.options,
        grad_z,
    )
    return (gh if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None) + _NO_GRADS[3:]


def _backward(ctx, grad_out, _g_count, grad_loss, *_unused):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "memcore.linear_accumulate does not support double backward (create_graph=True, e.g. a "
            "gradient penalty): its gradients are made by fused ops, not by differentiable ones. Use "
            "memcore.accumulate(F.linear(hidden, weight, bias), ...) for that loss (exact double backward)"
        )
    need = ctx.needs_input_grad
    saved = ctx.saved_tensors
    hidden, weight, bias, targets, lse, count, ce_weight = saved[:7]
    mask = [bool(need[0]), bool(need[1]), bool(ctx.has_bias and need[2])]
    if ctx.reduction == 0:
        if grad_loss is None:
            return _NO_GRADS
        return _recompute(ctx, grad_loss, hidden, weight, bias, targets, lse, ce_weight, mask)
    if grad_out is None:
        return _NO_GRADS
    scale = grad_out.to(lse.dtype)
    # mean over the batch's non-ignored rows (all ignored: the gradients are 0); the options route
    # made the gradients of the mean itself
    if ctx.reduction == 1 and not ctx.with_options:
        scale = scale / count.clamp_min(1).to(scale.dtype)
    scale = scale.reshape(1)
    mask = [m and made for m, made in zip(mask, ctx.grad_mask)]
    if torch.compiler.is_compiling():  # no mutation of saved activations in a traced graph
        grads = [g * scale if m else None for g, m in zip(saved[7:], mask)]
    elif ctx.buffers is None:
        # a second backward through a retained graph: the buffers now belong to .grad attributes or
        # other nodes, so this one recomputes with every row's upstream gradient
        rows, rows_z = _row_upstreams(ctx, scale, targets, ce_weight, count, lse.shape[0])
        return _recompute(ctx, rows, hidden, weight, bias, targets, lse, ce_weight, mask, rows_z)
    else:
        # in place: no second [V, H] buffer, and no pass at all when the factor is 1
        buffers, ctx.buffers = ctx.buffers, None
        grads = [g if m else None for g, m in zip(buffers, mask)]
        del buffers
        for g in grads:
            if g is not None:
                torch.ops.memcore.scale_unless_one_(g, scale)
    # fp32 buffers are returned as they are (autograd adopts them as .grad); 16-bit ones rounded once
    return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)) + _NO_GRADS[3:]


def _row_upstreams(ctx, scale, targets, ce_weight, count, n):
    """(grad_rows, grad_z) of a reduced loss's recomputation: every row's upstream gradient of its
    cross-entropy part and of its z-loss part (None: the same), for upstream `scale` of out."""
    if ctx.reduction == 2 or not ctx.with_options:
        return scale.expand(n), None
    keep = targets != ctx.ignore_index
    if ce_weight is None:
        wsum = keep.sum().to(scale.dtype)
    else:
        safe = torch.where(keep & (targets >= 0) & (targets < ce_weight.shape[0]), targets, 0)
        wsum = torch.where(keep, ce_weight[safe], 0.0).sum()
    return (scale / wsum).expand(n), (scale / count.to(scale.dtype)).expand(n)


torch.library.register_autograd("memcore::linear_ce_forward", _backward, setup_context=_setup_context)


_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def autocast_cast(t, device_type: str):
    """`t` cast as autocast casts F.linear's inputs on `device_type`: a floating tensor on that device
    type, unless float64, to the autocast dtype; anything else as it is."""
    if (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.dtype != torch.float64
        and t.device.type == device_type
    ):
        return t.to(torch.get_autocast_dtype(device_type))
    return t


def _autocast_kernels(device_type: str):
    def forward(hidden, weight, bias, *rest):
        cast = [autocast_cast(t, device_type) for t in (hidden, weight, bias)]
        with torch.autocast(device_type, enabled=False):
            return torch.ops.memcore.linear_ce_forward(*cast, *rest)

    def backward(*args):
        with torch.autocast(device_type, enabled=False):
            return torch.ops.memcore.linear_ce_backward(*args)

    return forward, backward


_lib = torch.library.Library("memcore", "IMPL")
for _device_type, _key in _AUTOCAST_KEYS.items():
    _fwd, _bwd = _autocast_kernels(_device_type)
    _lib.impl("linear_ce_forward", _fwd, _key)
    _lib.impl("linear_ce_backward", _bwd, _key)
