"""The Tracker's checkpoint format, in one place: the state dict (format 2: the compact state of
memcore/_state.py as it is, plus counters), its validation, the conversion of format 1 (memcore
0.1.0), and the files - one atomically replaced file (dense), or one file per rank plus a manifest
(sharded; loadable at any world size). Files are read with ``weights_only=True``: loading never runs
code from a file. The atomic write and the plain load serve the integrations and the harness too."""

import json
import os
import pickle
import tempfile
import uuid
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _shard
from . import _state as S
from ._validate import as_float, as_int, is_int

VERSION = 2
KEYS = {
    "version",
    "num_samples",
    "epochs",
    "correct_threshold",
    "tau",
    "buffers",
    "grad_start",
    "grad_history",
}
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "memcore-tracker-shards"


# ------------------------------------------------------------------------------------------ files
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


def load_plain(path: str, what: str, mmap: bool = False):
    """torch.load with ``weights_only=True``: only tensors, numbers, strings, lists, tuples and dicts
    are rebuilt, so a file never runs code on load. A file holding anything else (a pickled
    callable, an arbitrary class), or that torch.load cannot read (cut short, another format), raises
    ValueError naming `what` and `path`. `mmap`: the tensors map the file, read only where they are
    used (a slice of a shard)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} is not a plain {what} (tensors, numbers, lists and dicts only): refused to unpickle "
            f"it, since loading it would run code or build arbitrary objects ({e})"
        ) from None
    except OSError:  # a missing or unreadable path: the OS's error names it
        raise
    except Exception as e:  # noqa: BLE001  (a cut or foreign file fails in torch.load in many ways)
        raise ValueError(
            f"{path} is not a readable {what}: cut short, damaged or not written by torch.save "
            f"({type(e).__name__}: {e})"
        ) from None


# ------------------------------------------------------------------------- a training checkpoint's folder
TRACKER_FILE = "memcore_tracker.pt"  # an unsharded tracker in a framework's checkpoint folder
TRACKER_DIR = "memcore_tracker"  # a sharded one: its shard files and manifest


def save_in_folder(tracker, folder: str, write: bool) -> str:
    """Saves `tracker` into a framework's checkpoint folder; every rank calls it (the integrations'
    save hooks run on every rank). Sharded: ``folder/memcore_tracker/`` (a collective: each rank writes
    its shard, loadable at any world size); otherwise its ``state_dict()`` (a collective only while
    rows are buffered, which every rank then is) written to ``folder/memcore_tracker.pt`` where
    `write` (rank 0). Returns the path."""
    if tracker.shard:
        path = os.path.join(folder, TRACKER_DIR)
        tracker.save(path)
        return path
    state = tracker.state_dict()
    path = os.path.join(folder, TRACKER_FILE)
    if write:
        os.makedirs(folder, exist_ok=True)
        atomic_save(state, path)
    return path


def load_from_folder(tracker, folder: str) -> None:
    """Restores `tracker` from a folder written by ``save_in_folder`` (sharded: a collective)."""
    sharded, dense = os.path.join(folder, TRACKER_DIR), os.path.join(folder, TRACKER_FILE)
    if tracker.shard != os.path.isdir(sharded) and os.path.exists(dense if tracker.shard else sharded):
        raise ValueError(
            f"{folder} holds a {'non-' if tracker.shard else ''}sharded memcore tracker checkpoint; this "
            f"tracker is {'' if tracker.shard else 'not '}sharded (save and resume with the same shard=)"
        )
    if tracker.shard:
        tracker.load(sharded)
    else:
        tracker.load_state_dict(load_plain(dense, "memcore Tracker checkpoint"))


# ------------------------------------------------------------------------------------- state dict
def make(
    num_samples: int,
    ids: Tuple[int, int],
    epochs: int,
    correct_threshold: float,
    tau: Optional[float],
    buffers: Dict[str, torch.Tensor],
    grad_start: int,
    grad_history: List[torch.Tensor],
) -> Dict[str, Any]:
    """A format-2 state dict (CPU copies): plain tensors, numbers, lists and dicts only."""
    return {
        "version": VERSION,
        "num_samples": num_samples,
        "range": list(ids),
        "epochs": epochs,
        "correct_threshold": correct_threshold,
        "tau": tau,
        "buffers": {k: v.detach().cpu().clone() for k, v in buffers.items()},
        "grad_start": grad_start,
        "grad_history": [h.clone() for h in grad_history],
    }


def validate(state: Any, num_samples: int, start: int, end: int, device: torch.device) -> Dict[str, Any]:
    """The values a Tracker holding sample ids [start, end) of num_samples assigns from `state`
    (format 1 converted first): "buffers" (contiguous copies on `device`), "epochs",
    "correct_threshold", "tau", "grad_start", "grad_history" (CPU copies). Checks keys, types, buffer
    shapes and dtypes and value ranges first; a malformed state raises ValueError. Reads `state` only."""
    if not isinstance(state, dict) or "version" not in state:
        raise ValueError("state is not a memcore Tracker state_dict")
    version = state["version"]
    if is_int(version) and version == 1:
        _check(state, 1, num_samples, 0, num_samples)
        if (start, end) != (0, num_samples):
            raise ValueError(
                f"a format-1 tracker state holds every sample id; this tracker holds {[start, end]}"
            )
        state = _from_version1(state)
    elif version != VERSION:
        raise ValueError(f"tracker state has format version {version!r}, this memcore reads {VERSION}")
    _check(state, VERSION, num_samples, start, end)
    tau = state["tau"]
    return {
        "buffers": {
            k: v.detach().to(device).clone(memory_format=torch.contiguous_format)
            for k, v in state["buffers"].items()
        },
        "epochs": as_int(state["epochs"], "epochs"),
        "correct_threshold": float(state["correct_threshold"]),
        "tau": None if tau is None else float(tau),
        "grad_start": as_int(state["grad_start"], "grad_start"),
        "grad_history": [h.detach().cpu().clone() for h in state["grad_history"]],
    }


def _int(state: Dict[str, Any], name: str, minimum: int, maximum: Optional[int] = None) -> int:
    try:
        return as_int(state[name], f"tracker state {name!r}", minimum=minimum, maximum=maximum)
    except TypeError as e:  # a malformed state is a ValueError, whatever is wrong in it
        raise ValueError(str(e)) from None


def _float(state: Dict[str, Any], name: str, **bounds) -> float:
    try:
        return as_float(state[name], f"tracker state {name!r}", **bounds)
    except TypeError as e:
        raise ValueError(str(e)) from None


def _check(state: Dict[str, Any], version: int, num_samples: int, start: int, end: int) -> None:
    """Raises ValueError unless `state` is a well-formed tracker state of format `version` for sample
    ids [start, end) of num_samples: keys, types, buffer shapes and dtypes, value ranges. Reads only."""
    optional = {"range", "token"} if version == 2 else set()
    if not KEYS <= set(state) <= KEYS | optional:
        missing, extra = sorted(KEYS - set(state)), sorted(set(state) - KEYS - optional)
        raise ValueError(f"tracker state has missing keys {missing} / unexpected keys {extra}")
    if _int(state, "num_samples", 1) != num_samples:
        raise ValueError(
            f"tracker state is for num_samples={state['num_samples']}, this tracker has {num_samples}"
        )
    rng = state.get("range", [0, num_samples])
    if not isinstance(rng, (list, tuple)) or len(rng) != 2 or not all(is_int(x) for x in rng):
        raise ValueError(f"tracker state 'range' must be two ints [start, end), got {rng!r}")
    if [int(x) for x in rng] != [start, end]:
        raise ValueError(
            f"tracker state holds sample ids {list(rng)}, this tracker holds {[start, end]} "
            f"(load a sharded checkpoint with tracker.load(path))"
        )
    epochs = _int(state, "epochs", 0, S.MAX_EPOCHS)
    _float(state, "correct_threshold", minimum=0.0, maximum=1.0, open_minimum=True)
    tau = state["tau"]
    if tau is not None:
        _float(state, "tau", minimum=0.0)
    grad_start = _int(state, "grad_start", -1, epochs)
    n = end - start
    hist = state["grad_history"]
    # one running-mean entry per epoch since grad_start; format 2 keeps them only for tau=None
    want_len = epochs - grad_start if grad_start >= 0 and (version == 1 or tau is None) else 0
    if not isinstance(hist, (list, tuple)) or len(hist) != want_len:
        raise ValueError(
            f"tracker state 'grad_history' must be a list of {want_len} tensors (one per "
            f"epoch since grad_start={grad_start}), got {type(hist).__name__} of "
            f"{len(hist) if isinstance(hist, (list, tuple)) else '?'}"
        )
    for i, h in enumerate(hist):
        if not isinstance(h, torch.Tensor) or h.dtype != torch.float32 or tuple(h.shape) != (n,):
            raise ValueError(
                f"tracker state grad_history[{i}] must be a float32 tensor [{n}], got "
                f"{getattr(h, 'dtype', type(h).__name__)}{tuple(getattr(h, 'shape', ()))}"
            )
        if bool(torch.isinf(h).any() | (h < 0).any()):  # running means of squares; NaN: none recorded
            raise ValueError(
                f"tracker state grad_history[{i}] holds values out of range (must be >= 0 or NaN)"
            )
    if version == 1:
        want = _v1_buffers(n)
    else:
        want = S.allocate(n, torch.device("meta"))
        if grad_start >= 0:
            S.add_grad_fields(want, tau is not None)
        want["errors"] = torch.empty(1, dtype=torch.int32, device="meta")
    bufs = state["buffers"]
    if not isinstance(bufs, dict) or set(bufs) != set(want):
        got = sorted(bufs) if isinstance(bufs, dict) else type(bufs).__name__
        raise ValueError(f"tracker state has buffers {got}, expected {sorted(want)}")
    for k, v in bufs.items():
        if (
            not isinstance(v, torch.Tensor)
            or v.layout != torch.strided
            or v.shape != want[k].shape
            or v.dtype != want[k].dtype
        ):
            desc = f"{v.dtype}{tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"tracker state buffer {k!r} has {desc}, expected {want[k].dtype}{tuple(want[k].shape)}"
            )
    for k, ok, what in _ranges(version, epochs, grad_start, tau):
        if not bool(ok(bufs[k])):
            raise ValueError(f"tracker state buffer {k!r} holds values out of range (must be {what})")


def _ranges(version: int, epochs: int, grad_start: int, tau: Optional[float]):
    """(buffer, predicate, description) of the value ranges of a state's buffers."""

    def between(lo: int, hi: int):
        return lambda t: ((t >= lo) & (t <= hi)).all()

    nonneg = lambda t: (t >= 0).all()
    out = [
        ("learned_since", between(-1, epochs), f"in [-1, epochs={epochs}]"),
        ("forgetting", between(0, epochs), f"in [0, epochs={epochs}]"),
        ("errors", between(0, 7), "a status word in [0, 7]"),
    ]
    if version == 1:
        out += [(k, lambda t: nonneg(t[:, V1_ROWS]), "row counts >= 0") for k in ("epoch", "total")]
        out += [
            (k, lambda t: nonneg(t[:, V1_GRAD_ROWS]), "row counts >= 0") for k in ("grad_epoch", "grad_total")
        ]
        return out
    out.append(
        (
            "counts",
            lambda t: (
                nonneg(t)
                & (t[:, S.C_CORRECT] <= t[:, S.C_ROWS]).all()
                & (t[:, S.C_CORRECT_E] <= t[:, S.C_ROWS_E]).all()
            ),
            "row counts >= 0, correct rows <= rows",
        )
    )
    out.append(("sums", _finite_sums, _FINITE_SUMS))
    if grad_start >= 0:
        out.append(("grad_sq_sum", lambda t: torch.isfinite(t).all() & nonneg(t), "finite and >= 0"))
        out.append(("grad_rows", nonneg, "row counts >= 0"))
        if tau is not None:
            out.append(("formal_since", between(-1, epochs), f"in [-1, epochs={epochs}]"))
    return out


