"""Column layouts: the native kernels' per-row outputs (mirrors csrc/common.h) and the Tracker's compact
per-sample state (`CompactState`), with the arithmetic that commits rows into it and closes epochs."""

import os
from typing import Dict, List, Optional, Tuple

import torch

# float64 [num_samples, NUM_STATS] per-epoch statistics written by memcore::ce_commit
LOSS_SUM, ROWS, CORRECT, PROB_SUM, PROB_SQ_SUM, MARGIN_SUM = range(6)
NUM_STATS = 6

# error bits of the int32 status word returned by memcore::ce_forward
BAD_TARGET, BAD_INDEX, NON_FINITE = 1, 2, 4

# float64 [num_samples, NUM_GRAD_STATS] input-gradient statistics written by memcore::sqnorm_commit
GRAD_SQ_SUM, GRAD_ROWS = range(2)
NUM_GRAD_STATS = 2

# per-row statistics [N, 3] of memcore::ce_forward (opmath dtype)
ROW_PROB, ROW_MARGIN, ROW_CORRECT = range(3)

# ---------------------------------------------------------------------------------------------------
# Compact per-sample state (format version 2).
#
# "sums", float64 [S, 5]: the sums that grow without bound or need fp64 to stay exact to rounding:
#   S_LOSS    loss of the closed epochs (csl = S_LOSS + this epoch's loss, added at end_epoch as the
#             float64 per-epoch buffer of format 1 was, so csl rounds exactly as before)
#   S_LAST    while the sample has rows in the open epoch (C_ROWS_E > 0): that epoch's loss sum;
#             otherwise the mean loss of the last epoch it was seen in (last_loss; 0 if never seen).
#             One slot serves both because last_loss is only read back for samples unseen this epoch.
#   S_PROB, S_PROB_SQ, S_MARGIN  running sums of p(target), p^2 and the margin over every row
# "counts", int32 [S, 4]: rows and correctly predicted rows, of the closed epochs and of the open one
#   (exact up to 2^31 - 1 rows per sample)
# "forgetting", "learned_since": int16 [S] (epochs are capped at 32767; -1 = not learned)
# with input gradients recorded (allocated on first use):
#   "grad_sq_sum" float64 [S], "grad_rows" int32 [S]: running sum of squared input-gradient norms
#   "formal_since" int16 [S], only with a fixed tau: the first epoch of the current run of epochs whose
#   running mean of the squared norm is <= tau (-1: above tau at the last epoch). With tau=None the
#   threshold is a dataset mean known only when scores are read, so the per-epoch running means are
#   kept instead (float32, CPU, 4 bytes per sample and epoch, as in format 1).
# ---------------------------------------------------------------------------------------------------
S_LOSS, S_LAST, S_PROB, S_PROB_SQ, S_MARGIN = range(5)
NUM_SUMS = 5
C_ROWS, C_CORRECT, C_ROWS_E, C_CORRECT_E = range(4)
NUM_COUNTS = 4
MAX_EPOCHS = 32767  # int16 epoch fields

STATE_VERSION = 2


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
    t = torch.from_file(os.path.join(storage, f"{name}.bin"), shared=True, size=numel, dtype=dtype)
    return t.view(shape).fill_(fill)


