"""The dataset wrapper the core needs: items ``(x, y, index)``, the index ``memcore.accumulate``
expects. The readers of published datasets (digits, MNIST, CIFAR) and the controlled corruptions
(label noise, duplicates) are in the harness: ``memcore.eval.datasets``, ``memcore.eval.corruptions``.
"""

import operator
from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.data import Dataset

from ._validate import as_int

__all__ = ["IndexedDataset"]


class IndexedDataset(Dataset):
    """In-memory dataset whose items are ``(x[i], y[i], i)``.

    Args:
        x: inputs, float tensor [N, ...] (the loaders give float32 in [0, 1]).
        y: class labels, integer tensor [N] (stored as int64).
        num_classes: number of classes; default ``y.max() + 1``.
        name: a short name for logs and plots.
        meta: free-form record of where the data came from and what was done to it
            (``inject_label_noise`` adds ``meta["noise"]``, ``inject_duplicates`` adds
            ``meta["duplicates"]``).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: Optional[int] = None,
        name: str = "dataset",
        meta: Optional[Dict[str, Any]] = None,
    ) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"x and y must be torch.Tensors, got {type(x).__name__} and {type(y).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer tensor of class ids, got {y.dtype}")
        if x.dim() < 1 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x must be [N, ...] and y [N] with the same N, got x {tuple(x.shape)} and y {tuple(y.shape)}"
            )
        y = y.long()
        if num_classes is None:
            num_classes = int(y.max()) + 1 if y.numel() else 0
        num_classes = as_int(num_classes, "num_classes", minimum=0)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]"
            )
        self.x = x
        self.y = y
        self.num_classes = num_classes
        self.name = name
        self.meta: Dict[str, Any] = dict(meta) if meta else {}

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} of length {n}")
        return self.x[i], self.y[i], i

    def __repr__(self) -> str:
        return (
            f"IndexedDataset(name={self.name!r}, n={len(self)}, x={tuple(self.x.shape)} "
            f"{self.x.dtype}, num_classes={self.num_classes}, meta_keys={sorted(self.meta)})"
        )
