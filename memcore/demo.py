"""The demo: train a small network on scikit-learn's digits with injected label noise, tracking
per-sample statistics with memcore, and show how well each score finds the flipped labels.

    python -m memcore demo [--noise 0.1] [--epochs 40] [--seed 0]
"""
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .accumulate import accumulate
from .data import inject_label_noise, load_digits
from .tracker import Tracker

# score name -> (label shown, sign that makes "higher = more suspicious")
SUSPICION = {
    "csl": ("CSL (cumulative sample loss)", 1.0),
    "last_loss": ("final loss", 1.0),
    "learning_time": ("learning time (epochs)", 1.0),
    "forgetting": ("forgetting events", 1.0),
    "confidence_mean": ("in-confidence (1 - p)", -1.0),
    "aum": ("area under margin", -1.0),
}


def _model(in_dim: int, num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, num_classes),
    )


def run_demo(noise: float = 0.1, epochs: int = 40, seed: int = 0, top: int = 10,
             device: Optional[str] = None, progress: bool = True) -> Dict[str, float]:
    """Runs the demo, prints its report and returns {score name: mislabel AUROC}."""
    from sklearn.metrics import roc_auc_score
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clean = load_digits()
    data, flipped = inject_label_noise(clean, noise, seed=seed)
    n = len(data)
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model = _model(data.x[0].numel(), data.num_classes).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    tracker = Tracker(n, device=dev)

    print(f"memcore demo: scikit-learn digits, {n} images, {data.num_classes} classes, "
          f"{int(flipped.sum())} labels flipped ({noise:.0%}), MLP, {epochs} epochs on {dev}")
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
    aurocs = {k: float(roc_auc_score(truth, (sign * scores[k]).numpy())) for k, (_, sign) in SUSPICION.items()}
    print(f"trained in {elapsed:.1f}s, final train accuracy {correct / n:.3f} (on the noisy labels)\n")
    print("AUROC for finding the flipped labels (1.0 = perfect, 0.5 = chance):")
    for k, (label, _) in sorted(SUSPICION.items(), key=lambda kv: -aurocs[kv[0]]):
        print(f"  {label:<30s} {aurocs[k]:.4f}")

    model.eval()
    with torch.no_grad():
        pred = model(data.x.to(dev).flatten(1)).argmax(1).cpu()
    order = torch.argsort(scores["csl"], descending=True)[:top]
    print(f"\nThe {top} most suspicious samples by CSL:")
    print(f"  {'index':>5s}  {'CSL':>8s}  {'given':>5s}  {'original':>8s}  {'predicted':>9s}  flipped")
    orig = clean.y
    for i in order.tolist():
        print(f"  {i:5d}  {scores['csl'][i]:8.2f}  {int(data.y[i]):5d}  {int(orig[i]):8d}  "
              f"{int(pred[i]):9d}  {'yes' if flipped[i] else 'no'}")
    hits = int(flipped[order].sum())
    print(f"\n{hits}/{top} of the top-{top} CSL samples are flipped labels.")
    return aurocs
