"""The cross_entropy family's public wrapper, `memcore.accumulate`: cross-entropy that also records
per-sample statistics in a Tracker. The ops' fake kernels: memcore/_ops/cross_entropy.py; their
autograd: csrc/autograd/cross_entropy.cpp. The loss options (class weights, label smoothing,
soft-capping, z-loss) go through the options ops (ce_forward_reduce_options, or
ce_forward_grad_options_ with overwrite_logits=True)."""

from typing import Optional

import torch

from ._ops import cross_entropy as _registered  # noqa: F401  (fake kernels of the ops)
from ._validate import check_inputs_for_grad, class_options, explain_status, loss_call, rows_of
from .tracker import Tracker


def accumulate(
    logits: torch.Tensor,
    targets: torch.Tensor,
    index: torch.Tensor,
    tracker: Tracker,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    inputs: Optional[torch.Tensor] = None,
    overwrite_logits: bool = False,
    class_dim: Optional[int] = None,
    weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
):
    """Drop-in for ``F.cross_entropy(logits, targets, reduction=..., ignore_index=...)`` that also
    adds every row's loss, p(target), margin and correctness into ``tracker`` at ``index``.

    Args:
        logits: [N, C], [..., C] (classes last: language-model logits [B, T, V]) or F.cross_entropy's
            [N, C, d1, ...] (classes in dim 1: segmentation [N, C, H, W], [N, C, L]); float16 /
            bfloat16 / float32 / float64 scores; math in fp32 (fp64 for fp64 logits).
        targets: [N], [...] or [N, d1, ...], the logits' shape without the class dim: integer class
            ids in [0, C), or ``ignore_index``. Each position is one row.
        index: integer dataset indices in [0, tracker.num_samples) of each row, shaped like targets.
            Many rows may share one index; an index of shape [N] gives one id per input: per
            sequence for targets [B, T], per image for targets [N, H, W] (its rows are the H * W
            pixels). Repeated indices in a batch are summed correctly.
        tracker: the :class:`memcore.Tracker` that receives the statistics.
        reduction: "mean" (over non-ignored rows, like F.cross_entropy), "sum" or "none".
        ignore_index: rows with this target contribute no loss, gradient or statistics.
        inputs: optional [N, ...] batch input the logits were computed from, a leaf with
            ``requires_grad=True`` (set it before the forward pass). During ``loss.backward()`` the
            squared L2 norm of each row's input gradient — of the row's own loss, whatever the
            reduction or later loss scaling — is added into the tracker (one fused pass over the
            gradient); ``inputs.grad`` is not kept. Gives the ``input_grad_norm`` and
            ``learning_time_formal`` scores. Parameter gradients are exactly those without it.
            Valid when each input row affects only its own logits row (no batch-coupling layers
            such as BatchNorm in train mode).

        overwrite_logits: compute the logits gradient in the forward pass and write it over the
            logits' memory, as Liger-Kernel's cross-entropy does (reduction "mean" or "sum"). The
            forward + backward then read the logits once and write them once instead of reading
            them twice and allocating an N x C gradient: faster where memory bandwidth bounds the
            loss (large vocabularies on a GPU) and one N x C buffer less at peak. The logits hold
            the gradient after the call, so do not read them afterwards (take ``argmax`` etc.
            before); autograd raises if another node saved them for its backward. One backward
            per loss (no ``retain_graph`` second pass). A plain ``loss.backward()`` costs no extra
            pass; another upstream gradient (loss scaling, ``loss / k``) costs one. The gradient is
            stored in the logits' dtype before that factor is applied, so with float16 logits and
            a ``GradScaler`` small entries can underflow: use it with bfloat16 / float32 logits
            (or the default route for float16 + GradScaler). Ignored, with the default route, where
            no gradient is needed and under ``torch.compile``. Double backward (``create_graph=True``)
            raises with it (the gradient is a stored tensor, not a function of the logits). On a
            leaf tensor (logits optimized directly) the gradient is written over the leaf's own
            values and becomes its ``.grad`` in the same memory: use the default route there.
        class_dim: where the logits keep their classes, 1 ([N, C, d1, ...]) or -1 ([..., C]). By
            default the targets' shape decides; where both readings fit (logits [N, A, A] with
            targets [N, A], for instance) a ValueError asks for it. 2-D logits are the same either
            way. Classes in dim 1 are read without a copy where they are innermost in memory (a
            channels-last tensor is [N, d1, ..., C] in memory); otherwise the rows are copied into
            one N x C x d1 x ... temporary of the logits' dtype, and the gradient, computed on the
            copy, is copied back into the logits' layout (one more pass each way; with
            ``overwrite_logits=True`` it is the copy that is overwritten, not the logits).

        weight: optional class weights [C] (F.cross_entropy's ``weight``): row r's loss is
            multiplied by ``weight[targets[r]]``, and ``"mean"`` divides by the summed weights of
            the non-ignored rows. The weights get no gradient.
        label_smoothing: in [0, 1], F.cross_entropy's: the loss is taken against
            ``(1 - label_smoothing) * onehot + label_smoothing / C``; with ``weight``, the smoothing
            term of a row is ``-sum_j weight[j] * log p_j * label_smoothing / C``, and ignored rows
            still contribute nothing.

        softcap: optional positive cap (Liger-Kernel's ``softcap``, Gemma-2 / 3's final logit
            soft-capping): the logits become ``softcap * tanh(logits / softcap)`` before the
            softmax, the gradient flows through the tanh (in float32; float64 for float64 logits).
            With ``inputs=`` the default route runs on a capped N x C copy.
        z_loss: coefficient of the z-loss (Liger-Kernel's ``lse_square_scale``, PaLM's auxiliary
            loss): ``z_loss * logsumexp(row) ** 2`` is added to each non-ignored row's loss; it is
            not weighted by ``weight``, and ``"mean"`` divides it by the number of non-ignored rows
            (the cross-entropy part by the summed weights), as Liger-Kernel does.
        return_z_loss: return ``(loss, z_loss_term)`` as Liger-Kernel does: the z-loss part of
            ``loss``, reduced the same way, for logging (it carries no gradient; it is already in
            ``loss``).

            With any option the statistics recorded in ``tracker`` stay the model's own:
            -log p(target), p(target), margin and correctness of the softmax the model predicts
            (after ``softcap``), neither weighted, smoothed nor z-lossed. ``weight``,
            ``label_smoothing`` and ``z_loss`` do not combine with ``inputs``. The options run in
            the ops ``memcore::ce_forward_reduce_options`` (one pass over the logits each way, as
            the default route; their measured cost beside it: benchmarks/RESULTS.md), with
            ``overwrite_logits=True`` in ``ce_forward_grad_options_`` (the same two passes in the
            forward, the second writing the gradient over the logits). Double backward is exact
            with every option on the default route.

    Returns:
        The loss (a pair with ``return_z_loss=True``), in ``logits.dtype`` (float32 for float16 / bfloat16 logits under
        ``torch.autocast``, as F.cross_entropy): a scalar, or per-row with the shape of ``targets``
        for reduction="none". The logits' gradient has their shape and layout. Gradients flow to ``logits`` only; double backward (a gradient
        penalty through ``create_graph=True``) is exact on the default route.

    Distributed: a distributed tracker's first call (the ranks' settings check) and every
    ``flush_every``-th call are collectives (see ``memcore.Tracker``): every rank makes them.

    Threads: concurrent calls on one tracker are safe (their recording is serialised). With
    ``inputs=``, ``x`` must feed no other loss term in the same backward; two ``accumulate`` calls
    on one ``x`` raise in the backward (the hook sees only the summed gradient), other terms on
    ``x`` cannot be detected and make ``input_grad_norm`` that of the whole objective.

    Raises:
        TypeError / ValueError on wrong dtypes, shapes or devices; IndexError for targets or index
        out of range; ValueError for NaN / +inf logits. A rejected batch leaves the tracker
        unchanged; with ``overwrite_logits=True`` its logits are overwritten all the same (the
        kernel finds a bad target, index or value in the pass that writes the gradient; argument
        errors are raised before anything is written). With ``Tracker(strict=False)`` (and always inside torch.compile) value errors are
        raised at the next ``end_epoch()`` / ``scores()`` instead, so no GPU sync is needed per step.
    """
    code, ignore_index = loss_call(tracker, reduction, ignore_index)
    logits2d, targets1d, index1d = rows_of(logits, targets, index, ignore_index, tracker.device, class_dim)
    if weight is not None or label_smoothing != 0.0 or softcap is not None or z_loss != 0.0 or return_z_loss:
        options = class_options(weight, label_smoothing, softcap, z_loss, return_z_loss, logits2d)
        rows = (logits2d, targets1d, index1d)
        return _with_options(
            logits, targets, rows, tracker, (reduction, code, ignore_index, inputs, overwrite_logits), options
        )
    if inputs is not None:
        check_inputs_for_grad(inputs, targets1d.shape[0], logits2d)
    if overwrite_logits:
        if reduction == "none":
            raise ValueError(
                'overwrite_logits=True needs reduction "mean" or "sum" (the gradient it '
                "writes in the forward pass is that of the reduced loss)"
            )
        if inputs is not None:
            raise ValueError(
                "overwrite_logits=True cannot be combined with inputs= (the input-gradient "
                "hooks need the per-row losses in the autograd graph)"
            )
        if logits.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # its autograd (csrc/autograd/cross_entropy.cpp) hands the logits' memory back as the
            # gradient and refuses a second or a double backward
            out, _count, loss, _lse, row_stats, status = torch.ops.memcore.ce_forward_grad_(
                logits2d, targets1d, index1d, tracker.num_samples, ignore_index, code
            )
            _record(tracker, logits2d, targets1d, index1d, ignore_index, loss, row_stats, status)
            return _as_result(out, logits)
    if inputs is None and reduction != "none":  # forward and reduction in one operator
        out, _count, loss, _lse, row_stats, status = torch.ops.memcore.ce_forward_reduce(
            logits2d, targets1d, index1d, tracker.num_samples, ignore_index, code
        )
        # loss: an output without a gradient (its node marks it so), nothing to detach
        _record(tracker, logits2d, targets1d, index1d, ignore_index, loss, row_stats, status)
        return _as_result(out, logits)

    loss, _lse, row_stats, status = torch.ops.memcore.ce_forward(
        logits2d, targets1d, index1d, tracker.num_samples, ignore_index
    )
    _record(tracker, logits2d, targets1d, index1d, ignore_index, loss.detach(), row_stats, status)
    if inputs is not None and loss.requires_grad:
        _record_input_grads(tracker, inputs, loss, targets1d, index1d, ignore_index, status)

    if reduction == "none":
        out = loss.reshape(targets.shape)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / (targets1d != ignore_index).sum()
    return _as_result(out, logits)


