"""A compact ResNet-18 for 32x32 inputs (the usual CIFAR variant), for the training-step benchmark.

torchvision is not a dependency; this is the standard architecture (He et al., 2016) as used for
CIFAR-10: a 3x3 stride-1 stem without max-pooling, four stages of two BasicBlocks (64, 128, 256,
512 channels; stride 2 from the second stage on), global average pooling and a linear classifier.
11.2M parameters for 10 classes, 0.56 GFLOPs per 32x32 image forward.

BatchNorm in train mode couples the rows of a batch, so the per-sample input-gradient norms
``memcore.accumulate(..., inputs=x)`` records are not exactly each sample's own there; the
benchmark measures their cost, which does not depend on that.
"""

from typing import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self, blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3, width: int = 64
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        layers, cin = [], width
        for stage, n in enumerate(blocks):
            cout = width * 2**stage
            for i in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) for 32x32 images."""
    return ResNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)
