"""Checkpoint writing shared by the tracker, the stability estimator and the integrations."""

import os
import tempfile

import torch


def _umask() -> int:
    mask = os.umask(0o022)  # os.umask can only be read by setting it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file, then an atomic rename over `path`: a crash while saving
    never destroys the previous file at `path`.

    The temporary file gets a unique name per call (mkstemp, in the target's directory so the
    rename stays on one file system): saves to one path from several threads or processes never
    share a temporary file, and the last rename wins with a complete file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp creates 0600; give the file open()'s usual mode
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_plain(path: str, what: str):
    """torch.load with ``weights_only=True``: only tensors, numbers, strings, lists, tuples and dicts
    are rebuilt, so a file never runs code on load. A file holding anything else (a pickled
    callable, an arbitrary class) raises ValueError naming `what` and `path`."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} is not a plain {what} (tensors, numbers, lists and dicts only): refused to unpickle "
            f"it, since loading it would run code or build arbitrary objects ({e})"
        ) from None
