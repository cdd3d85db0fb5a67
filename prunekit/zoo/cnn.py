"""A plain CNN for Fashion-MNIST-sized inputs (1x28x28), any size >= 8x8 works."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(nn.Module):
    """(conv3x3-BN-ReLU-maxpool) x 3 with widths w, 2w, 4w, then an MLP head.

    An adaptive average pool to 3x3 before ``flatten`` makes the input size
    flexible; the head is ``fc1`` (hidden 64), ReLU, ``fc2``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(3):
            w = width * 2**i
            layers += [
                nn.Conv2d(c, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(c * 9, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.pool(self.features(x)))
        return self.fc2(self.relu(self.fc1(x)))


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> SmallCNN:
    """Build the plain CNN (see :class:`SmallCNN`)."""
    return SmallCNN(in_channels, num_classes, width)