def _with_options(logits, targets, rows, tracker, route, options):
    """accumulate with any of weight, label_smoothing, softcap, z_loss, return_z_loss. rows: the
    (logits2d, targets1d, index1d) of rows_of; route: (reduction, its op code, ignore_index, inputs,
    overwrite_logits); options: as class_options returns them."""
    logits2d, targets1d, index1d = rows
    reduction, code, ignore_index, inputs, overwrite = route
    w, eps, softcap, zc, return_z_loss = options
    op_options = (w, eps, softcap or 0.0, zc)  # the ops' weight, label_smoothing, softcap, z_loss
    if inputs is not None:
        if w is not None or eps != 0.0 or zc != 0.0:
            raise ValueError(
                "weight=, label_smoothing= and z_loss= cannot be combined with inputs= (the input-gradient "
                "norm is that of each row's plain cross-entropy); use softcap= alone there, or no inputs="
            )
        # softcap alone: the default route on the capped logits (a float32 / float64 temporary)
        acc = torch.float64 if logits2d.dtype == torch.float64 else torch.float32
        capped = logits2d if softcap is None else torch.tanh(logits2d.to(acc) / softcap) * softcap
        out = accumulate(
            capped,
            targets1d,
            index1d,
            tracker,
            reduction=reduction,
            ignore_index=ignore_index,
            inputs=inputs,
            overwrite_logits=overwrite,
        )
        out = _as_result(out.reshape(targets.shape) if reduction == "none" else out, logits)
        return (out, torch.zeros_like(out)) if return_z_loss else out
    if overwrite:
        if reduction == "none":
            raise ValueError(
                'overwrite_logits=True needs reduction "mean" or "sum" (the gradient it '
                "writes in the forward pass is that of the reduced loss)"
            )
        if logits.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # the loss and its gradient over the logits in one op; autograd as ce_forward_grad_'s
            out, z, nll, _lse, row_stats, status = torch.ops.memcore.ce_forward_grad_options_(
                logits2d, targets1d, index1d, tracker.num_samples, ignore_index, code, *op_options
            )
            _record(tracker, logits2d, targets1d, index1d, ignore_index, nll, row_stats, status)
            out = _as_result(out, logits)
            return (out, _as_result(z, logits)) if return_z_loss else out
    # the options' loss, its C++ autograd one ce_backward_options call (csrc/autograd/cross_entropy.cpp)
    out, z, nll, _lse, row_stats, status = torch.ops.memcore.ce_forward_reduce_options(
        logits2d, targets1d, index1d, tracker.num_samples, ignore_index, code, *op_options
    )
    _record(tracker, logits2d, targets1d, index1d, ignore_index, nll, row_stats, status)
    if reduction == "none":
        out, z = out.reshape(targets.shape), z.reshape(targets.shape)
    out = _as_result(out, logits)
    if return_z_loss:
        return out, _as_result(z, logits)
    return out


