"""`memcore.accumulate`: cross-entropy that also records per-sample statistics in a Tracker."""
import torch

from . import _ops  # noqa: F401  (operator registration)
from ._validate import REDUCTIONS, rows_of
from .tracker import Tracker


def accumulate(
    logits: torch.Tensor,
    targets: torch.Tensor,
    index: torch.Tensor,
    tracker: Tracker,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Drop-in for ``F.cross_entropy(logits, targets, reduction=..., ignore_index=...)`` that also
    adds every row's loss, p(target), margin and correctness into ``tracker`` at ``index``.

    Args:
        logits: [N, C] (or [..., C]) float16 / bfloat16 / float32 / float64 scores; math in fp32
            (fp64 for fp64 logits).
        targets: [N] (or [...]) integer class ids in [0, C), or ``ignore_index``.
        index: [N] integer dataset indices in [0, tracker.num_samples) of each row. Many rows may
            share one index (token rows of one sequence); for targets [B, T] an index of shape [B]
            gives one id per sequence. Repeated indices in a batch are summed correctly.
        tracker: the :class:`memcore.Tracker` that receives the statistics.
        reduction: "mean" (over non-ignored rows, like F.cross_entropy), "sum" or "none".
        ignore_index: rows with this target contribute no loss, gradient or statistics.

    Returns:
        The loss, in ``logits.dtype``: a scalar, or per-row with the shape of ``targets`` for
        reduction="none". Gradients flow to ``logits`` only.

    Raises:
        TypeError / ValueError on wrong dtypes, shapes or devices; IndexError for targets or index
        out of range; ValueError for NaN / +inf logits. A rejected batch leaves the tracker
        unchanged. With ``Tracker(strict=False)`` (and always inside torch.compile) value errors are
        raised at the next ``end_epoch()`` / ``scores()`` instead, so no GPU sync is needed per step.
    """
    if not isinstance(tracker, Tracker):
        raise TypeError(f"tracker must be a memcore.Tracker, got {type(tracker).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits2d, targets1d, index1d = rows_of(logits, targets, index, ignore_index, tracker.device)
    stats = tracker._stats_for(logits2d.device)
    loss, _lse, row_stats, status = torch.ops.memcore.ce_forward(
        logits2d, targets1d, index1d, tracker.num_samples, ignore_index
    )
    torch.ops.memcore.ce_commit(stats, index1d, targets1d, loss.detach(), row_stats, status, ignore_index)
    tracker._after_batch(status, logits2d, targets1d, index1d, ignore_index, loss)

    if reduction == "none":
        out = loss.reshape(targets.shape)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / (targets1d != ignore_index).sum()
    return out.to(logits.dtype)
