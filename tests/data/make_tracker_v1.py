"""Writes tracker_v1.pt: a format-1 Tracker state (memcore 0.1.0, float64 [S, 6] buffers) with an open
epoch and input gradients, and the scores that version computed from it, for the conversion test.
Run with the 0.1.0 package on the path:  PYTHONPATH=<memcore 0.1.0 checkout> python make_tracker_v1.py"""

import os

import torch

import memcore

assert memcore.Tracker.VERSION == 1, "run against memcore 0.1.0"
out = {}
for tau in (None, 0.3):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4, 3, generator=g) * 2
    tr = memcore.Tracker(12, tau=tau)
    for e in range(3):
        for _ in range(4):
            idx = torch.randint(0, 11, (6,), generator=g)  # id 11 never seen
            x = torch.randn(6, 4, generator=g).requires_grad_()
            t = torch.randint(0, 3, (6,), generator=g)
            memcore.accumulate(x @ w, t, idx, tr, inputs=x).backward()
        if e < 2:
            tr.end_epoch()  # the third epoch stays open
    out[str(tau)] = {"state": tr.state_dict(), "scores": tr.scores()}
torch.save(out, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tracker_v1.pt"))
