"""One step of each sampler, as pure functions of (x, model output, noise levels), in float32.

Flow steps use the SD3 convention (x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0, sigma 1 -> 0).
Stochastic steps return `StepOutput(x_next, log_prob, mean, std)`: the step is a Gaussian N(mean, std^2), and
log_prob is, per sample, the mean over dimensions of its log-density at x_next (METHOD.md §4). Passing `x_next`
scores that point instead of sampling one, so the same function serves the rollout and the policy update.
A step with std = 0 (noise level a = 0, or CPS/DDIM landing on sigma = 0) is deterministic: its log_prob is 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class StepOutput(NamedTuple):
    x_next: torch.Tensor    # (B, C, H, W)
    log_prob: torch.Tensor  # (B,) mean over dimensions of log N(x_next; mean, std^2); 0 where std == 0
    mean: torch.Tensor      # (B, C, H, W)
    std: torch.Tensor       # broadcastable to x: () or (B, 1, 1, 1)


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like x (float32), drawn from `generator` (on its own device) when given."""
    if generator is None:
        return torch.randn(x.shape, dtype=torch.float32, device=x.device)
    return torch.randn(x.shape, dtype=torch.float32, device=generator.device, generator=generator).to(x.device)


def as_column(value, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample (B,) value as a float32 tensor broadcastable against x (B, C, H, W)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim == 1 and t.shape[0] == x.shape[0]:
        return t.reshape(-1, *([1] * (x.ndim - 1)))
    raise ValueError(f"expected a scalar or a per-sample tensor of shape ({x.shape[0]},), got shape {tuple(t.shape)}")


# Gaussian log-density, averaged over dimensions: mean_d [-(x - mu)^2 / (2 std^2) - log std - log(2 pi) / 2].
def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).expand_as(x)
    zero = std == 0
    safe = torch.where(zero, torch.ones_like(std), std)
    lp = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _HALF_LOG_2PI
    lp = lp.flatten(1).mean(1)
    return torch.where(zero.flatten(1).any(1), torch.zeros_like(lp), lp)


def _sample_or_score(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None, x_next: torch.Tensor | None,
                     generator: torch.Generator | None) -> StepOutput:
    """Draw x_next = mean + std * noise (or take the given x_next) and score it under N(mean, std^2)."""
    if x_next is None:
        if noise is None:
            noise = randn_like(mean, generator)
        x_next = mean + std * noise.float()
    else:
        if x_next.shape != mean.shape:
            raise ValueError(f"x_next has shape {tuple(x_next.shape)} but the step's mean has {tuple(mean.shape)}")
        x_next = x_next.float()
    return StepOutput(x_next, gaussian_log_prob(x_next, mean, std), mean, std)


# Euler step of the flow ODE dx/dsigma = v: x_next = x + (sigma_next - sigma) v.
def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    return x.float() + (as_column(sigma_next, x) - as_column(sigma, x)) * v.float()


# ---------------------------------------------------------------------------------------------------------------
# Flow-GRPO SDE step (METHOD.md §4).

# Noise schedule s_t = a sqrt(sigma / (1 - sigma)); at sigma = 1 the denominator uses 1 - sigma_next (as Flow-GRPO).
def sde_noise_scale(sigma: torch.Tensor, sigma_next: torch.Tensor, a) -> torch.Tensor:
    denom = torch.where(sigma >= 1, 1 - sigma_next, 1 - sigma)
    return a * torch.sqrt(sigma / denom)


