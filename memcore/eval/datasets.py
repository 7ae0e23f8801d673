"""Offline readers of published datasets, each returning a :class:`memcore.data.IndexedDataset`
held in memory as two tensors. Nothing here downloads anything: the readers take the original file
formats from a directory you point them at.

    ds = load_digits()                                   # bundled with scikit-learn, no files
    ds = load_mnist(default_mnist_dir(), limit=10_000)   # MNIST idx files
    ds = load_cifar("/data/cifar-10-batches-py")         # CIFAR-10 / CIFAR-100 python pickles
"""

import gzip
import importlib.util
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..data import IndexedDataset
from . import require

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["load_digits", "load_mnist", "load_cifar", "default_mnist_dir"]


def _check_limit(limit: Optional[int]) -> Optional[int]:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    return int(limit)


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


# ----------------------------------------------------------------------------- digits


def load_digits(normalize: bool = True) -> IndexedDataset:
    """scikit-learn's bundled 8x8 digits (no files needed).

    Returns 1797 samples: x float32 [1797, 1, 8, 8] (in [0, 1] when ``normalize``, else the raw
    0..16 intensities), y int64 [1797] in 0..9. Read from scikit-learn's package data without
    importing scikit-learn (seconds of scipy), through its own loader where that file is not found.
    """
    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.isfile(path):
        data = np.loadtxt(path, delimiter=",")  # 64 pixels, then the class, a row per image
        images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    else:
        bunch = require("sklearn.datasets").load_digits()
        images, target = bunch.images, bunch.target
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1)
    if normalize:
        x = x / 16.0
    y = torch.from_numpy(np.asarray(target, dtype=np.int64))
    return IndexedDataset(
        x.contiguous(), y, num_classes=10, name="digits", meta={"source": "sklearn.datasets.load_digits"}
    )


# ----------------------------------------------------------------------------- MNIST

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


def default_mnist_dir() -> Optional[Path]:
    """First existing directory of: ``$MEMCORE_MNIST_DIR``, ``<repo>/../shared/data/mnist``.

    Returns None when neither exists.
    """
    candidates: List[Path] = []
    env = os.environ.get("MEMCORE_MNIST_DIR")
    if env:
        candidates.append(Path(env).expanduser())
    repo = Path(__file__).resolve().parents[2]
    candidates.append(repo.parent / "shared" / "data" / "mnist")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def _find_idx_file(root: Path, stem: str) -> Path:
    # Accept the gzip original, the uncompressed file, and the common "train-images.idx3-ubyte"
    # spelling of some mirrors.
    dotted = stem.replace("-idx", ".idx")
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        p = root / name
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"MNIST file {stem}.gz (or uncompressed {stem}) not found in {root}; expected the "
        f"original idx files {', '.join(s + '.gz' for pair in _MNIST_FILES.values() for s in pair)}"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # corrupt gzip stream, truncated file
        raise ValueError(f"cannot read {path}: {e}") from e


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parses one idx file: big-endian int32 magic, int32 dims, uint8 data -> uint8 [dims]."""
    raw = _read_bytes(path)
    ndim = 3 if magic == _IDX_IMAGES_MAGIC else 1
    header = 4 * (1 + ndim)
    if len(raw) < 4:
        raise ValueError(f"{path} is too short for an idx header ({len(raw)} bytes)")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
        raise ValueError(
            f"{path}: bad idx magic number {got}, expected {magic} (uint8 {kind}); "
            f"is this the right file, and is it gzip-compressed only if named .gz?"
        )
    if len(raw) < header:
        raise ValueError(f"{path} is too short for an idx header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says {dims} = {expected} bytes of data, file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(root: Optional[PathLike], split: str = "train", limit: Optional[int] = None) -> IndexedDataset:
    """MNIST (or any dataset in the MNIST idx layout) from ``root``.

    Reads ``train-images-idx3-ubyte.gz`` / ``train-labels-idx1-ubyte.gz`` (split ``"train"``) or
    ``t10k-images-idx3-ubyte.gz`` / ``t10k-labels-idx1-ubyte.gz`` (``"test"``); uncompressed files
    without ``.gz`` work too. ``root=None`` uses :func:`default_mnist_dir`.

    Returns x float32 [N, 1, H, W] in [0, 1] (28x28 for MNIST), y int64 [N]; ``limit`` keeps the
    first ``limit`` samples. ``meta`` records the files read and ``header_count`` (the number of
    samples in the files, before ``limit``).

    Raises:
        FileNotFoundError: ``root`` or one of the two files is missing.
        ValueError: wrong magic number, size mismatch, or image/label counts that differ.
    """
    split = _check_split(split)
    limit = _check_limit(limit)
    if root is None:
        root = default_mnist_dir()
        if root is None:
            raise FileNotFoundError(
                "no MNIST directory given and none found: set MEMCORE_MNIST_DIR or pass root, a "
                "directory holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
            )
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"MNIST directory {root} does not exist; expected a directory holding "
            f"{', '.join(s + '.gz' for pair in _MNIST_FILES.values() for s in pair)}"
        )
    img_stem, lab_stem = _MNIST_FILES[split]
    img_path = _find_idx_file(root, img_stem)
    lab_path = _find_idx_file(root, lab_stem)
    images = _read_idx(img_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(lab_path, _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels"
        )
    total = images.shape[0]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    num_classes = max(10, int(y.max()) + 1) if y.numel() else 10
    return IndexedDataset(
        x,
        y,
        num_classes=num_classes,
        name=f"mnist-{split}",
        meta={
            "source": str(root),
            "files": [str(img_path), str(lab_path)],
            "split": split,
            "header_count": total,
        },
    )


# ----------------------------------------------------------------------------- CIFAR

_C10_DIR, _C100_DIR = "cifar-10-batches-py", "cifar-100-python"
_C10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _is_c10(d: Path) -> bool:
    return any((d / f).is_file() for f in _C10_TRAIN + ("test_batch", "batches.meta"))


def _is_c100(d: Path) -> bool:
    return any((d / f).is_file() for f in ("train", "test", "meta"))


def _resolve_cifar(root: Path) -> Tuple[Path, str]:
    if not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR directory {root} does not exist; expected the python-pickle release: "
            f"{_C10_DIR}/ (data_batch_1..5, test_batch, batches.meta) or {_C100_DIR}/ "
            f"(train, test, meta), or their parent"
        )
    if _is_c10(root):
        return root, "cifar10"
    if _is_c100(root):
        return root, "cifar100"
    found = [
        (root / sub, kind)
        for sub, kind, test in ((_C10_DIR, "cifar10", _is_c10), (_C100_DIR, "cifar100", _is_c100))
        if (root / sub).is_dir() and test(root / sub)
    ]
    if len(found) == 1:
        return found[0]
    if len(found) == 2:
        raise ValueError(f"{root} holds both {_C10_DIR} and {_C100_DIR}; pass the one you want as root")
    raise FileNotFoundError(
        f"no CIFAR data in {root}: expected CIFAR-10 files (data_batch_1..5, test_batch, "
        f"batches.meta), CIFAR-100 files (train, test, meta), or a {_C10_DIR} / {_C100_DIR} "
        f"subdirectory"
    )


def _numpy_globals() -> Dict[Tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 / numpy 1.x
    reconstruct = core.multiarray._reconstruct
    return {
        # the official release was pickled by numpy 1.x (numpy.core); numpy 2 writes numpy._core
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _CifarUnpickler(pickle.Unpickler):
    """Loads only what the official CIFAR python release contains: dicts, lists, str / bytes, ints
    and numpy arrays. Any other global (a function, a class) is refused before it is looked up, so
    a crafted file cannot run code (plain ``pickle.load`` would call whatever the file names)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _numpy_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to load the global {module}.{name}: a CIFAR batch holds only dicts, lists, "
                f"strings, bytes, numbers and numpy arrays (is this file from the official release?)"
            )
        return allowed[(module, name)]


