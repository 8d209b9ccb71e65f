"""The policy over merging coefficients: a diagonal Gaussian w ~ N(m, diag(s^2)) and its policy-gradient losses.

Candidates are drawn in the unconstrained space and then (optionally) projected onto sum(w) = 1 before merging;
the projection is part of the environment, so log-probabilities are always those of the drawn w.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..pg import clip_masks, ppo_clip_loss


class GaussianPolicy(nn.Module):
    """w ~ N(mean, diag(exp(log_std)^2)); `learn_std=False` keeps log_std fixed."""

    def __init__(self, init_mean, init_std: float = 0.05, learn_std: bool = True, min_std: float = 1e-4):
        super().__init__()
        m = torch.as_tensor(np.asarray(init_mean, dtype=np.float64), dtype=torch.float64).reshape(-1)
        if init_std <= 0:
            raise ValueError(f"policy.init_std must be > 0, got {init_std}")
        self.mean = nn.Parameter(m.clone())
        self.log_std = nn.Parameter(torch.full_like(m, math.log(init_std)), requires_grad=learn_std)
        self.min_log_std = math.log(min_std)

    @property
    def k(self) -> int:
        return self.mean.numel()

    def std(self) -> torch.Tensor:
        return self.log_std.clamp(min=self.min_log_std).exp()

    @torch.no_grad()
    def sample(self, p: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """P candidate coefficient vectors, (P, K) float64."""
        eps = torch.randn(p, self.k, generator=generator, dtype=torch.float64)
        return self.mean + self.std() * eps

    def log_prob(self, w: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(w, self.mean, self.log_std.clamp(min=self.min_log_std))


# log N(w; m, diag(s^2)) summed over the K coefficients.
def gaussian_log_prob(w: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    z = (w - mean) / log_std.exp()
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


# Project w onto the affine plane sum(w) = 1 (orthogonal projection: add the same amount to every coefficient).
def project_sum_one(w: torch.Tensor) -> torch.Tensor:
    return w + (1.0 - w.sum(-1, keepdim=True)) / w.shape[-1]


# Advantages: rewards normalised across the P candidates of one iteration, A = (r - mean r) / (std r + eps).
def normalise_rewards(r: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r = r.double()
    if r.numel() < 2:
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std() + eps)


# REINFORCE: L = -mean_i A_i log pi(w_i).
def reinforce_loss(log_prob: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    return -(adv * log_prob).mean()


def policy_update(policy: GaussianPolicy, optimizer: torch.optim.Optimizer, w: torch.Tensor, adv: torch.Tensor, *,
                  algorithm: str = "ppo", epochs: int = 4, clip: float = 0.2, entropy: float = 0.0) -> dict:
    """One policy-gradient update from P scored candidates; returns the logged quantities."""
    if algorithm not in ("ppo", "reinforce"):
        raise ValueError(f"rl.algorithm must be 'ppo' or 'reinforce', got {algorithm!r}")
    with torch.no_grad():
        old_lp = policy.log_prob(w)
    epochs = epochs if algorithm == "ppo" else 1
    stats = {}
    for _ in range(epochs):
        lp = policy.log_prob(w)
        loss = ppo_clip_loss(adv, lp, old_lp, clip)[0].mean() if algorithm == "ppo" else reinforce_loss(lp, adv)
        if entropy:
            loss = loss - entropy * policy.log_std.sum()  # entropy of a diagonal Gaussian: sum log s + const
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            ratio = (policy.log_prob(w) - old_lp).exp()
        stats = {"loss": float(loss.detach()), "ratio_mean": float(ratio.mean()),
                 "clip_frac": float(torch.logical_or(*clip_masks(ratio, clip)).double().mean())}
    return stats
