"""The policy-gradient equations, one small pure function each, shared by the RL trainers (`distreward.rl`) and the
merging searchers (`distreward.merge`), which may not import each other (METHOD.md §4, §5).

Symbols follow the method: r (rewards), A (advantages), rho (ratio p_theta / p_old), eps (clip range),
beta (KL weight), mu_theta / mu_ref (means of one Gaussian sampler step), std (its standard deviation).
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "reward_scale", "group_spread", "ppo_clip_loss", "gaussian_kl", "kl_estimate",
           "clip_masks", "clip_binds"]


def group_advantages(r: torch.Tensor, groups: torch.Tensor, *, std: str = "group", eps: float = 1e-6,
                     clip: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = (r - mean_group(r)) / (std + eps * scale(r)), clipped to +-clip (METHOD.md §4 step 3).

    `std="group"` divides by each group's own std (GRPO), `"global"` by the std of the whole batch (less noisy
    when groups are small). `eps` is relative: scale(r) is the batch's reward std (`reward_scale`), so A does not
    change when every reward is multiplied by a positive constant (a distribution-wise reward at N = 50,000 moves
    by ~1e-4 per sample: an absolute eps of that size would shrink its advantages). A group whose rewards are all
    equal gets A = 0 exactly (no rounding noise is blown up). Also returns, per sample, whether its group had zero
    reward spread.
    """
    if std not in ("group", "global"):
        raise ValueError(f"advantage std must be 'group' or 'global', got {std!r}")
    r = r.double()
    _, inverse = torch.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    count = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inverse, r) / count
    centred = r - mean[inverse]
    var = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inverse, centred ** 2) / (count - 1).clamp(min=1)
    group_std = var.sqrt()[inverse]
    flat = group_spread(r, inverse, n_groups)[inverse] == 0          # all rewards of the group are equal
    batch_std = reward_scale(r)
    scale = group_std if std == "group" else batch_std
    adv = torch.where(flat, torch.zeros_like(r), centred / (scale + eps * batch_std)).clamp(-clip, clip)
    return adv.float(), flat


def reward_scale(r: torch.Tensor) -> torch.Tensor:
    """The batch's reward scale, its std, floored at the smallest positive float (all-equal rewards: no 0 / 0)."""
    s = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
    return s.clamp(min=torch.finfo(r.dtype).tiny)


def group_spread(r: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    """max - min of the rewards of each group (exactly 0 when they are all equal, whatever their scale)."""
    hi = torch.full((n_groups,), -torch.inf, dtype=r.dtype).scatter_reduce(0, inverse, r, "amax")
    lo = torch.full((n_groups,), torch.inf, dtype=r.dtype).scatter_reduce(0, inverse, r, "amin")
    return hi - lo


# PPO-clip, per sample: max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(log p_theta - log p_old).
def ppo_clip_loss(adv: torch.Tensor, log_prob: torch.Tensor, log_prob_old: torch.Tensor,
                  clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample PPO-clip loss and the ratios rho; returns (loss, rho)."""
    rho = torch.exp(log_prob - log_prob_old)
    loss = torch.maximum(-adv * rho, -adv * rho.clamp(1.0 - clip_eps, 1.0 + clip_eps))
    return loss, rho


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """KL(p_theta || p_ref) of two Gaussians of equal std, |mu_theta - mu_ref|^2 / (2 std^2), averaged over
    dimensions per sample like the step log-prob. Returns (B,)."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    if std.ndim == 1:
        std = std.view(-1, *([1] * (mean.ndim - 1)))
    kl = (mean - mean_ref) ** 2 / (2 * std ** 2)
    return kl.flatten(1).mean(1)


# The per-sample estimator of KL(p_old || p_theta) from samples of p_old: (rho - 1) - log rho (k3, non-negative).
def kl_estimate(log_rho: torch.Tensor) -> torch.Tensor:
    return torch.expm1(log_rho) - log_rho


def clip_masks(rho: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the ratio lies above 1 + eps and below 1 - eps (the clipped objective is flat on that side)."""
    return rho > 1 + clip_eps, rho < 1 - clip_eps


def clip_binds(rho: torch.Tensor, adv: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """Where the PPO clip binds: rho > 1 + eps with A > 0, or rho < 1 - eps with A < 0 (the sample's policy
    gradient is then zero)."""
    hi, lo = clip_masks(rho, clip_eps)
    return (hi & (adv > 0)) | (lo & (adv < 0))
