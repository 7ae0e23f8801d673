"""Per-sample state across torch.distributed ranks: which rank owns which samples, the buffer that
routes rows to their owner, and the agreement check of the ranks' settings (per-rank checkpoints:
memcore/_checkpoint.py).

Ownership is by contiguous ranges: rank r owns ids [r * chunk, min((r + 1) * chunk, N)) with
chunk = ceil(N / world). Every rank holds exactly `chunk` (or fewer, for the last) samples whatever
the id distribution; a shard's ids are its row number plus an offset, so no id array is stored, its
scores come out in id order, and loading a checkpoint at another world size only slices and
concatenates ranges. (``index % world`` balances rows better when ids correlate with the data
order, but a random sampler spreads every batch evenly over the ranges anyway, and resharding a
modulo layout would interleave every shard.)

Routing: ``accumulate`` appends each batch's per-row results (int64 sample id, loss, p, margin,
correct, validity) to a buffer on the tracker's device; a flush, every ``flush_every`` calls and at
every ``end_epoch()`` / ``scores()`` / ``save()``, drops the rejected and ignored rows and sends each
remaining row to its owner with ``all_to_all_single`` (counts first, then ids and values). Without
sharding (``Tracker(distributed=True)``) the same exchange sends every row to every rank, so each
rank commits the same rows in the same order and holds the same state.

Collectives: every one memcore makes starts with a header, one all_reduce of int64 [13] whatever
the call (``header``): the call's kind, the tracker's size and completed epochs, whether the rank has
rows to send, its deferred error bits. Ranks that reach different calls (one in ``end_epoch()``,
another in ``scores()``), or whose trackers differ, thus pair messages of one size and all raise the
same ValueError, instead of pairing collectives of different sizes, which aborts the process in
the backend. A flush with no rows recorded on this rank since the last one communicates nothing,
except where every rank calls it anyway (``end_epoch()``; a sharded tracker's ``scores()`` and
``save()``): ranks agree on that as long as they call ``accumulate`` equally often between
flushes, which the header checks wherever every rank is present.
"""

import contextlib
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from . import _state as S


def _dist():
    import torch.distributed as dist

    return dist


