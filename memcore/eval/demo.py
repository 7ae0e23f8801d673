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
from ..scores import SCORES, suspicion
from ..tracker import Tracker
from . import _args, require
from .corruptions import inject_label_noise
from .datasets import load_digits
from .metrics import auroc

# every score but `rows`, a count with no direction of its own
SIGNALS = [name for name in SCORES if name != "rows"]


def _model(in_dim: int, num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, num_classes),
    )


def _train(model, loader, opt, tracker, dev, epochs: int, progress: bool, tqdm) -> int:
    """The demo's training loop; returns the last epoch's number of correct predictions."""
    n = len(loader.dataset)
    bar = tqdm(range(epochs), desc="training", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        correct = 0
        for x, y, idx in loader:
            x, y, idx = x.to(dev).flatten(1).requires_grad_(), y.to(dev), idx.to(dev)
            logits = model(x)
            # F.cross_entropy + per-sample statistics, and the input-gradient ones from the backward
            loss = accumulate(logits, y, idx, tracker, inputs=x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == y).sum())
        tracker.end_epoch()
        bar.set_postfix(train_acc=f"{correct / n:.3f}")
    return correct


def run_demo(
    noise: float = 0.1,
    epochs: int = 40,
    seed: int = 0,
    top: int = 10,
    device: Optional[str] = None,
    progress: bool = True,
    out: Optional[str] = "runs/demo",
) -> Dict[str, float]:
    """Runs the demo, prints its report, writes every sample's scores, label, original label,
    prediction and whether its label was flipped to ``<out>/scores.csv`` (``out=None``: no file),
    and returns {score name: mislabel AUROC}. Input gradients are recorded
    (``accumulate(..., inputs=x)``), so every score of the tracker has a value."""
    tqdm = require("tqdm.auto").tqdm  # before training; load_digits names scikit-learn if it is missing

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
    # batches of 64 x 256: one CPU thread is as fast as several, and never waits at a thread pool's
    # barrier for a core a busy machine gave to another process (several times slower then)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        correct = _train(model, loader, opt, tracker, dev, epochs, progress, tqdm)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)

    scores = tracker.scores()
    truth = flipped.numpy()
    aurocs = {k: auroc(suspicion(k, scores[k]), truth) for k in SIGNALS}  # ranks +inf first
    print(f"trained in {elapsed:.1f}s, final train accuracy {correct / n:.3f} (on the noisy labels)\n")
    print(
        "AUROC of each score (columns of scores.csv) for finding the flipped labels (1 = perfect, 0.5 = chance):"
    )
    for k in sorted(SIGNALS, key=lambda k: -aurocs[k]):
        print(f"  {k:<22s} {aurocs[k]:.4f}  (suspicious when {SCORES[k].suspicious})")

    model.eval()
    with torch.no_grad():
        pred = model(data.x.to(dev).flatten(1)).argmax(1).cpu()
    columns = {**scores, "flipped": flipped.long(), "original_label": clean.y, "predicted": pred}
    order = torch.argsort(scores["csl"], descending=True)[:top]
    shown = ["csl", "label", "original_label", "predicted", "flipped"]
    print(f"\nThe {top} most suspicious samples by csl:")
    print("  " + "  ".join(f"{c:>{max(5, len(c))}s}" for c in ["index"] + shown))
    for i in order.tolist():
        cells = [i, float(scores["csl"][i]), int(data.y[i])] + [int(columns[c][i]) for c in shown[2:]]
        print(
            "  "
            + "  ".join(
                f"{v:>{max(5, len(c))}.2f}" if isinstance(v, float) else f"{v:>{max(5, len(c))}d}"
                for c, v in zip(["index"] + shown, cells)
            )
        )
    hits = int(flipped[order].sum())
    print(f"\n{hits}/{top} of the top-{top} csl samples are flipped labels.")
    if out is not None:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "scores.csv")
        export.to_csv(columns, path, labels=data.y)
        print(
            f"\nwrote every sample's scores to {path} (columns: index, label, {', '.join(columns)}).\n"
            f"Next: rank your own data the same way, memcore.export.ranked_issues(tracker.scores(), "
            f"by='csl'); or run the papers' experiments: python -m memcore experiment --help"
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
