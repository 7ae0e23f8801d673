"""Input-loss curvature (Garg, Ravikumar & Roy, "Memorization through the lens of curvature of loss
function around samples", 2023/ICML 2024): how sharply each sample's loss bends around the sample
w.r.t. the input. Averaged over training, high curvature flags memorized, mislabeled and
duplicated samples.

    out = memcore.curvature(model, x, y, index=idx)        # one batch
    tracker = memcore.CurvatureTracker(len(train_set))    # whole dataset, averaged over epochs
    tracker.update(model, loader)                         # at epoch ends; loader yields (x, y, index)
    tracker.scores()["curvature"]

The probes v are Rademacher vectors regenerated from Philox4x32-10 inside the kernels
(memcore::rademacher_perturb, memcore::probe_reduce), a pure function of (seed, index, probe), so a
sample's score does not depend on the batch it came in, its position, the chunking or the device.
"""

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _ops  # noqa: F401  (operator registration)
from ._validate import FLOAT_DTYPES, _require_integer, _require_tensor, as_float, as_int, same_device

MODES = ("fd", "hvp")
DEFAULT_MAX_ROWS = 256

__all__ = ["curvature", "CurvatureTracker", "MODES", "DEFAULT_MAX_ROWS"]


# ---------------------------------------------------------------------------------- validation
def _seed64(seed: Any) -> int:
    """The 64 bits of seed as the signed int64 the kernels take (Philox key = its lo, hi words)."""
    seed = as_int(seed, "seed", minimum=-(1 << 63), maximum=(1 << 64) - 1)
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _check_batch(model, inputs, targets, index) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not callable(model):
        raise TypeError(f"model must be callable (a torch.nn.Module), got {type(model).__name__}")
    _require_tensor(inputs, "inputs")
    _require_tensor(targets, "targets")
    if inputs.dtype not in FLOAT_DTYPES:
        raise TypeError(f"inputs must be float16, bfloat16, float32 or float64, got {inputs.dtype}")
    if inputs.dim() < 1:
        raise ValueError("inputs must have shape [B, ...] (a batch of samples), got a 0-d tensor")
    b = inputs.shape[0]
    _require_integer(targets, "targets")
    if tuple(targets.shape) != (b,):
        raise ValueError(
            f"targets must have shape ({b},) to match inputs {tuple(inputs.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    if not same_device(targets.device, inputs.device):
        raise ValueError(f"targets are on {targets.device} but inputs are on {inputs.device}")
    if index is None:
        index = torch.arange(b, device=inputs.device)
    else:
        _require_tensor(index, "index")
        _require_integer(index, "index")
        if tuple(index.shape) != (b,):
            raise ValueError(
                f"index must have shape ({b},) (one dataset index per sample of inputs "
                f"{tuple(inputs.shape)}), got {tuple(index.shape)}"
            )
        index = index.to(inputs.device, torch.int64)
        if b and int(index.min()) < 0:
            row = int((index < 0).nonzero()[0, 0])
            raise IndexError(f"index[{row}] = {int(index[row])} is negative; dataset indices must be >= 0")
    out = []
    for t in (inputs.detach(), targets.to(torch.int64), index):
        if t.is_inference():  # made under torch.inference_mode: autograd cannot save it
            with torch.inference_mode(False):
                t = t.clone()
        out.append(t.contiguous())
    return out[0], out[1], out[2]


# ---------------------------------------------------------------------------------- gradients
def _loss(
    model: Callable, x: torch.Tensor, y: torch.Tensor, check_targets: Optional[int] = None
) -> torch.Tensor:
    """Sum over rows of each row's own cross-entropy (no 1/B scaling), checking the logits and, when
    check_targets is the row offset of y in the batch, the targets' range."""
    logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits [N, C] for inputs of N={x.shape[0]} rows, got {shape}")
    c = logits.shape[1]
    if check_targets is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        row = int(((y < 0) | (y >= c)).nonzero()[0, 0])
        raise IndexError(
            f"targets[{row + check_targets}] = {int(y[row])} is outside [0, {c}) for a model with {c} classes"
        )
    return F.cross_entropy(logits, y, reduction="sum")


def _input_grad(
    model: Callable, x: torch.Tensor, y: torch.Tensor, check_targets: Optional[int] = None
) -> torch.Tensor:
    """grad_x of the summed per-sample losses, w.r.t. x only (parameters' .grad untouched)."""
    xg = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(_loss(model, xg, y, check_targets), xg, allow_unused=True)
    return torch.zeros_like(x) if g is None else g.contiguous()  # None: the model ignores x


def _fd_rows(model, x, y, index, n_probes, h, seed, max_rows, sq, vd) -> None:
    """Fills sq [P, B] = ||g(x + h v) - g(x)||^2 and vd [P, B] = v . (g(x + h v) - g(x))."""
    b = x.shape[0]
    rest = x.shape[1:]
    bs = min(b, max_rows)  # samples per clean pass
    for s0 in range(0, b, bs):
        xs, ys, ix = x[s0 : s0 + bs], y[s0 : s0 + bs], index[s0 : s0 + bs]
        n = xs.shape[0]
        g_clean = _input_grad(model, xs, ys, check_targets=s0)  # once per batch, shared by every probe
        pc = max(1, max_rows // n)  # probes per perturbed pass: pc * n <= max_rows rows
        for p0 in range(0, n_probes, pc):
            np_ = min(pc, n_probes - p0)
            xp = torch.ops.memcore.rademacher_perturb(xs, ix, seed, p0, np_, h)  # [np_, n, ...]
            gp = _input_grad(model, xp.reshape(np_ * n, *rest), ys.repeat(np_)).reshape(np_, n, *rest)
            s, v = torch.ops.memcore.probe_reduce(gp, g_clean, ix, seed, p0)
            sq[p0 : p0 + np_, s0 : s0 + n] = s
            vd[p0 : p0 + np_, s0 : s0 + n] = v


def _hvp_rows(model, x, y, index, n_probes, h, seed, max_rows, sq, vd) -> None:
    """Same quantities from exact Hessian-vector products (double backward): h H v replaces the
    gradient difference, so sq = ||h H v||^2 and vd = h v . H v."""
    b = x.shape[0]
    rest = list(x.shape[1:])
    bs = min(b, max_rows)
    for s0 in range(0, b, bs):
        xs, ys, ix = x[s0 : s0 + bs], y[s0 : s0 + bs], index[s0 : s0 + bs]
        n = xs.shape[0]
        xg = xs.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(
            _loss(model, xg, ys, check_targets=s0), xg, create_graph=True, allow_unused=True
        )
        for p in range(n_probes):
            v = torch.ops.memcore.rademacher(ix, seed, p, 1, rest, x.dtype)[0]
            hv = None
            if g is not None and g.requires_grad:
                (hv,) = torch.autograd.grad(g, xg, v, retain_graph=p + 1 < n_probes, allow_unused=True)
            if hv is None:  # the gradient does not depend on x: H = 0
                hv = torch.zeros_like(v)
            hv = hv.double().reshape(n, -1) * h
            sq[p, s0 : s0 + n] = hv.pow(2).sum(1)
            vd[p, s0 : s0 + n] = (v.double().reshape(n, -1) * hv).sum(1)


def _mean_over_probes(vals: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of [P, B], summed in probe order so that a sample's result never depends
    on B (torch's reductions may pick a different summation order for different shapes)."""
    acc = vals[0].clone()
    for p in range(1, vals.shape[0]):
        acc += vals[p]
    return acc / vals.shape[0]


# ---------------------------------------------------------------------------------- public API
def curvature(
    model: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    index: Optional[torch.Tensor] = None,
    n_probes: int = 10,
    h: float = 1e-3,
    seed: int = 0,
    mode: str = "fd",
    max_rows: int = DEFAULT_MAX_ROWS,
) -> Dict[str, torch.Tensor]:
    """Input-loss curvature of each sample of a batch (Garg et al. 2023).

    With l the sample's own cross-entropy, g(x) = grad_x l(x) and Rademacher probes v (entries +-1):

    - ``curvature`` = mean over probes of ||g(x + h v) - g(x)||_2, the papers' score;
    - ``trace`` = mean over probes of v . (g(x + h v) - g(x)) / h, Hutchinson's estimate of the
      trace of the input Hessian of l.

    Args:
        model: maps inputs [N, ...] to logits [N, C]. Evaluated in eval mode (each module's
            train/eval flag is restored afterwards); its parameters and their .grad are not touched.
        inputs: [B, ...] float16 / bfloat16 / float32 / float64 samples (any shape after B). In
            fp16/bf16, x + h v is rounded to the input dtype: use h >= 1e-2 or float32 inputs.
        targets: [B] integer labels in [0, C).
        index: [B] integer dataset indices (>= 0) of the samples; default ``arange(B)``. The probes
            of a sample depend only on (seed, index), so its score does not depend on the batch.
        n_probes: probes per sample (>= 1).
        h: finite-difference step (> 0).
        seed: 64-bit seed of the probes.
        mode: "fd" (default): one clean gradient per batch plus batched perturbed gradients, with
            the fused memcore kernels. "hvp": exact Hessian-vector products by double backward,
            same probes, ``curvature`` = mean ||h H v||, ``trace`` = mean v . H v (validation).
        max_rows: memory budget, the most rows (probes x samples) in one forward/backward.

    Returns:
        {"curvature": [B], "trace": [B]}, float64 tensors on ``inputs.device``.

    Raises:
        TypeError / ValueError naming the argument for wrong types, shapes, devices or settings;
        IndexError for a negative index or a target outside [0, C).
    """
    n_probes = as_int(n_probes, "n_probes", minimum=1)
    max_rows = as_int(max_rows, "max_rows", minimum=1)
    h = as_float(h, "h", minimum=0.0, open_minimum=True)
    seed = _seed64(seed)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    with torch.inference_mode(False):  # callable from no_grad / inference_mode code
        x, y, index = _check_batch(model, inputs, targets, index)
        b = x.shape[0]
        f64 = dict(dtype=torch.float64, device=x.device)
        sq = torch.zeros(n_probes, b, **f64)
        vd = torch.zeros(n_probes, b, **f64)
        if b == 0:
            return {"curvature": sq[0], "trace": vd[0]}
        modes: List[Tuple[torch.nn.Module, bool]] = (
            [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
        )
        try:
            if isinstance(model, torch.nn.Module):
                model.eval()
            with torch.enable_grad():
                fill = _fd_rows if mode == "fd" else _hvp_rows
                fill(model, x, y, index, n_probes, h, seed, max_rows, sq, vd)
        finally:
            for m, was_training in modes:
                m.training = was_training
    return {"curvature": _mean_over_probes(sq.sqrt()), "trace": _mean_over_probes(vd) / h}


class CurvatureTracker:
    """Per-sample input-loss curvature over a dataset, averaged over several checkpoints / epochs
    as in the paper. Call :meth:`update` at epoch ends (or on saved checkpoints).

    Args:
        num_samples: dataset size; the loader's indices lie in [0, num_samples).
        n_probes, h, seed, mode, max_rows: as in :func:`memcore.curvature`.
        fresh_probes: True (default) draws new probes at every update (update k uses seed
            ``seed + k * 2**32``), lowering the variance of the average; False reuses the same
            probes, so updates differ only through the model.
        progress: show a tqdm progress bar during :meth:`update`.

    Memory: three float64 values per sample (24 bytes), on the CPU.
    """

    VERSION = 1
    _BUFFERS = ("curvature_sum", "trace_sum", "count")

    def __init__(
        self,
        num_samples: int,
        n_probes: int = 10,
        h: float = 1e-3,
        seed: int = 0,
        *,
        mode: str = "fd",
        max_rows: int = DEFAULT_MAX_ROWS,
        fresh_probes: bool = True,
        progress: bool = True,
    ) -> None:
        self.num_samples = as_int(num_samples, "num_samples", minimum=1)
        self.n_probes = as_int(n_probes, "n_probes", minimum=1)
        self.h = as_float(h, "h", minimum=0.0, open_minimum=True)
        _seed64(seed)
        self.seed = int(seed)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.max_rows = as_int(max_rows, "max_rows", minimum=1)
        self.fresh_probes = bool(fresh_probes)
        self.progress = bool(progress)
        self.updates = 0
        z = torch.zeros(self.num_samples, dtype=torch.float64)
        self.curvature_sum, self.trace_sum, self.count = z, z.clone(), z.clone()

    def _seed_for(self, update: int) -> int:
        return _seed64((self.seed + (update << 32 if self.fresh_probes else 0)) & ((1 << 64) - 1))

    def update(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        loader: Iterable,
        *,
        device: Optional[torch.device] = None,
    ) -> Dict[str, torch.Tensor]:
        """Scores every sample the loader yields with the current model and adds it to the average.

        Args:
            model: the network at this checkpoint (evaluated in eval mode, left unchanged).
            loader: iterable of (inputs [B, ...], targets [B], index [B]) batches, e.g. a
                DataLoader over a dataset that returns the sample index.
            device: where to run; default the device of the model's first parameter (CPU if none).

        Returns:
            This update's scores, {"curvature", "curvature_trace"}: float64 CPU [num_samples],
            NaN for samples the loader did not yield.
        """
        if device is None:
            p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
            device = p.device if p is not None else torch.device("cpu")
        seed = self._seed_for(self.updates)
        cs = torch.zeros(self.num_samples, dtype=torch.float64)
        ts, cnt = cs.clone(), cs.clone()
        try:
            total: Optional[int] = len(loader)  # type: ignore[arg-type]
        except TypeError:  # iterable-style datasets have no length
            total = None
        batches: Iterable = loader
        if self.progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is a dependency, but a missing one only costs the bar
                pass
            else:
                batches = tqdm(loader, total=total, desc=f"curvature (update {self.updates})")
        for i, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                raise ValueError(
                    f"loader must yield (inputs, targets, index) batches; batch {i} is "
                    f"{type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                )
            x, y, ix = batch
            _require_tensor(ix, "index")
            _require_integer(ix, "index")
            ix = ix.reshape(-1).to(torch.int64).cpu()
            if ix.numel() and (int(ix.min()) < 0 or int(ix.max()) >= self.num_samples):
                row = int(((ix < 0) | (ix >= self.num_samples)).nonzero()[0, 0])
                raise IndexError(
                    f"index[{row}] = {int(ix[row])} in batch {i} is outside [0, {self.num_samples}) "
                    f"(the tracker's num_samples)"
                )
            _require_tensor(x, "inputs")
            out = curvature(
                model,
                x.to(device),
                y.to(device) if isinstance(y, torch.Tensor) else y,
                index=ix.to(device),
                n_probes=self.n_probes,
                h=self.h,
                seed=seed,
                mode=self.mode,
                max_rows=self.max_rows,
            )
            cs.index_add_(0, ix, out["curvature"].cpu())
            ts.index_add_(0, ix, out["trace"].cpu())
            cnt.index_add_(0, ix, torch.ones(ix.numel(), dtype=torch.float64))
        self.curvature_sum += cs
        self.trace_sum += ts
        self.count += cnt
        self.updates += 1
        return self._means(cs, ts, cnt)

    @staticmethod
    def _means(cs: torch.Tensor, ts: torch.Tensor, cnt: torch.Tensor) -> Dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        seen = cnt > 0
        return {
            "curvature": torch.where(seen, cs / cnt.clamp_min(1), nan),
            "curvature_trace": torch.where(seen, ts / cnt.clamp_min(1), nan),
        }

    def scores(self) -> Dict[str, torch.Tensor]:
        """Per-sample averages over every update, float64 CPU [num_samples], NaN where never scored:

        - ``curvature``: mean input-loss curvature (the papers' score; high = memorized-like);
        - ``curvature_trace``: mean Hutchinson estimate of the input-Hessian trace;
        - ``curvature_count``: how many times the sample was scored.
        """
        out = self._means(self.curvature_sum, self.trace_sum, self.count)
        out["curvature_count"] = self.count.clone()
        return out

    def state_dict(self) -> Dict[str, Any]:
        """Settings, update count and sums (CPU copies), enough to resume."""
        return {
            "version": self.VERSION,
            "num_samples": self.num_samples,
            "n_probes": self.n_probes,
            "h": self.h,
            "seed": self.seed,
            "mode": self.mode,
            "fresh_probes": self.fresh_probes,
            "updates": self.updates,
            "buffers": {k: getattr(self, k).clone() for k in self._BUFFERS},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` (its settings included); ValueError if it is not one or is
        for another num_samples."""
        if not isinstance(state, dict) or state.get("version") is None or "buffers" not in state:
            raise ValueError("state is not a memcore CurvatureTracker state_dict")
        if state["version"] != self.VERSION:
            raise ValueError(
                f"curvature state has format version {state['version']}, this memcore reads {self.VERSION}"
            )
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"curvature state is for num_samples={state['num_samples']}, this tracker has "
                f"{self.num_samples}"
            )
        bufs = state["buffers"]
        if set(bufs) != set(self._BUFFERS):
            raise ValueError(f"curvature state has buffers {sorted(bufs)}, expected {sorted(self._BUFFERS)}")
        for k in self._BUFFERS:
            v = bufs[k]
            if not isinstance(v, torch.Tensor) or v.shape != (self.num_samples,) or v.dtype != torch.float64:
                raise ValueError(f"curvature state buffer {k!r} must be float64 [{self.num_samples}]")
        for k in self._BUFFERS:
            setattr(self, k, bufs[k].detach().cpu().clone())
        self.n_probes, self.h, self.seed = int(state["n_probes"]), float(state["h"]), int(state["seed"])
        self.mode, self.fresh_probes = state["mode"], bool(state["fresh_probes"])
        self.updates = int(state["updates"])

    def __repr__(self) -> str:
        return (
            f"CurvatureTracker(num_samples={self.num_samples}, n_probes={self.n_probes}, h={self.h}, "
            f"seed={self.seed}, updates={self.updates})"
        )
