"""The score registry: every score ``Tracker.scores()`` returns, what it means, and in which
direction it is suspicious (a mislabeled, duplicated or memorized sample). The one place that
direction is kept: ``export``, the harness's baselines and the demo read it from here, and a test
checks README's scores table against it.

    from memcore.scores import SCORES, suspicion
    SCORES["aum"].suspicious        # "low"
    suspicion("aum", s)             # -s: higher = more suspicious for every score
"""

from typing import Dict, NamedTuple, Tuple

import torch


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
    ("forgetting", "number of correct -> incorrect transitions between consecutive epochs", "high"),
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


__all__ = ["Score", "SCORES", "SCORE_NAMES", "LOW_IS_SUSPICIOUS", "sign", "suspicion"]