_FINITE_SUMS = (
    "finite; the margin sums may be +inf (a row whose other logits are all -inf), never NaN or -inf"
)


def _finite_sums(t: torch.Tensor) -> torch.Tensor:
    margin = t[:, S.S_MARGIN]
    rest = t[:, [S.S_LOSS, S.S_LAST, S.S_PROB, S.S_PROB_SQ]]
    return torch.isfinite(rest).all() & ~(margin.isnan() | (margin == float("-inf"))).any()


# -------------------------------------------------------------------------------------- format 1
# float64 [S, 6] per-epoch ("epoch") and closed-epoch ("total") sums, and [S, 2] input-gradient sums
V1_LOSS_SUM, V1_ROWS, V1_CORRECT, V1_PROB_SUM, V1_PROB_SQ_SUM, V1_MARGIN_SUM = range(6)
V1_GRAD_SQ_SUM, V1_GRAD_ROWS = range(2)


def _v1_buffers(n: int) -> Dict[str, torch.Tensor]:
    """The buffers of format 1, as meta tensors (shape and dtype only)."""
    f64, meta = torch.float64, torch.device("meta")
    return {
        "epoch": torch.empty(n, 6, dtype=f64, device=meta),
        "total": torch.empty(n, 6, dtype=f64, device=meta),
        "last_loss": torch.empty(n, dtype=f64, device=meta),
        "prev_correct": torch.empty(n, dtype=torch.bool, device=meta),
        "forgetting": torch.empty(n, dtype=torch.int64, device=meta),
        "learned_since": torch.empty(n, dtype=torch.int64, device=meta),
        "errors": torch.empty(1, dtype=torch.int32, device=meta),
        "grad_epoch": torch.empty(n, 2, dtype=f64, device=meta),
        "grad_total": torch.empty(n, 2, dtype=f64, device=meta),
    }


