"""Tiny stand-ins shared by the multi-process tests: a seeded feature network small enough for 2 gloo ranks."""

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
