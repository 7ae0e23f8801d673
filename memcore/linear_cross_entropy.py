"""The linear_cross_entropy family's public wrapper, `memcore.linear_accumulate`: ``accumulate`` of
``F.linear(hidden, weight, bias)`` without ever materialising the [N, V] logits (LLM heads: 8k tokens
x 128k vocabulary). Ops' fake kernels and autograd: memcore/_ops/linear_cross_entropy.py."""

from typing import Optional

import torch

from . import _C
from ._layout import NON_FINITE
from ._ops import linear_cross_entropy as _registered  # fake kernels, autograd and autocast of the ops
from ._validate import as_int, class_options, explain_status, linear_rows_of, loss_call
from .tracker import Tracker, _capturing

_MIB = 2**20
# Bytes of one chunk's logits (plus, for 16-bit inputs, the fp32 copy of their gradient that the
# weight-gradient GEMM reads) that chunk_size=None aims at. Fixed per device type rather than taken
# from the free memory, so that the chunking, and with it the rounding of the results, does not
# depend on what else happens to be allocated.
CHUNK_BYTES = {"cpu": 128 * _MIB, "cuda": 512 * _MIB}
# On the CPU a chunk also takes at least this many rows per feature of hidden, as far as
# CPU_MAX_CHUNK_BYTES allows: every chunk reads the head's weight [V, H] twice (the logits GEMM,
# hidden's gradient) and reads and writes the fp32 weight-gradient accumulator once, so with few rows
# per chunk that traffic, not the GEMMs' work, sets the time (2,048 x 2,048 x 128,256 fp32 on 2
# cores: 261-row chunks 1.13-1.25x the time of F.linear + F.cross_entropy, 1,024-row chunks
# 0.94-0.96x; benchmarks/RESULTS.md).
CPU_MIN_ROWS_PER_FEATURE = 0.5
CPU_MAX_CHUNK_BYTES = 512 * _MIB


