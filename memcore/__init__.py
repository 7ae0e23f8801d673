"""memcore: which training samples a network memorizes, from statistics training already computes.

    tracker = memcore.Tracker(num_samples=len(train_set))
    for x, y, idx in loader:
        loss = memcore.accumulate(model(x), y, idx, tracker)   # drop-in for F.cross_entropy
        loss.backward(); opt.step(); opt.zero_grad()
    tracker.end_epoch()
    scores = tracker.scores()   # {"csl": tensor[num_samples], ...}

The core (this package without ``memcore.eval``) needs only torch and numpy; the research harness
``memcore.eval`` needs ``pip install 'torch-memcore[eval]'``.
"""

from . import data, export
from ._ops import cpu_isa, with_cuda
from .cross_entropy import accumulate
from .curvature import CurvatureTracker, curvature
from .linear_cross_entropy import linear_accumulate
from .scores import SCORE_NAMES, SCORES
from .tracker import Tracker

__version__ = "0.2.0"
__all__ = [
    "Tracker",
    "accumulate",
    "linear_accumulate",
    "curvature",
    "CurvatureTracker",
    "with_cuda",
    "cpu_isa",
    "SCORES",
    "SCORE_NAMES",
    "export",
    "data",
    "__version__",
]
