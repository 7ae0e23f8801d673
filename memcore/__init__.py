"""memcore: which training samples a network memorizes, from statistics training already computes.

    tracker = memcore.Tracker(num_samples=len(train_set))
    for x, y, idx in loader:
        loss = memcore.accumulate(model(x), y, idx, tracker)   # drop-in for F.cross_entropy
        loss.backward(); opt.step(); opt.zero_grad()
    tracker.end_epoch()
    scores = tracker.scores()   # {"csl": tensor[num_samples], ...}
"""
from . import data
from ._ops import with_cuda
from .accumulate import accumulate
from .curvature import CurvatureTracker, curvature
from .linear_accumulate import linear_accumulate
from .tracker import SCORE_NAMES, Tracker

__version__ = "0.1.0"
__all__ = ["Tracker", "accumulate", "linear_accumulate", "with_cuda", "SCORE_NAMES", "__version__", "curvature", "CurvatureTracker"]
