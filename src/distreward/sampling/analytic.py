"""Exact models of Gaussian data x0 ~ N(m, s^2) (independent per dimension): reference velocity and denoiser
for tests and sanity checks of the samplers (an exact model makes every sampler error a discretisation error).

m and s are numbers or tensors broadcastable to one sample (C, H, W); s > 0.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import sigma_vector


def _stats(m, s, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(m, dtype=torch.float32, device=x.device)
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    return m, s


# Flow: x = (1 - sigma) x0 + sigma eps has variance V = (1 - sigma)^2 s^2 + sigma^2, and
# E[x0|x] = m + (1 - sigma) s^2 / V (x - (1 - sigma) m), E[eps|x] = sigma / V (x - (1 - sigma) m), v = E[eps|x] - E[x0|x].
def gaussian_flow_velocity(x: torch.Tensor, sigma: torch.Tensor, m, s) -> torch.Tensor:
    m, s = _stats(m, s, x)
    sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    var = (1 - sig) ** 2 * s**2 + sig**2
    r = x - (1 - sig) * m
    return sig / var * r - (m + (1 - sig) * s**2 / var * r)


# EDM: x = y + sigma n gives D(x, sigma) = E[y|x] = m + s^2 / (s^2 + sigma^2) (x - m).
def gaussian_edm_denoiser(x: torch.Tensor, sigma: torch.Tensor, m, s) -> torch.Tensor:
    m, s = _stats(m, s, x)
    sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return m + s**2 / (s**2 + sig**2) * (x - m)


class GaussianVelocity(nn.Module):
    """v = model(x, sigma, labels): the exact flow velocity of N(m, s^2) data (labels are ignored)."""

    def __init__(self, m, s):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        return gaussian_flow_velocity(x.float(), sigma_vector(sigma, x), self.m, self.s)


class GaussianDenoiser(GaussianVelocity):
    """D = net(x, sigma, class_labels): the exact EDM denoiser of N(m, s^2) data (labels are ignored)."""

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        return gaussian_edm_denoiser(x.float(), sigma_vector(sigma, x), self.m, self.s)
