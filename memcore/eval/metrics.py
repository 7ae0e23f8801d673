"""Evaluation metrics: how well a score finds corrupted samples, and how it agrees with another."""

from typing import Optional

import numpy as np
import torch


def _np(x) -> np.ndarray:
    return (
        x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    )


def auroc(score, is_positive) -> float:
    """ROC AUC of `score` (higher = more suspicious) for the boolean `is_positive`; NaN scores rank
    lowest, +inf highest. The Mann-Whitney statistic with tied scores counting one half: the value
    of scikit-learn's roc_auc_score, without its import (seconds)."""
    s, y = _np(score), _np(is_positive).astype(bool)
    finite = np.isfinite(s)
    lo, hi = (s[finite].min() - 1.0, s[finite].max() + 1.0) if finite.any() else (0.0, 1.0)
    s = np.where(np.isnan(s) | np.isneginf(s), lo, np.where(np.isposinf(s), hi, s))
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"AUROC needs positive and negative samples, got {pos} and {neg}")
    _, which, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[which.reshape(-1)]  # 1-based, ties averaged
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def _pair(a, b, top: Optional[int], by, ranks: bool = False):
    """Finite entries of a and b (with `ranks`, every entry but NaN: an infinite score such as a
    never-learned sample's forgetting has a rank); with `top`, only the `top` ranked highest by `by`
    (default b)."""
    x, y = _np(a), _np(b)
    keep = ~(np.isnan(x) | np.isnan(y)) if ranks else np.isfinite(x) & np.isfinite(y)
    if top is None:
        return x[keep], y[keep]
    key = np.where(keep, _np(by) if by is not None else y, -np.inf)
    idx = np.argsort(-key, kind="stable")[: min(top, int(keep.sum()))]
    return x[idx], y[idx]


def cosine(a, b, top: Optional[int] = None, by=None) -> float:
    """Cosine similarity of two score vectors; with `top`, on the `top` samples ranked highest by `by` (default b).

    NaN when either vector is constant on the chosen samples (with `top`): against a constant
    vector cosine measures only how even the other one is (uniform noise in [1, 2] scores 0.98),
    not agreement. Without `top` the full vectors are compared, as the papers do.
    """
    x, y = _pair(a, b, top, by)
    if top is not None and (len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0):
        return float("nan")
    den = np.linalg.norm(x) * np.linalg.norm(y)
    return float(x @ y / den) if den > 0 else float("nan")


def pearson(a, b, top: Optional[int] = None, by=None) -> float:
    """Pearson correlation of two score vectors (optionally on the `top` samples by `by`, default b)."""
    x, y = _pair(a, b, top, by)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties given their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def spearman(a, b, top: Optional[int] = None, by=None) -> float:
    """Spearman rank correlation (Pearson of the ranks, ties averaged), like `pearson`; infinite
    entries take part (ranked last or first), NaN ones do not."""
    x, y = _pair(a, b, top, by, ranks=True)
    return pearson(_ranks(x), _ranks(y)) if len(x) >= 2 else float("nan")


def _top_membership(x: np.ndarray, k: int) -> np.ndarray:
    """P(sample in the top k of x) when ties at the k-th value are broken at random."""
    v = np.sort(x)[::-1][k - 1]
    above, tied = x > v, x == v
    p = above.astype(np.float64)
    p[tied] = (k - above.sum()) / tied.sum()
    return p


def top_k_overlap(a, b, k: int) -> float:
    """Fraction of the `k` samples ranked highest by `a` that are among the `k` highest by `b`
    (entries that are not NaN in both only; k is capped at their number), ties at the k-th value
    broken at random (the expectation is returned). A rank measure that stays defined when `b` is
    constant on its top k; chance level is k / N.
    """
    x, y = _pair(a, b, None, None, ranks=True)
    k = min(int(k), len(x))
    if k < 1:
        return float("nan")
    return float(_top_membership(x, k) @ _top_membership(y, k) / k)


def split_half_reliability(half_a, half_b) -> float:
    """Reliability of an estimate that averages two independent halves `half_a`, `half_b` [N].

    The Spearman–Brown formula 2r / (1 + r) on r = Pearson(half_a, half_b): the expected
    correlation of the full estimate with another one made the same way. Its square root bounds
    the Pearson correlation any score can reach with the estimate, whatever the score. 0 when the
    halves do not correlate positively (no signal above the noise); NaN when no sample has a
    finite value in both halves.
    """
    r = pearson(half_a, half_b)
    return 2.0 * r / (1.0 + r) if r > 0 else (0.0 if r == r else float("nan"))
