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


TINY_UNET = {"img_resolution": 32, "img_channels": 1, "num_classes": 10, "model_channels": 4, "channel_mult": [1, 2],
             "num_blocks": 1, "attn_resolutions": []}


def save_tiny_unet(path, noise: float = 0.05, seed: int = 0):
    """A tiny class-conditional UNet generator file. The UNet's output layer starts at zero: `noise` added to every
    weight gives the stand-in base a non-trivial velocity."""
    from distreward.models import build_network, save_generator

    torch.manual_seed(seed)
    net = build_network("unet", TINY_UNET)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * torch.randn_like(p))
    save_generator(path, net, "unet", TINY_UNET)
    return path