def _as_result(out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """out in F.cross_entropy's result dtype (`_result_dtype`); itself when it has it already (a cast
    to the same dtype still costs an operator call)."""
    want = _result_dtype(logits)
    return out if out.dtype == want else out.to(want)


def _result_dtype(logits: torch.Tensor) -> torch.dtype:
    """F.cross_entropy's result dtype: the logits' own, except float32 for float16 / bfloat16 logits
    under torch.autocast on their device (cross_entropy is on autocast's float32 list). Every route's
    op returns its loss in float32 (opmath) for 16-bit logits, so this only skips the final cast."""
    if logits.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(logits.device.type):
        return torch.float32
    return logits.dtype


def _record(tracker: Tracker, logits, targets, index, ignore_index: int, loss, row_stats, status) -> None:
    """Hands a batch's per-row results to the tracker with the builder of the exception for a non-zero
    status word (called only when one is raised)."""
    tracker._record(
        index,
        targets,
        loss,
        row_stats,
        status,
        ignore_index,
        lambda bits: explain_status(bits, logits, targets, index, tracker.num_samples, ignore_index, loss),
    )


def _record_input_grads(
    tracker: Tracker,
    inputs: torch.Tensor,
    loss_rows: torch.Tensor,
    targets: torch.Tensor,
    index: torch.Tensor,
    ignore_index: int,
    status: torch.Tensor,
) -> None:
    """Hooks that reduce d(loss_r)/d(inputs_r) into the tracker during backward.

    The backward pass delivers d(total)/d(inputs_r) = d(total)/d(loss_r) * d(loss_r)/d(inputs_r);
    the hook on the per-row losses fires first and records d(total)/d(loss_r), whose inverse is
    the row's scale (1/B for "mean", GradScaler factors, accumulation divisors all cancel).
    A batch the forward rejected (``status`` != 0, reachable with ``Tracker(strict=False)``)
    records nothing here either: every row's scale is 0, decided on the device without a sync.
    """
    upstream = {}
    # the upstreams of every accumulate(..., inputs=x) call on this x whose backward is pending:
    # x's hook sees the gradient summed over all of them, so two in one backward cannot be split
    peers = inputs.__dict__.setdefault("_memcore_upstreams", [])
    peers.append(upstream)

    def on_loss_grad(g: Optional[torch.Tensor]) -> None:
        if g is not None:  # None: an undefined upstream gradient (no contribution)
            upstream["g"] = g.detach()

    def on_input_grad(gx: Optional[torch.Tensor]) -> None:
        g = upstream.pop("g", None)
        if g is None or gx is None:
            return
        if any("g" in u for u in peers if u is not upstream):
            for u in peers:
                u.pop("g", None)
            raise RuntimeError(
                "memcore.accumulate(..., inputs=x): x feeds two memcore.accumulate losses in this backward; "
                "x's gradient is their sum, so neither loss's per-sample input-gradient norm can be "
                "recorded exactly. Pass inputs= to one of them only, or give each loss its own leaf "
                "input. Nothing was recorded for this backward."
            )
        g = g.double()
        keep = (targets != ignore_index) & (g != 0) & (status == 0)
        scale = torch.where(keep, 1.0 / torch.where(keep, g, torch.ones_like(g)), torch.zeros_like(g))
        # per-row squared norms of the rows' own losses' gradients (0 where scale is 0, unread)
        sq = torch.ops.memcore.ce_input_sqnorm(gx.detach().contiguous(), scale)
        tracker._record_grad(index, sq, (scale != 0).double())

    def drop_grad(t: torch.Tensor) -> None:
        t.grad = None  # the norms are recorded; keep no [N, ...] copy
        for h in handles:  # one-shot: an input tensor reused across steps collects no hooks
            h.remove()
        peers[:] = [u for u in peers if u is not upstream]  # identity: dicts of tensors do not compare

    handles = [
        loss_rows.register_hook(on_loss_grad),
        inputs.register_hook(on_input_grad),
        inputs.register_post_accumulate_grad_hook(drop_grad),
    ]
