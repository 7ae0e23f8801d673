"""Argument checks with exceptions that name the offending argument.

Only metadata (shape, dtype, device) is checked here, so nothing synchronises with the GPU. Value
errors (targets or index out of range, non-finite logits) are detected inside the kernel in the
same pass that computes the loss and reported through its status word; `explain_status` turns that
word into the exception, pointing at the first offending row.
"""

import math
import numbers
import operator
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._layout import BAD_INDEX, BAD_TARGET, NON_FINITE

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def is_int(x) -> bool:
    """Whether x is an integer scalar: int, numpy integer or 0-d integer tensor; bool is not one."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def as_int(x, name: str, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """x as a Python int. TypeError unless it is an integer (see `is_int`: numpy integers and 0-d
    integer tensors are accepted, bool and floats refused), ValueError outside [minimum, maximum]."""
    if not is_int(x):
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}")
    v = operator.index(x) if not isinstance(x, torch.Tensor) else int(x.item())
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v}")
    return v


def as_float(
    x,
    name: str,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    open_minimum: bool = False,
) -> float:
    """x as a finite Python float. TypeError unless it is a real number (bool refused), ValueError
    when it is NaN / infinite or outside [minimum, maximum] ((minimum, maximum] with open_minimum)."""
    if isinstance(x, bool) or not (
        isinstance(x, numbers.Real) or (isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_complex())
    ):
        raise TypeError(f"{name} must be a number, got {type(x).__name__} {x!r}")
    v = float(x)
    below = minimum is not None and (v <= minimum if open_minimum else v < minimum)
    if not math.isfinite(v) or below or (maximum is not None and v > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        interval = f"{'(' if open_minimum else '['}{lo}, {hi}]"
        raise ValueError(f"{name} must be a finite number in {interval}, got {v}")
    return v


def as_ignore_index(ignore_index) -> int:
    """ignore_index as a Python int: any integer (numpy integers, 0-d integer tensors) as
    F.cross_entropy accepts; bool and floats are refused."""
    return as_int(ignore_index, "ignore_index")


def _require_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _require_integer(x: torch.Tensor, name: str) -> None:
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        what = "class ids" if name == "targets" else "the samples' dataset indices"
        raise TypeError(f"{name} must be an integer tensor of {what}, got {x.dtype}")


def refuse_transforms(what: str, *tensors) -> None:
    """TypeError when a tensor is wrapped by a torch.func transform (vmap, grad, jacrev, ...): the rows
    a call records outlive the transform, which the Tracker's later flushes cannot read. Raised before
    anything runs, so no row is left behind. (torch.compile traces no such wrapper: not checked there.)"""
    if torch.compiler.is_compiling():
        return
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if any(isinstance(t, torch.Tensor) and wrapped(t) for t in tensors):
        raise TypeError(
            f"{what} cannot run under a torch.func transform (vmap, grad, jacrev, ...): the rows it records "
            "into the Tracker would be transformed tensors that outlive the transform. Call it outside "
            "the transform; the tracker was not updated"
        )


def same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ai = a.index if a.index is not None else torch.cuda.current_device()
        bi = b.index if b.index is not None else torch.cuda.current_device()
        return ai == bi
    return True


def _rows(
    x: torch.Tensor,
    x_name: str,
    targets,
    index,
    ignore_index,
    tracker_device: Optional[torch.device],
    class_dim: int = -1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Checks targets and index against x (logits or hidden) and flattens them to int64 [N]: targets
    have x's shape without its class (feature) dim, `class_dim` (-1: [..., D]; 1: logits [N, C, d1, ...]);
    index is like targets or, for targets [B, T] ([N, d1, ...]), one id per sequence (input) [B]."""
    _require_tensor(targets, "targets")
    _require_tensor(index, "index")
    _require_integer(targets, "targets")
    _require_integer(index, "index")
    lead = tuple(x.shape[:-1]) if class_dim == -1 else tuple(x.shape[:1] + x.shape[2:])
    if tuple(targets.shape) != lead:
        where = " (classes in dim 1, as F.cross_entropy)" if class_dim == 1 and x.dim() > 2 else ""
        raise ValueError(
            f"targets must have shape {lead} to match {x_name} {tuple(x.shape)}{where}, "
            f"got {tuple(targets.shape)}"
        )
    if tuple(index.shape) != lead and not (len(lead) >= 2 and tuple(index.shape) == lead[:1]):
        unit = "input" if class_dim == 1 else "sequence"
        per_seq = f" or {lead[:1]} (one sample id per {unit})" if len(lead) >= 2 else ""
        raise ValueError(f"index must have shape {lead}{per_seq}, got {tuple(index.shape)}")
    for t, name in ((targets, "targets"), (index, "index")):
        if not same_device(t.device, x.device):
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")
    if tracker_device is not None and not same_device(tracker_device, x.device):
        raise ValueError(
            f"tracker lives on {tracker_device} but {x_name} is on {x.device}; "
            f"create it with memcore.Tracker(num_samples, device={str(x.device)!r})"
        )
    if type(ignore_index) is not int:
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    n = targets.numel()
    if tuple(index.shape) != lead:  # one id per sequence -> one id per row
        index = index.reshape(lead[:1] + (1,) * (len(lead) - 1)).expand(lead)
    return targets.reshape(n).to(torch.int64).contiguous(), index.reshape(n).to(torch.int64).contiguous()


