"""The embedded feature networks: two small Fashion-MNIST CNN classifiers of different architectures.

`fmnist-reward` (arch `pool-cnn`: conv + max-pool stages, a fully connected feature layer, d=192) is what the
reward computes FD on; `fmnist-eval` (arch `gap-cnn`: strided convs, global average pooling, d=128) is held out
and used only for evaluation, so a gain cannot be an artefact of the reward's own features.
Input: float (B, 1, 32, 32) in [-1, 1] (Fashion-MNIST padded 28 -> 32). The feature is the penultimate layer
(after a smooth activation, so no coordinate is constant and the covariance stays full rank).
Weight files are .safetensors with metadata {"arch", "kwargs", "seed", "test_accuracy", ...}.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
import torch.nn.functional as F

from ..config import repo_path
from ..data import load_fmnist
from ..utils.errors import InputFileError, reading
from ..utils.io import atomic_save_safetensors
from ..utils.progress import progress as tqdm

INPUT_SHAPE = (1, 32, 32)
NUM_CLASSES = 10


class _FeatureClassifier(nn.Module):
    """Shared interface: forward(images) -> (B, dim) features, logits(images) -> (B, 10)."""

    dim: int
    input_shape = INPUT_SHAPE

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != INPUT_SHAPE:
            raise ValueError(f"{type(self).__name__} expects images of shape (B, 1, 32, 32) in [-1, 1], got {tuple(x.shape)}; "
                             "pad 28x28 Fashion-MNIST with distreward.data.pad_to(x, 32)")
        if not x.is_floating_point():
            raise TypeError(f"expected float images in [-1, 1], got {x.dtype}; convert uint8 with distreward.data.to_float_images")
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self._check(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(self._check(x))))


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PoolCNN(_FeatureClassifier):
    """32x32 -> three conv/max-pool stages (32 -> 16 -> 8 -> 4) -> flatten -> Linear -> SiLU = feature."""

    def __init__(self, widths=(16, 32, 48), dim: int = 192, dropout: float = 0.3):
        super().__init__()
        w1, w2, w3 = widths
        self.body = nn.Sequential(
            _conv_bn(1, w1), nn.MaxPool2d(2),
            _conv_bn(w1, w2), nn.MaxPool2d(2),
            _conv_bn(w2, w3), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(w3 * 4 * 4, dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, NUM_CLASSES)
        self.dim = dim

    def features(self, x):
        return F.silu(self.fc(self.body(x).flatten(1)))


class GapCNN(_FeatureClassifier):
    """32x32 -> strided 5x5 stem (16x16) -> conv -> strided conv (8x8) -> conv -> global average pool = feature."""

    def __init__(self, widths=(16, 32, 128), dropout: float = 0.2):
        super().__init__()
        w1, w2, w3 = widths
        self.body = nn.Sequential(
            _conv_bn(1, w1, stride=2, kernel=5),
            _conv_bn(w1, w2),
            _conv_bn(w2, w3, stride=2),
        )
        self.last = nn.Sequential(nn.Conv2d(w3, w3, 3, padding=1, bias=False), nn.BatchNorm2d(w3))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(w3, NUM_CLASSES)
        self.dim = w3

    def features(self, x):
        return F.gelu(self.last(self.body(x))).mean((2, 3))


ARCHS: dict[str, type[_FeatureClassifier]] = {"pool-cnn": PoolCNN, "gap-cnn": GapCNN}

# role -> how the shipped network of that role is built and trained
ROLES = {
    "reward": {"name": "fmnist-reward", "arch": "pool-cnn", "kwargs": {"widths": [16, 32, 48], "dim": 192}, "seed": 0, "epochs": 5},
    "eval": {"name": "fmnist-eval", "arch": "gap-cnn", "kwargs": {"widths": [16, 32, 128]}, "seed": 1, "epochs": 6},
}


def build_classifier(arch: str, kwargs: dict | None = None) -> _FeatureClassifier:
    if arch not in ARCHS:
        raise ValueError(f"unknown feature-network architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch](**(kwargs or {}))


# ---------------------------------------------------------------------------------------------- files

def save_classifier(path: str | os.PathLike, net: nn.Module, arch: str, kwargs: dict, info: dict | None = None) -> Path:
    """Atomic .safetensors with the metadata that rebuilds the network (arch, kwargs) and how it was made."""
    meta = {"arch": arch, "kwargs": json.dumps(kwargs)}
    for k, v in (info or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return atomic_save_safetensors(path, net.state_dict(), metadata=meta)


FEATURES_FIX = "give a .safetensors written by 'distreward train-features' (or the shipped weights/ files)"


def read_classifier_metadata(path: str | os.PathLike) -> dict:
    with reading(path, "safetensors file", FEATURES_FIX):
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    if "arch" not in meta:
        raise InputFileError(f"{path} has no 'arch' metadata: it was not written by 'distreward train-features'; "
                             f"{FEATURES_FIX}")
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v) if k != "arch" else v
        except json.JSONDecodeError:
            out[k] = v
    return out


def load_fmnist_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> _FeatureClassifier:
    """Rebuild the network named in the file's metadata and load its weights strictly; eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature-network weights {path} not found; train them with 'distreward train-features'")
    meta = read_classifier_metadata(path)
    with reading(path, f"{meta['arch']} feature network (its tensors do not match its metadata)", FEATURES_FIX):
        net = build_classifier(meta["arch"], meta.get("kwargs") or {})
        net.load_state_dict(load_file(str(path)), strict=True)
    net.meta = meta
    net.weights_path = str(path)
    return net.eval().requires_grad_(False).to(device)