def new_state(n: int, device: torch.device, storage: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Zeroed compact state for n samples (without the input-gradient fields); with `storage` (a
    directory, CPU only) each tensor is a memory-mapped file there."""
    return {
        "sums": _tensor((n, NUM_SUMS), torch.float64, 0, device, storage, "sums"),
        "counts": _tensor((n, NUM_COUNTS), torch.int32, 0, device, storage, "counts"),
        "forgetting": _tensor((n,), torch.int16, 0, device, storage, "forgetting"),
        "learned_since": _tensor((n,), torch.int16, -1, device, storage, "learned_since"),
    }


def add_grad_fields(st: Dict[str, torch.Tensor], fixed_tau: bool, storage: Optional[str] = None) -> None:
    n, dev = st["sums"].shape[0], st["sums"].device
    st["grad_sq_sum"] = _tensor((n,), torch.float64, 0, dev, storage, "grad_sq_sum")
    st["grad_rows"] = _tensor((n,), torch.int32, 0, dev, storage, "grad_rows")
    if fixed_tau:
        st["formal_since"] = _tensor((n,), torch.int16, -1, dev, storage, "formal_since")


def state_bytes(st: Dict[str, torch.Tensor], history: Optional[List[torch.Tensor]] = None) -> int:
    """Bytes held by the state's tensors (and the learning-time history, if given)."""
    out = sum(t.numel() * t.element_size() for t in st.values())
    return out + sum(h.numel() * h.element_size() for h in (history or []))


@torch.no_grad()
def commit_rows(
    st: Dict[str, torch.Tensor],
    index: torch.Tensor,
    keep: torch.Tensor,
    loss: torch.Tensor,
    row_stats: torch.Tensor,
) -> None:
    """Adds rows into the state. index int64 [n] (state-local ids; any value where ~keep), keep bool [n],
    loss [n] and row_stats [n, 3] as memcore::ce_forward returns them (any float dtype). No host sync.

    Within a call the rows are added in order, per sample (index_add_), as ce_commit adds them."""
    idx = torch.where(keep, index, torch.zeros_like(index))
    zero = torch.zeros((), dtype=torch.float64, device=idx.device)
    l64 = torch.where(keep, loss.double(), zero)
    p = torch.where(keep, row_stats[:, ROW_PROB].double(), zero)
    margin = torch.where(keep, row_stats[:, ROW_MARGIN].double(), zero)
    sums, counts = st["sums"], st["counts"]
    # the epoch's first rows of a sample replace its last_loss by 0 in the shared slot. Every row that
    # points at a sample writes the same value, so the scatter has no conflicting writes: masked rows
    # point at sample 0 and write what its own rows (if any) write.
    fresh = counts[idx, C_ROWS_E] == 0
    first0 = (keep & (index == 0)).any() & (counts[0, C_ROWS_E] == 0)
    first = torch.where(keep, fresh, first0)
    last = sums[:, S_LAST]
    last.index_put_((idx,), torch.where(first, zero, last[idx]))
    vals = torch.stack([l64, p, p * p, margin], 1)
    sums[:, S_LAST].index_add_(0, idx, l64)
    sums[:, S_PROB:].index_add_(0, idx, vals[:, 1:])
    one = keep.to(torch.int32)
    correct = torch.where(keep, row_stats[:, ROW_CORRECT], torch.zeros_like(row_stats[:, ROW_CORRECT]))
    counts[:, C_ROWS_E:].index_add_(0, idx, torch.stack([one, correct.to(torch.int32)], 1))


@torch.no_grad()
def commit_kept(st: Dict[str, torch.Tensor], index: torch.Tensor, vals: torch.Tensor) -> None:
    """Adds rows that are all to be recorded: index int64 [n] (state-local ids), vals float64 [n, 4]
    (loss, p, margin, correct). The flush path: fewer, larger ops than commit_rows."""
    if index.numel() == 0:
        return
    sums, counts = st["sums"], st["counts"]
    last = sums[:, S_LAST]
    # one column at a time: 1-D index_add_ / index_select take a much faster path than 2-D blocks
    fresh = counts[:, C_ROWS_E].index_select(0, index) == 0  # rows of one sample agree: no conflicting writes
    last.scatter_(0, index, torch.where(fresh, torch.zeros_like(vals[:, 0]), last.index_select(0, index)))
    p = vals[:, 1]
    for col, v in ((S_LAST, vals[:, 0]), (S_PROB, p), (S_PROB_SQ, p * p), (S_MARGIN, vals[:, 2])):
        sums[:, col].index_add_(0, index, v)
    counts[:, C_ROWS_E].index_add_(0, index, torch.ones_like(index, dtype=torch.int32))
    counts[:, C_CORRECT_E].index_add_(0, index, vals[:, 3].to(torch.int32))


@torch.no_grad()
def commit_grad_rows(
    st: Dict[str, torch.Tensor], index: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor
) -> None:
    """Adds squared input-gradient norms: sq float64 [n], rows [n] (1 for a recorded row, 0 for a row
    to skip, whose sq is 0 and whose index may be anything)."""
    keep = rows != 0
    idx = torch.where(keep, index, torch.zeros_like(index))
    st["grad_sq_sum"].index_add_(
        0, idx, torch.where(keep, sq.double(), torch.zeros_like(sq, dtype=torch.float64))
    )
    st["grad_rows"].index_add_(0, idx, keep.to(torch.int32))


def grad_mean(st: Dict[str, torch.Tensor]) -> torch.Tensor:
    """float64 [S] running mean of the squared input-gradient norm, NaN where none was recorded."""
    rows = st["grad_rows"].double()
    return torch.where(rows > 0, st["grad_sq_sum"] / rows.clamp_min(1), torch.full_like(rows, float("nan")))


def has_open_rows(st: Dict[str, torch.Tensor]) -> bool:
    return bool(st["counts"][:, C_ROWS_E].any())


@torch.no_grad()
def closed(
    st: Dict[str, torch.Tensor], epoch: int, correct_threshold: float, tau: Optional[float]
) -> Dict[str, torch.Tensor]:
    """The state after closing epoch `epoch` (0-based) from its open rows; `st` is not modified.

    Same rules as format 1: a sample seen this epoch is correct when at least correct_threshold of its
    rows were; last_loss becomes the epoch's mean loss; learning_time and forgetting follow. With a
    fixed tau the learning-time-formal run is advanced for every sample that has input gradients."""
    sums, counts = st["sums"], st["counts"]
    rows_e = counts[:, C_ROWS_E].double()
    seen = rows_e > 0
    correct = (counts[:, C_CORRECT_E].double() >= correct_threshold * rows_e - 1e-9) & seen
    new_sums = sums.clone()
    new_sums[:, S_LOSS] = sums[:, S_LOSS] + torch.where(seen, sums[:, S_LAST], torch.zeros_like(rows_e))
    new_sums[:, S_LAST] = torch.where(seen, sums[:, S_LAST] / rows_e.clamp_min(1), sums[:, S_LAST])
    new_counts = torch.stack(
        [
            counts[:, C_ROWS] + counts[:, C_ROWS_E],
            counts[:, C_CORRECT] + counts[:, C_CORRECT_E],
            torch.zeros_like(counts[:, 0]),
            torch.zeros_like(counts[:, 0]),
        ],
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
        # float32 comparison, as format 1 compared its float32 history with tau
        below = grad_mean(st).float() <= tau  # NaN (never recorded) compares False
        fs = st["formal_since"]
        out["formal_since"] = torch.where(
            below, torch.where(fs >= 0, fs, torch.full_like(fs, epoch)), torch.full_like(fs, -1)
        )
    return out


FOLD_ROWS = 1 << 20  # rows per block of an in-place epoch close


@torch.no_grad()
def close_in_place(
    st: Dict[str, torch.Tensor], epoch: int, correct_threshold: float, tau: Optional[float]
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


@torch.no_grad()
def scores_of(st: Dict[str, torch.Tensor], epochs: int) -> Dict[str, torch.Tensor]:
    """The cross-entropy scores of a state whose epochs are all closed (see Tracker.scores), float64."""
    sums, counts = st["sums"], st["counts"]
    rows = counts[:, C_ROWS].double()
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=sums.device)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(rows > 0, x / rows.clamp_min(1), nan)

    conf = mean(sums[:, S_PROB])
    var = (mean(sums[:, S_PROB_SQ]) - conf * conf).clamp_min(0)
    learned = st["learned_since"]
    lt = torch.where(learned >= 0, learned, torch.full_like(learned, epochs)).double()
    return {
        "csl": sums[:, S_LOSS],
        "csl_mean": mean(sums[:, S_LOSS]),
        "rows": rows,
        "last_loss": torch.where(rows > 0, sums[:, S_LAST], nan),
        "learning_time": torch.where(rows > 0, lt, nan),
        "forgetting": st["forgetting"].double(),
        "confidence_mean": conf,
        "confidence_std": var.sqrt(),
        "aum": mean(sums[:, S_MARGIN]),
        "correctness": mean(counts[:, C_CORRECT].double()),
    }


def formal_from_since(since: torch.Tensor, norm: torch.Tensor, epochs: int) -> torch.Tensor:
    """learning_time_formal from the online run start (fixed tau)."""
    lt = torch.where(since >= 0, since, torch.full_like(since, epochs)).double()
    return torch.where(norm.isnan(), torch.full_like(lt, float("nan")), lt)


def formal_from_history(
    history: List[torch.Tensor], grad_start: int, norm: torch.Tensor, tau: float, epochs: int
) -> torch.Tensor:
    """learning_time_formal from the per-epoch running means (float32 [S] each, CPU), as format 1."""
    below = torch.stack(history) <= tau  # [E, S]; NaN (not yet seen) compares False
    # stays[e] = below at every epoch >= e: "learned" is for good, as in learning_time
    stays = torch.flip(torch.cumprod(torch.flip(below.int(), [0]), 0), [0]).bool()
    first = stays.int().argmax(0).double() + grad_start
    lt = torch.where(stays.any(0), first, torch.full_like(first, float(epochs)))
    return torch.where(norm.isnan().cpu(), torch.full_like(lt, float("nan")), lt)


def from_version1(
    buffers: Dict[str, torch.Tensor], history: List[torch.Tensor], grad_start: int, tau: Optional[float]
) -> Dict[str, torch.Tensor]:
    """Converts the float64 buffers of format 1 (epoch / total [S, 6], last_loss, prev_correct,
    forgetting, learned_since, grad_epoch / grad_total [S, 2]) into format 2."""
    e, t = buffers["epoch"], buffers["total"]
    n = t.shape[0]
    st = new_state(n, torch.device("cpu"))
    seen_e = e[:, ROWS] > 0
    st["sums"][:, S_LOSS] = t[:, LOSS_SUM]
    st["sums"][:, S_LAST] = torch.where(seen_e, e[:, LOSS_SUM], buffers["last_loss"].nan_to_num(0.0))
    for dst, src in ((S_PROB, PROB_SUM), (S_PROB_SQ, PROB_SQ_SUM), (S_MARGIN, MARGIN_SUM)):
        st["sums"][:, dst] = t[:, src] + e[:, src]
    for dst, src, b in (
        (C_ROWS, ROWS, t),
        (C_CORRECT, CORRECT, t),
        (C_ROWS_E, ROWS, e),
        (C_CORRECT_E, CORRECT, e),
    ):
        st["counts"][:, dst] = b[:, src].round().to(torch.int32)
    st["forgetting"] = buffers["forgetting"].to(torch.int16)
    st["learned_since"] = buffers["learned_since"].to(torch.int16)
    if grad_start >= 0:
        g = buffers["grad_total"] + buffers["grad_epoch"]
        add_grad_fields(st, tau is not None)
        st["grad_sq_sum"] = g[:, GRAD_SQ_SUM].clone()
        st["grad_rows"] = g[:, GRAD_ROWS].round().to(torch.int32)
        if tau is not None:
            since = torch.full((n,), -1, dtype=torch.int16)
            for k, h in enumerate(history):
                below = h <= tau
                since = torch.where(
                    below,
                    torch.where(since >= 0, since, torch.full_like(since, grad_start + k)),
                    torch.full_like(since, -1),
                )
            st["formal_since"] = since
    return st
