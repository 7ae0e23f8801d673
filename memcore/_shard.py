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
"""

from typing import Dict, List, Tuple

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


def check_agreement(fields: Dict[str, float], device: torch.device) -> None:
    """Raises ValueError on every rank unless all ranks pass the same `fields` (None -> NaN). One small
    all_gather."""
    dist = _dist()
    world = dist.get_world_size()
    names = list(fields)
    mine = torch.tensor(
        [float("nan") if fields[k] is None else float(fields[k]) for k in names],
        dtype=torch.float64,
        device=device,
    )
    got = [torch.empty_like(mine) for _ in range(world)]
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
        self, errors: torch.Tensor, epochs: int, grad: bool
    ) -> Tuple[torch.Tensor, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
        """Collective: exchanges the buffered rows together with this rank's deferred error bits
        (int32 [1]), completed epochs and whether it records input gradients. Returns the error bits
        of every rank ORed, and the rows this rank commits (see ``exchange``; "grad" only when some
        rank records input gradients). ValueError on every rank when their epoch counts differ."""
        dev = errors.device
        bits = errors.to(torch.int64)
        # max-reduced with the rows: error bits, max and -min of the ranks' completed epochs (ranks that
        # called end_epoch() unequally often would merge unrelated epochs), "some rank has grad rows"
        flags = torch.cat(
            [(bits & b).ne(0).to(torch.int64) for b in (1, 2, 4)]
            + [torch.tensor([epochs, -epochs, int(grad)], device=dev)]
        )
        flags, got = self.exchange(flags)
        hi, lo = int(flags[3]), -int(flags[4])
        if hi != lo:  # on every rank alike: they all see the same reduced flags
            raise ValueError(
                f"memcore Trackers differ across ranks: their completed epochs range from {lo} to "
                f"{hi}; every rank must call end_epoch() the same number of times (this rank's "
                f"buffered rows were dropped)"
            )
        return (flags[:3] * torch.tensor([1, 2, 4], device=dev)).sum().to(torch.int32).view(1), got

    def exchange(
        self, flags: torch.Tensor
    ) -> Tuple[torch.Tensor, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
        """Collective. flags: int64 [k] per-rank flags, max-reduced over ranks and returned; the last
        one says "this rank has input-gradient rows" (the grad channel is exchanged only when some
        rank has). Returns also, per channel ("ce", "grad"), the (int64 ids, float64 values [n, w])
        this rank commits: the rows it owns (shard) or every row (replicate), in rank order, then in
        recording order. One host sync (the row counts)."""
        try:
            return self._exchange(flags)
        except RuntimeError as e:  # gloo / NCCL say "timed out" or "connection closed", not why
            raise RuntimeError(
                "memcore.Tracker: exchanging the buffered rows between ranks failed. end_epoch(), "
                "scores(), save() and every flush_every-th accumulate call are collectives: every rank "
                f"must reach each of them, in the same order (did a rank skip one?). Backend error: {e}"
            ) from e

    def _exchange(
        self, flags: torch.Tensor
    ) -> Tuple[torch.Tensor, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
        dist = _dist()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        device = flags.device
        sends = {}
        idx, keep, vals = self.take_ce(device)
        sends["ce"] = (idx[keep], vals[keep])
        gidx, gsq, grows = self.take_grad(device)
        if int(flags[-1]):
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
        return flags, out