def _from_version1(state: Dict[str, Any]) -> Dict[str, Any]:
    """A checked format-1 state dict in format 2."""
    b, history, grad_start, tau = state["buffers"], state["grad_history"], state["grad_start"], state["tau"]
    e, t = b["epoch"], b["total"]
    n = t.shape[0]
    st = S.allocate(n, torch.device("cpu"))
    sums, counts = st["sums"], st["counts"]
    sums[:, S.S_LOSS] = t[:, V1_LOSS_SUM]
    sums[:, S.S_LAST] = torch.where(e[:, V1_ROWS] > 0, e[:, V1_LOSS_SUM], b["last_loss"].nan_to_num(0.0))
    for dst, src in ((S.S_PROB, V1_PROB_SUM), (S.S_PROB_SQ, V1_PROB_SQ_SUM), (S.S_MARGIN, V1_MARGIN_SUM)):
        sums[:, dst] = t[:, src] + e[:, src]
    for dst, src, buf in (
        (S.C_ROWS, V1_ROWS, t),
        (S.C_CORRECT, V1_CORRECT, t),
        (S.C_ROWS_E, V1_ROWS, e),
        (S.C_CORRECT_E, V1_CORRECT, e),
    ):
        counts[:, dst] = buf[:, src].round().to(torch.int32)
    st["forgetting"] = b["forgetting"].to(torch.int16)
    st["learned_since"] = b["learned_since"].to(torch.int16)
    if grad_start >= 0:
        g = b["grad_total"] + b["grad_epoch"]
        S.add_grad_fields(st, tau is not None)
        st["grad_sq_sum"] = g[:, V1_GRAD_SQ_SUM].clone()
        st["grad_rows"] = g[:, V1_GRAD_ROWS].round().to(torch.int32)
        if tau is not None:  # format 2 keeps the run start of a fixed tau, not the history
            since = torch.full((n,), -1, dtype=torch.int16)
            for k, h in enumerate(history):
                keep = torch.where(since >= 0, since, torch.full_like(since, grad_start + k))
                since = torch.where(h <= tau, keep, torch.full_like(since, -1))
            st["formal_since"] = since
    st["errors"] = b["errors"]
    return {
        **state,
        "version": 2,
        "range": [0, state["num_samples"]],
        "buffers": st,
        "grad_history": [] if tau is not None else list(history),
    }