# SDE mean: x + [v + s_t^2 / (2 sigma) (x + (1 - sigma) v)] dsigma, dsigma = sigma_next - sigma < 0.
def sde_mean(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, s_t: torch.Tensor) -> torch.Tensor:
    return x + (v + s_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * (sigma_next - sigma)


# SDE std: s_t sqrt(-dsigma).
def sde_std(s_t: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    return s_t * torch.sqrt(sigma - sigma_next)


def _noise_level(a, x: torch.Tensor) -> torch.Tensor:
    a = as_column(a, x)
    if bool((a < 0).any()):
        raise ValueError(f"noise level a must be >= 0 (0 = the deterministic ODE step), got {a.min().item()}")
    return a


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, a, noise: torch.Tensor | None = None,
             x_next: torch.Tensor | None = None, generator: torch.Generator | None = None) -> StepOutput:
    """One Flow-GRPO SDE step from sigma to sigma_next with noise level a; a = 0 is exactly the Euler step."""
    x, v = x.float(), v.float()
    s, s_next = as_column(sigma, x), as_column(sigma_next, x)
    s_t = sde_noise_scale(s, s_next, _noise_level(a, x))
    return _sample_or_score(sde_mean(x, v, s, s_next, s_t), sde_std(s_t, s, s_next), noise, x_next, generator)


# ---------------------------------------------------------------------------------------------------------------
# Coefficient-preserving sampling (CPS; Wang & Yu 2025): re-noise the predicted (x0, eps) so that the coefficients
# of x0 and of the total noise stay (1 - sigma_next, sigma_next).

# Predicted data: x0 = x - sigma v.
def flow_x0(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x - sigma * v


# Predicted noise: eps = x + (1 - sigma) v.
def flow_eps(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x + (1 - sigma) * v


# CPS std: sigma_next sin(a pi / 2), a in [0, 1].
def cps_std(sigma_next: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return sigma_next * torch.sin(a * (math.pi / 2))


# CPS mean: (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) eps.
def cps_mean(x0: torch.Tensor, eps: torch.Tensor, sigma_next: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (1 - sigma_next) * x0 + torch.sqrt((sigma_next**2 - std**2).clamp_min(0)) * eps


def cps_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, a, noise: torch.Tensor | None = None,
             x_next: torch.Tensor | None = None, generator: torch.Generator | None = None) -> StepOutput:
    """One CPS step; a in [0, 1] (a = 0: the deterministic DDIM/Euler step, a = 1: full re-noising)."""
    x, v = x.float(), v.float()
    s, s_next = as_column(sigma, x), as_column(sigma_next, x)
    a = _noise_level(a, x)
    if bool((a > 1).any()):
        raise ValueError(f"CPS noise level a must lie in [0, 1], got {a.max().item()}")
    std = cps_std(s_next, a)
    mean = cps_mean(flow_x0(x, v, s), flow_eps(x, v, s), s_next, std)
    return _sample_or_score(mean, std, noise, x_next, generator)


# ---------------------------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021) for epsilon-prediction models, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.

# DDIM eq. 12, predicted x0 = (x - sqrt(1 - abar) eps) / sqrt(abar).
def ddim_x0(x: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    return (x - torch.sqrt(1 - abar) * eps) / torch.sqrt(abar)


# DDIM eq. 16, std = eta sqrt((1 - abar_next) / (1 - abar)) sqrt(1 - abar / abar_next).
def ddim_std(abar: torch.Tensor, abar_next: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    return eta * torch.sqrt((1 - abar_next) / (1 - abar)) * torch.sqrt((1 - abar / abar_next).clamp_min(0))


# DDIM eq. 12, mean = sqrt(abar_next) x0 + sqrt(1 - abar_next - std^2) eps.
def ddim_mean(x0: torch.Tensor, eps: torch.Tensor, abar_next: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(abar_next) * x0 + torch.sqrt((1 - abar_next - std**2).clamp_min(0)) * eps


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar, alpha_bar_next, eta, noise: torch.Tensor | None = None,
              x_next: torch.Tensor | None = None, generator: torch.Generator | None = None) -> StepOutput:
    """One DDIM step of an epsilon model from cumulative alpha `alpha_bar` to `alpha_bar_next` (> alpha_bar)."""
    x, eps = x.float(), eps.float()
    abar, abar_next = as_column(alpha_bar, x), as_column(alpha_bar_next, x)
    if bool((abar <= 0).any()) or bool((abar_next > 1).any()) or bool((abar_next < abar).any()):
        raise ValueError("DDIM needs 0 < alpha_bar <= alpha_bar_next <= 1 (cumulative alphas grow towards the data)")
    std = ddim_std(abar, abar_next, _noise_level(eta, x))
    return _sample_or_score(ddim_mean(ddim_x0(x, eps, abar), eps, abar_next, std), std, noise, x_next, generator)
