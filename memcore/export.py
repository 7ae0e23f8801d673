"""Scores out of memcore: a pandas DataFrame / CSV, Parquet (streamed, per shard), a join onto a
Hugging Face dataset, and cleanlab's conventions (ranked issue indices, label quality scores in
[0, 1]) to feed existing data-cleaning workflows."""

import csv
import json
import os
import re
import uuid
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from ._validate import as_float, as_int, is_int
from .scores import LOW_IS_SUSPICIOUS  # noqa: F401  (re-exported: scores suspicious when low)


def _suspicion(scores: Dict[str, torch.Tensor], by: str) -> np.ndarray:
    if by not in scores or by == "index":
        raise KeyError(f"no score named {by!r}; have {sorted(k for k in scores if k != 'index')}")
    s = scores[by].detach().double().cpu().numpy()
    s = -s if by in LOW_IS_SUSPICIOUS else s.copy()
    s[np.isnan(s)] = -np.inf  # never-seen samples rank last
    return s


def _ids(values, what: str) -> np.ndarray:
    """Sample ids as int64 numpy [n]: integers, none negative, none repeated (ValueError naming `what`)."""
    a = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ValueError(f"{what} must be a 1-D array of integer sample ids, got {a.dtype}{list(a.shape)}")
    a = a.astype(np.int64)
    if (a < 0).any():
        raise ValueError(f"{what} holds negative sample ids (first: {int(a[a < 0][0])})")
    u, counts = np.unique(a, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{what} holds sample id {int(u[counts > 1][0])} more than once")
    return a


def _columns(scores: Dict[str, torch.Tensor], labels) -> Tuple[np.ndarray, Optional[torch.Tensor]]:
    """Checks that every score, the ids under "index" and the labels have one entry per row; returns
    (sample ids: scores["index"], or 0..n-1 without it, labels)."""
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores must be a non-empty dict of per-sample tensors (Tracker.scores())")
    lengths = {k: len(v) for k, v in scores.items()}
    n = next(iter(lengths.values()))
    if any(m != n for m in lengths.values()):
        raise ValueError(f"scores have different lengths: {lengths}")
    ids = _ids(scores["index"], 'scores["index"]') if "index" in scores else np.arange(n, dtype=np.int64)
    if labels is None:
        return ids, None
    lab = torch.as_tensor(labels).cpu()
    if lab.dim() != 1 or len(lab) != n:
        raise ValueError(f"labels must have one entry per sample: shape [{n}], got {tuple(lab.shape)}")
    return ids, lab


def to_dataframe(scores: Dict[str, torch.Tensor], labels: Optional[torch.Tensor] = None):
    """A pandas DataFrame with one row per sample: `index` (the sample id: ``scores["index"]`` when
    present, as a shard's scores have, else the row number), optionally `label`, one column per score."""
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError(
            "memcore.export.to_dataframe needs pandas: pip install 'torch-memcore[export]' (to_csv needs nothing)"
        ) from e

    ids, lab = _columns(scores, labels)
    cols = {"index": ids}
    if lab is not None:
        cols["label"] = lab.numpy()
    cols.update({k: v.detach().cpu().numpy() for k, v in scores.items() if k != "index"})
    return pd.DataFrame(cols)


def to_csv(scores: Dict[str, torch.Tensor], path: str, labels: Optional[torch.Tensor] = None) -> None:
    """Writes the scores as CSV (same columns as `to_dataframe`); needs no pandas. Lengths and ids are
    checked before the file is opened: a mismatch raises ValueError and writes nothing."""
    ids, lab_t = _columns(scores, labels)
    names = [k for k in scores if k != "index"]
    cols = [scores[k].detach().cpu().tolist() for k in names]
    lab = lab_t.tolist() if lab_t is not None else None
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index"] + (["label"] if lab is not None else []) + names)
        for i, sid in enumerate(ids.tolist()):
            w.writerow([sid] + ([lab[i]] if lab is not None else []) + [repr(c[i]) for c in cols])


def ranked_issues(
    scores: Dict[str, torch.Tensor],
    by: str = "csl",
    top: Optional[int] = None,
    fraction: Optional[float] = None,
) -> np.ndarray:
    """Sample ids ordered from most to least suspicious by score `by` — the form of cleanlab's
    ``find_label_issues(..., return_indices_ranked_by=...)``: ``scores["index"]`` when present (a
    shard's scores, or a read Parquet export), else the row numbers. Keep the first `top`, or the first
    `fraction` of the rows (e.g. your estimated noise rate)."""
    if top is not None:
        top = as_int(top, "top (how many indices to keep)", minimum=0)
    ids, _ = _columns(scores, None)
    s = _suspicion(scores, by)
    order = np.argsort(-s, kind="stable")
    if fraction is not None:
        top = int(round(as_float(fraction, "fraction", minimum=0.0, maximum=1.0) * len(s)))
    return ids[order if top is None else order[:top]]


def label_quality_scores(scores: Dict[str, torch.Tensor], by: str = "csl") -> np.ndarray:
    """cleanlab's convention: a quality in [0, 1] per sample, lower = more likely a label issue.

    It is a percentile rank, not a calibrated probability: 1 - the sample's suspicion percentile
    under score `by`, so it is uniform on [0, 1] by construction whatever the data (thresholding at
    0.5 flags half the dataset). Pick a cut-off from your estimated noise rate instead, e.g.
    ``ranked_issues(scores, fraction=rate)``. float64 [n], one per row of `scores` (whose sample ids
    are ``scores["index"]`` when present)."""
    s = _suspicion(scores, by)
    ranks = np.empty(len(s))
    ranks[np.argsort(s, kind="stable")] = np.arange(len(s))
    return 1.0 - ranks / max(len(s) - 1, 1)


# ------------------------------------------------------------------------------------------ Parquet
PARQUET_ROWS = 1 << 20  # rows per row group / per block of scores computed at a time
# every file to_parquet writes says, in its schema metadata under this key, which export it belongs to
# (a token per export), its part and the number of parts: read_parquet refuses anything else
PARQUET_KEY = b"memcore.scores"
PARQUET_FORMAT = "memcore-scores"
# the file names to_parquet writes (one export's parts, or the file of an unsharded one)
_PARQUET_NAME = re.compile(r"scores(-\d{5}-of-\d{5})?\.parquet")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "memcore.export.to_parquet needs pyarrow: pip install 'torch-memcore[export]' (or pip install pyarrow)"
        ) from e
    return pa, pq


