"""The Feldman–Zhang stability memorization estimator: the costly reference CSL is judged by.

K models, each trained on a random subset (70% by default) of the data;
    mem(i) = P(correct on i | i in the subset) - P(correct on i | i held out),
estimated by counting over the K models. Resumable: the counts are saved after every model.
"""
import os
import time
import zlib
from typing import Callable, Dict, Optional

import torch
from torch.utils.data import Dataset

from ._io import atomic_save
from .training import TrainConfig, labels_of, predict, train


def stability(
    dataset: Dataset,
    model_fn: Callable[[], torch.nn.Module],
    *,
    k: int = 8,
    subset: float = 0.7,
    cfg: Optional[TrainConfig] = None,
    seed: int = 0,
    checkpoint: Optional[str] = None,
    progress: bool = True,
) -> Dict[str, torch.Tensor]:
    """Trains `k` models (each `model_fn()`, trained with `cfg`) on random `subset` fractions.

    Args:
        dataset: yields (x, y, index); labels are the (possibly corrupted) training labels.
        checkpoint: path of a file to save the counts to after each model; if it exists, the
            run resumes from it (same dataset size, subset and seed are required; a larger `k`
            extends a finished run).

    Returns: float64 [N] tensors "memorization", "p_in", "p_out", "n_in", "n_out", and 0-dim
        "seconds" (training + evaluation time summed over sessions) and "models" (models trained).
        Samples never held out (or never included) get NaN memorization.
    """
    from tqdm.auto import tqdm

    if not 0.0 < subset < 1.0:
        raise ValueError(f"subset must be in (0, 1), got {subset}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cfg = cfg or TrainConfig()
    n = len(dataset)
    labels = labels_of(dataset)
    # labels in the key: a checkpoint of other (e.g. differently corrupted) labels is never resumed
    meta = {"n": n, "subset": subset, "seed": seed,
            "labels_crc32": zlib.crc32(torch.as_tensor(labels, dtype=torch.int64).numpy().tobytes())}
    state = {"done": 0, "seconds": 0.0, "in_total": torch.zeros(n), "in_correct": torch.zeros(n),
             "out_total": torch.zeros(n), "out_correct": torch.zeros(n)}
    if checkpoint and os.path.exists(checkpoint):
        saved = torch.load(checkpoint)
        if saved.get("meta") != meta:
            raise ValueError(f"checkpoint {checkpoint} is for {saved.get('meta')}, this run is {meta}")
        state = saved["state"]

    bar = tqdm(range(state["done"], k), desc="stability models", initial=min(state["done"], k), total=k,
               disable=not progress)
    for m in bar:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed * 100003 + m)
        chosen = torch.randperm(n, generator=g)[: int(round(subset * n))]
        inside = torch.zeros(n, dtype=torch.bool)
        inside[chosen] = True
        torch.manual_seed(seed * 100003 + m)
        model = model_fn()
        mcfg = TrainConfig(**{**cfg.__dict__, "seed": seed * 100003 + m, "progress": False})
        train(model, dataset, mcfg, indices=chosen.tolist())
        correct = (predict(model, dataset).argmax(1) == labels).double()
        state["in_total"] += inside.double()
        state["in_correct"] += correct * inside
        state["out_total"] += (~inside).double()
        state["out_correct"] += correct * (~inside)
        state["seconds"] += time.perf_counter() - t0
        state["done"] = m + 1
        if checkpoint:
            atomic_save({"meta": meta, "state": state}, checkpoint)

    p_in = state["in_correct"] / state["in_total"]
    p_out = state["out_correct"] / state["out_total"]
    return {
        "memorization": (p_in - p_out).double(),
        "p_in": p_in.double(), "p_out": p_out.double(),
        "n_in": state["in_total"].double(), "n_out": state["out_total"].double(),
        "seconds": torch.tensor(state["seconds"], dtype=torch.float64),
        "models": torch.tensor(state["done"]),
    }
