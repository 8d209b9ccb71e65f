"""Flow-matching training objective (SD3 convention, METHOD.md §4) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch


# Logit-normal noise levels (SD3, Esser et al. 2024): sigma = sigmoid(m + s * n), n ~ N(0, 1).
def sample_sigma_logit_normal(n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


# Uniform noise levels: sigma ~ U(0, 1).
def sample_sigma_uniform(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.rand(n, generator=generator)


def sample_sigma(n: int, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    if kind == "logit_normal":
        return sample_sigma_logit_normal(n, mean, std, generator)
    if kind == "uniform":
        return sample_sigma_uniform(n, generator)
    raise ValueError(f"train.sigma_sampling must be 'logit_normal' or 'uniform', got {kind!r}")


# Forward process: x_sigma = (1 - sigma) x0 + sigma eps.
def flow_interpolate(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * eps


# Target velocity: v = d x_sigma / d sigma = eps - x0.
def flow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


# Loss: mean squared error of the predicted velocity, per sample (B,).
def flow_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    return (v_pred.float() - v_target.float()).square().flatten(1).mean(1)


# Label dropout for classifier-free guidance: each label becomes the null label with probability p.
def drop_labels(labels: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_label), labels)


# Learning rate (EDM2 style): linear warm-up over rampup_kimg, then lr / sqrt(max(kimg / decay_kimg, 1))
# (decay_kimg <= 0: constant after the warm-up).
def learning_rate(kimg: float, lr: float, rampup_kimg: float = 0.0, decay_kimg: float = 0.0) -> float:
    if decay_kimg > 0:
        lr = lr / math.sqrt(max(kimg / decay_kimg, 1.0))
    if rampup_kimg > 0:
        lr = lr * min(kimg / rampup_kimg, 1.0)
    return lr