def class_layout(logits: torch.Tensor, targets, class_dim) -> int:
    """Where logits [>= 2 dims] keep their classes: -1 ([..., C], targets [...]) or 1 (F.cross_entropy's
    [N, C, d1, ...], targets [N, d1, ...]); the two are one for 2-D logits (-1 is returned). Without
    `class_dim` the targets' shape decides; where both readings fit it (logits [N, A, A], [N, A, A, A],
    ...) `class_dim` is required."""
    nd = logits.dim()
    if class_dim is not None:
        cd = as_int(class_dim, "class_dim")
        if not (cd in (1, -1) or cd == nd - 1 or cd == -(nd - 1)):
            raise ValueError(
                f"class_dim must be 1 (F.cross_entropy's [N, C, d1, ...]) or -1 ([..., C], the last dim), "
                f"got {cd} for logits of shape {tuple(logits.shape)}"
            )
        return -1 if nd == 2 or cd in (-1, nd - 1) else 1
    if nd == 2:
        return -1
    _require_tensor(targets, "targets")
    shape = tuple(targets.shape)
    last, first = tuple(logits.shape[:-1]), tuple(logits.shape[:1] + logits.shape[2:])
    if shape == last and shape == first:
        raise ValueError(
            f"logits {tuple(logits.shape)} with targets {shape} fit both class layouts: pass "
            f"class_dim=1 for F.cross_entropy's [N, C, d1, ...] ({logits.shape[1]} classes) or "
            f"class_dim=-1 for [..., C] ({logits.shape[-1]} classes, e.g. language-model logits [B, T, V])"
        )
    if shape == first:
        return 1
    if shape != last:
        raise ValueError(
            f"targets must have shape {last} (logits [..., C], classes last) or {first} (logits "
            f"[N, C, d1, ...], classes in dim 1, as F.cross_entropy) to match logits {tuple(logits.shape)}, "
            f"got {shape}"
        )
    return -1


class _ClassesLast(torch.autograd.Function):
    """logits [N, C, d1, ...] -> rows [N * d1 * ..., C], copied; the gradient is copied back into the
    logits' own layout (their strides where they are dense, contiguous otherwise), so the layers
    upstream get it in the layout they produced."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        ctx.shape = tuple(logits.shape)
        ctx.stride = tuple(logits.stride()) if _dense(logits) else None
        return logits.movedim(1, -1).contiguous().view(-1, logits.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n, c, *d = ctx.shape
        rows = grad.reshape(n, *d, c).movedim(-1, 1)
        if ctx.stride is None:
            return rows.contiguous()
        out = torch.empty_strided(ctx.shape, ctx.stride, dtype=grad.dtype, device=grad.device)
        return out.copy_(rows)


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill its memory without gaps or overlaps (in some dim order)."""
    expect = 1
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    for stride, size in dims:
        if stride != expect:
            return False
        expect *= size
    return True


