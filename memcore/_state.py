"""The Tracker's compact per-sample state: its layout, its allocation (in memory or in memory-mapped
files), the commit of recorded rows into it and the close of an epoch. A state is a dict of tensors,
one row per sample; checkpoint format 2 (memcore/_checkpoint.py) stores these tensors as they are.

"sums", float64 [S, 5]: the sums that grow without bound or need fp64 to stay exact to rounding:
  S_LOSS    loss of the closed epochs (csl = S_LOSS + this epoch's loss, added at the epoch's close)
  S_LAST    while the sample has rows in the open epoch (C_ROWS_E > 0): that epoch's loss sum;
            otherwise the mean loss of the last epoch it was seen in (last_loss; 0 if never seen).
            One slot serves both because last_loss is only read back for samples unseen this epoch.
  S_PROB, S_PROB_SQ, S_MARGIN  running sums of p(target), p^2 and the margin over every row
"counts", int32 [S, 4]: rows and correctly predicted rows, of the closed epochs and of the open one
  (exact up to 2^31 - 1 rows per sample)
"forgetting", "learned_since": int16 [S] (epochs are capped at 32767; -1 = not learned)
with input gradients recorded (allocated on first use):
  "grad_sq_sum" float64 [S], "grad_rows" int32 [S]: running sum of squared input-gradient norms
  "formal_since" int16 [S], only with a fixed tau: the first epoch of the current run of epochs whose
  running mean of the squared norm is <= tau (-1: above tau at the last epoch). With tau=None the
  threshold is a dataset mean known only when scores are read, so the Tracker keeps the per-epoch
  running means instead (float32, CPU, 4 bytes per sample and epoch).

Commits are deterministic: every call adds the rows of one sample in a fixed order. On CUDA it
takes one ``index_put_(accumulate=True)`` per state tensor (a stable sort of the ids, then each id's
rows in row order, without atomics); on the CPU one serial ``index_add_`` per column, in row order
(the same bits as ``index_put_`` there, at half its cost: a 1-D index_add_ is a plain loop). The same rows
give bitwise the same state on one device, however often ids repeat. (Inside torch.compile on CUDA,
inductor turns index_put_ into atomic adds unless torch.use_deterministic_algorithms(True) is set.)
"""

import os
from typing import Dict, List, Optional, Tuple

import torch

S_LOSS, S_LAST, S_PROB, S_PROB_SQ, S_MARGIN = range(5)
NUM_SUMS = 5
C_ROWS, C_CORRECT, C_ROWS_E, C_CORRECT_E = range(4)
NUM_COUNTS = 4
MAX_EPOCHS = 32767  # int16 epoch fields

# columns of the float64 rows `commit` takes: the loss, then the kernels' per-row statistics in their
# order (memcore/_layout.py ROW_*)
V_LOSS, V_PROB, V_MARGIN, V_CORRECT = range(4)

State = Dict[str, torch.Tensor]


def _tensor(
    shape: Tuple[int, ...],
    dtype: torch.dtype,
    fill: float,
    device: torch.device,
    storage: Optional[str],
    name: str,
) -> torch.Tensor:
    if storage is None:
        return torch.full(shape, fill, dtype=dtype, device=device)
    # memory-mapped: the OS pages the state in and out of `storage/<name>.bin`
    numel = 1
    for d in shape:
        numel *= d
    path = os.path.join(storage, f"{name}.bin")
    try:
        t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    except (OSError, RuntimeError) as e:
        raise OSError(
            f"memcore Tracker storage: cannot map {path} ({e}); was the storage directory removed? The "
            "tracker's state so far stays readable in memory: save() it elsewhere"
        ) from None
    return t.view(shape).fill_(fill)


def allocate(n: int, device: torch.device, storage: Optional[str] = None) -> State:
    """Zeroed state for n samples (without the input-gradient fields); with `storage` (a directory,
    CPU only) each tensor is a memory-mapped file there. On the meta device: shapes and dtypes only."""
    return {
        "sums": _tensor((n, NUM_SUMS), torch.float64, 0, device, storage, "sums"),
        "counts": _tensor((n, NUM_COUNTS), torch.int32, 0, device, storage, "counts"),
        "forgetting": _tensor((n,), torch.int16, 0, device, storage, "forgetting"),
        "learned_since": _tensor((n,), torch.int16, -1, device, storage, "learned_since"),
    }


def add_grad_fields(st: State, fixed_tau: bool, storage: Optional[str] = None) -> None:
    """Adds the zeroed input-gradient fields to `st`: all of them, or (an allocation failed) none."""
    n, dev = st["sums"].shape[0], st["sums"].device
    new = {
        "grad_sq_sum": _tensor((n,), torch.float64, 0, dev, storage, "grad_sq_sum"),
        "grad_rows": _tensor((n,), torch.int32, 0, dev, storage, "grad_rows"),
    }
    if fixed_tau:
        new["formal_since"] = _tensor((n,), torch.int16, -1, dev, storage, "formal_since")
    st.update(new)


