"""The scores: the registry of every score ``Tracker.scores()`` returns (what it means, and in which
direction it is suspicious: a mislabeled, duplicated or memorized sample), and their math from the
per-sample state (memcore/_state.py). The registry is the one place that direction is kept:
``export``, the harness's baselines and the demo read it from here, and a test checks README's
scores table against it.

    from memcore.scores import SCORES, suspicion
    SCORES["aum"].suspicious        # "low"
    suspicion("aum", s)             # -s: higher = more suspicious for every score

Definitions (each a float64 CPU tensor, one entry per sample; samples never seen give NaN for the
means, learning_time and forgetting, and 0 for the sums and counts):

- ``csl``: cumulative sample loss, the sum of the sample's loss over every row ever seen.
- ``csl_mean``: csl / rows, the mean loss per presentation (per token for sequences).
- ``rows``: number of rows (presentations, or tokens) recorded.
- ``last_loss``: mean loss over the sample's rows in the last epoch it was seen.
- ``learning_time``: the first epoch (0-based) from which the sample was classified
  correctly in every epoch it was seen; samples incorrect at their last epoch get the
  number of epochs recorded (never learned).
- ``forgetting``: forgetting events as Toneva et al. (2019) define them: the number of correct ->
  incorrect transitions between consecutive epochs in which the sample was seen, and +inf for a
  sample never classified correctly in any epoch it was seen (never learned: the paper counts it
  as forgotten infinitely often, so labels the network never fits rank first). NaN when unseen.
- ``forgetting_events``: the raw count of those transitions, 0 for a never-learned or unseen
  sample. A sample was correct in some epoch iff it is learned now (``learned_since`` >= 0) or
  has forgotten since (events >= 1), so both scores come from the same state.
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
The last two are NaN when input gradients were not recorded.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from . import _state as S


class Score(NamedTuple):
    name: str
    meaning: str
    suspicious: str  # "high" or "low": the direction in which the score flags a sample
    dtype: torch.dtype  # of the tensor Tracker.scores() returns ([num_samples], on the CPU)


_TABLE: Tuple[Tuple[str, str, str], ...] = (
    ("csl", "cumulative sample loss: the sum of the sample's loss over every row ever seen", "high"),
    ("csl_mean", "csl / rows: the mean loss per presentation (per token for sequences)", "high"),
    ("rows", "number of rows (presentations, or tokens) recorded; a count, not a suspicion signal", "high"),
    ("last_loss", "mean loss over the sample's rows in the last epoch it was seen", "high"),
    (
        "learning_time",
        "first epoch from which the sample is classified correctly in every epoch it is seen",
        "high",
    ),
    (
        "forgetting",
        "correct -> incorrect transitions between consecutive epochs; +inf if never classified correctly",
        "high",
    ),
    ("forgetting_events", "raw count of correct -> incorrect transitions (0 if never learned)", "high"),
    ("confidence_mean", "mean p(given label) over presentations", "low"),
    ("confidence_std", "std of p(given label) over presentations", "high"),
    ("aum", "area under the margin: mean of given-label logit minus the largest other logit", "low"),
    ("correctness", "fraction of presentations predicted correctly", "low"),
    (
        "input_grad_norm",
        "mean squared L2 norm of the gradient of the sample's loss w.r.t. its input "
        "(needs accumulate(..., inputs=x))",
        "high",
    ),
    (
        "learning_time_formal",
        "first epoch from which the running mean of input_grad_norm stays <= tau "
        "(needs accumulate(..., inputs=x))",
        "high",
    ),
)

#: name -> Score, in the order ``Tracker.scores()`` returns them
SCORES: Dict[str, Score] = {n: Score(n, m, d, torch.float64) for n, m, d in _TABLE}
SCORE_NAMES: Tuple[str, ...] = tuple(SCORES)
#: scores where a LOW value is suspicious; every other score is suspicious when high
LOW_IS_SUSPICIOUS = frozenset(n for n, s in SCORES.items() if s.suspicious == "low")


def sign(name: str) -> float:
    """+1.0 for scores suspicious when high, -1.0 for those suspicious when low."""
    if name not in SCORES:
        raise KeyError(f"no score named {name!r}; have {list(SCORES)}")
    return -1.0 if SCORES[name].suspicious == "low" else 1.0


def suspicion(name: str, values: torch.Tensor) -> torch.Tensor:
    """``values`` of score ``name`` oriented so that higher = more suspicious (negated when low is)."""
    return values * sign(name)


# ------------------------------------------------------------------------------------------- math
class Context(NamedTuple):
    """What the scores of any block of a state's rows need besides the rows (see ``Tracker.scores``)."""

    open: bool  # the state has rows of an epoch in progress: scored as if it had just closed
    closed_epochs: int  # epochs closed so far (the index of the open one)
    correct_threshold: float
    tau: Optional[float]  # the tracker's fixed tau; None: the dataset mean, `threshold`
    threshold: Optional[float]  # tau of learning_time_formal (None: no input gradients recorded)
    grad_start: int  # first epoch with input gradients (-1: none)

    @property
    def epochs(self) -> int:
        """Epochs scored, the open one included."""
        return self.closed_epochs + int(self.open)