def chunk_of(num_samples: int, world: int) -> int:
    return max(1, -(-num_samples // world))


def range_of(num_samples: int, world: int, rank: int) -> Tuple[int, int]:
    """[start, end) of the sample ids rank `rank` owns."""
    c = chunk_of(num_samples, world)
    start = min(rank * c, num_samples)
    return start, min(start + c, num_samples)


# What each memcore collective is, by code: the header every one of them starts with names it, so that
# ranks that reach different calls get a clear error instead of pairing unrelated collectives.
SETTINGS = "the settings check (Tracker(shard=True), or a distributed Tracker's first accumulate)"
PERIODIC = "a flush_every-th accumulate call"
KINDS = (
    SETTINGS,
    PERIODIC,
    "end_epoch()",
    "scores()",
    "state_dict()",
    "save()",
    "load()",
    "to()",
    "export.to_parquet()",
    "export.gather_scores()",
)
# slots of the header: (kind, -kind), (num_samples, -num_samples), (epochs, -epochs), (rows, -rows)
# compare the ranks (max and -min); grad, the three error bits and refused are ORed (max)
_H_KIND, _H_N, _H_EPOCHS, _H_ROWS, _H_GRAD, _H_ERR, _H_REFUSED = 0, 2, 4, 6, 8, 9, 12
_HEADER = 13


class Header(NamedTuple):
    rows: bool  # some rank has rows to exchange
    grad: bool  # some rank records input gradients
    errors: torch.Tensor  # int32 [1]: the deferred error bits of every rank, ORed


@contextlib.contextmanager
def backend_errors():
    """Turns a backend failure inside memcore's collectives (gloo / NCCL say "timed out" or
    "connection closed", not why) into an explanation."""
    try:
        yield
    except RuntimeError as e:
        raise RuntimeError(
            "memcore.Tracker: a collective between ranks failed. Tracker(shard=True), end_epoch(), "
            "every flush_every-th accumulate call and, while rows are buffered, scores() / "
            "state_dict() / save() are collectives: every rank must reach each of them, in the same "
            "order (did a rank skip one, or stop?). After such a failure the process group is "
            f"unusable: call torch.distributed.destroy_process_group() before exiting. Backend error: {e}"
        ) from e


def group_ready() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def all_reduce(t: torch.Tensor) -> None:
    """Collective: sums `t` in place across ranks."""
    with backend_errors():
        _dist().all_reduce(t)


def collective_device(device: Optional[torch.device]) -> torch.device:
    """Where the small tensors of the headers live: the tracker's device, or the one the default
    process group's backend reduces (a refused tracker has no valid device of its own)."""
    if device is not None:
        return device
    dist = _dist()
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def header(
    kind: str,
    num_samples: int,
    epochs: int,
    device: torch.device,
    *,
    rows: bool = False,
    grad: bool = False,
    errors: Optional[torch.Tensor] = None,
    refused: bool = False,
) -> Header:
    """Collective: the first step of every memcore collective, one all_reduce of int64 [13] whatever
    the call, so ranks that reach different calls pair the same message. Raises ValueError, on every
    rank alike (they all see the same reduced values), when the ranks are in different calls, hold
    trackers of different sizes or epoch counts, disagree on whether rows were recorded since the
    last flush, or when a rank refused its Tracker arguments (`refused`). Changes nothing."""
    dist = _dist()
    code = KINDS.index(kind) + 1
    rank = dist.get_rank()
    bits = 0 if errors is None else int(errors.item())
    mine = [code, -code, num_samples, -num_samples, epochs, -epochs, int(rows), -int(rows), int(grad)]
    mine += [int(bool(bits & b)) for b in (1, 2, 4)] + [rank + 1 if refused else 0]
    t = torch.tensor(mine, dtype=torch.int64, device=device)
    with backend_errors():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    h = t.tolist()
    if h[_H_REFUSED]:
        raise ValueError(
            f"Tracker(shard=True) was refused on rank {h[_H_REFUSED] - 1} (its arguments are wrong: see "
            f"that rank's error); no rank holds a tracker"
        )
    lo, hi = -h[_H_KIND + 1], h[_H_KIND]
    if lo != hi:
        raise ValueError(
            f"memcore Trackers are out of step across ranks: one rank is in {KINDS[hi - 1]} while another "
            f"is in {KINDS[lo - 1]}. Every rank must reach memcore's collectives in the same order "
            "(and call accumulate equally often between them, as DDP does); nothing was exchanged"
        )
    where = KINDS[code - 1]
    lo, hi = -h[_H_N + 1], h[_H_N]
    if lo != hi and kind != SETTINGS:  # the settings check that follows names every rank's value
        raise ValueError(
            f"memcore Trackers differ across ranks: num_samples ranges from {lo} to {hi} in {where} "
            "(each rank must call it on its copy of the same tracker)"
        )
    lo, hi = -h[_H_EPOCHS + 1], h[_H_EPOCHS]
    if lo != hi:
        raise ValueError(
            f"memcore Trackers differ across ranks: their completed epochs range from {lo} to {hi}; "
            f"every rank must call end_epoch() the same number of times (nothing was exchanged)"
        )
    if h[_H_ROWS] != -h[_H_ROWS + 1]:
        raise ValueError(
            f"memcore Trackers are out of step across ranks in {where}: "
            "some ranks recorded rows since the last flush and others none. Every rank must call "
            "accumulate equally often between flushes (as DDP does); a rank that called end_epoch() "
            "more often than the others shows this way too (nothing was exchanged)"
        )
    err = sum(b * h[_H_ERR + j] for j, b in enumerate((1, 2, 4)))
    return Header(bool(h[_H_ROWS]), bool(h[_H_GRAD]), torch.tensor([err], dtype=torch.int32, device=device))


def check_agreement(fields: Dict[str, Optional[float]], device: torch.device) -> None:
    """Collective (after the caller's header): raises ValueError on every rank unless all ranks pass
    the same `fields` (None -> NaN). One small all_gather."""
    dist = _dist()
    world = dist.get_world_size()
    names = list(fields)
    mine = torch.tensor(
        [float("nan") if fields[k] is None else float(fields[k]) for k in names],
        dtype=torch.float64,
        device=device,
    )
    got = [torch.empty_like(mine) for _ in range(world)]
    with backend_errors():
        dist.all_gather(got, mine)
    table = torch.stack(got).cpu()
    for j, k in enumerate(names):
        col = table[:, j]
        same = torch.isnan(col).all() or (not torch.isnan(col).any() and bool((col == col[0]).all()))
        if not same:
            vals = ", ".join(f"rank {r}: {_fmt(col[r])}" for r in range(world))
            raise ValueError(
                f"Tracker settings differ across ranks: {k} ({vals}); construct the tracker "
                f"with the same arguments on every rank"
            )


def any_rank(flag: bool, device: torch.device) -> bool:
    """Collective: whether `flag` is True on any rank."""
    dist = _dist()
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    with backend_errors():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _fmt(v: torch.Tensor) -> str:
    x = float(v)
    return "None" if x != x else (str(int(x)) if x == int(x) else repr(x))


class Router:
    """Rows recorded on this rank since the last flush, kept as the ops returned them (a list append and
    three small copies per call: the caller may reuse its index / target / loss tensors).

    mode "local": one process, committed in place at the flush (no collective, no host sync);
    "replicate": every row goes to every rank; "shard": each row goes to the owner of its id.
    """

    def __init__(self, num_samples: int, world: int, rank: int, mode: str) -> None:
        self.num_samples, self.world, self.rank, self.mode = num_samples, world, rank, mode
        self.chunk = chunk_of(num_samples, world)
        self.ce: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        self.grad: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.calls = 0

    def pending(self) -> bool:
        return bool(self.ce or self.grad)

    def add_ce(
        self,
        index: torch.Tensor,
        targets: torch.Tensor,
        loss: torch.Tensor,
        row_stats: torch.Tensor,
        status: torch.Tensor,
        ignore_index: int,
    ) -> None:
        self.ce.append(
            (index.clone(), targets.clone(), loss.detach().clone(), row_stats.detach(), status, ignore_index)
        )
        self.calls += 1

    def add_grad(self, index: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor) -> None:
        self.grad.append((index.clone(), sq, rows))

    def bytes_pending(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for rows in (self.ce, self.grad)
            for r in rows
            for t in r
            if isinstance(t, torch.Tensor)
        )

    def take_ce(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The buffered ce rows as (int64 ids [n], bool keep [n], float64 [n, 4] values for
        memcore._state.commit), emptying the buffer; no host sync."""
        rows, self.ce = self.ce, []
        if not rows:
            return (
                torch.empty(0, dtype=torch.int64, device=device),
                torch.empty(0, dtype=torch.bool, device=device),
                torch.empty(0, 4, dtype=torch.float64, device=device),
            )
        idx = torch.cat([r[0] for r in rows])
        sizes = [r[0].shape[0] for r in rows]
        status = torch.cat([r[4] for r in rows]).repeat_interleave(
            torch.tensor(sizes, device=idx.device), output_size=idx.shape[0]
        )
        ignore = {r[5] for r in rows}
        targets = torch.cat([r[1] for r in rows])
        if len(ignore) == 1:
            keep = (targets != ignore.pop()) & (status == 0)
        else:
            keep = torch.cat([r[1] != r[5] for r in rows]) & (status == 0)
        return idx, keep, S.values(torch.cat([r[2] for r in rows]), torch.cat([r[3] for r in rows]))

    def take_grad(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The buffered input-gradient rows as (int64 ids, float64 squared norms, recorded flags)."""
        rows, self.grad = self.grad, []
        if not rows:
            z = torch.empty(0, dtype=torch.float64, device=device)
            return torch.empty(0, dtype=torch.int64, device=device), z, z
        return (
            torch.cat([r[0] for r in rows]),
            torch.cat([r[1] for r in rows]).double(),
            torch.cat([r[2] for r in rows]),
        )

    def merge(
        self, kind: str, errors: torch.Tensor, epochs: int, grad: bool
    ) -> Tuple[Header, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
        """Collective: the header of call `kind` (see ``header``: this rank's deferred error bits,
        int32 [1], its completed epochs, whether it records input gradients), then, when some rank has
        rows, their exchange. Returns the header (error bits of every rank ORed) and the rows this rank
        commits (see ``exchange``; "grad" only when some rank records input gradients; nothing when no
        rank had rows). A header that raises leaves the buffer as it was."""
        h = header(
            kind, self.num_samples, epochs, errors.device, rows=self.pending(), grad=grad, errors=errors
        )
        self.calls = 0
        if not h.rows:
            return h, {}
        return h, self.exchange(h.grad, errors.device)

    def exchange(self, grad: bool, device: torch.device) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Collective, after a header: sends the buffered rows (emptying the buffer) and returns, per
        channel ("ce"; "grad" when `grad`: some rank records input gradients), the (int64 ids, float64
        values [n, w]) this rank commits: the rows it owns (shard) or every row (replicate), in rank
        order, then in recording order. One host sync (the row counts)."""
        with backend_errors():
            return self._exchange(grad, device)

    def _exchange(self, grad: bool, device: torch.device) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        dist = _dist()
        sends = {}
        idx, keep, vals = self.take_ce(device)
        sends["ce"] = (idx[keep], vals[keep])
        gidx, gsq, grows = self.take_grad(device)
        if grad:
            gkeep = grows != 0
            sends["grad"] = (gidx[gkeep], gsq[gkeep][:, None])
        routed = {}
        for name, (idx, vals) in sends.items():
            if self.mode == "shard":
                dest = torch.div(idx, self.chunk, rounding_mode="floor")
                order = torch.sort(dest, stable=True).indices
                idx, vals = idx[order], vals[order]
                counts = torch.bincount(dest, minlength=self.world)
            else:  # every rank gets every row
                counts = torch.full((self.world,), idx.numel(), dtype=torch.int64, device=device)
                idx, vals = idx.repeat(self.world), vals.repeat(self.world, 1)
            routed[name] = (idx, vals, counts)
        names = list(routed)
        k = len(names)
        send_counts = torch.stack([routed[n][2] for n in names], 1).reshape(-1).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        sc, rc = send_counts.view(self.world, k).tolist(), recv_counts.view(self.world, k).tolist()
        out = {}
        for j, name in enumerate(names):
            idx, vals, _ = routed[name]
            s_split, r_split = [c[j] for c in sc], [c[j] for c in rc]
            r_idx = torch.empty(sum(r_split), dtype=torch.int64, device=device)
            r_vals = torch.empty(sum(r_split), vals.shape[1], dtype=torch.float64, device=device)
            dist.all_to_all_single(r_idx, idx, r_split, s_split)
            dist.all_to_all_single(r_vals, vals, r_split, s_split)
            out[name] = (r_idx, r_vals)
        return out