def _unpickle(path: Path) -> Dict[Any, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} is missing")
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated, not a pickle, or a refused global
        raise ValueError(f"cannot unpickle {path}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a dict (got {type(obj).__name__})")
    return obj


def _get(d: Dict[Any, Any], key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise ValueError(f"{path} has no {key!r} entry (keys: {sorted(map(repr, d))})")


def _read_cifar_batch(path: Path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    data = np.asarray(_get(d, "data", path))
    labels = np.asarray(_get(d, label_key, path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 [n, 3072], got {data.dtype} {tuple(data.shape)}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {label_key!r} has shape {tuple(labels.shape)}")
    return data, labels.astype(np.int64)


def _label_names(path: Path, key: str) -> Optional[List[str]]:
    if not path.is_file():
        return None
    names = _get(_unpickle(path), key, path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(root: PathLike, split: str = "train", limit: Optional[int] = None) -> IndexedDataset:
    """CIFAR-10 or CIFAR-100 from the python-pickle release in ``root``; never downloads.

    ``root`` is ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``),
    ``cifar-100-python`` (``train``, ``test``, ``meta``; fine labels), or a directory containing
    one of them. The files are pickles, read by a restricted unpickler that accepts only the
    types the official release contains (a file naming any other global is refused, never run).

    Returns x float32 [N, 3, 32, 32] in [0, 1], y int64 [N] (10 or 100 classes); ``limit`` keeps
    the first ``limit`` samples (in file order). ``meta["class_names"]`` comes from the meta file
    when present.
    """
    split = _check_split(split)
    limit = _check_limit(limit)
    d, kind = _resolve_cifar(Path(root))
    if kind == "cifar10":
        files = list(_C10_TRAIN) if split == "train" else ["test_batch"]
        label_key, num_classes, meta_file, names_key = "labels", 10, "batches.meta", "label_names"
    else:
        files = [split]
        label_key, num_classes, meta_file, names_key = "fine_labels", 100, "meta", "fine_label_names"
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{kind} {split} split in {d} is missing {', '.join(missing)}")
    xs, ys, have = [], [], 0
    for f in files:
        if limit is not None and have >= limit:
            break
        data, labels = _read_cifar_batch(d / f, label_key)
        xs.append(data)
        ys.append(labels)
        have += data.shape[0]
    data, labels = np.concatenate(xs), np.concatenate(ys)
    if limit is not None:
        data, labels = data[:limit], labels[:limit]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{kind} labels in {d} must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32)).div_(255.0)
    y = torch.from_numpy(labels)
    meta: Dict[str, Any] = {"source": str(d), "split": split}
    names = _label_names(d / meta_file, names_key)
    if names is not None:
        meta["class_names"] = names
    return IndexedDataset(x, y, num_classes=num_classes, name=f"{kind}-{split}", meta=meta)
