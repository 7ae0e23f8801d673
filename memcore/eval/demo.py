"""The demo: train a small network on scikit-learn's digits with injected label noise, tracking
per-sample statistics with memcore, and show how well each score finds the flipped labels.

    python -m memcore demo [--noise 0.1] [--epochs 40] [--seed 0] [--out runs/demo]

Writes every sample's scores as CSV (``memcore.export.to_csv``) to ``<out>/scores.csv``.
"""

import argparse
import os
import time
from typing import Dict, Optional

import torch
from torch.utils.data import DataLoader

from .. import export
from ..cross_entropy import accumulate
from ..scores import suspicion
from ..tracker import Tracker
from . import _args, require
from .corruptions import inject_label_noise
from .datasets import load_digits
from .metrics import auroc

# score name -> label shown; the direction that makes "higher = more suspicious" is the registry's
SUSPICION = {
    "csl": "CSL (cumulative sample loss)",
    "last_loss": "final loss",
    "learning_time": "learning time (epochs)",
    "forgetting": "forgetting (unlearned = inf)",
    "forgetting_events": "forgetting events (count)",
    "confidence_mean": "in-confidence (1 - p)",
    "aum": "area under margin",
}


def _model(in_dim: int, num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, num_classes),
    )


def run_demo(
    noise: float = 0.1,
    epochs: int = 40,
    seed: int = 0,
    top: int = 10,
    device: Optional[str] = None,
    progress: bool = True,
    out: Optional[str] = "runs/demo",
) -> Dict[str, float]:
    """Runs the demo, prints its report, writes the scores to ``<out>/scores.csv`` (``out=None``:
    no file) and returns {score name: mislabel AUROC}."""
    tqdm = require("sklearn.metrics", "tqdm.auto").tqdm  # sklearn for auroc, checked before training

    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clean = load_digits()
    data, flipped = inject_label_noise(clean, noise, seed=seed)
    n = len(data)
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model = _model(data.x[0].numel(), data.num_classes).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    tracker = Tracker(n, device=dev)

    print(
        f"memcore demo: scikit-learn digits, {n} images, {data.num_classes} classes, "
        f"{int(flipped.sum())} labels flipped ({noise:.0%}), MLP, {epochs} epochs on {dev}"
    )
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc="training", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        correct = 0
        for x, y, idx in loader:
            x, y, idx = x.to(dev).flatten(1), y.to(dev), idx.to(dev)
            logits = model(x)
            loss = accumulate(logits, y, idx, tracker)  # F.cross_entropy + per-sample statistics
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == y).sum())
        tracker.end_epoch()
        bar.set_postfix(train_acc=f"{correct / n:.3f}")
    elapsed = time.perf_counter() - t0

    scores = tracker.scores()
    truth = flipped.numpy()
    aurocs = {k: auroc(suspicion(k, scores[k]), truth) for k in SUSPICION}  # ranks +inf first
    print(f"trained in {elapsed:.1f}s, final train accuracy {correct / n:.3f} (on the noisy labels)\n")
    print("AUROC for finding the flipped labels (1.0 = perfect, 0.5 = chance):")
    for k, label in sorted(SUSPICION.items(), key=lambda kv: -aurocs[kv[0]]):
        print(f"  {label:<30s} {aurocs[k]:.4f}")

    model.eval()
    with torch.no_grad():
        pred = model(data.x.to(dev).flatten(1)).argmax(1).cpu()
    order = torch.argsort(scores["csl"], descending=True)[:top]
    print(f"\nThe {top} most suspicious samples by CSL:")
    print(f"  {'index':>5s}  {'CSL':>8s}  {'given':>5s}  {'original':>8s}  {'predicted':>9s}  flipped")
    orig = clean.y
    for i in order.tolist():
        print(
            f"  {i:5d}  {scores['csl'][i]:8.2f}  {int(data.y[i]):5d}  {int(orig[i]):8d}  "
            f"{int(pred[i]):9d}  {'yes' if flipped[i] else 'no'}"
        )
    hits = int(flipped[order].sum())
    print(f"\n{hits}/{top} of the top-{top} CSL samples are flipped labels.")
    if out is not None:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "scores.csv")
        export.to_csv(scores, path, labels=data.y)
        print(
            f"\nwrote every sample's scores to {path} (columns: index, label, "
            f"{', '.join(scores)}).\nNext: rank your own data the same way, "
            f"memcore.export.ranked_issues(tracker.scores(), by='csl'); or run the papers' "
            f"experiments: python -m memcore experiment --help"
        )
    return aurocs


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m memcore demo``; each one's range is checked by argparse."""
    p.add_argument("--noise", type=_args.rate, default=0.1, help="fraction of labels to flip, in [0, 1)")
    p.add_argument("--epochs", type=_args.positive_int, default=40, help="training epochs")
    p.add_argument("--seed", type=_args.nonnegative_int, default=0, help="seed of noise, model and order")
    p.add_argument("--top", type=_args.positive_int, default=10, help="how many suspicious samples to list")
    p.add_argument(
        "--device", type=_args.device, default=None, help="cpu or cuda (default: cuda when available)"
    )
    p.add_argument("--out", default="runs/demo", help="directory for scores.csv")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def from_args(args: argparse.Namespace) -> Dict[str, object]:
    return dict(
        noise=args.noise,
        epochs=args.epochs,
        seed=args.seed,
        top=args.top,
        device=args.device,
        progress=not args.no_progress,
        out=args.out,
    )