def lock_storage(directory: str):
    """An exclusive lock on a storage directory (``<directory>/lock``), held as long as the returned
    file object is open: a second Tracker on the directory, in this process or another, raises
    ValueError instead of zeroing the first one's state. The OS drops the lock when its holder closes
    the file or its process ends, so a crash leaves no stale lock behind."""
    path = os.path.join(directory, "lock")
    f = open(path, "a+b")
    try:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows
            import msvcrt

            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        f.close()
        raise ValueError(
            f"storage directory {directory!r} is in use by another live Tracker (it holds {path}); "
            "give each tracker its own directory"
        ) from None
    return f


def assign(st: State, new: State, storage: Optional[str]) -> State:
    """The state to hold after replacing `st` by the (checked) tensors `new`: `new` itself, made
    contiguous (the commits index the whole tensors), or, with `storage`, `st`'s memory-mapped files
    with `new` copied into them."""
    if storage is None:
        return {k: v.contiguous() for k, v in new.items()}
    if any(k not in st for k in new):
        add_grad_fields(st, "formal_since" in new, storage)
    for k in [k for k in st if k not in new]:
        del st[k]
    for k, v in new.items():
        st[k].copy_(v)
    return st


def nbytes(st: State, history: Optional[List[torch.Tensor]] = None) -> int:
    """Bytes held by the state's tensors (and the learning-time history, if given)."""
    out = sum(t.numel() * t.element_size() for t in st.values())
    return out + sum(h.numel() * h.element_size() for h in (history or []))


def values(loss: torch.Tensor, row_stats: torch.Tensor) -> torch.Tensor:
    """The float64 [n, 4] rows `commit` takes, from a kernel's per-row loss [n] and statistics [n, 3]."""
    return torch.cat([loss[:, None].double(), row_stats.double()], 1)


def _put(t: torch.Tensor, index: torch.Tensor, values: torch.Tensor, accumulate: bool) -> None:
    """t.index_put_((index,), values, accumulate) without its range check: the ids are in range by
    construction (masked rows point at sample 0). The check reads the ids' extremes back to the host
    on some torch versions, which a CUDA-graph capture forbids, and costs launches on every other."""
    torch.ops.aten._index_put_impl_(t, (index,), values, accumulate, True)