def classes_last(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, C, d1, ...] as contiguous rows [N * d1 * ..., C] in targets' row order: a view where
    the classes are innermost in memory (channels-last), else a copy (`_ClassesLast`)."""
    moved = logits.movedim(1, -1)
    if moved.is_contiguous():
        return moved.reshape(-1, logits.shape[1])
    return _ClassesLast.apply(logits)


def rows_of(
    logits, targets, index, ignore_index, tracker_device: Optional[torch.device], class_dim=None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks the inputs of accumulate and flattens them to logits [N, C], targets [N], index [N].

    logits [..., C] with targets [...] (the same leading shape), or F.cross_entropy's [N, C, d1, ...]
    with targets [N, d1, ...] (`class_layout` decides which, from `class_dim` or the shapes); index
    either like targets or, for targets [B, T] ([N, d1, ...]), one sample id per sequence (input) [B].
    """
    refuse_transforms("memcore.accumulate", logits, targets, index)
    if (  # the common case, checked with as few tensor calls as possible (they dominate small batches)
        type(logits) is torch.Tensor
        and type(targets) is torch.Tensor
        and type(index) is torch.Tensor
        and (class_dim is None or (type(class_dim) is int and class_dim in (1, -1)))
        and logits.dim() == 2
        and targets.dtype == torch.int64
        and index.dtype == torch.int64
        and logits.dtype in FLOAT_DTYPES
        and type(ignore_index) is int
    ):
        n, c = logits.shape
        dev = logits.device
        if (
            c >= 2
            and targets.shape == (n,)
            and index.shape == (n,)
            and targets.device == dev
            and index.device == dev
            and (tracker_device is None or tracker_device == dev)
            and logits.is_contiguous()
            and targets.is_contiguous()
            and index.is_contiguous()
        ):
            return logits, targets, index
    _require_tensor(logits, "logits")
    _require_tensor(targets, "targets")
    _require_tensor(index, "index")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(
            f"logits must have shape [N, C] (or [..., C], or [N, C, d1, ...]), got {tuple(logits.shape)}"
        )
    layout = class_layout(logits, targets, class_dim)
    num_classes = logits.shape[layout]
    if num_classes < 2:
        where = "the last dim" if layout == -1 else "dim 1"
        raise ValueError(f"logits must have at least 2 classes in {where}, got shape {tuple(logits.shape)}")
    targets1d, index1d = _rows(logits, "logits", targets, index, ignore_index, tracker_device, layout)
    if layout == 1 and logits.dim() > 2:
        return classes_last(logits), targets1d, index1d
    n = targets1d.shape[0]
    logits2d = logits.reshape(n, num_classes)
    if not logits2d.is_contiguous():
        logits2d = logits2d.contiguous()
    return logits2d, targets1d, index1d