def dataset_mean(norm: torch.Tensor, all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> float:
    """Mean of `norm` over the samples that have one (not NaN); with `all_reduce` (sums a float64 [2]
    tensor in place across the shards) over every shard's samples."""
    seen = norm[~norm.isnan()]
    if all_reduce is None:
        return float(seen.mean())
    t = torch.stack([seen.sum(), torch.tensor(float(seen.numel()), dtype=torch.float64, device=seen.device)])
    all_reduce(t)
    return float(t[0] / t[1])


@torch.no_grad()
def of_state(st: S.State, history: List[torch.Tensor], ctx: Context) -> Dict[str, torch.Tensor]:
    """Every score of SCORES for the rows of `st` (any block of a state's rows, with the same block of
    each tau=None running-mean history entry), float64 CPU tensors, in SCORES order."""
    if ctx.open:
        st = S.closed(st, ctx.closed_epochs, ctx.correct_threshold, ctx.tau)
    epochs = ctx.epochs
    sums, counts = st["sums"], st["counts"]
    rows = counts[:, S.C_ROWS].double()
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=sums.device)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(rows > 0, x / rows.clamp_min(1), nan)

    conf = mean(sums[:, S.S_PROB])
    var = (mean(sums[:, S.S_PROB_SQ]) - conf * conf).clamp_min(0)
    learned = st["learned_since"]
    lt = torch.where(learned >= 0, learned, torch.full_like(learned, epochs)).double()
    events = st["forgetting"].double()
    # correct in some epoch: still learned, or forgotten since (closing an epoch sets learned_since
    # to -1 only after a correct epoch, and counts that as an event)
    ever_correct = (learned >= 0) | (st["forgetting"] > 0)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=sums.device)
    out = {
        "csl": sums[:, S.S_LOSS],
        "csl_mean": mean(sums[:, S.S_LOSS]),
        "rows": rows,
        "last_loss": torch.where(rows > 0, sums[:, S.S_LAST], nan),
        "learning_time": torch.where(rows > 0, lt, nan),
        "forgetting": torch.where(rows > 0, torch.where(ever_correct, events, inf), nan),
        "forgetting_events": events,
        "confidence_mean": conf,
        "confidence_std": var.sqrt(),
        "aum": mean(sums[:, S.S_MARGIN]),
        "correctness": mean(counts[:, S.C_CORRECT].double()),
    }
    if ctx.grad_start < 0:
        unrecorded = torch.full_like(rows, float("nan"))
        out.update(input_grad_norm=unrecorded, learning_time_formal=unrecorded)
    else:
        norm = S.grad_mean(st)
        if ctx.tau is not None:
            ltf = formal_from_since(st["formal_since"], norm, epochs)
        else:
            hist = history + ([norm.float().cpu()] if ctx.open else [])
            if hist:
                ltf = formal_from_history(hist, ctx.grad_start, norm, ctx.threshold, epochs)
            else:  # recording started, but no epoch with rows since (e.g. empty batches only)
                ltf = torch.full_like(norm, float("nan"))
        out.update(input_grad_norm=norm, learning_time_formal=ltf)
    return {k: v.detach().to("cpu", torch.float64).clone() for k, v in out.items()}


def formal_from_since(since: torch.Tensor, norm: torch.Tensor, epochs: int) -> torch.Tensor:
    """learning_time_formal from the online run start (fixed tau)."""
    lt = torch.where(since >= 0, since, torch.full_like(since, epochs)).double()
    return torch.where(norm.isnan(), torch.full_like(lt, float("nan")), lt)


def formal_from_history(
    history: List[torch.Tensor], grad_start: int, norm: torch.Tensor, tau: float, epochs: int
) -> torch.Tensor:
    """learning_time_formal from the per-epoch running means (float32 [S] each, CPU)."""
    below = torch.stack(history) <= tau  # [E, S]; NaN (not yet seen) compares False
    # stays[e] = below at every epoch >= e: "learned" is for good, as in learning_time
    stays = torch.flip(torch.cumprod(torch.flip(below.int(), [0]), 0), [0]).bool()
    first = stays.int().argmax(0).double() + grad_start
    lt = torch.where(stays.any(0), first, torch.full_like(first, float(epochs)))
    return torch.where(norm.isnan().cpu(), torch.full_like(lt, float("nan")), lt)


__all__ = ["Score", "SCORES", "SCORE_NAMES", "LOW_IS_SUSPICIOUS", "sign", "suspicion"]