@torch.no_grad()
def commit(st: State, index: torch.Tensor, vals: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
    """Adds rows into the state: index int64 [n] (state-local ids), vals float64 [n, 4] (V_* columns),
    keep bool [n] (None: every row) - a row where ~keep adds nothing, whatever its index and values.
    No host sync; a fixed number of ops whatever n (see the module's note on determinism)."""
    if index.shape[0] == 0:
        return
    sums, counts = st["sums"], st["counts"]
    zero = torch.zeros((), dtype=vals.dtype, device=vals.device)
    cpu = vals.device.type == "cpu"
    if keep is None:
        cols = vals.unbind(1)
    else:  # masked rows point at sample 0 and add zeros (exactly nothing: sums are never -0.0)
        index = index * keep
        if cpu:  # on the CPU four 1-D selects cost half of one broadcast [n, 4] select
            cols = [torch.where(keep, c, zero) for c in vals.unbind(1)]
        else:  # one launch
            cols = torch.where(keep[:, None], vals, zero).unbind(1)
    loss, p, margin, correct = cols[V_LOSS], cols[V_PROB], cols[V_MARGIN], cols[V_CORRECT]
    # the epoch's first rows of a sample replace its last_loss by 0 in the shared slot. Every row of a
    # sample writes the same value, so the scatter has no conflicting writes; masked rows write what
    # sample 0's own rows write, or its value unchanged when it has none here.
    fresh = counts[:, C_ROWS_E].index_select(0, index) == 0
    if keep is not None:
        fresh = fresh & (keep | (keep & (index == 0)).any())
    flat = sums.view(-1)  # one contiguous tensor: ATen would copy a strided column view whole
    slot = index * NUM_SUMS + S_LAST
    last = torch.where(fresh, zero, flat.index_select(0, slot))
    if cpu:  # equal values per sample: the same bits in any order, at a third of index_put_'s cost
        flat.scatter_(0, slot, last)
    else:
        _put(flat, slot, last, False)
    one = torch.ones_like(index, dtype=torch.int32) if keep is None else keep.to(torch.int32)
    # S_LOSS and C_ROWS / C_CORRECT are added at the epoch's close
    _add(sums, index, {S_LAST: loss, S_PROB: p, S_PROB_SQ: p * p, S_MARGIN: margin})
    _add(counts, index, {C_ROWS_E: one, C_CORRECT_E: correct.to(torch.int32)})


def _add(t: torch.Tensor, index: torch.Tensor, columns: Dict[int, torch.Tensor]) -> None:
    """t[index[r], col] += v[r] for each column col -> v [n], every sample's rows in row order."""
    if t.device.type == "cpu":
        for col, v in columns.items():
            t[:, col].index_add_(0, index, v)
        return
    zero = torch.zeros_like(next(iter(columns.values())))
    _put(t, index, torch.stack([columns.get(c, zero) for c in range(t.shape[1])], 1), True)


@torch.no_grad()
def commit_grad(st: State, index: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor) -> None:
    """Adds squared input-gradient norms: sq [n], rows [n] (1 for a recorded row, 0 for a row to
    skip, whose sq is 0 and whose index may be anything). Deterministic, as `commit`."""
    if index.shape[0] == 0:
        return
    keep = rows != 0
    index = torch.where(keep, index, torch.zeros_like(index))
    sq = torch.where(keep, sq.double(), torch.zeros((), dtype=torch.float64, device=sq.device))
    _put(st["grad_sq_sum"], index, sq, True)
    _put(st["grad_rows"], index, keep.to(torch.int32), True)


def grad_mean(st: State) -> torch.Tensor:
    """float64 [S] running mean of the squared input-gradient norm, NaN where none was recorded."""
    rows = st["grad_rows"].double()
    return torch.where(rows > 0, st["grad_sq_sum"] / rows.clamp_min(1), torch.full_like(rows, float("nan")))


def has_open_rows(st: State) -> bool:
    return bool(st["counts"][:, C_ROWS_E].any())


@torch.no_grad()
def closed(st: State, epoch: int, correct_threshold: float, tau: Optional[float]) -> State:
    """The state after closing epoch `epoch` (0-based) from its open rows; `st` is not modified.

    A sample seen this epoch is correct when at least correct_threshold of its rows were; last_loss
    becomes the epoch's mean loss; learning_time and forgetting follow. With a fixed tau the
    learning-time-formal run is advanced for every sample that has input gradients."""
    sums, counts = st["sums"], st["counts"]
    rows_e = counts[:, C_ROWS_E].double()
    seen = rows_e > 0
    correct = (counts[:, C_CORRECT_E].double() >= correct_threshold * rows_e - 1e-9) & seen
    new_sums = sums.clone()
    new_sums[:, S_LOSS] = sums[:, S_LOSS] + torch.where(seen, sums[:, S_LAST], torch.zeros_like(rows_e))
    new_sums[:, S_LAST] = torch.where(seen, sums[:, S_LAST] / rows_e.clamp_min(1), sums[:, S_LAST])
    zero = torch.zeros_like(counts[:, 0])
    new_counts = torch.stack(
        [counts[:, C_ROWS] + counts[:, C_ROWS_E], counts[:, C_CORRECT] + counts[:, C_CORRECT_E], zero, zero],
        1,
    )
    learned = st["learned_since"]
    prev_correct = learned >= 0  # a sample's last seen epoch was correct iff it is learned since some epoch
    forgot = seen & prev_correct & ~correct
    start = torch.where(prev_correct, learned, torch.full_like(learned, epoch))
    out = dict(st)
    out.update(
        sums=new_sums,
        counts=new_counts,
        forgetting=st["forgetting"] + forgot.to(torch.int16),
        learned_since=torch.where(seen, torch.where(correct, start, torch.full_like(start, -1)), learned),
    )
    if "formal_since" in st and tau is not None:
        # float32 comparison, as the tau=None history compares its float32 running means with tau
        below = grad_mean(st).float() <= tau  # NaN (never recorded) compares False
        fs = st["formal_since"]
        out["formal_since"] = torch.where(
            below, torch.where(fs >= 0, fs, torch.full_like(fs, epoch)), torch.full_like(fs, -1)
        )
    return out


FOLD_ROWS = 1 << 20  # rows per block of an in-place epoch close


@torch.no_grad()
def close_in_place(
    st: State, epoch: int, correct_threshold: float, tau: Optional[float]
) -> Optional[torch.Tensor]:
    """`closed` applied to `st` itself, FOLD_ROWS rows at a time, so closing an epoch needs memory for
    one block of temporaries, not a second copy of the state. Returns the float32 CPU running means of
    the squared input-gradient norm after the epoch when the state has them (the tau=None history)."""
    n = st["sums"].shape[0]
    means = torch.empty(n, dtype=torch.float32) if "grad_sq_sum" in st else None
    for lo in range(0, n, FOLD_ROWS):
        view = {k: v[lo : lo + FOLD_ROWS] for k, v in st.items()}
        new = closed(view, epoch, correct_threshold, tau)
        for k, v in view.items():
            if new[k] is not v:
                v.copy_(new[k])
        if means is not None:
            means[lo : lo + FOLD_ROWS] = grad_mean(view).float().cpu()
    return means