# ---------------------------------------------------------------------------------------- sharded
def shard_file(token: str, rank: int, world: int) -> str:
    return f"shard-{token}-{rank:05d}-of-{world:05d}.pt"


def new_token(device: torch.device) -> str:
    """A save id chosen on rank 0 and broadcast (collective), naming this save's files."""
    import torch.distributed as dist

    t = torch.tensor([uuid.uuid4().int & ((1 << 62) - 1)], dtype=torch.int64, device=device)
    with _shard.backend_errors():
        dist.broadcast(t, src=0)
    return f"{int(t):016x}"


def all_ok(ok: bool, device: torch.device) -> bool:
    """Collective: whether `ok` holds on every rank (also a barrier)."""
    import torch.distributed as dist

    t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=device)
    with _shard.backend_errors():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def save_shards(
    path: str, shard_state: Dict[str, Any], ranges: List[Tuple[int, int]], rank: int, device
) -> None:
    """Collective: every rank writes its shard file (`shard_state`, ids ranges[rank]) under directory
    `path` (atomic rename), then rank 0 writes the manifest (atomic) naming this save's files and
    removes the previous save's files. A crash before the manifest is replaced leaves the previous
    checkpoint whole."""
    world = len(ranges)
    token = new_token(device)
    err: Optional[BaseException] = None
    try:
        os.makedirs(path, exist_ok=True)
        atomic_save({**shard_state, "token": token}, os.path.join(path, shard_file(token, rank, world)))
    except BaseException as e:  # noqa: BLE001  (reported after the ranks agreed on failure)
        err = e
    if not all_ok(err is None, device):
        if err is not None:
            raise err
        raise RuntimeError(
            f"saving the sharded tracker to {path!r} failed on another rank; the previous "
            f"checkpoint there is unchanged"
        )
    if rank == 0:
        files = [shard_file(token, r, world) for r in range(world)]
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": shard_state["version"],
            "num_samples": shard_state["num_samples"],
            "world_size": world,
            "token": token,
            "epochs": shard_state["epochs"],
            "ranges": [list(r) for r in ranges],
            "files": files,
        }
        tmp = os.path.join(path, f"{MANIFEST}.tmp{os.getpid()}-{token}")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(path, MANIFEST))
        for name in os.listdir(path):
            if name.startswith("shard-") and name.endswith(".pt") and name not in files:
                try:
                    os.remove(os.path.join(path, name))
                except OSError:
                    pass
    all_ok(True, device)  # nobody returns before the manifest names the new files


