"""The Feldman–Zhang stability memorization estimator: the costly reference CSL is judged by.

K models, each trained on a random subset (70% by default) of the data;
    mem(i) = P(correct on i | i in the subset) - P(correct on i | i held out),
estimated by counting over the K models. Resumable: the counts are saved after every model.

The counts of the odd-numbered models are also kept apart, so the estimate can be split into
two independent halves (even / odd models): their correlation is the split-half reliability of
the estimate, the ceiling on how well any score can agree with it.
"""

import os
import time
import zlib
from typing import Callable, Dict, Optional

import torch
from torch.utils.data import Dataset

from .._checkpoint import atomic_save, load_plain
from . import require
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
            run resumes from it (the same data, labels, subset, seed, architecture and training
            settings are required, else ValueError; a larger `k` extends a finished run).

    Returns: float64 [N] tensors "memorization", "p_in", "p_out", "n_in", "n_out", and 0-dim
        "seconds" (training + evaluation time summed over sessions) and "models" (models trained);
        "memorization_halves", float64 [2, N], the estimate from the even- and from the
        odd-numbered models alone (absent when resuming a checkpoint written before they were kept).
        Samples never held out (or never included) get NaN memorization.
    """
    tqdm = require("tqdm.auto").tqdm

    if not 0.0 < subset < 1.0:
        raise ValueError(f"subset must be in (0, 1), got {subset}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cfg = cfg or TrainConfig()
    n = len(dataset)
    labels = labels_of(dataset)
    # labels in the key: a checkpoint of other (e.g. differently corrupted) labels is never resumed
    # and the training recipe: models of another recipe (epochs, lr, architecture) are never mixed in
    meta = {
        "n": n,
        "subset": subset,
        "seed": seed,
        "labels_crc32": zlib.crc32(torch.as_tensor(labels, dtype=torch.int64).numpy().tobytes()),
        "train": {f: getattr(cfg, f) for f in ("epochs", "batch_size", "lr", "momentum", "weight_decay")},
        "model_crc32": zlib.crc32(repr(model_fn()).encode()),
    }
    state = {
        "done": 0,
        "seconds": 0.0,
        **{key: torch.zeros(n) for key in _COUNTS},
        **{f"odd_{key}": torch.zeros(n) for key in _COUNTS},
    }
    if checkpoint and os.path.exists(checkpoint):
        # weights_only: a checkpoint is data; one holding a pickled callable is refused, never run
        saved = load_plain(checkpoint, "stability checkpoint")
        if saved.get("meta") != meta:
            raise ValueError(f"checkpoint {checkpoint} is for {saved.get('meta')}, this run is {meta}")
        state = saved["state"]

    bar = tqdm(
        range(state["done"], k),
        desc="stability models",
        initial=min(state["done"], k),
        total=k,
        disable=not progress,
    )
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
        step = {
            "in_total": inside.double(),
            "in_correct": correct * inside,
            "out_total": (~inside).double(),
            "out_correct": correct * (~inside),
        }
        for key, inc in step.items():
            state[key] += inc
            if m % 2 == 1 and f"odd_{key}" in state:
                state[f"odd_{key}"] += inc
        state["seconds"] += time.perf_counter() - t0
        state["done"] = m + 1
        if checkpoint:
            atomic_save({"meta": meta, "state": state}, checkpoint)

    p_in = state["in_correct"] / state["in_total"]
    p_out = state["out_correct"] / state["out_total"]
    out = {
        "memorization": (p_in - p_out).double(),
        "p_in": p_in.double(),
        "p_out": p_out.double(),
        "n_in": state["in_total"].double(),
        "n_out": state["out_total"].double(),
        "seconds": torch.tensor(state["seconds"], dtype=torch.float64),
        "models": torch.tensor(state["done"]),
    }
    if "odd_in_total" in state:
        odd = [state[f"odd_{key}"].double() for key in _COUNTS]
        even = [state[key].double() - o for key, o in zip(_COUNTS, odd)]
        out["memorization_halves"] = torch.stack([_mem(*even), _mem(*odd)])
    return out


_COUNTS = ("in_correct", "in_total", "out_correct", "out_total")


def _mem(in_correct, in_total, out_correct, out_total) -> torch.Tensor:
    return in_correct / in_total - out_correct / out_total