def _blocks(tracker_or_scores, rows: int) -> Tuple[Iterator[Dict[str, np.ndarray]], Optional[int]]:
    """Score blocks (numpy, with an int64 "index" column first), and num_samples when known."""
    from .tracker import Tracker

    if isinstance(tracker_or_scores, Tracker):
        tr = tracker_or_scores
        # the collectives (flush, open epoch, dataset tau) happen here, once
        blocks = tr._score_blocks(rows, "export.to_parquet()")

        def gen():
            for first, block in blocks:
                out = {"index": np.arange(first, first + len(block["csl"]), dtype=np.int64)}
                out.update({k: v.numpy() for k, v in block.items()})
                yield out

        return gen(), tr.num_samples
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
    ids, _ = _columns(scores, None)

    def gen_dict():
        for lo in range(0, max(n, 1), rows):
            hi = min(lo + rows, n)
            out = {"index": ids[lo:hi]}
            out.update(
                {
                    k: torch.as_tensor(v[lo:hi]).detach().cpu().double().numpy()
                    for k, v in scores.items()
                    if k != "index"
                }
            )
            yield out

    return gen_dict(), None


def _export_token(tracker_or_scores) -> Tuple[str, int, int, Any]:
    """(token naming this export, this writer's part, number of parts, the tracker's device when the
    parts are a sharded tracker's ranks, else None). Sharded: a collective (rank 0's token)."""
    from .tracker import Tracker

    tr = tracker_or_scores
    if isinstance(tr, Tracker) and tr.shard:
        import torch.distributed as dist

        from . import _checkpoint

        return _checkpoint.new_token(tr.device), dist.get_rank(), dist.get_world_size(), tr.device
    return f"{uuid.uuid4().int & ((1 << 62) - 1):016x}", 0, 1, None


def _writes(tracker_or_scores) -> bool:
    """False on the ranks other than 0 of a replicated distributed tracker: every rank holds the same
    scores, rank 0 writes them."""
    from .tracker import Tracker

    if (
        isinstance(tracker_or_scores, Tracker)
        and not tracker_or_scores.shard
        and tracker_or_scores._distributed()
    ):
        import torch.distributed as dist

        return dist.get_rank() == 0
    return True


