"""Checkpoint writing shared by the tracker, the stability estimator and the integrations."""
import os

import torch


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file, then an atomic rename over `path`: a crash while saving
    never destroys the previous file at `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
