"""Tiny models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_cnn(width: int = 8) -> nn.Sequential:
    """A small CNN shaped like lightly's backbones: conv stages then a global pool (index 6)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class SiameseNet(nn.Module):
    """backbone + projection head, the layout of lightly's SSL models."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.backbone = tiny_cnn(width)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
