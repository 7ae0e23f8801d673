"""Scores out of memcore: a pandas DataFrame / CSV, and cleanlab's conventions (ranked issue
indices, label quality scores in [0, 1]) to feed existing data-cleaning workflows."""
import csv
from typing import Dict, Optional, Tuple

import numpy as np
import torch

# scores where a LOW value is suspicious; every other score is suspicious when high
LOW_IS_SUSPICIOUS = {"confidence_mean", "aum", "correctness"}


def _suspicion(scores: Dict[str, torch.Tensor], by: str) -> np.ndarray:
    if by not in scores:
        raise KeyError(f"no score named {by!r}; have {sorted(scores)}")
    s = scores[by].detach().double().cpu().numpy()
    s = -s if by in LOW_IS_SUSPICIOUS else s.copy()
    s[np.isnan(s)] = -np.inf  # never-seen samples rank last
    return s


def _columns(scores: Dict[str, torch.Tensor], labels) -> Tuple[int, Optional[torch.Tensor]]:
    """Checks that every score and the labels have one entry per sample; returns (n, labels)."""
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores must be a non-empty dict of per-sample tensors (Tracker.scores())")
    lengths = {k: len(v) for k, v in scores.items()}
    n = next(iter(lengths.values()))
    if any(m != n for m in lengths.values()):
        raise ValueError(f"scores have different lengths: {lengths}")
    if labels is None:
        return n, None
    lab = torch.as_tensor(labels).cpu()
    if lab.dim() != 1 or len(lab) != n:
        raise ValueError(f"labels must have one entry per sample: shape [{n}], got {tuple(lab.shape)}")
    return n, lab


def to_dataframe(scores: Dict[str, torch.Tensor], labels: Optional[torch.Tensor] = None):
    """A pandas DataFrame with one row per sample: `index`, optionally `label`, one column per score."""
    import pandas as pd

    n, lab = _columns(scores, labels)
    cols = {"index": np.arange(n)}
    if lab is not None:
        cols["label"] = lab.numpy()
    cols.update({k: v.detach().cpu().numpy() for k, v in scores.items()})
    return pd.DataFrame(cols)


def to_csv(scores: Dict[str, torch.Tensor], path: str, labels: Optional[torch.Tensor] = None) -> None:
    """Writes the scores as CSV (same columns as `to_dataframe`); needs no pandas. Lengths are
    checked before the file is opened: a mismatch raises ValueError and writes nothing."""
    n, lab_t = _columns(scores, labels)
    names = list(scores)
    cols = [scores[k].detach().cpu().tolist() for k in names]
    lab = lab_t.tolist() if lab_t is not None else None
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index"] + (["label"] if lab is not None else []) + names)
        for i in range(n):
            w.writerow([i] + ([lab[i]] if lab is not None else []) + [repr(c[i]) for c in cols])


def ranked_issues(scores: Dict[str, torch.Tensor], by: str = "csl", top: Optional[int] = None,
                  fraction: Optional[float] = None) -> np.ndarray:
    """Sample indices ordered from most to least suspicious by score `by` — the form of
    cleanlab's ``find_label_issues(..., return_indices_ranked_by=...)``. Keep the first `top`,
    or the first `fraction` of the dataset (e.g. your estimated noise rate)."""
    if top is not None and (not isinstance(top, (int, np.integer)) or isinstance(top, bool) or top < 0):
        raise ValueError(f"top must be a non-negative int (how many indices to keep), got {top!r}")
    s = _suspicion(scores, by)
    order = np.argsort(-s, kind="stable")
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        top = int(round(fraction * len(s)))
    return order if top is None else order[:top]


def label_quality_scores(scores: Dict[str, torch.Tensor], by: str = "csl") -> np.ndarray:
    """cleanlab's convention: a quality in [0, 1] per sample, lower = more likely a label issue
    (1 - the sample's suspicion percentile under score `by`)."""
    s = _suspicion(scores, by)
    ranks = np.empty(len(s))
    ranks[np.argsort(s, kind="stable")] = np.arange(len(s))
    return 1.0 - ranks / max(len(s) - 1, 1)
