"""Tiny stand-ins shared by the tests: a seeded feature network small enough for 2 gloo ranks, and the same network
with classifier logits (for the sample-wise reward and the evaluator in the GRPO tests)."""

from __future__ import annotations

import torch
from torch import nn


class TinyFeatures(nn.Module):
    """A fixed random conv feature map (dim features), seeded so every rank builds the same network."""

    def __init__(self, seed: int, dim: int = 6):
        super().__init__()
        torch.manual_seed(seed)
        self.dim = dim
        self.conv = nn.Conv2d(1, dim, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean((2, 3)) + 0.1 * x.flatten(1)[:, : self.dim]


class TinyClassifier(TinyFeatures):
    """TinyFeatures plus a linear head: `logits(x)`, as fmnist-reward has."""

    def __init__(self, seed: int, dim: int = 6, num_classes: int = 3):
        super().__init__(seed, dim)
        self.head = nn.Linear(dim, num_classes)

    def logits(self, x):
        return self.head(self(x))