def explain_status(
    bits: int,
    logits: torch.Tensor,
    targets: torch.Tensor,
    index: torch.Tensor,
    num_samples: int,
    ignore_index: int,
    loss: Optional[torch.Tensor],
) -> Exception:
    """Builds the exception for a non-zero status word; names the first offending row."""
    keep = targets != ignore_index
    if bits & BAD_TARGET:
        c = logits.shape[1]
        bad = keep & ((targets < 0) | (targets >= c))
        row = int(bad.nonzero()[0, 0])
        return IndexError(
            f"targets[{row}] = {int(targets[row])} is outside [0, {c}) for logits with {c} classes "
            f"(and is not ignore_index={ignore_index}); the tracker was not updated"
        )
    if bits & BAD_INDEX:
        bad = keep & ((index < 0) | (index >= num_samples))
        row = int(bad.nonzero()[0, 0])
        return IndexError(
            f"index[{row}] = {int(index[row])} is outside [0, {num_samples}) (the tracker's num_samples); "
            f"the tracker was not updated"
        )
    if bits & NON_FINITE:
        # the kernel's loss is in opmath (float32 unless the logits are float64): a row of finite
        # logits more than ~3.4e38 apart overflows there (F.cross_entropy returns inf for it too)
        opmath = torch.float64 if logits.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            safe = torch.where(keep, targets, torch.zeros_like(targets))
            exact = F.cross_entropy(logits.detach().double(), safe, reduction="none")
            if loss is None:  # the fused path keeps no per-row losses: recompute them (error path only)
                loss = F.cross_entropy(logits.detach().to(opmath), safe, reduction="none")
            loss = loss.detach()
            big = torch.finfo(opmath).max
            bad = keep & (~torch.isfinite(loss) | ~torch.isfinite(exact) | (exact.abs() > big))
            rows = bad.nonzero()
        if rows.numel() == 0:  # the kernel's rounding disagreed with this recomputation at the edge
            return ValueError(
                f"a logits row gives a loss outside the {opmath} range (NaN / +inf logits, a -inf target "
                f"logit, or finite logits about {big:.3g} apart); the tracker was not updated"
            )
        row = int(rows[0, 0])
        if torch.isfinite(exact[row]):
            return ValueError(
                f"logits row {row} gives a loss of {float(exact[row]):.6g} (in float64), which overflows "
                f"{opmath} (F.cross_entropy returns inf for it): its finite logits are more than "
                f"{big:.3g} apart; the tracker was not updated"
            )
        return ValueError(
            f"logits row {row} gives a non-finite loss ({float(exact[row])}): the row holds NaN or +inf, "
            f"or the target's logit is -inf; the tracker was not updated"
        )
    return RuntimeError(f"memcore kernel reported unknown status bits {bits}")


def describe_bits(bits: int) -> str:
    names = [
        n
        for b, n in (
            (BAD_TARGET, "target out of range"),
            (BAD_INDEX, "index out of range"),
            (NON_FINITE, "non-finite loss"),
        )
        if bits & b
    ]
    return ", ".join(names) or f"status {bits}"


def check_inputs_for_grad(inputs, num_rows: int, logits: torch.Tensor) -> None:
    """`accumulate(..., inputs=x)`: x must be the leaf batch input, one row per logits row."""
    _require_tensor(inputs, "inputs")
    if not inputs.dtype.is_floating_point:
        raise TypeError(f"inputs must be a floating-point tensor, got {inputs.dtype}")
    if inputs.dim() < 1 or inputs.shape[0] != num_rows:
        raise ValueError(
            f"inputs must have one row per logits row: shape [{num_rows}, ...], got {tuple(inputs.shape)}"
        )
    if not same_device(inputs.device, logits.device):
        raise ValueError(f"inputs is on {inputs.device} but logits are on {logits.device}")
    if not inputs.is_leaf or not inputs.requires_grad:
        raise ValueError(
            "inputs must be a leaf tensor that requires grad: call x.requires_grad_() on the batch "
            "before the forward pass (x = x.detach().requires_grad_() if it came out of another op)"
        )


