"""Controlled corruptions with ground truth for judging memorization scores: flipped labels and
duplicates with a conflicting label.

    noisy, flipped = inject_label_noise(ds, 0.1)
    dup, is_dup = inject_duplicates(ds, 50)
"""

import copy
from typing import Tuple

import numpy as np
import torch

from ..data import IndexedDataset

__all__ = ["inject_label_noise", "inject_duplicates"]


def _other_labels(y: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A label uniform over the classes other than y (y int64 [n] on CPU)."""
    offset = torch.randint(1, num_classes, y.shape, generator=gen)
    return (y + offset) % num_classes


def _check_corruptible(ds: IndexedDataset, key: str, what: str) -> None:
    if not isinstance(ds, IndexedDataset):
        raise TypeError(f"ds must be an IndexedDataset, got {type(ds).__name__}")
    if ds.num_classes < 2:
        raise ValueError(f"{what} needs at least 2 classes, {ds.name} has {ds.num_classes}")
    if key in ds.meta:
        raise ValueError(f"{ds.name} already has meta[{key!r}]; apply {what} once, to the clean dataset")


def inject_label_noise(ds: IndexedDataset, rate: float, seed: int = 0) -> Tuple[IndexedDataset, torch.Tensor]:
    """Symmetric label noise: exactly ``round(rate * N)`` samples, chosen at random, get a label
    drawn uniformly from the other ``num_classes - 1`` classes.

    Returns ``(noisy, flipped)``: a new dataset (``ds`` is not modified; ``x`` is shared, not
    copied) and flipped, bool [N]. ``noisy.meta["noise"]`` = ``{"rate", "seed",
    "flipped_indices" (int64 [k], sorted), "original_labels" (int64 [k], aligned with
    flipped_indices)}``. Deterministic given ``seed``.
    """
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    _check_corruptible(ds, "noise", "inject_label_noise")
    n = len(ds)
    k = int(round(rate * n))
    gen = torch.Generator().manual_seed(int(seed))
    y_cpu = ds.y.cpu()
    idx = torch.randperm(n, generator=gen)[:k].sort().values
    original = y_cpu[idx].clone()
    y_new = y_cpu.clone()
    y_new[idx] = _other_labels(original, ds.num_classes, gen)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[idx] = True
    meta = copy.deepcopy(ds.meta)
    meta["noise"] = {"rate": rate, "seed": int(seed), "flipped_indices": idx, "original_labels": original}
    noisy = IndexedDataset(
        ds.x, y_new.to(ds.y.device), num_classes=ds.num_classes, name=f"{ds.name}+noise{rate:g}", meta=meta
    )
    return noisy, flipped


def inject_duplicates(ds: IndexedDataset, k: int, seed: int = 0) -> Tuple[IndexedDataset, torch.Tensor]:
    """Appends copies of ``k`` distinct random samples, each relabelled uniformly among the other
    classes (a conflicting duplicate can only be fit by memorizing it).

    Returns ``(dup, is_dup)``: a new dataset of N + k samples (the originals first, unchanged, then
    the copies) and is_dup, bool [N + k], True on the appended copies. ``dup.meta["duplicates"]``
    = ``{"k", "seed", "source_indices" (int64 [k]: copy N + j is of sample source_indices[j])}``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    _check_corruptible(ds, "duplicates", "inject_duplicates")
    n = len(ds)
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}] (distinct source samples), got {k}")
    gen = torch.Generator().manual_seed(int(seed))
    src = torch.randperm(n, generator=gen)[:k]
    new_labels = _other_labels(ds.y.cpu()[src], ds.num_classes, gen)
    x = torch.cat([ds.x, ds.x[src.to(ds.x.device)]])
    y = torch.cat([ds.y, new_labels.to(ds.y.device)])
    is_dup = torch.zeros(n + k, dtype=torch.bool)
    is_dup[n:] = True
    meta = copy.deepcopy(ds.meta)
    meta["duplicates"] = {"k": k, "seed": int(seed), "source_indices": src}
    dup = IndexedDataset(x, y, num_classes=ds.num_classes, name=f"{ds.name}+dup{k}", meta=meta)
    return dup, is_dup
