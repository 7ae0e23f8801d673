"""Scores out of memcore: a pandas DataFrame / CSV, Parquet (streamed, per shard), a join onto a
Hugging Face dataset, and cleanlab's conventions (ranked issue indices, label quality scores in
[0, 1]) to feed existing data-cleaning workflows."""

import csv
import os
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from ._validate import as_float, as_int
from .scores import LOW_IS_SUSPICIOUS  # noqa: F401  (re-exported: scores suspicious when low)


def _suspicion(scores: Dict[str, torch.Tensor], by: str) -> np.ndarray:
    if by not in scores:
        raise KeyError(f"no score named {by!r}; have {sorted(scores)}")
    s = scores[by].detach().double().cpu().numpy()
    s = -s if by in LOW_IS_SUSPICIOUS else s.copy()
    s[np.isnan(s)] = -np.inf  # never-seen samples rank last
    return s


def _columns(scores: Dict[str, torch.Tensor], labels) -> Tuple[int, Optional[torch.Tensor]]:
    """Checks that every score and the labels have one entry per sample; returns (n, labels)."""
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores must be a non-empty dict of per-sample tensors (Tracker.scores())")
    lengths = {k: len(v) for k, v in scores.items()}
    n = next(iter(lengths.values()))
    if any(m != n for m in lengths.values()):
        raise ValueError(f"scores have different lengths: {lengths}")
    if labels is None:
        return n, None
    lab = torch.as_tensor(labels).cpu()
    if lab.dim() != 1 or len(lab) != n:
        raise ValueError(f"labels must have one entry per sample: shape [{n}], got {tuple(lab.shape)}")
    return n, lab


def to_dataframe(scores: Dict[str, torch.Tensor], labels: Optional[torch.Tensor] = None):
    """A pandas DataFrame with one row per sample: `index`, optionally `label`, one column per score."""
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError(
            "memcore.export.to_dataframe needs pandas: pip install 'torch-memcore[export]' (to_csv needs nothing)"
        ) from e

    n, lab = _columns(scores, labels)
    cols = {"index": np.arange(n)}
    if lab is not None:
        cols["label"] = lab.numpy()
    cols.update({k: v.detach().cpu().numpy() for k, v in scores.items()})
    return pd.DataFrame(cols)


def to_csv(scores: Dict[str, torch.Tensor], path: str, labels: Optional[torch.Tensor] = None) -> None:
    """Writes the scores as CSV (same columns as `to_dataframe`); needs no pandas. Lengths are
    checked before the file is opened: a mismatch raises ValueError and writes nothing."""
    n, lab_t = _columns(scores, labels)
    names = list(scores)
    cols = [scores[k].detach().cpu().tolist() for k in names]
    lab = lab_t.tolist() if lab_t is not None else None
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index"] + (["label"] if lab is not None else []) + names)
        for i in range(n):
            w.writerow([i] + ([lab[i]] if lab is not None else []) + [repr(c[i]) for c in cols])


def ranked_issues(
    scores: Dict[str, torch.Tensor],
    by: str = "csl",
    top: Optional[int] = None,
    fraction: Optional[float] = None,
) -> np.ndarray:
    """Sample indices ordered from most to least suspicious by score `by` — the form of
    cleanlab's ``find_label_issues(..., return_indices_ranked_by=...)``. Keep the first `top`,
    or the first `fraction` of the dataset (e.g. your estimated noise rate)."""
    if top is not None:
        top = as_int(top, "top (how many indices to keep)", minimum=0)
    s = _suspicion(scores, by)
    order = np.argsort(-s, kind="stable")
    if fraction is not None:
        top = int(round(as_float(fraction, "fraction", minimum=0.0, maximum=1.0) * len(s)))
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


# ------------------------------------------------------------------------------------------ Parquet
PARQUET_ROWS = 1 << 20  # rows per row group / per block of scores computed at a time


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "memcore.export.to_parquet needs pyarrow: pip install 'torch-memcore[export]' (or pip install pyarrow)"
        ) from e
    return pa, pq


def _blocks(tracker_or_scores, rows: int) -> Tuple[Iterator[Dict[str, np.ndarray]], str]:
    """Score blocks (numpy, with an int64 "index" column first) and the file stem."""
    from .tracker import Tracker

    if isinstance(tracker_or_scores, Tracker):
        tr = tracker_or_scores
        blocks = tr._score_blocks(rows)  # the collectives (flush, open epoch, dataset tau) happen here, once
        stem = "scores"
        if tr.shard:
            import torch.distributed as dist

            stem = f"scores-{dist.get_rank():05d}-of-{dist.get_world_size():05d}"

        def gen():
            for first, block in blocks:
                out = {"index": np.arange(first, first + len(block["csl"]), dtype=np.int64)}
                out.update({k: v.numpy() for k, v in block.items()})
                yield out

        return gen(), stem
    if not isinstance(tracker_or_scores, dict) or not tracker_or_scores:
        raise TypeError(
            f"to_parquet takes a memcore.Tracker or a dict of score tensors, got "
            f"{type(tracker_or_scores).__name__}"
        )
    scores = tracker_or_scores
    n = len(next(iter(scores.values())))
    for k, v in scores.items():
        if len(v) != n:
            raise ValueError(f"score {k!r} has {len(v)} rows, expected {n}")

    def gen_dict():
        index = scores.get("index")
        for lo in range(0, max(n, 1), rows):
            hi = min(lo + rows, n)
            out = {
                "index": (
                    np.arange(lo, hi, dtype=np.int64)
                    if index is None
                    else torch.as_tensor(index[lo:hi]).cpu().numpy().astype(np.int64)
                )
            }
            out.update(
                {
                    k: torch.as_tensor(v[lo:hi]).detach().cpu().numpy()
                    for k, v in scores.items()
                    if k != "index"
                }
            )
            yield out

    return gen_dict(), "scores"