def shipped_weights(role: str) -> Path:
    return repo_path("weights", f"{ROLES[role]['name']}.safetensors")


def _load_role(role: str, weights, device) -> _FeatureClassifier:
    path = Path(weights) if weights is not None else shipped_weights(role)
    if not path.is_file():
        raise FileNotFoundError(f"{ROLES[role]['name']} weights {path} not found; retrain them with "
                                f"'distreward train-features --which {role} --out weights/'")
    net = load_fmnist_classifier(path, device)
    net.feature_name = ROLES[role]["name"]
    return net


def load_fmnist_reward(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> _FeatureClassifier:
    """The reward's feature network (default: the shipped weights/fmnist-reward.safetensors)."""
    return _load_role("reward", weights, device)


def load_fmnist_eval(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> _FeatureClassifier:
    """The held-out evaluation network (default: the shipped weights/fmnist-eval.safetensors)."""
    return _load_role("eval", weights, device)


# ---------------------------------------------------------------------------------------------- training

def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Light augmentation: a random translation of up to `max_shift` pixels (background -1) and a horizontal flip."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    shifts = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


@torch.no_grad()
def classifier_accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `net.logits` on (images, labels)."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        pred = net.logits(images[i:i + batch_size].to(device)).argmax(1).cpu()
        correct += int((pred == labels[i:i + batch_size]).sum())
    net.train(was_training)
    return correct / max(images.shape[0], 1)


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_feature_network(arch: str, seed: int, epochs: int, *, kwargs: dict | None = None, batch_size: int = 128,
                          lr: float = 2e-3, weight_decay: float = 5e-4, label_smoothing: float = 0.1,
                          max_train: int | None = None, max_test: int | None = None,
                          device: str | torch.device = "cpu", progress: bool = True,
                          log: Callable[[str], None] | None = print) -> tuple[_FeatureClassifier, dict]:
    """Train a classifier on Fashion-MNIST train (AdamW, cosine schedule, light augmentation).

    Returns (net in eval mode, info) where info holds seed, epochs, test_accuracy and the training time.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    kwargs = dict(kwargs or {})
    torch.manual_seed(seed)
    net = build_classifier(arch, kwargs).to(device)
    x_train, y_train = load_fmnist("train")
    if max_train is not None:
        x_train, y_train = x_train[:max_train], y_train[:max_train]
    x_test, y_test = load_fmnist("test")
    x_test, y_test = x_test[:max_test], y_test[:max_test]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(x_train.shape[0], generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"{arch} epoch {epoch + 1}/{epochs}", disable=not progress, unit="batch")
        for i in bar:
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = augment(x_train[idx], gen).to(device)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, lr, warmup=min(200, total // 10))
            loss = F.cross_entropy(net.logits(x), y_train[idx].to(device), label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if i % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if log:
            log(f"{arch} epoch {epoch + 1}/{epochs}: test accuracy {classifier_accuracy(net, x_test, y_test):.4f}")
    net.eval()
    acc = classifier_accuracy(net, x_test, y_test)
    info = {"seed": seed, "epochs": epochs, "test_accuracy": round(acc, 5), "test_images": int(x_test.shape[0]),
            "train_images": int(x_train.shape[0]),
            "batch_size": batch_size, "lr": lr, "train_seconds": round(time.time() - t0, 1)}
    return net.requires_grad_(False), info
