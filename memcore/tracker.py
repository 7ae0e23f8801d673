"""Tracker: per-sample training statistics, filled by `memcore.accumulate`, read by `scores()`."""

import contextlib
import functools
import os
import sys
import threading
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from . import _checkpoint, _shard
from . import _state as S
from ._validate import as_float, as_int, describe_bits, same_device
from .scores import SCORE_NAMES, Context, dataset_mean, of_state

DeviceLike = Union[str, torch.device, None]


def _with_lock(method):
    """Runs a Tracker method under the tracker's lock (see Tracker._locked)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._locked():
            return method(self, *args, **kwargs)

    return locked


class Tracker:
    """Per-sample statistics over a training run, in a compact layout (see memcore/_state.py).

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
            flushes only at those calls. A flush with no rows recorded on this rank since the last
            one is local (``end_epoch()`` excepted, and a sharded tracker's ``scores()`` and
            ``save()``): after ``end_epoch()`` one rank alone may read scores or save.
            Default: 64, but None for unsharded distributed trackers.

    Collectives, under torch.distributed: every one starts with a header that checks the ranks are in
    the same call with the same tracker; ranks out of step all raise the same ValueError there (see
    docs/distributed.md for the list of collectives and what each misuse gives).

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
    Rows waiting for a flush: ``buffered_bytes()``.
    """

    VERSION = _checkpoint.VERSION

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
        try:
            num_samples = as_int(num_samples, "num_samples", minimum=1)
            correct_threshold = as_float(
                correct_threshold, "correct_threshold", minimum=0.0, maximum=1.0, open_minimum=True
            )
            if flush_every is not None and flush_every != -1:
                flush_every = as_int(flush_every, "flush_every", minimum=1)
            self._tau = None if tau is None else as_float(tau, "tau", minimum=0.0)
            dev = None if device is None else _resolve(torch.device(device))
            if storage is not None and dev is not None and dev.type != "cpu":
                raise ValueError(
                    f"storage= keeps the state in memory-mapped files on the CPU; got device={device!r}"
                )
            if shard and dev is None and storage is None:
                raise ValueError(
                    "Tracker(shard=True) needs an explicit device (the ranks exchange rows on it)"
                )
        except (TypeError, ValueError, RuntimeError):
            if shard and _shard.group_ready():  # the other ranks wait in the settings check: tell them
                try:
                    _shard.header(_shard.SETTINGS, 0, 0, _shard.collective_device(None), refused=True)
                except ValueError:  # "refused on rank r": this rank raises its own error instead
                    pass
            raise
        self.num_samples = num_samples
        self.strict = bool(strict)
        self.correct_threshold = correct_threshold
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
        self.device: Optional[torch.device] = dev
        self._router: Optional[_shard.Router] = None
        self._start, self._end = 0, num_samples  # the ids this tracker holds
        self._storage: Optional[str] = None
        self._storage_lock = None  # an exclusive lock on the storage directory, held while the tracker lives
        # serialises the recording of concurrent accumulate calls (threads sharing one tracker) with
        # flushes and reads: the row buffer and the commits are not thread-safe (re-entrant: a record
        # may flush, a flush may move the tracker to the first batch's device)
        self._lock = threading.RLock()
        if storage is not None:
            self.device = torch.device("cpu")
        if self.shard:
            self._init_shard()
        if storage is not None:
            directory = os.path.join(str(storage), self._storage_name())
            os.makedirs(directory, exist_ok=True)
            # before the files are touched: a second tracker on the directory would zero the first's state
            self._storage_lock = S.lock_storage(directory)
            self._storage = directory
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

        if not _shard.group_ready():
            raise ValueError(
                "Tracker(shard=True) needs an initialized torch.distributed process group "
                "(call dist.init_process_group first)"
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        self._check_agreement()
        self._start, self._end = _shard.range_of(self.num_samples, world, rank)
        self._router = _shard.Router(self.num_samples, world, rank, "shard")

    def _check_agreement(self) -> None:
        """Collective: every rank must have built its tracker with the same settings (a clear error on
        every rank otherwise). Sharded trackers check at construction, replicated ones when they first
        route rows, so a rank with shard=True and one without meet in the same check."""
        dev = self.device or torch.device("cpu")
        _shard.header(_shard.SETTINGS, self.num_samples, 0, dev)
        _shard.check_agreement(
            {
                "num_samples": self.num_samples,
                "shard": int(self.shard),
                "flush_every": self.flush_every,
                "correct_threshold": self.correct_threshold,
                "tau": self._tau,
            },
            dev,
        )

    # ------------------------------------------------------------------ buffers
    def _storage_name(self) -> str:
        if not self.shard:
            return "state"
        import torch.distributed as dist

        return f"state-{dist.get_rank():05d}-of-{dist.get_world_size():05d}"

    def _alloc(self, device: torch.device) -> None:
        self._st = S.allocate(self._end - self._start, device, self._storage)
        self._errors = torch.zeros(1, dtype=torch.int32, device=device)

    def _buffers(self) -> Dict[str, torch.Tensor]:
        return {**self._st, "errors": self._errors}

    def _set_buffers(self, bufs: Dict[str, torch.Tensor]) -> None:
        bufs = dict(bufs)
        self._errors = bufs.pop("errors", self._errors)
        self._st = S.assign(self._st, bufs, self._storage)

    def state_bytes(self) -> int:
        """Bytes of per-sample state this tracker (this rank's shard, if sharded) holds: buffers and
        learning-time history, without the rows waiting for a flush."""
        return S.nbytes(self._st, self._grad_history)

    def buffered_bytes(self) -> int:
        """Bytes of per-row results waiting for the next flush (see ``flush_every``), on the
        tracker's device; 0 right after a flush."""
        with self._locked():
            return 0 if self._router is None else self._router.bytes_pending()

    def to(self, device: DeviceLike) -> "Tracker":
        """Moves all buffers to ``device`` (in place) and returns self. Commits the buffered rows first:
        under torch.distributed a collective when this rank recorded rows since the last flush."""
        dev = _resolve(torch.device(device))
        if self._storage is not None and dev.type != "cpu":
            raise ValueError("a Tracker with storage= stays on the CPU (its state is memory-mapped files)")
        self._flush("to()")
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
        # a copy holds its state in memory (tensors copy their memory-mapped files' contents): it does
        # not own the storage directory, whose files stay the original's
        state["_storage"], state["_storage_lock"] = None, None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _locked(self, compiling: Optional[bool] = None):
        """The tracker's lock in eager mode; nothing under torch.compile, which cannot trace a lock
        (a compiled step runs its graph as one unit). `compiling`: torch.compiler.is_compiling(), when
        the caller has asked already."""
        if compiling is None:
            compiling = torch.compiler.is_compiling()
        return contextlib.nullcontext() if compiling else self._lock

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
        compiling = torch.compiler.is_compiling()  # asked once: each query costs a Python call
        with self._locked(compiling):
            capturing = not compiling and _capturing()  # compile: no torch.cuda to trace
            if capturing:
                self._check_capture(loss.device, grad=False)
            if self.device is None:
                self._adopt(loss.device)
            if (compiling or capturing) and not self._distributed():
                keep = (targets != ignore_index) & (status == 0)
                S.commit(self._st, index, S.values(loss.detach(), row_stats), keep)
            else:
                router = self._routing()
                router.add_ce(index, targets, loss, row_stats, status, ignore_index)
                if self.flush_every is not None and router.calls >= self.flush_every:
                    self._flush(_shard.PERIODIC)
            self._after_batch(status, explain, deferred=capturing or compiling)

    def _record_grad(self, index: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor) -> None:
        """Squared input-gradient norms of a batch's rows (rows[r] = 0: not recorded); committed at
        once inside CUDA-graph capture (see ``_record``)."""
        with self._locked():
            if not torch.compiler.is_compiling() and _capturing():
                self._check_capture(sq.device, grad=True)
                S.commit_grad(self._st, index, sq, rows)
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
        """Allocates the input-gradient fields at their first use; a failure (a storage directory that
        was removed) leaves the tracker as it was, its state readable and savable."""
        if "grad_sq_sum" not in self._st:
            S.add_grad_fields(self._st, self._tau is not None, self._storage)
        if self._grad_start < 0:
            self._grad_start = self.epochs

    def _flush(self, kind: str, collective: bool = False) -> None:
        """Commits the buffered rows (`kind`: the public call flushing, for the header's messages).

        Under torch.distributed a collective when this rank recorded rows since the last flush, or
        when `collective` (calls every rank makes: end_epoch(), a sharded tracker's scores() and
        save()): a header (memcore/_shard.py) checks that the ranks are in the same call and merges
        their deferred-error bits, then the rows are exchanged, each rank committing those it holds.
        With nothing recorded here since the last flush it is local: the ranks agree on that as long
        as they call accumulate equally often between flushes (a header finds out otherwise)."""
        with self._locked():
            router = self._router
            if router is None:
                return
            dev = self.device or torch.device("cpu")
            if router.mode == "local":
                router.calls = 0
                if router.grad:
                    self._start_grad()
                    S.commit_grad(self._st, *router.take_grad(dev))
                if router.ce:
                    idx, keep, vals = router.take_ce(dev)
                    S.commit(self._st, idx, vals, keep)  # rejected and ignored rows add nothing
                return
            if not (collective or router.pending()):
                return
            h, got = router.merge(kind, self._errors, self.epochs, bool(router.grad) or self._grad_start >= 0)
            self._errors = h.errors
            if h.grad:  # some rank records input gradients: every shard holds the fields
                self._start_grad()
            if "grad" in got:
                gidx, gvals = got["grad"]
                S.commit_grad(self._st, gidx - self._start, gvals[:, 0], torch.ones_like(gidx))
            if "ce" in got:
                idx, vals = got["ce"]
                S.commit(self._st, idx - self._start, vals)

    # ------------------------------------------------------------------ errors
    def _after_batch(self, status: torch.Tensor, explain: Callable[[int], Exception], deferred: bool) -> None:
        """Strict: reads the status word (a host sync) and raises at once; otherwise, and where a sync
        is impossible (`deferred`: inside torch.compile or CUDA-graph capture), ORs it into the errors
        end_epoch() checks."""
        if self.strict and not deferred:
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
        """Whether any row was recorded since the last end_epoch (on any rank when sharded: a collective)."""
        local = S.has_open_rows(self._st)
        return _shard.any_rank(local, self.device) if self.shard else local

    @_with_lock
    def end_epoch(self) -> None:
        """Closes the epoch: updates last loss, learning time and forgetting from its statistics.

        Call once per pass over the data, after the last ``accumulate`` of the epoch. Under
        torch.distributed this is a collective, whether or not rows were recorded: call it on every
        rank; the ranks' rows are exchanged first, so every rank (or, sharded, every sample's owner)
        holds the whole epoch. Ranks that call it unequally often get a ValueError at the first
        collective where that shows.
        """
        if self.epochs >= S.MAX_EPOCHS:
            raise ValueError(f"a Tracker counts at most {S.MAX_EPOCHS} epochs")
        if self._distributed():
            self._routing()  # the settings check, if this rank has not recorded yet
        self._flush("end_epoch()", collective=True)
        self._raise_deferred(self._errors)
        if not self._open_epoch():
            _warn_once(
                self,
                "end_epoch",
                "Tracker.end_epoch() with no batch recorded since the last end_epoch(): the epoch is "
                "counted, with no rows (call it once per pass over the data, after its accumulate calls)",
            )
        means = S.close_in_place(self._st, self.epochs, self.correct_threshold, self._tau)
        if self._grad_start >= 0 and self._tau is None:
            self._grad_history.append(means)
        self.epochs += 1

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    @_with_lock
    def scores(self) -> Dict[str, torch.Tensor]:
        """Per-sample scores, each a float64 CPU tensor [num_samples]; which direction is suspicious
        is ``memcore.scores.SCORES[name].suspicious`` ("high" or "low"). Samples never seen give 0 for the sums
        and counts (csl, rows, forgetting_events) and NaN for every other score.

        An epoch in progress (``accumulate`` called since the last ``end_epoch``) is included as if
        it had just ended; the tracker itself is not changed. Under torch.distributed: sharded, a
        collective (call it on every rank), each tensor covering this rank's samples only, with their
        ids under ``"index"`` (int64); replicated, a collective only while this rank has rows
        recorded since the last flush (mid-epoch: call it on every rank), and local after
        ``end_epoch()``: every rank then holds every score, and any one rank may read them alone.

        What each score is: ``memcore.SCORES`` and the definitions in memcore/scores.py.
        """
        _, out = next(self._score_blocks(max(self._end - self._start, 1), "scores()"))
        if self.shard:
            out["index"] = torch.arange(self._start, self._end, dtype=torch.int64)
        return out

    def _score_context(self, kind: str) -> Context:
        """The collective part of reading scores (`kind`: the public call): flush; sharded, the open
        epoch and the dataset tau of every shard."""
        self._flush(kind, collective=self.shard)
        self._raise_deferred(self._errors)
        open_epoch = self._open_epoch()
        if not open_epoch and self.epochs == 0:
            _warn_once(
                self,
                "scores",
                "Tracker.scores() before any recorded epoch: no accumulate call has recorded a row yet, "
                "so every score is that of a sample never seen (NaN means, zero sums)",
            )
        threshold = self._tau
        if self._grad_start >= 0 and self._tau is None:  # closing an epoch leaves grad_mean as it is
            reduce = _shard.all_reduce if self.shard else None
            threshold = dataset_mean(S.grad_mean(self._st), reduce)
        return Context(
            open_epoch, self.epochs, self.correct_threshold, self._tau, threshold, self._grad_start
        )

    def _score_blocks(self, rows: int, kind: str) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        """(first sample id, scores) of this tracker's samples, `rows` at a time (at least one block).
        The collectives happen in this call, once; the blocks are computed as they are taken."""
        ctx = self._score_context(kind)
        n = self._end - self._start

        def blocks():
            for lo in range(0, max(n, 1), rows):
                hi = min(lo + rows, n)
                st = {k: v[lo:hi] for k, v in self._st.items()}
                yield self._start + lo, of_state(st, [h[lo:hi] for h in self._grad_history], ctx)

        return blocks()

    # ------------------------------------------------------------------ checkpoints
    @_with_lock
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume: buffers (CPU copies) and counters; plain tensors, numbers,
        lists and dicts (``torch.load(..., weights_only=True)`` reads it). Sharded: this rank's shard
        (``"range"``: its ids [start, end)).

        Under torch.distributed a collective only while this rank has rows recorded since the last
        flush (mid-epoch: call it on every rank, which then holds them all). After ``end_epoch()`` it
        communicates nothing: a replicated tracker's ranks all hold the same state, so rank 0 alone
        may save it."""
        self._flush("state_dict()")
        return self._snapshot()

    def _snapshot(self) -> Dict[str, Any]:
        """The state dict of what is committed (no flush)."""
        return _checkpoint.make(
            self.num_samples,
            (self._start, self._end),
            self.epochs,
            self.correct_threshold,
            self._tau,
            self._buffers(),
            self._grad_start,
            self._grad_history,
        )

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a ``state_dict()``; format 1 (memcore 0.1.0) is converted. Buffers land on this
        tracker's device; buffered rows not yet flushed are dropped.

        Everything is checked before anything is changed (keys, types, buffer shapes and dtypes,
        ranges: 0 <= epochs <= 32767, -1 <= grad_start <= epochs, one grad_history entry per epoch
        since grad_start where the state keeps them, counts and epoch fields in range, the shard's
        id range): a rejected state raises ValueError and leaves the tracker exactly as it was.
        """
        with self._locked():
            self._assign(
                _checkpoint.validate(
                    state, self.num_samples, self._start, self._end, self.device or torch.device("cpu")
                )
            )

    def _assign(self, new: Dict[str, Any]) -> None:
        """Takes the values of a checked state (``_checkpoint.validate``)."""
        with self._locked():
            # the swap: assignments (copies into the files, with storage=) of values already checked
            self._set_buffers(new["buffers"])
            self.epochs = new["epochs"]
            self.correct_threshold = new["correct_threshold"]
            self._tau = new["tau"]
            self._grad_start = new["grad_start"]
            self._grad_history = new["grad_history"]
            if self._router is not None:
                self._router.ce, self._router.grad, self._router.calls = [], [], 0

    def save(self, path: str) -> None:
        """Writes ``state_dict()`` to ``path`` through a temporary file and an atomic rename, so a
        crash while saving never destroys the previous checkpoint at ``path``.

        Sharded (a collective: call it on every rank): ``path`` is a directory; each rank writes its
        shard's file there and rank 0 then replaces ``manifest.json`` (world size, ranges, file
        names), the commit point, and removes the files of earlier saves. Otherwise a collective only
        as ``state_dict()`` is."""
        with self._locked():
            if self.shard:
                import torch.distributed as dist

                self._flush("save()", collective=True)
                world = dist.get_world_size()
                ranges = [_shard.range_of(self.num_samples, world, r) for r in range(world)]
                _checkpoint.save_shards(path, self._snapshot(), ranges, dist.get_rank(), self.device)
                return
            self._flush("save()")
            state = self._snapshot()
        _checkpoint.atomic_save(state, path)

    def load(self, path: str) -> None:
        """Restores a tracker written by ``save`` (same checks as ``load_state_dict``); never runs code
        from the file (``weights_only=True``).

        Sharded (a collective: call it on every rank): reads the shards overlapping this rank's ids,
        whatever world size wrote them (a rank that owns no ids gets an empty shard). Every rank checks
        its part, then they agree: when any rank's part is missing or malformed, every rank raises
        (that rank its own error) and none changes."""
        if not self.shard:
            self.load_state_dict(_checkpoint.load_plain(path, "memcore Tracker checkpoint"))
            return
        with self._locked():
            dev = self.device or torch.device("cpu")
            _shard.header("load()", self.num_samples, 0, dev)
            err: Optional[BaseException] = None
            try:
                state = _checkpoint.load_shards(path, self._start, self._end, self.num_samples)
                new = _checkpoint.validate(state, self.num_samples, self._start, self._end, dev)
            except Exception as e:  # noqa: BLE001  (whatever fails here must reach the other ranks)
                err = e
            if not _checkpoint.all_ok(err is None, dev):
                if err is not None:
                    raise err
                raise ValueError(
                    f"loading the sharded checkpoint {path!r} failed on another rank (see its error); "
                    "no rank's tracker changed"
                )
            self._assign(new)

    def __repr__(self) -> str:
        return (
            f"Tracker(num_samples={self.num_samples}, device={self.device}, epochs={self.epochs}, "
            f"strict={self.strict}{', shard=True' if self.shard else ''})"
        )


def _capturing() -> bool:
    """True while the current CUDA stream captures a graph, where a host sync (reading the status
    word, a flush's boolean mask) is illegal. A capture needs CUDA initialized; asking only then keeps
    a CPU-only run from initializing CUDA here (is_current_stream_capturing would)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _resolve(dev: torch.device) -> torch.device:
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def _warn_once(tracker: Tracker, cause: str, message: str) -> None:
    """A UserWarning for a likely misuse, once per tracker and cause, attributed to the first caller
    outside memcore and torch (the tracker's methods sit behind decorators of both)."""
    warned = tracker.__dict__.setdefault("_warned", set())
    if cause in warned:
        return
    warned.add(cause)
    inside = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


__all__ = ["Tracker", "SCORE_NAMES", "same_device"]
