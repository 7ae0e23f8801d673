"""A plain supervised training loop with memcore tracking, shared by the demo, the experiments,
the stability estimator and the benchmarks. Datasets yield (x, y, index)."""

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ..cross_entropy import accumulate
from ..tracker import Tracker
from . import require


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    device: Optional[str] = None  # None: cuda when available
    progress: bool = True
    record_input_grads: bool = False  # accumulate(..., inputs=x): input_grad_norm, learning_time_formal

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def train(
    model: torch.nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    *,
    tracker: Optional[Tracker] = None,
    indices: Optional[Sequence[int]] = None,
    on_epoch_end: Optional[Callable[[int, torch.nn.Module], None]] = None,
    desc: str = "training",
) -> torch.nn.Module:
    """SGD with momentum and cosine learning-rate decay on `dataset` (or its `indices` subset).

    With a tracker, the loss is `memcore.accumulate` (statistics recorded under the dataset
    index each sample carries), else F.cross_entropy. `on_epoch_end(epoch, model)` runs after
    each epoch (after `tracker.end_epoch()`), e.g. to score curvature.
    """
    tqdm = require("tqdm.auto").tqdm

    dev = cfg.torch_device()
    model.to(dev)
    data = Subset(dataset, list(indices)) if indices is not None else dataset
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * len(loader)))
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not cfg.progress, leave=False)
    for epoch in bar:
        model.train()
        seen = correct = 0
        for x, y, idx in loader:
            x, y, idx = x.to(dev), y.to(dev), idx.to(dev)
            record = tracker is not None and cfg.record_input_grads
            if record:
                x.requires_grad_()
            logits = model(x)
            if tracker is not None:
                loss = accumulate(logits, y, idx, tracker, inputs=x if record else None)
            else:
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
        if tracker is not None:
            tracker.end_epoch()
        bar.set_postfix(train_acc=f"{correct / max(seen, 1):.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
    return model


@torch.no_grad()
def predict(
    model: torch.nn.Module, dataset: Dataset, *, batch_size: int = 512, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Logits [len(dataset), C] (float32, CPU) of the model in eval mode."""
    dev = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for x, _, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        out.append(model(x.to(dev)).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def labels_of(dataset: Dataset) -> torch.Tensor:
    """The int64 labels [N] of a dataset yielding (x, y, index): its `y` if it has one."""
    if hasattr(dataset, "y"):
        return torch.as_tensor(dataset.y)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])
