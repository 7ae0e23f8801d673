"""Small reference models for the demo, the experiments and the benchmarks."""

from typing import Sequence

import torch
from torch import nn


def mlp(in_shape: Sequence[int], num_classes: int, width: int = 256) -> nn.Module:
    """Two hidden layers of `width` ReLU units on the flattened input."""
    d = 1
    for s in in_shape:
        d *= int(s)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def small_cnn(in_shape: Sequence[int], num_classes: int, width: int = 32) -> nn.Module:
    """conv(3x3)-ReLU-maxpool x2, then a 128-unit hidden layer: for 8x8 to 32x32 images [C, H, W]."""
    c, h, w = (int(s) for s in in_shape)
    feats = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        d = feats(torch.zeros(1, c, h, w)).shape[1]
    return nn.Sequential(feats, nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, num_classes))


MODELS = {"mlp": mlp, "cnn": small_cnn}


def make_model(name: str, in_shape: Sequence[int], num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](in_shape, num_classes)
