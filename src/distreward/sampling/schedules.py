"""Noise-level schedules: the SD3 flow schedule (sigma from 1 to 0) and EDM's rho schedule (sigma_max to 0).

Flow sigmas live in [0, 1]; EDM sigmas in [0, inf). `edm_to_flow_sigma` / `flow_to_edm_sigma` convert between them
(METHOD.md §4: s = sigma / (1 + sigma)), so an EDM schedule can drive the flow samplers through `EDMVelocity`.
"""

from __future__ import annotations

import torch


def _check_steps(steps: int) -> int:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


# SD3 time shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma) (shift > 1 spends more steps at high noise).
def time_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Flow schedule of `steps` steps: float32 (steps+1,), uniform in sigma from 1 to 0, then SD3-shifted."""
    steps = _check_steps(steps)
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (1.0 = no shift), got {shift!r}")
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return time_shift(sigmas, float(shift)).to(torch.float32)


# EDM (Karras et al. 2022, eq. 5): sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, then sigma_N = 0.
def edm_sigmas(steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM schedule in EDM units: float32 (steps+1,), from sigma_max down to sigma_min, then a final 0."""
    steps = _check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if steps == 1:
        body = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        i = torch.arange(steps, dtype=torch.float64)
        body = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([body, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


# METHOD.md §4, EDM -> flow noise level: s = sigma / (1 + sigma).
def edm_to_flow_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return sigma / (1 + sigma)


# METHOD.md §4, the inverse (flow -> EDM noise level): sigma = s / (1 - s).
def flow_to_edm_sigma(s: torch.Tensor) -> torch.Tensor:
    return s / (1 - s)


def edm_flow_sigmas(steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's rho schedule expressed as flow sigmas (starts at sigma_max/(1+sigma_max) < 1): use it for EDM models."""
    return edm_to_flow_sigma(edm_sigmas(steps, sigma_min, sigma_max, rho).double()).to(torch.float32)


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Validate a flow schedule: 1-D, at least 2 entries, strictly decreasing, within [0, 1]. Returns float32 on CPU."""
    sigmas = torch.as_tensor(sigmas).detach().to("cpu", torch.float32)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of at least 2 noise levels, got shape {tuple(sigmas.shape)}; "
                         "build one with sigma_schedule(steps)")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing (noise -> data); build one with sigma_schedule(steps)")
    if sigmas[0] > 1 or sigmas[-1] < 0:
        raise ValueError(f"flow sigmas must lie in [0, 1], got [{sigmas[-1].item()}, {sigmas[0].item()}]; "
                         "for EDM noise levels use edm_to_flow_sigma(...) or edm_flow_sigmas(...)")
    return sigmas
