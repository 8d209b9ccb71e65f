"""The equations of GRPO on a stochastic flow sampler (METHOD.md §4), one small pure function each.

Symbols follow the method: r (rewards), A (advantages), rho (ratio p_theta / p_old), eps (clip range),
beta (KL weight), mu_theta / mu_ref (means of one Gaussian sampler step), std (its standard deviation).
"""

from __future__ import annotations

import torch


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


def ppo_clip_loss(adv: torch.Tensor, log_prob: torch.Tensor, log_prob_old: torch.Tensor,
                  clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample max(-A rho, -A clip(rho, 1-eps, 1+eps)) with rho = exp(log p_theta - log p_old); returns (loss, rho)."""
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


def approx_kl(log_rho: torch.Tensor) -> torch.Tensor:
    """Estimate of KL(p_old || p_theta) from samples of p_old: E[(rho - 1) - log rho] (non-negative, unbiased)."""
    return (torch.expm1(log_rho) - log_rho).mean()


def clip_fractions(rho: torch.Tensor, clip_eps: float) -> tuple[float, float]:
    """Share of ratios above 1+eps and below 1-eps (where the clipped objective is flat on that side)."""
    return float((rho > 1 + clip_eps).float().mean()), float((rho < 1 - clip_eps).float().mean())


def clip_binds(rho: torch.Tensor, adv: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """Where the PPO clip binds: rho > 1 + eps with A > 0, or rho < 1 - eps with A < 0 (the sample's policy
    gradient is then zero)."""
    return ((rho > 1 + clip_eps) & (adv > 0)) | ((rho < 1 - clip_eps) & (adv < 0))


def trained_steps(T: int, mode: str, *, fraction: float = 0.5, window: int | list | tuple = 5,
                  generator: torch.Generator | None = None, count: int | None = None) -> list[int]:
    """Which of the T sampler steps get a gradient: a random `fraction` of them, or a `window` at high noise
    (step indices [start, end) or its length from step 0); with `count`, a random `count` of the window's steps,
    drawn per iteration (the update's cost is proportional to the number of trained steps, so a batch can be larger
    for the same time). The last step (to sigma = 0) is never trained."""
    if T < 2:
        raise ValueError(f"GRPO needs at least 2 sampler steps (the last one is never trained), got T={T}")
    last = T - 1
    if mode == "fraction":
        if not 0 < fraction <= 1:
            raise ValueError(f"rl.train_steps.fraction must be in (0, 1], got {fraction}")
        k = max(1, min(last, round(fraction * last)))
        return sorted(torch.randperm(last, generator=generator)[:k].tolist())
    if mode == "window":
        start, end = (0, int(window)) if isinstance(window, int) else (int(window[0]), int(window[1]))
        end = min(end, last)
        if not 0 <= start < end:
            raise ValueError(f"rl.train_steps.window {window} selects no step among 0..{last - 1} "
                             f"(T={T}, the last step is never trained); use e.g. window={min(5, last)}")
        steps = list(range(start, end))
        if count is None or int(count) >= len(steps):
            return steps
        if int(count) < 1:
            raise ValueError(f"rl.train_steps.count must be >= 1 (or null for the whole window), got {count}")
        pick = torch.randperm(len(steps), generator=generator)[:int(count)]
        return sorted(steps[i] for i in pick.tolist())
    raise ValueError(f"rl.train_steps.mode must be 'fraction' or 'window', got {mode!r}")
