"""PNG figures of the experiments (matplotlib, headless)."""

from typing import Dict, List, Tuple

import torch

from . import require

require("matplotlib", "sklearn")  # fail at import, naming the eval extra


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_curves(
    curves: Dict[str, Tuple[Dict[str, torch.Tensor], torch.Tensor]],
    order: List[str],
    keys: Dict[str, str],
    path: str,
) -> None:
    """One panel per noise level: ROC curve of every method for finding the flipped labels."""
    from sklearn.metrics import roc_curve

    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4.2), squeeze=False)
    for ax, (title, (methods, truth)) in zip(axes[0], curves.items()):
        for name in order:
            key = keys[name]
            if key not in methods:
                continue
            s = torch.nan_to_num(methods[key].double(), nan=-1e300, posinf=1e300, neginf=-1e300)
            fpr, tpr, _ = roc_curve(truth.numpy(), s.numpy())
            ax.plot(fpr, tpr, label=name, lw=1.8 if key == "csl" else 1.0)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def top_images(
    ds, score: torch.Tensor, pred: torch.Tensor, flagged: torch.Tensor, path: str, n: int = 32
) -> None:
    """Grid of the `n` highest-scoring training images with given / predicted labels (red: flagged)."""
    plt = _plt()
    order = torch.argsort(torch.nan_to_num(score, nan=-1e300), descending=True)[:n]
    cols = 8
    rows = (len(order) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order.tolist()):
        img = ds.x[i]
        img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        ax.imshow(img.numpy(), cmap="gray" if img.dim() == 2 else None)
        ax.set_title(
            f"#{i} y={int(ds.y[i])} p={int(pred[i])}",
            fontsize=7,
            color="red" if bool(flagged[i]) else "black",
        )
    fig.suptitle("highest CSL (given label y, prediction p; red = injected corruption)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