def to_parquet(tracker_or_scores, directory: str, *, row_group_size: int = PARQUET_ROWS) -> str:
    """Writes scores to ``directory/<stem>.parquet``: column ``index`` (int64 sample id) and one float64
    column per score, streamed in row groups of ``row_group_size`` rows (the scores of a Tracker are
    computed block by block, so no whole-dataset table is ever built). Returns the file's path.

    Given a sharded Tracker this is a collective (call it on every rank): each rank writes
    ``scores-<rank>-of-<world>.parquet``, the rows it owns. Any other Tracker (its flush as in
    ``scores()``; a replicated distributed tracker is written by rank 0) or a dict of scores
    (``"index"``: the sample ids, default 0..n-1) gives one ``scores.parquet``. Re-exporting into a folder replaces the previous export: every part is
    written under a hidden temporary name first, then each is renamed over its final name (once
    every rank has written its part), then the previous export's other parts are removed; files
    that are not memcore exports are left alone (``read_parquet`` refuses a folder holding them; the
    hidden temporary of an export cut short by a crash stays, unread).
    pandas, polars, Spark and ``datasets`` read the directory as one table
    (``pd.read_parquet(directory)``). Needs pyarrow (``torch-memcore[export]``)."""
    pa, pq = _pyarrow()
    row_group_size = as_int(row_group_size, "row_group_size", minimum=1)
    blocks, num_samples = _blocks(tracker_or_scores, row_group_size)
    token, part, parts, device = _export_token(tracker_or_scores)
    stem = "scores" if device is None else f"scores-{part:05d}-of-{parts:05d}"
    path = os.path.join(directory, f"{stem}.parquet")
    if not _writes(tracker_or_scores):
        return path
    tmp = os.path.join(directory, f".{stem}.parquet.tmp-{token}")
    meta = {
        "format": PARQUET_FORMAT,
        "token": token,
        "part": part,
        "parts": parts,
        "num_samples": num_samples,
    }
    err: Optional[BaseException] = None
    writer = None
    try:
        os.makedirs(directory, exist_ok=True)
        for block in blocks:
            table = pa.table(block)
            if writer is None:
                schema = table.schema.with_metadata({PARQUET_KEY: json.dumps(meta).encode()})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table.replace_schema_metadata(schema.metadata), row_group_size=row_group_size)
        writer.close()
        writer = None
    except BaseException as e:  # noqa: BLE001  (reported once the ranks agreed on failure)
        err = e
    finally:
        if writer is not None:
            writer.close()
    if device is not None:
        from . import _checkpoint

        ok = _checkpoint.all_ok(err is None, device)
    else:
        ok = err is None
    if not ok:
        if os.path.exists(tmp):
            os.remove(tmp)
        if err is not None:
            raise err
        raise RuntimeError(
            f"writing the scores to {directory!r} failed on another rank; nothing was replaced"
        )
    os.replace(tmp, path)  # the swap, part by part
    if device is not None:
        from . import _checkpoint

        _checkpoint.all_ok(True, device)  # every part is in place before the old ones go
    if part == 0:
        keep = (
            {f"scores-{r:05d}-of-{parts:05d}.parquet" for r in range(parts)} if device is not None else set()
        )
        keep.add(os.path.basename(path))
        for name in os.listdir(directory):
            stale = _PARQUET_NAME.fullmatch(name) and name not in keep
            if stale:
                try:
                    os.remove(os.path.join(directory, name))
                except OSError:
                    pass
    if device is not None:
        from . import _checkpoint

        _checkpoint.all_ok(True, device)  # nobody returns before the folder holds this export only
    return path


