"""Tracker: per-sample training statistics, filled by `memcore.accumulate`, read by `scores()`."""
import math
import threading
from typing import Any, Dict, List, Optional, Union

import torch

from . import _layout as L
from ._io import atomic_save, load_plain
from ._validate import describe_bits, explain_status, same_device

DeviceLike = Union[str, torch.device, None]

SCORE_NAMES = (
    "csl", "csl_mean", "rows", "last_loss", "learning_time", "forgetting",
    "confidence_mean", "confidence_std", "aum", "correctness",
    "input_grad_norm", "learning_time_formal",
)


class Tracker:
    """Per-sample statistics over a training run, all in float64.

    Args:
        num_samples: size of the dataset; ``accumulate`` indices lie in [0, num_samples).
        device: where the buffers live (``"cuda"``, ``"cpu"``, ...). ``None`` adopts the device of
            the first batch passed to ``accumulate``.
        strict: True (default) raises on a bad batch inside ``accumulate`` (one host sync per
            call on GPU). False defers the error to the next ``end_epoch()`` / ``scores()``: the bad
            batch is still skipped, but no sync is needed per step. Inside ``torch.compile`` errors
            are always deferred.
        correct_threshold: a sample counts as correctly classified in an epoch when at least this
            fraction of its rows that epoch were predicted right (1.0: all of them; it matters only
            when several rows share an index, e.g. tokens of a sequence).
        tau: threshold of ``learning_time_formal``; None (default) uses the dataset mean of
            ``input_grad_norm``, as in the CSL paper (App. B.4).
        distributed: merge statistics across torch.distributed ranks in ``end_epoch()`` and
            ``scores()`` (all_reduce). None (default): whenever a process group with more than one
            rank is initialized. Each rank records the samples it sees; every rank ends up with the
            scores of the whole dataset, equal to a single-process run on the same data order.

    Memory: 2 * 8 float64 + 4 scalars per sample (~160 bytes): 1.6 MB for 10k samples, 160 MB
    for 1M; with input gradients recorded, 4 bytes more per sample and epoch (CPU history).
    """

    VERSION = 1

    def __init__(
        self,
        num_samples: int,
        device: DeviceLike = None,
        *,
        strict: bool = True,
        correct_threshold: float = 1.0,
        tau: Optional[float] = None,
        distributed: Optional[bool] = None,
    ) -> None:
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not 0.0 < float(correct_threshold) <= 1.0:
            raise ValueError(f"correct_threshold must be in (0, 1], got {correct_threshold!r}")
        self.num_samples = num_samples
        self.strict = bool(strict)
        self.correct_threshold = float(correct_threshold)
        self.tau = tau
        self.distributed = distributed
        self.epochs = 0  # completed epochs
        # running mean of the squared input-gradient norm after each epoch, float32 CPU [S] each,
        # from the first epoch that recorded input gradients (epoch index _grad_start)
        self._grad_history: List[torch.Tensor] = []
        self._grad_start = -1
        self.device: Optional[torch.device] = None if device is None else _resolve(torch.device(device))
        # serialises the commits of concurrent accumulate calls (threads sharing one tracker): the
        # CPU commit kernels add without atomics, so two commits at once could lose updates
        self._lock = threading.Lock()
        self._alloc(self.device or torch.device("cpu"))

    # ------------------------------------------------------------------ buffers
    def _alloc(self, device: torch.device) -> None:
        s, f64 = self.num_samples, dict(dtype=torch.float64, device=device)
        self._epoch = torch.zeros(s, L.NUM_STATS, **f64)  # written by the kernels
        self._total = torch.zeros(s, L.NUM_STATS, **f64)  # completed epochs
        self._last_loss = torch.full((s,), float("nan"), **f64)
        self._prev_correct = torch.zeros(s, dtype=torch.bool, device=device)
        self._forgetting = torch.zeros(s, dtype=torch.int64, device=device)
        self._learned_since = torch.full((s,), -1, dtype=torch.int64, device=device)
        self._errors = torch.zeros(1, dtype=torch.int32, device=device)
        self._grad_epoch = torch.zeros(s, L.NUM_GRAD_STATS, **f64)  # written by sqnorm_commit
        self._grad_total = torch.zeros(s, L.NUM_GRAD_STATS, **f64)

    def _buffers(self) -> Dict[str, torch.Tensor]:
        return {
            "epoch": self._epoch, "total": self._total, "last_loss": self._last_loss,
            "prev_correct": self._prev_correct, "forgetting": self._forgetting,
            "learned_since": self._learned_since, "errors": self._errors,
            "grad_epoch": self._grad_epoch, "grad_total": self._grad_total,
        }

    def _set_buffers(self, bufs: Dict[str, torch.Tensor]) -> None:
        for k, v in bufs.items():
            setattr(self, "_" + k, v)

    def to(self, device: DeviceLike) -> "Tracker":
        """Moves all buffers to ``device`` (in place) and returns self."""
        dev = _resolve(torch.device(device))
        self._set_buffers({k: v.to(dev) for k, v in self._buffers().items()})
        self.device = dev
        return self

    def _stats_for(self, device: torch.device) -> torch.Tensor:
        if self.device is None:
            if device.type == "meta":  # adopting it would leave the tracker without values for good
                raise ValueError("logits are on the meta device (no values): memcore.accumulate needs real "
                                 "tensors; the tracker was not updated and keeps device=None")
            self.to(device)
        return self._epoch

    def __getstate__(self) -> Dict[str, Any]:  # copy / deepcopy / pickle: a lock cannot be copied
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _grad_stats_for(self, device: torch.device) -> torch.Tensor:
        self._stats_for(device)
        if self._grad_start < 0:
            self._grad_start = self.epochs
        return self._grad_epoch

    # ------------------------------------------------------------------ errors
    def _after_batch(self, status, logits, targets, index, ignore_index, loss) -> None:
        if self.strict and not torch.compiler.is_compiling() and not _capturing(status):
            bits = int(status.item())
            if bits:
                raise explain_status(bits, logits, targets, index, self.num_samples, ignore_index, loss)
        else:
            self._errors.bitwise_or_(status)

    def _raise_deferred(self, errors: torch.Tensor) -> None:
        bits = int(errors.item())
        if bits:
            self._errors.zero_()
            raise ValueError(
                f"memcore.accumulate rejected at least one batch since the last check ({describe_bits(bits)}); "
                f"those batches were not recorded. Use Tracker(strict=True) outside torch.compile to "
                f"raise at the offending call."
            )

    # ------------------------------------------------------------------ epochs
    def _distributed(self) -> bool:
        if self.distributed is not None:
            return self.distributed
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _merged(self) -> Dict[str, torch.Tensor]:
        """This epoch's buffers summed over all ranks (a collective), or the local ones."""
        local = {"epoch": self._epoch, "grad_epoch": self._grad_epoch, "errors": self._errors}
        if not self._distributed():
            return local
        import torch.distributed as dist

        self._check_ranks_agree(dist)
        merged = {k: v.clone() for k, v in local.items()}
        dist.all_reduce(merged["epoch"])
        dist.all_reduce(merged["grad_epoch"])
        flags = torch.stack([(merged["errors"] & b).ne(0).to(torch.int32) for b in (1, 2, 4)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        merged["errors"] = (flags.view(-1) * torch.tensor([1, 2, 4], dtype=torch.int32, device=flags.device)).sum().view(1)
        return merged

    def _check_ranks_agree(self, dist) -> None:
        """Raises ValueError on every rank when the ranks' trackers differ in num_samples, completed
        epochs or correct_threshold: all_reduce over buffers of different sizes would abort the
        process inside the backend (gloo: SIGABRT) or merge unrelated epochs. One all_gather of
        three int64 per call (end_epoch / scores only)."""
        thr_bits = torch.tensor([self.correct_threshold], dtype=torch.float64).view(torch.int64)
        mine = torch.cat([torch.tensor([self.num_samples, self.epochs], dtype=torch.int64), thr_bits])
        mine = mine.to(self._epoch.device)
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        rows = [tuple(int(x) for x in t.cpu()) for t in everyone]
        if any(r != rows[0] for r in rows):
            desc = "; ".join(
                f"rank {i}: num_samples={r[0]}, epochs={r[1]}, correct_threshold="
                f"{torch.tensor([r[2]], dtype=torch.int64).view(torch.float64).item()}"
                for i, r in enumerate(rows))
            raise ValueError(f"memcore Trackers differ across ranks ({desc}); every rank must create its "
                             f"Tracker with the same num_samples and correct_threshold and call "
                             f"end_epoch() the same number of times")

    def _fold(self, merged: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Buffers after closing the current epoch from its (merged) statistics; self is not modified."""
        e = merged["epoch"]
        rows = e[:, L.ROWS]
        seen = rows > 0
        correct = e[:, L.CORRECT] >= self.correct_threshold * rows - 1e-9
        correct = correct & seen
        last_loss = torch.where(seen, e[:, L.LOSS_SUM] / rows.clamp_min(1), self._last_loss)
        forgot = seen & self._prev_correct & ~correct
        start = torch.where(self._learned_since >= 0, self._learned_since,
                            torch.full_like(self._learned_since, self.epochs))
        learned = torch.where(seen, torch.where(correct, start, torch.full_like(start, -1)), self._learned_since)
        return {
            "epoch": torch.zeros_like(e),
            "total": self._total + e,
            "last_loss": last_loss,
            "prev_correct": torch.where(seen, correct, self._prev_correct),
            "forgetting": self._forgetting + forgot.to(torch.int64),
            "learned_since": learned,
            "errors": self._errors,
            "grad_epoch": torch.zeros_like(self._grad_epoch),
            "grad_total": self._grad_total + merged["grad_epoch"],
        }

    def end_epoch(self) -> None:
        """Closes the epoch: updates last loss, learning time and forgetting from its statistics.

        Call once per pass over the data, after the last ``accumulate`` of the epoch. Under
        torch.distributed this is a collective: call it on every rank; the ranks' statistics are
        summed, so every rank holds the scores of the whole dataset.
        """
        merged = self._merged()
        self._raise_deferred(merged["errors"])
        folded = self._fold(merged)
        if self._grad_start >= 0:
            self._grad_history.append(_grad_mean(folded["grad_total"]).float().cpu())
        self._set_buffers(folded)
        self.epochs += 1

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def scores(self) -> Dict[str, torch.Tensor]:
        """Per-sample scores, each a float64 CPU tensor [num_samples]; higher = more memorized-like
        for csl, csl_mean, last_loss, learning_time, forgetting; lower for confidence_mean, aum,
        correctness. Samples never seen give NaN for the means and 0 for the sums.

        An epoch in progress (``accumulate`` called since the last ``end_epoch``) is included as if
        it had just ended; the tracker itself is not changed. A collective under torch.distributed.

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
        merged = self._merged()
        self._raise_deferred(merged["errors"])
        open_epoch = bool(merged["epoch"][:, L.ROWS].any())
        st = self._fold(merged) if open_epoch else self._buffers()
        epochs = self.epochs + int(open_epoch)
        tot = st["total"]
        rows = tot[:, L.ROWS]
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=tot.device)

        def mean(col: int) -> torch.Tensor:
            return torch.where(rows > 0, tot[:, col] / rows.clamp_min(1), nan)

        conf = mean(L.PROB_SUM)
        var = (mean(L.PROB_SQ_SUM) - conf * conf).clamp_min(0)
        learned = st["learned_since"]
        lt = torch.where(learned >= 0, learned, torch.full_like(learned, epochs)).double()
        out = {
            "csl": tot[:, L.LOSS_SUM],
            "csl_mean": mean(L.LOSS_SUM),
            "rows": rows,
            "last_loss": st["last_loss"],
            "learning_time": torch.where(rows > 0, lt, nan),
            "forgetting": st["forgetting"].double(),
            "confidence_mean": conf,
            "confidence_std": var.sqrt(),
            "aum": mean(L.MARGIN_SUM),
            "correctness": mean(L.CORRECT),
        }
        out.update(self._formal_learning_time(st["grad_total"], epochs, open_epoch))
        return {k: v.detach().to("cpu", torch.float64).clone() for k, v in out.items()}

    def _formal_learning_time(self, grad_total: torch.Tensor, epochs: int, open_epoch: bool) -> Dict[str, torch.Tensor]:
        norm = _grad_mean(grad_total)
        if self._grad_start < 0:
            nan = torch.full_like(norm, float("nan"))
            return {"input_grad_norm": nan, "learning_time_formal": nan}
        hist = self._grad_history + ([norm.float().cpu()] if open_epoch else [])
        if not hist:  # recording started, but no epoch with rows since (e.g. empty batches only)
            return {"input_grad_norm": norm, "learning_time_formal": torch.full_like(norm, float("nan"))}
        tau = float(self.tau) if self.tau is not None else float(norm[~norm.isnan()].mean())
        below = torch.stack(hist) <= tau  # [E, S]; NaN (not yet seen) compares False
        # stays[e] = below at every epoch >= e: "learned" is for good, as in learning_time
        stays = torch.flip(torch.cumprod(torch.flip(below.int(), [0]), 0), [0]).bool()
        first = stays.int().argmax(0).double() + self._grad_start
        lt = torch.where(stays.any(0), first, torch.full_like(first, float(epochs)))
        lt = torch.where(norm.isnan().cpu(), torch.full_like(lt, float("nan")), lt)
        return {"input_grad_norm": norm, "learning_time_formal": lt}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume: buffers (CPU copies) and counters."""
        return {
            "version": self.VERSION,
            "num_samples": self.num_samples,
            "epochs": self.epochs,
            "correct_threshold": self.correct_threshold,
            "tau": None if self.tau is None else float(self.tau),  # plain float: loads with weights_only
            "buffers": {k: v.detach().cpu().clone() for k, v in self._buffers().items()},
            "grad_start": self._grad_start,
            "grad_history": [h.clone() for h in self._grad_history],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a ``state_dict()``; buffers land on this tracker's device.

        Everything is checked before anything is changed (keys, types, buffer shapes and dtypes,
        ranges: epochs >= 0, -1 <= grad_start <= epochs, one grad_history entry per epoch since
        grad_start, counters in range): a rejected state raises ValueError and leaves the
        tracker exactly as it was.
        """
        new = self._checked_state(state)
        # the swap: plain assignments, none of which can fail
        self._set_buffers(new["buffers"])
        self.epochs = new["epochs"]
        self.correct_threshold = new["correct_threshold"]
        self.tau = new["tau"]
        self._grad_start = new["grad_start"]
        self._grad_history = new["grad_history"]

    def _checked_state(self, state: Any) -> Dict[str, Any]:
        """Validates a state_dict and returns the values load_state_dict assigns (buffers copied
        onto this tracker's device); raises ValueError without touching self."""
        if not isinstance(state, dict) or "version" not in state:
            raise ValueError("state is not a memcore Tracker state_dict")
        if state["version"] != self.VERSION:
            raise ValueError(f"tracker state has format version {state['version']}, this memcore reads {self.VERSION}")
        keys = {"version", "num_samples", "epochs", "correct_threshold", "tau", "buffers", "grad_start",
                "grad_history"}
        if set(state) != keys:
            missing, extra = sorted(keys - set(state)), sorted(set(state) - keys)
            raise ValueError(f"tracker state has missing keys {missing} / unexpected keys {extra}")

        def integer(name: str) -> int:
            v = state[name]
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"tracker state {name!r} must be an int, got {v!r}")
            return v

        if integer("num_samples") != self.num_samples:
            raise ValueError(
                f"tracker state is for num_samples={state['num_samples']}, this tracker has {self.num_samples}"
            )
        epochs = integer("epochs")
        if epochs < 0:
            raise ValueError(f"tracker state 'epochs' must be >= 0, got {epochs}")
        thr = state["correct_threshold"]
        if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not 0.0 < float(thr) <= 1.0:
            raise ValueError(f"tracker state 'correct_threshold' must be in (0, 1], got {thr!r}")
        tau = state["tau"]
        if tau is not None and (not isinstance(tau, (int, float)) or isinstance(tau, bool)
                                or not math.isfinite(float(tau))):
            raise ValueError(f"tracker state 'tau' must be None or a finite number, got {tau!r}")
        grad_start = integer("grad_start")
        if not -1 <= grad_start <= epochs:
            raise ValueError(f"tracker state 'grad_start' must be in [-1, epochs={epochs}], got {grad_start}")
        hist = state["grad_history"]
        want_len = 0 if grad_start < 0 else epochs - grad_start
        if not isinstance(hist, (list, tuple)) or len(hist) != want_len:
            raise ValueError(f"tracker state 'grad_history' must be a list of {want_len} tensors (one per "
                             f"epoch since grad_start={grad_start}), got {type(hist).__name__} of "
                             f"{len(hist) if isinstance(hist, (list, tuple)) else '?'}")
        for i, h in enumerate(hist):
            if not isinstance(h, torch.Tensor) or h.dtype != torch.float32 or tuple(h.shape) != (self.num_samples,):
                raise ValueError(f"tracker state grad_history[{i}] must be a float32 tensor [{self.num_samples}], "
                                 f"got {getattr(h, 'dtype', type(h).__name__)}{tuple(getattr(h, 'shape', ()))}")

        bufs = state["buffers"]
        mine = self._buffers()
        if not isinstance(bufs, dict) or set(bufs) != set(mine):
            got = sorted(bufs) if isinstance(bufs, dict) else type(bufs).__name__
            raise ValueError(f"tracker state has buffers {got}, expected {sorted(mine)}")
        for k, v in bufs.items():
            if (not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.shape != mine[k].shape
                    or v.dtype != mine[k].dtype):
                desc = f"{v.dtype}{tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"tracker state buffer {k!r} has {desc}, expected "
                                 f"{mine[k].dtype}{tuple(mine[k].shape)}")
        ranges = (  # (buffer, ok(values), what is required)
            ("learned_since", lambda t: ((t >= -1) & (t <= epochs)).all(), f"in [-1, epochs={epochs}]"),
            ("forgetting", lambda t: ((t >= 0) & (t <= epochs)).all(), f"in [0, epochs={epochs}]"),
            ("errors", lambda t: ((t >= 0) & (t <= 7)).all(), "a status word in [0, 7]"),
            ("epoch", lambda t: (t[:, L.ROWS] >= 0).all(), "row counts >= 0"),
            ("total", lambda t: (t[:, L.ROWS] >= 0).all(), "row counts >= 0"),
            ("grad_epoch", lambda t: (t[:, L.GRAD_ROWS] >= 0).all(), "row counts >= 0"),
            ("grad_total", lambda t: (t[:, L.GRAD_ROWS] >= 0).all(), "row counts >= 0"),
        )
        for k, ok, what in ranges:
            if not bool(ok(bufs[k])):
                raise ValueError(f"tracker state buffer {k!r} holds values out of range (must be {what})")

        dev = self.device or torch.device("cpu")
        return {
            "buffers": {k: v.detach().to(dev).clone() for k, v in bufs.items()},
            "epochs": epochs,
            "correct_threshold": float(thr),
            "tau": None if tau is None else float(tau),
            "grad_start": grad_start,
            "grad_history": [h.detach().cpu().clone() for h in hist],
        }

    def save(self, path: str) -> None:
        """Writes ``state_dict()`` to ``path`` through a temporary file and an atomic rename, so a
        crash while saving never destroys the previous checkpoint at ``path``."""
        atomic_save(self.state_dict(), path)

    def load(self, path: str) -> None:
        """Restores a tracker written by ``save`` (same checks as ``load_state_dict``). The file is read
        with ``torch.load(weights_only=True)``: it can hold only tensors, numbers, lists and dicts,
        so loading never runs code; anything else raises ValueError and changes nothing."""
        self.load_state_dict(load_plain(path, "memcore Tracker checkpoint"))

    def __repr__(self) -> str:
        return (f"Tracker(num_samples={self.num_samples}, device={self.device}, epochs={self.epochs}, "
                f"strict={self.strict})")


def _grad_mean(grad_stats: torch.Tensor) -> torch.Tensor:
    rows = grad_stats[:, L.GRAD_ROWS]
    return torch.where(rows > 0, grad_stats[:, L.GRAD_SQ_SUM] / rows.clamp_min(1),
                       torch.full_like(rows, float("nan")))


def _capturing(status: torch.Tensor) -> bool:
    """True inside CUDA-graph capture, where reading the status word (a sync) is illegal: the error
    is deferred to end_epoch() / scores(), as under torch.compile."""
    return status.is_cuda and torch.cuda.is_current_stream_capturing()


def _resolve(dev: torch.device) -> torch.device:
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


__all__ = ["Tracker", "SCORE_NAMES", "same_device"]