def read_manifest(path: str) -> Dict[str, Any]:
    """The manifest of the sharded checkpoint under `path`, checked: ValueError naming it when it is
    not valid UTF-8 JSON, or its fields are missing or inconsistent (world size, ranges covering
    [0, num_samples) in order, the shard file names of its token)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"{path!r} is not a sharded tracker checkpoint: {MANIFEST} is missing")
    try:
        with open(mpath, encoding="utf-8") as f:
            m = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{mpath} is not a memcore sharded-tracker manifest (not valid JSON: {e})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{mpath} is not a memcore sharded-tracker manifest")
    try:
        for key in ("num_samples", "world_size"):
            m[key] = as_int(m.get(key), f"{key!r}", minimum=1)
        token, ranges, files, world = m.get("token"), m.get("ranges"), m.get("files"), m["world_size"]
        if not (isinstance(token, str) and len(token) == 16 and all(c in "0123456789abcdef" for c in token)):
            raise ValueError(f"'token' must be 16 hex digits, got {token!r}")
        if not isinstance(ranges, list) or len(ranges) != world:
            raise ValueError(f"'ranges' must list world_size={world} ranges, got {ranges!r}")
        want = 0
        for r, rng in enumerate(ranges):
            if not (isinstance(rng, list) and len(rng) == 2 and all(is_int(x) for x in rng)):
                raise ValueError(f"range {r} must be two ints [start, end), got {rng!r}")
            if rng[0] != want or not rng[0] <= rng[1] <= m["num_samples"]:
                raise ValueError(f"range {r} {rng} does not continue the ranges before it (from {want})")
            want = rng[1]
        if want != m["num_samples"]:
            raise ValueError(f"'ranges' cover [0, {want}), not [0, num_samples={m['num_samples']})")
        if files != [shard_file(token, r, world) for r in range(world)]:
            raise ValueError(f"'files' must name the {world} shard files of token {token}, got {files!r}")
    except (TypeError, ValueError) as e:  # a malformed file is a ValueError, whatever is wrong in it
        raise ValueError(f"manifest {mpath}: {e}") from None
    return m


def load_shards(path: str, start: int, end: int, num_samples: int) -> Dict[str, Any]:
    """The state dict of sample ids [start, end) from the sharded checkpoint under `path`, whatever
    world size wrote it: the shard files overlapping the range (weights_only, memory-mapped loads),
    each checked against the manifest (save id, range) and its slice checked as a state of its own
    (keys, dtypes, shapes, value ranges), then concatenated in id order. An empty range (a rank that
    owns no ids) gives an empty state, its settings read from the first shard."""
    m = read_manifest(path)
    if m["num_samples"] != num_samples:
        raise ValueError(
            f"sharded checkpoint {path!r} is for num_samples={m['num_samples']}, this tracker has "
            f"{num_samples}"
        )
    parts = []
    for r, ((s, e), name) in enumerate(zip(m["ranges"], m["files"])):
        lo, hi = max(s, start), min(e, end)
        if lo >= hi and (start < end or parts):
            continue
        if lo > hi:  # the empty range reads its settings from the first shard, sliced to nothing
            lo = hi = s
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise FileNotFoundError(
                f"shard {r} of {m['world_size']} of checkpoint {path!r} is missing: {fpath}"
            )
        st = load_plain(fpath, "memcore Tracker shard", mmap=True)
        if not isinstance(st, dict) or st.get("token") != m["token"] or list(st.get("range", [])) != [s, e]:
            raise ValueError(
                f"shard file {fpath} does not belong to this checkpoint (save id or range "
                f"differs from {MANIFEST}): a mixed or partly overwritten checkpoint"
            )
        try:
            part = {k: v for k, v in _slice(st, lo - s, hi - s).items() if k != "token"}
            part["range"] = [lo, hi]
            part["buffers"]["errors"] = torch.zeros(1, dtype=torch.int32)  # the shards' own: not concatenated
            _check(part, VERSION, num_samples, lo, hi)
        except ValueError as err:
            raise ValueError(f"shard file {fpath}: {err}") from None
        parts.append(part)
    state = _concat(parts)
    state["range"] = [start, end]
    state["buffers"]["errors"] = torch.zeros(1, dtype=torch.int32)
    return state


def _slice(st: Dict[str, Any], lo: int, hi: int) -> Dict[str, Any]:
    """Rows [lo, hi) of a shard's state; ValueError unless each per-sample tensor has one row per id of
    the shard's range (the slice's own checks see only the slice)."""
    n = st["range"][1] - st["range"][0]
    bufs, hist = st.get("buffers"), st.get("grad_history")
    if not isinstance(bufs, dict) or not isinstance(hist, (list, tuple)):
        raise ValueError("a shard's 'buffers' must be a dict and its 'grad_history' a list")
    per_sample = [v for k, v in bufs.items() if k != "errors"] + list(hist)
    if not all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n for v in per_sample):
        raise ValueError(f"a shard of ids {list(st['range'])} must hold tensors of {n} rows")
    out = dict(st)
    out["buffers"] = {k: v[lo:hi] for k, v in bufs.items()}
    out["grad_history"] = [h[lo:hi] for h in hist]
    return out


def _concat(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One state from consecutive range slices; their scalar settings must agree."""
    first = parts[0]
    for p in parts[1:]:
        for k in ("version", "epochs", "correct_threshold", "tau", "grad_start"):
            if p[k] != first[k]:
                raise ValueError(f"shards of one checkpoint disagree on {k}: {first[k]!r} vs {p[k]!r}")
        if set(p["buffers"]) != set(first["buffers"]) or len(p["grad_history"]) != len(first["grad_history"]):
            raise ValueError("shards of one checkpoint hold different buffers")
    out = dict(first)
    out["buffers"] = {k: torch.cat([p["buffers"][k] for p in parts]) for k in first["buffers"]}
    out["grad_history"] = [
        torch.cat([p["grad_history"][i] for p in parts]) for i in range(len(first["grad_history"]))
    ]
    return out
