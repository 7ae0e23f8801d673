"""Tracker: per-sample training statistics, filled by `memcore.accumulate`, read by `scores()`."""

import contextlib
import functools
import math
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from . import _layout as L
from . import _shard
from ._io import atomic_save, load_plain
from ._validate import as_float, as_int, describe_bits, is_int, same_device
from .scores import SCORE_NAMES

DeviceLike = Union[str, torch.device, None]


def _with_lock(method):
    """Runs a Tracker method under the tracker's lock (see Tracker._locked)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._locked():
            return method(self, *args, **kwargs)

    return locked


class Tracker:
    """Per-sample statistics over a training run, in a compact layout (see memcore/_layout.py).

    Args:
        num_samples: size of the dataset; ``accumulate`` indices lie in [0, num_samples).
        device: where the buffers live (``"cuda"``, ``"cpu"``, ...). ``None`` adopts the device of
            the first batch passed to ``accumulate``.
        strict: True (default) raises on a bad batch inside ``accumulate`` (one host sync per
            call on GPU). False defers the error to the next ``end_epoch()`` / ``scores()``: the bad
            batch is still skipped, but no sync is needed per step. Inside ``torch.compile`` and
            inside CUDA-graph capture (``torch.cuda.graph``) errors are always deferred.
        correct_threshold: a sample counts as correctly classified in an epoch when at least this
            fraction of its rows that epoch were predicted right (1.0: all of them; it matters only
            when several rows share an index, e.g. tokens of a sequence).
        tau: threshold of ``learning_time_formal``; None (default) uses the dataset mean of
            ``input_grad_norm``, as in the CSL paper (App. B.4). A fixed tau keeps one int16 per
            sample for it; None keeps the per-epoch running means (4 bytes per sample and epoch, CPU),
            because that threshold is known only when the scores are read.
        distributed: merge statistics across torch.distributed ranks (None, the default: whenever a
            process group with more than one rank is initialized). Each rank records the samples it
            sees; their rows reach every rank at each flush (below), so every rank holds the scores of
            the whole dataset, equal to a single-process run on the same data order.
        shard: each rank holds only the samples it owns, a contiguous range of about
            num_samples / world ids (needs an initialized process group; constructing the tracker is
            then a collective that checks that every rank passed the same settings). Rows are routed
            to their owner at each flush. ``scores()`` returns the local shard with its ids under
            ``"index"``; ``memcore.export.gather_scores`` collects all shards on one rank;
            ``save`` / ``load`` write and read one file per shard (resharding to another world size).
        storage: a directory: the per-sample state lives in memory-mapped files there (CPU only), for
            states larger than RAM; the OS pages it. It is working memory, not a checkpoint: use
            ``save`` to keep it. Sharded: one subdirectory per rank.
        flush_every: ``accumulate`` buffers each batch's per-row results (~40 bytes per row, on the
            tracker's device) and commits them every this many calls, and at every ``end_epoch()``,
            ``scores()``, ``state_dict()`` and ``save()``. Under torch.distributed a flush is a
            collective that routes the rows to the ranks holding their samples, so with a number
            here every rank must call ``accumulate`` equally often (as DDP training does); None
            flushes only at those calls. Default: 64, but None for unsharded distributed trackers.

    CUDA graphs: ``accumulate`` (every route: ``inputs=``, ``overwrite_logits=True``) may be
    captured by ``torch.cuda.graph`` and replayed, on a single process, after a warm-up step outside
    the capture (as CUDA graphs need anyway; with ``inputs=`` the warm-up must use ``inputs=`` too).
    Inside the capture nothing syncs the host: each batch's rows are committed on the device in the
    graph itself (every replay records its rows; nothing is buffered), and errors are deferred to
    the next ``end_epoch()`` / ``scores()``. Those, ``state_dict()``, ``save()`` and ``load()`` read
    or write host memory and sync: call them outside the capture. A distributed tracker cannot be
    captured (its flushes are collectives with host syncs): RuntimeError.

    Threads: one tracker may be shared by threads; recording, flushes, ``end_epoch``, ``scores`` and
    checkpoints are serialised by a per-tracker lock.

    Memory (``state_bytes()``): 60 bytes per sample (5 float64 sums, 4 int32 counts, 2 int16 epoch
    fields); with input gradients recorded 12 more, and 2 (fixed tau) or 4 per epoch (tau=None).
    """

    VERSION = L.STATE_VERSION

    def __init__(
        self,
        num_samples: int,
        device: DeviceLike = None,
        *,
        strict: bool = True,
        correct_threshold: float = 1.0,
        tau: Optional[float] = None,
        distributed: Optional[bool] = None,
        shard: bool = False,
        flush_every: Optional[int] = -1,
        storage: Optional[str] = None,
    ) -> None:
        num_samples = as_int(num_samples, "num_samples", minimum=1)
        correct_threshold = as_float(
            correct_threshold, "correct_threshold", minimum=0.0, maximum=1.0, open_minimum=True
        )
        if flush_every is not None and flush_every != -1:
            flush_every = as_int(flush_every, "flush_every", minimum=1)
        self.num_samples = num_samples
        self.strict = bool(strict)
        self.correct_threshold = correct_threshold
        self._tau = None if tau is None else as_float(tau, "tau", minimum=0.0)
        self.distributed = distributed
        self.shard = bool(shard)
        self.flush_every = flush_every  # -1: the default of the mode, decided with the router
        if self.shard and flush_every == -1:
            self.flush_every = 64
        self.epochs = 0  # completed epochs
        # tau=None: running mean of the squared input-gradient norm after each epoch, float32 CPU
        # [S] each, from the first epoch that recorded input gradients (epoch index _grad_start)
        self._grad_history: List[torch.Tensor] = []
        self._grad_start = -1
        self.device: Optional[torch.device] = None if device is None else _resolve(torch.device(device))
        self._router: Optional[_shard.Router] = None
        self._start, self._end = 0, num_samples  # the ids this tracker holds
        self._storage: Optional[str] = None
        # serialises the recording of concurrent accumulate calls (threads sharing one tracker) with
        # flushes and reads: the row buffer and the commits are not thread-safe (re-entrant: a record
        # may flush, a flush may move the tracker to the first batch's device)
        self._lock = threading.RLock()
        if storage is not None:
            if self.device is not None and self.device.type != "cpu":
                raise ValueError(
                    f"storage= keeps the state in memory-mapped files on the CPU; got device={device!r}"
                )
            self.device = torch.device("cpu")
        if self.shard:
            self._init_shard()
        if storage is not None:
            self._storage = os.path.join(str(storage), self._storage_name())
            os.makedirs(self._storage, exist_ok=True)
        self._alloc(self.device or torch.device("cpu"))

    @property
    def tau(self) -> Optional[float]:
        return self._tau

    @tau.setter
    def tau(self, value: Optional[float]) -> None:
        new = None if value is None else as_float(value, "tau", minimum=0.0)
        if self._grad_start >= 0 and new != self._tau:
            raise ValueError(
                "tau cannot change once input gradients were recorded (the tracker keeps the "
                "learning-time state of the tau it was recorded with)"
            )
        self._tau = new

    def _init_shard(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "Tracker(shard=True) needs an initialized torch.distributed process group "
                "(call dist.init_process_group first)"
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        if self.device is None:
            raise ValueError("Tracker(shard=True) needs an explicit device (the ranks exchange rows on it)")
        self._check_agreement()
        self._start, self._end = _shard.range_of(self.num_samples, world, rank)
        self._router = _shard.Router(self.num_samples, world, rank, "shard")

    def _check_agreement(self) -> None:
        """Collective: every rank must have built its tracker with the same settings (a clear error on
        every rank otherwise). Sharded trackers check at construction, replicated ones when they first
        route rows, so a rank with shard=True and one without meet in the same check."""
        _shard.check_agreement(
            {
                "num_samples": self.num_samples,
                "shard": int(self.shard),
                "flush_every": self.flush_every,
                "correct_threshold": self.correct_threshold,
                "tau": self._tau,
            },
            self.device or torch.device("cpu"),
        )

    # ------------------------------------------------------------------ buffers
    def _storage_name(self) -> str:
        if not self.shard:
            return "state"
        import torch.distributed as dist

        return f"state-{dist.get_rank():05d}-of-{dist.get_world_size():05d}"

    def _alloc(self, device: torch.device) -> None:
        self._st = L.new_state(self._end - self._start, device, self._storage)
        self._errors = torch.zeros(1, dtype=torch.int32, device=device)

    def _buffers(self) -> Dict[str, torch.Tensor]:
        return {**self._st, "errors": self._errors}

    def _set_buffers(self, bufs: Dict[str, torch.Tensor]) -> None:
        bufs = dict(bufs)
        self._errors = bufs.pop("errors", self._errors)
        if self._storage is not None:  # into the memory-mapped files
            if any(k not in self._st for k in bufs):
                L.add_grad_fields(self._st, "formal_since" in bufs, self._storage)
            for k in [k for k in self._st if k not in bufs]:
                del self._st[k]
            for k, v in bufs.items():
                self._st[k].copy_(v)
            return
        self._st = bufs

    def _state(self) -> Dict[str, torch.Tensor]:
        """The compact state with every buffered row committed (local ones only: no collective)."""
        if self._router is not None and self._router.mode == "local":
            self._flush()
        return self._st

    def _recorded(self) -> torch.Tensor:
        """Every accumulated value as one float64 tensor (sums, counts, input-gradient sums): zero for a
        fresh tracker, unchanged by a rejected batch. For tests (flushes the buffered rows)."""
        self._state()
        keys = [k for k in ("sums", "counts", "grad_sq_sum", "grad_rows") if k in self._st]
        return torch.cat([self._st[k].double().flatten() for k in keys])

    def state_bytes(self) -> int:
        """Bytes of per-sample state this tracker (this rank's shard, if sharded) holds: buffers and
        learning-time history, without the rows waiting for a flush."""
        return L.state_bytes(self._st, self._grad_history)

    def to(self, device: DeviceLike) -> "Tracker":
        """Moves all buffers to ``device`` (in place) and returns self."""
        dev = _resolve(torch.device(device))
        if self._storage is not None and dev.type != "cpu":
            raise ValueError("a Tracker with storage= stays on the CPU (its state is memory-mapped files)")
        self._flush()
        self._set_buffers({k: v.to(dev) for k, v in self._buffers().items()})
        self.device = dev
        return self

    def _adopt(self, device: torch.device) -> None:
        if self.device is None:
            if device.type == "meta":  # adopting it would leave the tracker without values for good
                raise ValueError(
                    "logits are on the meta device (no values): memcore.accumulate needs real "
                    "tensors; the tracker was not updated and keeps device=None"
                )
            self.to(device)

    def __getstate__(self) -> Dict[str, Any]:  # copy / deepcopy / pickle: a lock cannot be copied
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _locked(self):
        """The tracker's lock in eager mode; nothing under torch.compile, which cannot trace a lock
        (a compiled step runs its graph as one unit)."""
        return contextlib.nullcontext() if torch.compiler.is_compiling() else self._lock

    def _routing(self) -> _shard.Router:
        """The row buffer; created at the first batch (by then a process group is up, if any)."""
        if self._router is None:
            if self._distributed():
                import torch.distributed as dist

                if self.flush_every == -1:
                    self.flush_every = None
                self._check_agreement()
                self._router = _shard.Router(
                    self.num_samples, dist.get_world_size(), dist.get_rank(), "replicate"
                )
            else:
                if self.flush_every == -1:
                    self.flush_every = 64
                self._router = _shard.Router(self.num_samples, 1, 0, "local")
        return self._router

    def _record(
        self,
        index: torch.Tensor,
        targets: torch.Tensor,
        loss: torch.Tensor,
        row_stats: torch.Tensor,
        status: torch.Tensor,
        ignore_index: int,
        explain: Callable[[int], Exception],
    ) -> None:
        """Takes a batch's per-row results from memcore::ce_forward (no host sync), then checks its
        status word (``_after_batch``; ``explain(bits)`` builds the exception naming the offending
        row), under the tracker's lock. The rows are buffered and committed
        at the next flush (rows of a rejected batch are dropped there); inside torch.compile (single
        process) committed at once, so that no Python state changes per call; likewise inside CUDA-graph
        capture, where a buffered row would be read once at the next flush, not once per replay."""
        with self._locked():
            capturing = not torch.compiler.is_compiling() and _capturing()  # compile: no torch.cuda to trace
            if capturing:
                self._check_capture(loss.device, grad=False)
            self._adopt(loss.device)
            if (torch.compiler.is_compiling() or capturing) and not self._distributed():
                keep = (targets != ignore_index) & (status == 0)
                L.commit_rows(self._st, index, keep, loss.detach(), row_stats)
            else:
                router = self._routing()
                router.add_ce(index, targets, loss, row_stats, status, ignore_index)
                if self.flush_every is not None and router.calls >= self.flush_every:
                    self._flush()
            self._after_batch(status, explain, deferred=capturing)

    def _record_grad(self, index: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor) -> None:
        """Squared input-gradient norms of a batch's rows (rows[r] = 0: not recorded); committed at
        once inside CUDA-graph capture (see ``_record``)."""
        with self._locked():
            if not torch.compiler.is_compiling() and _capturing():
                self._check_capture(sq.device, grad=True)
                L.commit_grad_rows(self._st, index, sq, rows)
                return
            self._adopt(sq.device)
            router = self._routing()
            if router.mode == "local":  # the fields exist from the first such batch on: a capture
                self._start_grad()  # after this warm-up finds them (it cannot allocate them)
            router.add_grad(index, sq, rows)

    def _check_capture(self, device: torch.device, grad: bool) -> None:
        """Refuses what cannot go into a CUDA graph: anything captured is re-run by every replay, so
        the state must exist on the batch's device before the capture (a move or an allocation of
        the input-gradient fields inside it would be redone, zeroing the state, on each replay), and
        a distributed tracker's flushes are collectives that sync the host."""
        if self._distributed():
            raise RuntimeError(
                "memcore.accumulate inside CUDA-graph capture: a distributed Tracker cannot be captured "
                "(its flushes exchange rows between ranks with host syncs); capture the model only and "
                "call accumulate outside the graph"
            )
        if self.device != device or (grad and "grad_sq_sum" not in self._st):
            what = "accumulate(..., inputs=x)" if grad else "accumulate"
            raise RuntimeError(
                f"memcore.accumulate inside CUDA-graph capture: the Tracker's state is not ready on {device} "
                f"(device={self.device}); run one warm-up step with {what} outside the capture first, "
                "as CUDA graphs need anyway"
            )

    def _start_grad(self) -> None:
        if self._grad_start < 0:
            self._grad_start = self.epochs
        if "grad_sq_sum" not in self._st:
            L.add_grad_fields(self._st, self._tau is not None, self._storage)

    def _flush(self) -> None:
        """Commits the buffered rows. Under torch.distributed a collective: exchanges them first (each
        rank commits the rows it holds) and merges the deferred-error bits of all ranks."""
        with self._locked():
            self._flush_locked()

    def _flush_locked(self) -> None:
        router = self._router
        if router is None:
            return
        router.calls = 0
        dev = self.device or torch.device("cpu")
        if router.mode == "local":
            if router.grad:
                self._start_grad()
                gidx, gsq, grows = router.take_grad(dev)
                L.commit_grad_rows(self._st, gidx, gsq, grows)
            if router.ce:
                idx, keep, vals = router.take_ce(dev)
                if not bool(keep.all()):  # one host sync per flush on a GPU
                    idx, vals = idx[keep], vals[keep]
                L.commit_kept(self._st, idx, vals)
            return
        bits = self._errors.to(torch.int64)
        # max-reduced with the rows: error bits, max and -min of the ranks' completed epochs (ranks that
        # called end_epoch() unequally often would merge unrelated epochs), "some rank has grad rows"
        flags = torch.cat(
            [(bits & b).ne(0).to(torch.int64) for b in (1, 2, 4)]
            + [
                torch.tensor(
                    [self.epochs, -self.epochs, int(bool(router.grad) or self._grad_start >= 0)], device=dev
                )
            ]
        )
        flags, got = router.exchange(flags.to(dev))
        hi, lo = int(flags[3]), -int(flags[4])
        if hi != lo:  # on every rank alike: they all see the same reduced flags
            raise ValueError(
                f"memcore Trackers differ across ranks: their completed epochs range from {lo} to "
                f"{hi}; every rank must call end_epoch() the same number of times (this rank's "
                f"buffered rows were dropped)"
            )
        self._errors = (flags[:3] * torch.tensor([1, 2, 4], device=dev)).sum().to(torch.int32).view(1)
        if int(flags[5]):
            self._start_grad()
            gidx, gvals = got["grad"]
            if gidx.numel():
                L.commit_grad_rows(self._st, gidx - self._start, gvals[:, 0], torch.ones_like(gidx))
        idx, vals = got["ce"]
        L.commit_kept(self._st, idx - self._start, vals)

    # ------------------------------------------------------------------ errors
    def _after_batch(self, status: torch.Tensor, explain: Callable[[int], Exception], deferred: bool) -> None:
        """Strict: reads the status word (a host sync) and raises at once; otherwise, and where a sync
        is impossible (torch.compile, CUDA-graph capture), ORs it into the errors end_epoch() checks."""
        if self.strict and not deferred and not torch.compiler.is_compiling():
            bits = int(status.item())
            if bits:
                raise explain(bits)
        else:
            self._errors.bitwise_or_(status)

    def _raise_deferred(self, errors: torch.Tensor) -> None:
        bits = int(errors.item())
        if bits:
            self._errors.zero_()
            raise ValueError(
                f"memcore.accumulate rejected at least one batch since the last check ({describe_bits(bits)}); "
                f"those batches were not recorded. Use Tracker(strict=True) outside torch.compile and "
                f"CUDA-graph capture to raise at the offending call."
            )

    # ------------------------------------------------------------------ epochs
    def _distributed(self) -> bool:
        if self.shard:
            return True
        if self.distributed is not None:
            return self.distributed
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _open_epoch(self) -> bool:
        """Whether any row was recorded since the last end_epoch (on any rank when sharded)."""
        local = L.has_open_rows(self._st)
        if not self.shard:
            return local
        import torch.distributed as dist

        t = torch.tensor([int(local)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @_with_lock
    def end_epoch(self) -> None:
        """Closes the epoch: updates last loss, learning time and forgetting from its statistics.

        Call once per pass over the data, after the last ``accumulate`` of the epoch. Under
        torch.distributed this is a collective: call it on every rank; the ranks' rows are
        exchanged first, so every rank (or, sharded, every sample's owner) holds the whole epoch.
        """
        if self.epochs >= L.MAX_EPOCHS:
            raise ValueError(f"a Tracker counts at most {L.MAX_EPOCHS} epochs")
        self._flush()
        self._raise_deferred(self._errors)
        means = L.close_in_place(self._st, self.epochs, self.correct_threshold, self._tau)
        if self._grad_start >= 0 and self._tau is None:
            self._grad_history.append(means)
        self.epochs += 1

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    @_with_lock
    def scores(self) -> Dict[str, torch.Tensor]:
        """Per-sample scores, each a float64 CPU tensor [num_samples]; higher = more memorized-like
        for csl, csl_mean, last_loss, learning_time, forgetting; lower for confidence_mean, aum,
        correctness. Samples never seen give NaN for the means and 0 for the sums.

        An epoch in progress (``accumulate`` called since the last ``end_epoch``) is included as if
        it had just ended; the tracker itself is not changed. A collective under torch.distributed.
        With ``shard=True`` each tensor covers this rank's samples only, and ``"index"`` (int64)
        holds their ids.

        - ``csl``: cumulative sample loss, the sum of the sample's loss over every row ever seen.
        - ``csl_mean``: csl / rows, the mean loss per presentation (per token for sequences).
        - ``rows``: number of rows (presentations, or tokens) recorded.
        - ``last_loss``: mean loss over the sample's rows in the last epoch it was seen.
        - ``learning_time``: the first epoch (0-based) from which the sample was classified
          correctly in every epoch it was seen; samples incorrect at their last epoch get the
          number of epochs recorded (never learned).
        - ``forgetting``: number of correct -> incorrect transitions between consecutive epochs in
          which the sample was seen (Toneva et al. 2019).
        - ``confidence_mean`` / ``confidence_std``: mean and (population) std of p(given label)
          over presentations (dataset cartography, Swayamdipta et al. 2020).
        - ``aum``: mean margin, given-label logit minus the largest other logit (Pleiss et al. 2020).
        - ``correctness``: fraction of presentations predicted correctly.
        - ``input_grad_norm``: mean over presentations of the squared L2 norm of the gradient of
          the sample's own loss w.r.t. its input (recorded with ``accumulate(..., inputs=x)``).
        - ``learning_time_formal``: the CSL paper's learning time (Ravikumar et al. 2025, Eq. 7):
          the first epoch from whose end on the running mean (over the sample's presentations so
          far) of that squared norm stays <= tau (default: the dataset mean of
          ``input_grad_norm``); the number of epochs if it ends above tau. ("Stays" makes it
          robust to input gradients that grow early in training, when the raw first crossing
          would be epoch 0 for every sample.)
        Both are NaN when input gradients were not recorded.
        """
        ctx = self._score_context()
        out = self._scores_rows(ctx, 0, self._end - self._start)
        if self.shard:
            out["index"] = torch.arange(self._start, self._end, dtype=torch.int64)
        return out

    def _score_context(self) -> Dict[str, Any]:
        """The collective part of reading scores (flush, open epoch, dataset tau), done once; the
        scores of any block of rows then follow locally from it (``_scores_rows``)."""
        self._flush()
        self._raise_deferred(self._errors)
        open_epoch = self._open_epoch()
        ctx: Dict[str, Any] = {"open": open_epoch, "epochs": self.epochs + int(open_epoch), "tau": self._tau}
        if self._grad_start >= 0 and self._tau is None:
            st = L.closed(self._st, self.epochs, self.correct_threshold, None) if open_epoch else self._st
            ctx["tau"] = self._dataset_mean(L.grad_mean(st))
        return ctx

    @torch.no_grad()
    def _scores_rows(self, ctx: Dict[str, Any], lo: int, hi: int) -> Dict[str, torch.Tensor]:
        """Scores of this tracker's rows [lo, hi) (float64 CPU)."""
        st = {k: v[lo:hi] for k, v in self._st.items()}
        if ctx["open"]:
            st = L.closed(st, self.epochs, self.correct_threshold, self._tau)
        epochs = ctx["epochs"]
        out = L.scores_of(st, epochs)
        if self._grad_start < 0:
            nan = torch.full((hi - lo,), float("nan"), dtype=torch.float64, device=st["sums"].device)
            out.update(input_grad_norm=nan, learning_time_formal=nan)
        else:
            norm = L.grad_mean(st)
            if self._tau is not None:
                ltf = L.formal_from_since(st["formal_since"], norm, epochs)
            else:
                hist = [h[lo:hi] for h in self._grad_history] + ([norm.float().cpu()] if ctx["open"] else [])
                if hist:
                    ltf = L.formal_from_history(hist, self._grad_start, norm, ctx["tau"], epochs)
                else:  # recording started, but no epoch with rows since (e.g. empty batches only)
                    ltf = torch.full_like(norm, float("nan"))
            out.update(input_grad_norm=norm, learning_time_formal=ltf)
        return {k: v.detach().to("cpu", torch.float64).clone() for k, v in out.items()}

    def _dataset_mean(self, norm: torch.Tensor) -> float:
        seen = norm[~norm.isnan()]
        if not self.shard:
            return float(seen.mean())
        import torch.distributed as dist

        t = torch.stack(
            [seen.sum(), torch.tensor(float(seen.numel()), dtype=torch.float64, device=seen.device)]
        )
        dist.all_reduce(t)
        return float(t[0] / t[1])

    # ------------------------------------------------------------------ checkpoints
    @_with_lock
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume: buffers (CPU copies) and counters; plain tensors, numbers,
        lists and dicts (``torch.load(..., weights_only=True)`` reads it). Sharded: this rank's shard
        (``"range"``: its ids [start, end)); a collective, like every flush."""
        self._flush()
        return {
            "version": self.VERSION,
            "num_samples": self.num_samples,
            "range": [self._start, self._end],
            "epochs": self.epochs,
            "correct_threshold": self.correct_threshold,
            "tau": self._tau,
            "buffers": {k: v.detach().cpu().clone() for k, v in self._buffers().items()},
            "grad_start": self._grad_start,
            "grad_history": [h.clone() for h in self._grad_history],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a ``state_dict()``; format 1 (memcore <= 0.1.0) is converted. Buffers land on this
        tracker's device; buffered rows not yet flushed are dropped.

        Everything is checked before anything is changed (keys, types, buffer shapes and dtypes,
        ranges: 0 <= epochs <= 32767, -1 <= grad_start <= epochs, one grad_history entry per epoch
        since grad_start where the state keeps them, counts and epoch fields in range, the shard's
        id range): a rejected state raises ValueError and leaves the tracker exactly as it was.
        """
        with self._locked():
            new = self._checked_state(state)
            # the swap: assignments (copies into the files, with storage=) of values already checked
            self._set_buffers(new["buffers"])
            self.epochs = new["epochs"]
            self.correct_threshold = new["correct_threshold"]
            self._tau = new["tau"]
            self._grad_start = new["grad_start"]
            self._grad_history = new["grad_history"]
            if self._router is not None:
                self._router.ce, self._router.grad, self._router.calls = [], [], 0

    def _checked_state(self, state: Any) -> Dict[str, Any]:
        """Validates a state_dict (format 1 first converted) and returns the values load_state_dict
        assigns (buffers copied onto this tracker's device); raises ValueError without touching self."""
        if not isinstance(state, dict) or "version" not in state:
            raise ValueError("state is not a memcore Tracker state_dict")
        version = state["version"]
        if is_int(version) and version == 1:
            _check_state(state, 1, self.num_samples, 0, self.num_samples)
            if self._start != 0 or self._end != self.num_samples:
                raise ValueError(
                    f"a format-1 tracker state holds every sample id; this tracker holds "
                    f"{[self._start, self._end]}"
                )
            state = _from_version1(state)
        elif version != self.VERSION:
            raise ValueError(
                f"tracker state has format version {version!r}, this memcore reads {self.VERSION}"
            )
        _check_state(state, self.VERSION, self.num_samples, self._start, self._end)
        dev = self.device or torch.device("cpu")
        tau = state["tau"]
        return {
            "buffers": {k: v.detach().to(dev).clone() for k, v in state["buffers"].items()},
            "epochs": state["epochs"],
            "correct_threshold": float(state["correct_threshold"]),
            "tau": None if tau is None else float(tau),
            "grad_start": state["grad_start"],
            "grad_history": [h.detach().cpu().clone() for h in state["grad_history"]],
        }

    def save(self, path: str) -> None:
        """Writes ``state_dict()`` to ``path`` through a temporary file and an atomic rename, so a
        crash while saving never destroys the previous checkpoint at ``path``.

        Sharded (a collective): ``path`` is a directory; each rank writes its shard's file there
        and rank 0 then replaces ``manifest.json`` (world size, ranges, file names), the commit point."""
        if self.shard:
            import torch.distributed as dist

            _shard.save_shards(
                path, self.state_dict(), self.num_samples, dist.get_world_size(), dist.get_rank(), self.device
            )
            return
        atomic_save(self.state_dict(), path)

    def load(self, path: str) -> None:
        """Restores a tracker written by ``save`` (same checks as ``load_state_dict``); never runs code
        from the file (``weights_only=True``). Sharded: reads the shards overlapping this rank's ids,
        whatever world size wrote them."""
        if self.shard:
            _, parts = _shard.load_range(path, self._start, self._end, self.num_samples)
            if not parts:
                raise ValueError(
                    f"sharded checkpoint {path!r} holds none of the ids {[self._start, self._end]}"
                )
            state = _shard.concat_shards(parts)
            state["range"] = [self._start, self._end]
            state["buffers"]["errors"] = torch.zeros(1, dtype=torch.int32)  # shards' own, not concatenated
            self.load_state_dict(state)
            return
        self.load_state_dict(load_plain(path, "memcore Tracker checkpoint"))

    def __repr__(self) -> str:
        return (
            f"Tracker(num_samples={self.num_samples}, device={self.device}, epochs={self.epochs}, "
            f"strict={self.strict}{', shard=True' if self.shard else ''})"
        )


_STATE_KEYS = {
    "version",
    "num_samples",
    "epochs",
    "correct_threshold",
    "tau",
    "buffers",
    "grad_start",
    "grad_history",
}


def _v1_buffers(n: int) -> Dict[str, torch.Tensor]:
    """The buffers of format 1 (memcore <= 0.1.0), as meta tensors (shape and dtype only)."""
    f64, meta = torch.float64, torch.device("meta")
    return {
        "epoch": torch.empty(n, L.NUM_STATS, dtype=f64, device=meta),
        "total": torch.empty(n, L.NUM_STATS, dtype=f64, device=meta),
        "last_loss": torch.empty(n, dtype=f64, device=meta),
        "prev_correct": torch.empty(n, dtype=torch.bool, device=meta),
        "forgetting": torch.empty(n, dtype=torch.int64, device=meta),
        "learned_since": torch.empty(n, dtype=torch.int64, device=meta),
        "errors": torch.empty(1, dtype=torch.int32, device=meta),
        "grad_epoch": torch.empty(n, L.NUM_GRAD_STATS, dtype=f64, device=meta),
        "grad_total": torch.empty(n, L.NUM_GRAD_STATS, dtype=f64, device=meta),
    }


def _check_state(state: Dict[str, Any], version: int, num_samples: int, start: int, end: int) -> None:
    """Raises ValueError unless `state` is a well-formed tracker state of format `version` for sample
    ids [start, end) of num_samples: keys, types, buffer shapes and dtypes, value ranges. Reads only."""
    optional = {"range", "token"} if version == 2 else set()
    if not _STATE_KEYS <= set(state) <= _STATE_KEYS | optional:
        missing, extra = sorted(_STATE_KEYS - set(state)), sorted(set(state) - _STATE_KEYS - optional)
        raise ValueError(f"tracker state has missing keys {missing} / unexpected keys {extra}")

    def integer(name: str) -> int:
        v = state[name]
        if not is_int(v):
            raise ValueError(f"tracker state {name!r} must be an int, got {v!r}")
        return v

    if integer("num_samples") != num_samples:
        raise ValueError(
            f"tracker state is for num_samples={state['num_samples']}, this tracker has {num_samples}"
        )
    rng = state.get("range", [0, num_samples])
    if not isinstance(rng, (list, tuple)) or len(rng) != 2 or not all(is_int(x) for x in rng):
        raise ValueError(f"tracker state 'range' must be two ints [start, end), got {rng!r}")
    if list(rng) != [start, end]:
        raise ValueError(
            f"tracker state holds sample ids {list(rng)}, this tracker holds {[start, end]} "
            f"(load a sharded checkpoint with tracker.load(path))"
        )
    epochs = integer("epochs")
    if epochs < 0:
        raise ValueError(f"tracker state 'epochs' must be >= 0, got {epochs}")
    if epochs > L.MAX_EPOCHS:
        raise ValueError(f"tracker state 'epochs' must be <= {L.MAX_EPOCHS}, got {epochs}")
    thr = state["correct_threshold"]
    if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not 0.0 < thr <= 1.0:
        raise ValueError(f"tracker state 'correct_threshold' must be in (0, 1], got {thr!r}")
    tau = state["tau"]
    if tau is not None and (
        not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(float(tau))
    ):
        raise ValueError(f"tracker state 'tau' must be None or a finite number, got {tau!r}")
    grad_start = integer("grad_start")
    if not -1 <= grad_start <= epochs:
        raise ValueError(f"tracker state 'grad_start' must be in [-1, epochs={epochs}], got {grad_start}")
    n = end - start
    hist = state["grad_history"]
    # one running-mean entry per epoch since grad_start; format 2 keeps them only for tau=None
    keeps = grad_start >= 0 and (version == 1 or tau is None)
    want_len = epochs - grad_start if keeps else 0
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

    if version == 1:
        want = _v1_buffers(n)
    else:
        want = L.new_state(n, torch.device("meta"))
        if grad_start >= 0:
            L.add_grad_fields(want, tau is not None)
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

    def between(lo: int, hi: int):
        return lambda t: ((t >= lo) & (t <= hi)).all()

    if version == 1:
        ranges = [
            ("learned_since", between(-1, epochs), f"in [-1, epochs={epochs}]"),
            ("forgetting", between(0, epochs), f"in [0, epochs={epochs}]"),
            ("epoch", lambda t: (t[:, L.ROWS] >= 0).all(), "row counts >= 0"),
            ("total", lambda t: (t[:, L.ROWS] >= 0).all(), "row counts >= 0"),
            ("grad_epoch", lambda t: (t[:, L.GRAD_ROWS] >= 0).all(), "row counts >= 0"),
            ("grad_total", lambda t: (t[:, L.GRAD_ROWS] >= 0).all(), "row counts >= 0"),
        ]
    else:
        C = L
        ranges = [
            ("learned_since", between(-1, epochs), f"in [-1, epochs={epochs}]"),
            ("forgetting", between(0, epochs), f"in [0, epochs={epochs}]"),
            (
                "counts",
                lambda t: (
                    (t >= 0).all()
                    & (t[:, C.C_CORRECT] <= t[:, C.C_ROWS]).all()
                    & (t[:, C.C_CORRECT_E] <= t[:, C.C_ROWS_E]).all()
                ),
                "row counts >= 0, correct rows <= rows",
            ),
        ]
        if grad_start >= 0:
            ranges.append(("grad_rows", lambda t: (t >= 0).all(), "row counts >= 0"))
            if tau is not None:
                ranges.append(("formal_since", between(-1, epochs), f"in [-1, epochs={epochs}]"))
    ranges.append(("errors", between(0, 7), "a status word in [0, 7]"))
    for k, ok, what in ranges:
        if not bool(ok(bufs[k])):
            raise ValueError(f"tracker state buffer {k!r} holds values out of range (must be {what})")


def _from_version1(state: Dict[str, Any]) -> Dict[str, Any]:
    """A format-1 state_dict (float64 [S, 6] epoch and total buffers) in format 2."""
    bufs = L.from_version1(state["buffers"], state["grad_history"], state["grad_start"], state["tau"])
    bufs["errors"] = state["buffers"]["errors"]
    return {
        **state,
        "version": 2,
        "range": [0, state["num_samples"]],
        "buffers": bufs,
        "grad_history": [] if state["tau"] is not None else list(state["grad_history"]),
    }


def _capturing() -> bool:
    """True while the current CUDA stream captures a graph, where a host sync (reading the status
    word, a flush's boolean mask) is illegal. A capture needs CUDA initialized; asking only then keeps
    a CPU-only run from initializing CUDA here (is_current_stream_capturing would)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _resolve(dev: torch.device) -> torch.device:
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


__all__ = ["Tracker", "SCORE_NAMES", "same_device"]