def read_parquet(directory: str) -> Dict[str, torch.Tensor]:
    """The scores of the export under ``directory`` (every ``*.parquet`` file there that is not hidden)
    as tensors (``index`` int64, scores float64), sorted by index. For small datasets: it reads
    everything into memory.

    Every file is checked before anything is returned: it must be a part of one ``to_parquet`` export
    (the metadata that function writes), all parts present, an int64 ``index`` column with each sample
    id once (in [0, num_samples) for a Tracker's export) and float64 score columns. A file that is not
    (another program's, a part of an earlier export) raises ValueError naming it."""
    pa, pq = _pyarrow()
    files = sorted(
        f for f in os.listdir(directory) if f.endswith(".parquet") and not f.startswith((".", "_"))
    )
    if not files:
        raise FileNotFoundError(f"no .parquet files under {directory!r}")
    tables, first, seen = [], None, {}
    for name in files:
        path = os.path.join(directory, name)
        try:
            schema = pq.read_schema(path)
            meta = json.loads((schema.metadata or {}).get(PARQUET_KEY, b"null"))
            table = pq.read_table(path)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise ValueError(f"{path} is not a readable memcore scores file: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != PARQUET_FORMAT:
            raise ValueError(
                f"{path} is not a memcore scores file (memcore.export.to_parquet writes its own "
                f"metadata); move it out of {directory!r} or read the folder with pandas"
            )
        if first is None:
            first = meta
        elif (meta.get("token"), meta.get("parts")) != (first.get("token"), first.get("parts")):
            raise ValueError(
                f"{path} belongs to another export than {files[0]} (a mixed folder: re-export into it, "
                "or remove the stale parts)"
            )
        part = meta.get("part")
        if part in seen:
            raise ValueError(f"{path} and {seen[part]} are the same part {part} of one export")
        seen[part] = path
        types = {f.name: str(f.type) for f in schema}
        bad = [k for k, t in types.items() if t != ("int64" if k == "index" else "double")]
        if "index" not in types or bad:
            raise ValueError(
                f"{path} must have an int64 'index' column and float64 score columns, got {types}"
            )
        tables.append(table)
    parts = first.get("parts")
    if not (is_int(parts) and sorted(seen) == list(range(parts))):
        raise ValueError(
            f"the export under {directory!r} has parts {sorted(seen, key=str)} of {parts!r}: some are missing"
        )
    names = [f.name for f in pq.read_schema(os.path.join(directory, files[0]))]
    if any([f.name for f in t.schema] != names for t in tables):
        raise ValueError(f"the parts of the export under {directory!r} have different columns")
    table = pa.concat_tables(tables)
    cols = {name: torch.from_numpy(table.column(name).to_numpy().copy()) for name in table.column_names}
    ids = _ids(cols["index"], f"the 'index' column of {directory!r}")
    n = first.get("num_samples")
    if n is not None and ids.size and ids.max() >= n:
        raise ValueError(
            f"the export under {directory!r} holds sample id {int(ids.max())} >= num_samples={n}"
        )
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

    world, rank = dist.get_world_size(), dist.get_rank()
    if dst >= world:
        raise ValueError(f"dst must be a rank in [0, {world}), got {dst}")
    _, s = next(tracker._score_blocks(max(tracker._end - tracker._start, 1), "export.gather_scores()"))
    names = list(s)
    chunk = _shard.chunk_of(tracker.num_samples, world)
    block = torch.full((chunk, len(names)), float("nan"), dtype=torch.float64)
    n = tracker._end - tracker._start
    block[:n] = torch.stack([s[k] for k in names], 1)
    block = block.to(tracker.device)
    got = [torch.empty_like(block) for _ in range(world)] if rank == dst else None
    with _shard.backend_errors():
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
    ``to_parquet``. Rows whose id has no score get NaN. Needs ``datasets``.

    Checked before anything is added: every column has one entry per id; the ids are integers, none
    negative or repeated; without ``index_column`` every id names a row (< len(dataset)), and the
    dataset column's ids are non-negative integers. A violation raises ValueError."""
    try:
        import datasets  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "memcore.export.join_scores needs the `datasets` package (pip install datasets)"
        ) from e
    if isinstance(scores, (str, os.PathLike)):
        scores = read_parquet(str(scores))
    ids, _ = _columns(scores, None)
    if index_column is None:
        rows = np.arange(len(dataset), dtype=np.int64)
        if ids.size and ids.max() >= len(dataset):
            raise ValueError(
                f"scores hold sample id {int(ids.max())}, beyond the dataset's {len(dataset)} rows; pass "
                "index_column= naming the dataset's column of sample ids"
            )
    else:
        col = np.asarray(dataset[index_column])
        if col.ndim != 1 or not (np.issubdtype(col.dtype, np.integer) or col.size == 0):
            raise ValueError(f"dataset column {index_column!r} must hold integer sample ids, got {col.dtype}")
        rows = col.astype(np.int64)
        if (rows < 0).any():
            raise ValueError(f"dataset column {index_column!r} holds negative sample ids")
    # row r takes the scores of id rows[r]: its position among the sorted ids, where it is one of them
    order = np.argsort(ids, kind="stable")
    pos = np.minimum(np.searchsorted(ids[order], rows), max(len(ids) - 1, 0))
    found = (ids[order][pos] == rows) if len(ids) else np.zeros(len(rows), dtype=bool)
    take = order[pos] if len(ids) else pos
    out = dataset
    for k, v in scores.items():
        if k == "index":
            continue
        vals = torch.as_tensor(v).double().cpu().numpy()
        out = out.add_column(prefix + k, np.where(found, vals[take] if len(ids) else np.nan, np.nan))
    return out