def linear_rows_of(
    hidden, weight, bias, targets, index, ignore_index, tracker_device: Optional[torch.device]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks the inputs of linear_accumulate and flattens them to hidden [N, H], targets [N], index [N].

    hidden [..., H]; weight [V, H] and bias [V] (or None) of hidden's dtype and device; targets [...]
    (hidden's leading shape); index [...] like targets or, for targets [B, T], one id per sequence [B].
    """
    refuse_transforms("memcore.linear_accumulate", hidden, weight, bias, targets, index)
    _require_tensor(hidden, "hidden")
    _require_tensor(weight, "weight")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape [N, H] (or [..., H]), got {tuple(hidden.shape)}")
    h = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(
            f"weight must have shape [V, H={h}] (F.linear's [out_features, in_features]) for "
            f"hidden {tuple(hidden.shape)}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 2:
        raise ValueError(f"weight must have at least 2 rows (classes), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if not same_device(weight.device, hidden.device):
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        _require_tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V={weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        if not same_device(bias.device, hidden.device):
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    targets1d, index1d = _rows(hidden, "hidden", targets, index, ignore_index, tracker_device)
    n = targets1d.shape[0]
    # a view whose rows cannot be flattened (e.g. h[:, :-1]) is copied here, [N, H] only
    hidden2d = hidden.reshape(n, h)
    if not hidden2d.is_contiguous():
        hidden2d = hidden2d.contiguous()
    return hidden2d, targets1d, index1d


# ---------------------------------------------------------------- the loss wrappers' opening checks

# reduction name -> the ops' code: at::Reduction's values, as csrc/common.h's Reduction
REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}


_TRACKER = None  # memcore.Tracker, imported at the first call (tracker.py imports this module)


def class_options(
    weight,
    label_smoothing,
    softcap,
    z_loss,
    return_z_loss,
    logits2d: torch.Tensor,
    weight_name: str = "weight",
):
    """The loss options of accumulate / linear_accumulate checked against logits [N, C], returned as
    (weight, label_smoothing, softcap, z_loss, return_z_loss): weight None or a floating [C] tensor
    on the logits' device (returned detached in the ops' accumulation dtype, float64 for float64
    logits, else float32), label_smoothing a number in [0, 1], softcap None or a number > 0, z_loss
    a number >= 0 (floats), return_z_loss a bool. Raises TypeError / ValueError naming the argument."""
    eps = as_float(label_smoothing, "label_smoothing", minimum=0.0, maximum=1.0)
    cap = None if softcap is None else as_float(softcap, "softcap", minimum=0.0, open_minimum=True)
    zc = as_float(z_loss, "z_loss", minimum=0.0)
    if not isinstance(return_z_loss, bool):
        raise TypeError(f"return_z_loss must be a bool, got {type(return_z_loss).__name__}")
    if weight is None:
        return None, eps, cap, zc, return_z_loss
    _require_tensor(weight, weight_name)
    c = logits2d.shape[1]
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{weight_name} must be a floating-point tensor of class weights, got {weight.dtype}")
    if weight.shape != (c,):
        raise ValueError(
            f"{weight_name} must have shape ({c},), one weight per class, got {tuple(weight.shape)}"
        )
    if not same_device(weight.device, logits2d.device):
        raise ValueError(
            f"{weight_name} must be on the logits' device {logits2d.device}, got {weight.device}"
        )
    acc = torch.float64 if logits2d.dtype == torch.float64 else torch.float32
    return weight.detach().to(acc).contiguous(), eps, cap, zc, return_z_loss


def loss_call(tracker, reduction, ignore_index) -> Tuple[int, int]:
    """The checks ``accumulate`` and ``linear_accumulate`` open with: tracker a memcore.Tracker,
    reduction one of REDUCTIONS, ignore_index an integer (numpy integers and 0-d integer tensors too,
    as F.cross_entropy accepts). Returns (the reduction's code, ignore_index as an int)."""
    global _TRACKER
    if _TRACKER is None:  # an import statement per call costs as much as the other checks together
        from .tracker import Tracker as _TRACKER
    if not isinstance(tracker, _TRACKER):
        raise TypeError(f"tracker must be a memcore.Tracker, got {type(tracker).__name__}")
    code = REDUCTION_CODE.get(reduction) if isinstance(reduction, str) else None
    if code is None:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if type(ignore_index) is not int:
        ignore_index = as_ignore_index(ignore_index)
    return code, ignore_index