def to_parquet(tracker_or_scores, directory: str, *, row_group_size: int = PARQUET_ROWS) -> str:
    """Writes scores to ``directory/<stem>.parquet``: column ``index`` (int64 sample id) and one float64
    column per score, streamed in row groups of ``row_group_size`` rows (the scores of a Tracker are
    computed block by block, so no whole-dataset table is ever built). Returns the file's path.

    Given a Tracker this is a collective under torch.distributed (like ``scores()``); a sharded
    tracker writes ``scores-<rank>-of-<world>.parquet`` on every rank, the rows it owns. The file is
    written under a temporary name and renamed. pandas, polars, Spark and ``datasets`` read the
    directory as one table (``pd.read_parquet(directory)``). Needs pyarrow (``torch-memcore[export]``)."""
    pa, pq = _pyarrow()
    row_group_size = as_int(row_group_size, "row_group_size", minimum=1)
    os.makedirs(directory, exist_ok=True)
    blocks, stem = _blocks(tracker_or_scores, row_group_size)
    path = os.path.join(directory, f"{stem}.parquet")
    tmp = f"{path}.tmp{os.getpid()}"
    writer = None
    try:
        for block in blocks:
            table = pa.table(block)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table, row_group_size=row_group_size)
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_parquet(directory: str) -> Dict[str, torch.Tensor]:
    """The scores of every ``*.parquet`` file under ``directory`` as tensors (``index`` int64, scores
    float64), sorted by index. For small datasets: it reads everything into memory."""
    pa, pq = _pyarrow()
    files = sorted(f for f in os.listdir(directory) if f.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no .parquet files under {directory!r}")
    table = pa.concat_tables([pq.read_table(os.path.join(directory, f)) for f in files])
    cols = {name: torch.from_numpy(table.column(name).to_numpy().copy()) for name in table.column_names}
    order = torch.argsort(cols["index"])
    return {k: v[order] for k, v in cols.items()}


def gather_scores(tracker, dst: int = 0) -> Optional[Dict[str, torch.Tensor]]:
    """All shards' scores of a sharded tracker on rank ``dst``, as one dict over every sample (with
    ``"index"`` = 0..N-1); None on the other ranks. A collective (call on every rank). It holds the
    whole dataset's scores on ``dst`` (about 100 bytes per sample): for small N. Unsharded trackers
    already hold everything: their ``scores()`` is returned."""
    dst = as_int(dst, "dst", minimum=0)
    if not tracker.shard:
        return tracker.scores()
    import torch.distributed as dist

    from . import _shard

    s = tracker.scores()
    names = [k for k in s if k != "index"]
    world, rank = dist.get_world_size(), dist.get_rank()
    chunk = _shard.chunk_of(tracker.num_samples, world)
    block = torch.full((chunk, len(names)), float("nan"), dtype=torch.float64)
    n = len(s["index"])
    block[:n] = torch.stack([s[k] for k in names], 1)
    block = block.to(tracker.device)
    got = [torch.empty_like(block) for _ in range(world)] if rank == dst else None
    dist.gather(block, got, dst=dst)
    if rank != dst:
        return None
    full = torch.cat(
        [
            g.cpu()[: e - b]
            for g, (b, e) in zip(got, (_shard.range_of(tracker.num_samples, world, r) for r in range(world)))
        ]
    )
    out = {k: full[:, j].clone() for j, k in enumerate(names)}
    out["index"] = torch.arange(tracker.num_samples, dtype=torch.int64)
    return out


def join_scores(dataset, scores, *, index_column: Optional[str] = None, prefix: str = ""):
    """A Hugging Face ``datasets.Dataset`` with one column per score added, matched by sample id: row i
    gets the scores of id i, or of id ``dataset[index_column][i]`` when given. ``scores``: a dict of
    tensors (``"index"`` optional: without it row k of each tensor is id k) or a directory written by
    ``to_parquet``. Rows whose id has no score get NaN. Needs ``datasets``."""
    try:
        import datasets  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "memcore.export.join_scores needs the `datasets` package (pip install datasets)"
        ) from e
    if isinstance(scores, (str, os.PathLike)):
        scores = read_parquet(str(scores))
    n_scores = len(next(iter(scores.values())))
    ids = (
        np.asarray(scores["index"], dtype=np.int64)
        if "index" in scores
        else np.arange(n_scores, dtype=np.int64)
    )
    rows = (
        np.asarray(dataset[index_column], dtype=np.int64)
        if index_column is not None
        else np.arange(len(dataset), dtype=np.int64)
    )
    size = int(max(ids.max(initial=-1), rows.max(initial=-1))) + 1
    if (rows < 0).any():
        raise ValueError(f"dataset column {index_column!r} holds negative sample ids")
    out = dataset
    for k, v in scores.items():
        if k == "index":
            continue
        full = np.full(size, np.nan)
        full[ids] = torch.as_tensor(v).double().cpu().numpy()
        out = out.add_column(prefix + k, full[rows])
    return out
