"""Baseline memorization / label-noise scores the papers compare CSL with.

Scores that come free from one tracked training run are read from `Tracker.scores()`
(see `from_tracker`); the others need their own training (SSFT, confident learning) or a pass of
the final model (final loss). Every function returns float64 [N] scores, higher = more suspicious.
"""

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..scores import suspicion
from .training import TrainConfig, labels_of, predict, train


def from_tracker(scores: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Baselines available from one tracked run, oriented so that higher = more suspicious (the
    direction of each tracker score comes from the registry, ``memcore.scores``)."""
    out = {
        # in-confidence as the papers define it, 1 - p: the registry's orientation (-p) shifted by 1,
        # which AUROC ignores but the cosine of the agreement tables does not
        "in_confidence": 1.0 + suspicion("confidence_mean", scores["confidence_mean"]),
        "forgetting": suspicion("forgetting", scores["forgetting"]),  # +inf: never learned
        "forgetting_events": suspicion("forgetting_events", scores["forgetting_events"]),
        "learning_time": suspicion("learning_time", scores["learning_time"]),
        "aum": suspicion("aum", scores["aum"]),
    }
    if not torch.isnan(scores["input_grad_norm"]).all():
        # input-gradient magnitude over training
        out["loss_sensitivity"] = suspicion("input_grad_norm", scores["input_grad_norm"])
        out["learning_time_formal"] = suspicion("learning_time_formal", scores["learning_time_formal"])
    return out


def final_loss(model: torch.nn.Module, dataset: Dataset) -> torch.Tensor:
    """Per-sample cross-entropy of the final model (eval mode) on the given labels."""
    logits = predict(model, dataset)
    return F.cross_entropy(logits, labels_of(dataset), reduction="none").double()


def ssft(
    dataset: Dataset, model_fn: Callable[[], torch.nn.Module], cfg: TrainConfig, *, seed: int = 0
) -> torch.Tensor:
    """Second-split forgetting time (Maini et al. 2022), as a suspicion score (minus the time).

    Splits the data in halves A and B; trains on A, then on B only, and records for each sample
    of A the first epoch of the second phase after which it stays misclassified (never: the
    number of epochs). Then the same with A and B swapped. Mislabeled samples are forgotten
    first, so the score is -forgetting_time.
    """
    n = len(dataset)
    labels = labels_of(dataset)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = (perm[: n // 2], perm[n // 2 :])
    time_ = torch.full((n,), float(cfg.epochs), dtype=torch.float64)
    for first, second in (halves, halves[::-1]):
        torch.manual_seed(seed)
        model = model_fn()
        train(model, dataset, cfg, indices=first.tolist(), desc="ssft phase 1")
        sub = torch.utils.data.Subset(dataset, first.tolist())
        history = []

        def record(epoch: int, m: torch.nn.Module) -> None:
            history.append(predict(m, sub).argmax(1) == labels[first])

        train(model, dataset, cfg, indices=second.tolist(), on_epoch_end=record, desc="ssft phase 2")
        correct = torch.stack(history)  # [E, |first|]
        # first epoch e such that the sample is wrong at every epoch >= e
        wrong_from = torch.flip(torch.cumprod(torch.flip((~correct).int(), [0]), 0), [0]).bool()
        has = wrong_from.any(0)
        first_e = wrong_from.int().argmax(0).double()
        time_[first] = torch.where(has, first_e, torch.full_like(first_e, float(len(history))))
    return -time_


def confident_learning(
    dataset: Dataset,
    model_fn: Callable[[], torch.nn.Module],
    cfg: TrainConfig,
    *,
    folds: int = 2,
    seed: int = 0,
) -> Optional[torch.Tensor]:
    """Confident learning (Northcutt et al. 2021) via cleanlab on out-of-fold predicted
    probabilities: 1 - cleanlab's label quality score. None when cleanlab is not installed."""
    try:
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        return None
    n = len(dataset)
    labels = labels_of(dataset)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    probs = torch.zeros(n, int(labels.max()) + 1)
    for f in range(folds):
        held = perm[f::folds]
        mask = torch.ones(n, dtype=torch.bool)
        mask[held] = False
        torch.manual_seed(seed + f)
        model = train(
            model_fn(), dataset, cfg, indices=mask.nonzero().squeeze(1).tolist(), desc=f"CL fold {f}"
        )
        probs[held] = predict(model, torch.utils.data.Subset(dataset, held.tolist())).softmax(1)
    q = get_label_quality_scores(labels.numpy(), probs.numpy())
    return 1.0 - torch.as_tensor(q, dtype=torch.float64)
