"""The dataset index ``memcore.accumulate`` expects: ``with_index(dataset)`` makes any map-style
dataset's items carry their index, ``IndexedDataset`` holds tensors and yields ``(x, y, index)``.
The readers of published datasets (digits, MNIST, CIFAR) and the controlled corruptions (label
noise, duplicates) are in the harness: ``memcore.eval.datasets``, ``memcore.eval.corruptions``.
"""

import operator
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, IterableDataset

from ._validate import as_int

__all__ = ["IndexedDataset", "WithIndex", "with_index"]


class WithIndex(Dataset):
    """``dataset`` whose items carry their index; made by :func:`with_index`."""

    def __init__(self, dataset, key: str = "sample_index") -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "dataset is an IterableDataset: its items have no fixed index, so with_index needs a "
                "map-style dataset (__len__ and __getitem__); number an iterable's items where it "
                "yields them, with the same number every epoch"
            )
        missing = [m for m in ("__len__", "__getitem__") if not hasattr(dataset, m)]
        if missing:
            raise TypeError(
                f"dataset must be a map-style dataset with __len__ and __getitem__; "
                f"{type(dataset).__name__} has no {' or '.join(missing)}"
            )
        if not isinstance(key, str):
            raise TypeError(f"key must be a str (the dict key of the index), got {type(key).__name__}")
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def _position(self, i) -> int:
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"index must be an int, got {type(i).__name__}") from None
        n = len(self.dataset)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of length {n}")
        return i + n if i < 0 else i

    def _attach(self, item, i: int):
        if isinstance(item, tuple):
            return item + (i,)
        if isinstance(item, list):
            return item + [i]
        if isinstance(item, Mapping):
            if self.key in item:
                raise ValueError(
                    f"item {i} already holds the key {self.key!r}; pass with_index(dataset, key=...) "
                    f"with another name, or use the dataset as it is"
                )
            return {**item, self.key: i}  # a new dict: the dataset's own item is left as it was
        return (item, i)

    def __getitem__(self, i):
        i = self._position(i)
        return self._attach(self.dataset[i], i)

    def __getitems__(self, indices: Sequence[int]) -> List[Any]:
        """Batched fetch (DataLoader uses it): the wrapped dataset's own ``__getitems__`` where it has one."""
        pos = [self._position(i) for i in indices]
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(pos) if fetch is not None else [self.dataset[i] for i in pos]
        return [self._attach(item, i) for item, i in zip(items, pos)]

    def __repr__(self) -> str:
        return f"with_index({self.dataset!r}, key={self.key!r})"


def with_index(dataset, key: str = "sample_index") -> WithIndex:
    """Wraps a map-style dataset (any ``torch.utils.data.Dataset`` with ``__len__`` and
    ``__getitem__``, or any object with both) so that item ``i`` carries ``i``, the index
    ``memcore.accumulate`` and ``memcore.Tracker(num_samples=len(dataset))`` expect. No data is
    copied: items are fetched from ``dataset`` when asked for.

    - a tuple item gains the index last: ``(x, y)`` -> ``(x, y, i)`` (ImageFolder, TensorDataset);
      a list likewise (``[x, y, i]``);
    - a dict (any mapping) item becomes a new dict with ``key`` -> ``i`` added (ValueError if the
      item already has ``key``);
    - any other item becomes ``(item, i)``.

    Negative indices give the non-negative index they stand for. The DataLoader's default collate
    turns the indices into an int64 tensor ``[B]``. An ``IterableDataset`` is refused (TypeError):
    its items have no fixed index. A Hugging Face ``datasets.Dataset`` can instead store the index as
    a column: ``ds.map(lambda ex, i: {"sample_index": i}, with_indices=True)``.
    """
    return WithIndex(dataset, key)


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
