"""Scores out of memcore: a pandas DataFrame / CSV, and cleanlab's conventions (ranked issue
indices, label quality scores in [0, 1]) to feed existing data-cleaning workflows."""
import csv
from typing import Dict, Optional

import numpy as np
import torch

from .scores import LOW_IS_SUSPICIOUS  # noqa: F401  (re-exported: scores suspicious when low)


def _suspicion(scores: Dict[str, torch.Tensor], by: str) -> np.ndarray:
    if by not in scores:
        raise KeyError(f"no score named {by!r}; have {sorted(scores)}")
    s = scores[by].detach().double().cpu().numpy()
    s = -s if by in LOW_IS_SUSPICIOUS else s.copy()
    s[np.isnan(s)] = -np.inf  # never-seen samples rank last
    return s


def to_dataframe(scores: Dict[str, torch.Tensor], labels: Optional[torch.Tensor] = None):
    """A pandas DataFrame with one row per sample: `index`, optionally `label`, one column per score."""
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError("memcore.export.to_dataframe needs pandas: pip install 'memcore[export]' "
                          "(to_csv needs nothing)") from e

    n = len(next(iter(scores.values())))
    cols = {"index": np.arange(n)}
    if labels is not None:
        cols["label"] = torch.as_tensor(labels).cpu().numpy()
    cols.update({k: v.detach().cpu().numpy() for k, v in scores.items()})
    return pd.DataFrame(cols)


def to_csv(scores: Dict[str, torch.Tensor], path: str, labels: Optional[torch.Tensor] = None) -> None:
    """Writes the scores as CSV (same columns as `to_dataframe`); needs no pandas."""
    n = len(next(iter(scores.values())))
    names = list(scores)
    cols = [scores[k].detach().cpu().tolist() for k in names]
    lab = torch.as_tensor(labels).cpu().tolist() if labels is not None else None
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
    s = _suspicion(scores, by)
    order = np.argsort(-s, kind="stable")
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        top = int(round(fraction * len(s)))
    return order if top is None else order[:top]


def label_quality_scores(scores: Dict[str, torch.Tensor], by: str = "csl") -> np.ndarray:
    """cleanlab's convention: a quality in [0, 1] per sample, lower = more likely a label issue.

    It is a percentile rank, not a calibrated probability: 1 - the sample's suspicion percentile
    under score `by`, so it is uniform on [0, 1] by construction whatever the data (thresholding at
    0.5 flags half the dataset). Pick a cut-off from your estimated noise rate instead, e.g.
    ``ranked_issues(scores, fraction=rate)``. float64 [N]."""
    s = _suspicion(scores, by)
    ranks = np.empty(len(s))
    ranks[np.argsort(s, kind="stable")] = np.arange(len(s))
    return 1.0 - ranks / max(len(s) - 1, 1)
