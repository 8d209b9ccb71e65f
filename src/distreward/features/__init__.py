"""Feature networks behind one registry: images in the project's range -> (B, d) features.

Registered names: `fmnist-reward` (used by the reward), `fmnist-eval` (held out: evaluation only),
`inception` (FID, pool3 2048-d), `dinov2` (FD-DINOv2, CLS 1024-d). `get_feature_network` also takes a path
to a .safetensors file written by `distreward train-features`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..utils.errors import InputError
from ..utils.progress import progress as tqdm
from .fmnist import load_fmnist_classifier

# name -> "module:factory"; factory(weights: str | None, device) -> nn.Module with .dim and forward(images)->(B, d)
_REGISTRY: dict[str, str] = {
    "fmnist-reward": "distreward.features.fmnist:load_fmnist_reward",
    "fmnist-eval": "distreward.features.fmnist:load_fmnist_eval",
    "inception": "distreward.features.inception:load_inception",
    "dinov2": "distreward.features.dinov2:load_dinov2",
}


def register_features(name: str, target: str | Callable) -> None:
    """Add a feature network: `target` is a factory or its "module:function" path."""
    _REGISTRY[name] = target


def available_features() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(target):
    if callable(target):
        return target
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def get_feature_network(name_or_path: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                        device: str | torch.device = "cpu") -> torch.nn.Module:
    """A feature network in eval mode on `device`, by registry name or by path to a weight file."""
    key = str(name_or_path)
    if key in _REGISTRY:
        net = _resolve(_REGISTRY[key])(weights, device)
    elif Path(key).suffix == ".safetensors" or Path(key).is_file():
        net = load_fmnist_classifier(key, device)
    else:
        raise InputError(f"unknown feature network {key!r}: use one of {', '.join(available_features())} or a .safetensors path")
    return net.eval().requires_grad_(False).to(device)


@torch.no_grad()
def compute_features(net: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 500, progress: bool = False,
                     desc: str = "features") -> np.ndarray:
    """Features of `images` (float, project range) in batches, as a float64 (N, d) array."""
    device = next(net.parameters()).device
    out = []
    for i in tqdm(range(0, images.shape[0], batch_size), desc=desc, disable=not progress, unit="batch"):
        out.append(net(images[i:i + batch_size].to(device)).double().cpu())
    if not out:
        raise ValueError("no images to compute features of")
    return torch.cat(out).numpy()