def auto_chunk_size(
    num_rows: int, num_classes: int, dtype: torch.dtype, device: torch.device, hidden_size: int = 0
) -> int:
    """Rows per chunk for ``chunk_size=None``: as many as keep one chunk's [rows, V] logits (and, for
    float16 / bfloat16, their fp32 copy) within ``CHUNK_BYTES`` of the device type (128 MiB on CPU,
    512 MiB elsewhere); on the CPU at least ``hidden_size / 2`` rows (``CPU_MIN_ROWS_PER_FEATURE``)
    while the chunk stays within 512 MiB; at least 1 and at most ``num_rows``. Examples: V=32,000
    fp32 -> 1,048 rows on CPU; V=128,256, H=2,048 fp32 -> 1,024 rows on CPU (a 501 MiB chunk);
    V=128,256 bf16 on CUDA -> 697 rows."""
    per_row = num_classes * (dtype.itemsize + (4 if dtype in (torch.float16, torch.bfloat16) else 0))
    kind = torch.device(device).type
    rows = CHUNK_BYTES.get(kind, CHUNK_BYTES["cuda"]) // per_row
    if kind == "cpu":
        rows = max(rows, min(int(hidden_size * CPU_MIN_ROWS_PER_FEATURE), CPU_MAX_CHUNK_BYTES // per_row))
    return max(1, min(int(num_rows), rows))


_16BIT = (torch.float16, torch.bfloat16)


def settle_gemm(like: torch.Tensor) -> bool:
    """Settles which weight-gradient GEMM 16-bit calls on ``like``'s device take: whether this torch's
    addmm accumulates a float16 / bfloat16 product into an fp32 result (docs/kernels.md). The probe
    syncs the host, so :func:`linear_accumulate` runs it at its first such call, before any CUDA-graph
    capture; inside a capture that no earlier step settled it raises RuntimeError naming the warm-up
    step. An exception from the probe itself is not kept as an answer: the next call probes again.
    Returns True for the fp32-accumulating GEMM."""
    return _C._linear_ce_gemm_probe(like, _capturing())


def linear_accumulate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    index: torch.Tensor,
    tracker: Tracker,
    *,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    ce_weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
):
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets, ...)`` that also records every row's
    statistics in ``tracker`` (as :func:`memcore.accumulate` on those logits would), computed chunk
    by chunk so that the [N, V] logits never exist whole.

    Args:
        hidden: [N, H] or [..., H] float16 / bfloat16 / float32 / float64 (the last hidden state).
            Its features are last, as F.linear takes them; the classes come from ``weight``, so
            there is no class dimension to choose (``accumulate``'s ``class_dim``): for a model whose
            features sit in dim 1 ([N, H, d1, ...]), pass ``hidden.movedim(1, -1)``.
        weight: [V, H] output embedding / LM head weight, hidden's dtype (tied embeddings too).
        targets: [N] or [...] (hidden's leading shape) class ids in [0, V), or ``ignore_index``.
        index: dataset index of each row, like ``targets``, or [B] (one per sequence) for targets
            [B, T]; in [0, tracker.num_samples).
        tracker: the :class:`memcore.Tracker` that receives the statistics.
        bias: optional [V] bias of the head, hidden's dtype.
        reduction: "mean" (over the non-ignored rows of the whole call), "sum" or "none".
        ignore_index: rows with this target contribute no loss, gradient or statistics.
        chunk_size: rows per chunk; None: :func:`auto_chunk_size` (one chunk's logits within 128 MiB
            on CPU, 512 MiB on CUDA; on CPU at least H / 2 rows, up to 512 MiB). Peak memory above the inputs is about one chunk's logits, the
            fp32 weight gradient [V, H] and hidden's gradient [N, H]; time is that of the three
            GEMMs F.linear + backward would run plus memcore's CE passes.

        ce_weight: optional class weights [V] (Liger-Kernel's name; ``accumulate``'s ``weight``, which
            here is the head's matrix): row r's cross-entropy is multiplied by ``ce_weight[targets[r]]``
            and ``"mean"`` divides by the summed weights of the non-ignored rows, as F.cross_entropy.
            No gradient.
        label_smoothing: in [0, 1], F.cross_entropy's (with ``ce_weight`` as there).
        softcap: optional positive cap (Gemma-2 / 3's final logit soft-capping): the logits become
            ``softcap * tanh(logits / softcap)`` before the softmax, in fp32 (fp64 for fp64 input)
            inside each chunk; the gradient flows through the tanh.
        z_loss: coefficient of ``z_loss * logsumexp(row) ** 2`` added to each non-ignored row's loss
            (Liger-Kernel's ``lse_square_scale``), not weighted; ``"mean"`` divides it by the number
            of non-ignored rows.
        return_z_loss: return ``(loss, z_loss_term)``: the z-loss part of ``loss`` reduced the same
            way, for logging (no gradient; it is already in ``loss``).

            Each option is exactly ``accumulate``'s on ``F.linear(hidden, weight, bias)``, and the
            statistics recorded stay the model's own (-log p(target), p(target), margin and
            correctness of the soft-capped logits), neither weighted, smoothed nor z-lossed. With
            any option each chunk goes through the options' kernels (the default route is untouched).

    Math: logits in hidden's dtype as F.linear gives them; softmax, loss and statistics in fp32
    (fp64 for fp64 input); weight and bias gradients accumulate across chunks in fp32 and are
    rounded once. "mean" / "sum" compute the gradients during the forward pass (the backward only
    scales them by the upstream gradient, in place); "none" recomputes
    each logits chunk in the backward and applies each row's upstream gradient exactly. Inputs must
    not be modified in place between the forward and the backward pass.

    Under ``torch.autocast`` the inputs are cast as F.linear's are (floating, not float64, to the
    autocast dtype: a float32 weight with bfloat16 hidden too), the logits are in that dtype, and the
    loss is float32, as ``F.cross_entropy(F.linear(...))`` gives. Double backward
    (``create_graph=True``) raises RuntimeError: use ``accumulate`` on ``F.linear``'s logits for it.

    Distributed: a distributed tracker's first call and every ``flush_every``-th call are
    collectives, as for ``accumulate``.

    Returns:
        The loss in hidden's dtype (float32 for 16-bit logits under autocast): a scalar, or per-row
        with the shape of ``targets`` for "none"; a pair ``(loss, z_loss_term)`` with
        ``return_z_loss=True``.

    Raises:
        TypeError / ValueError naming the argument on wrong dtypes, shapes or devices; IndexError
        for targets or index out of range; ValueError for a non-finite loss (NaN / inf in hidden,
        weight or bias). A rejected batch leaves the tracker unchanged; with
        ``Tracker(strict=False)`` (and under torch.compile) the error is raised at the next
        ``end_epoch()`` / ``scores()``, as for ``accumulate``.
    """
    code, ignore_index = loss_call(tracker, reduction, ignore_index)
    out_dtype = hidden.dtype if isinstance(hidden, torch.Tensor) else None
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        # as F.linear under autocast: 16-bit logits from the cast inputs (the op's autocast kernel
        # casts alike); the loss float32 for them, as F.cross_entropy under autocast
        hidden, weight, bias = (
            _registered.autocast_cast(t, hidden.device.type) for t in (hidden, weight, bias)
        )
        if hidden.dtype in (torch.float16, torch.bfloat16):
            out_dtype = torch.float32
    hidden2d, targets1d, index1d = linear_rows_of(
        hidden, weight, bias, targets, index, ignore_index, tracker.device
    )
    n, v = hidden2d.shape[0], weight.shape[0]
    options = ce_weight is not None or label_smoothing != 0.0 or softcap is not None or z_loss != 0.0
    if options or return_z_loss:
        # checked against the [N, V] logits F.linear would give (a stride-0 view: nothing allocated)
        logits_like = hidden2d.new_empty(()).expand(n, v)
        ce_weight, label_smoothing, softcap, z_loss, return_z_loss = class_options(
            ce_weight, label_smoothing, softcap, z_loss, return_z_loss, logits_like, "ce_weight"
        )
    if chunk_size is None:
        chunk_size = auto_chunk_size(n, v, hidden.dtype, hidden.device, hidden2d.shape[1])
    else:
        chunk_size = as_int(chunk_size, "chunk_size", minimum=1)
    grad = torch.is_grad_enabled()
    mask = [
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    ]
    if mask[1] and hidden.is_cuda and hidden.dtype in _16BIT and not torch.compiler.is_compiling():
        settle_gemm(hidden)
    args = (
        hidden2d,
        weight,
        bias,
        targets1d,
        index1d,
        tracker.num_samples,
        ignore_index,
        code,
        chunk_size,
        mask,
    )
    if options:
        args += (ce_weight, label_smoothing, 0.0 if softcap is None else softcap, z_loss)
    out, count, loss, _lse, row_stats, status, _gh, _gw, _gb, nll, zloss = (
        torch.ops.memcore.linear_ce_forward(*args)
    )
    # the statistics are the model's own: -log p(target) (nll with options, else the loss)
    nll = (nll if options else loss).detach()
    # one record for the whole batch, skipped (on the device) when any chunk flagged an error
    tracker._record(
        index1d,
        targets1d,
        nll,
        row_stats,
        status,
        ignore_index,
        lambda bits: _explain(
            bits, hidden2d, weight, bias, targets1d, index1d, tracker.num_samples, ignore_index, nll
        ),
    )
    result = loss.to(out_dtype).reshape(targets.shape) if reduction == "none" else out.to(out_dtype)
    if not return_z_loss:
        return result
    if zloss.numel() == 0:  # no z-loss: its term is 0
        return result, torch.zeros_like(result).detach()
    if reduction == "none":
        z = zloss.reshape(targets.shape)
    else:
        z = zloss.sum() if reduction == "sum" else zloss.sum() / count
    return result, z.detach().to(out_dtype)


def _explain(bits, hidden, weight, bias, targets, index, num_samples, ignore_index, loss) -> Exception:
    """The exception for a non-zero status word, naming the first offending row and argument."""
    if bits & NON_FINITE and not bits & ~NON_FINITE:
        keep = targets != ignore_index
        row = int((keep & ~torch.isfinite(loss.detach())).nonzero()[0, 0])
        if not bool(torch.isfinite(hidden[row]).all()):
            where = f"hidden row {row} holds NaN or inf"
        elif not bool(torch.isfinite(weight).all()):
            where = "weight holds NaN or inf"
        elif bias is not None and not bool(torch.isfinite(bias).all()):
            where = "bias holds NaN or inf"
        else:
            where = "its logits overflow or the target's logit is -inf"
        return ValueError(
            f"row {row} gives a non-finite loss ({float(loss[row])}): {where}; the tracker was not updated"
        )
    # target / index errors: explain_status needs only the logits' shape [N, V]
    logits_shape = hidden.new_empty(()).expand(hidden.shape[0], weight.shape[0])
    return explain_status(bits, logits_shape, targets, index, num_samples, ignore_index, loss)
