"""The power-function EMA of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", §3), written from its equations.

At training step t (1, 2, ...) the EMA is the average of the weights theta_1..theta_t under the power profile
p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]. Its width is named by the relative standard deviation
sigma_rel = std(p_t) / t, which does not depend on t. The update that realises it exactly in discrete time is
theta_ema <- beta_t theta_ema + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1):
the weight of theta_k in the EMA at step t is then (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1).
Time may be counted in steps or images (t = n * batch gives the same beta): we count steps.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

# The widest EMA std (sigma_rel) allowed: power profiles reach sqrt(1/12) ~ 0.289 only as gamma -> 0.
MAX_SIGMA_REL = 0.28


# sigma_rel(gamma)^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)): the relative variance of the power profile.
def gamma_to_sigma_rel(gamma):
    g = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


# Inverse of the above: gamma is the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0.
def sigma_rel_to_gamma(sigma_rel):
    s = np.asarray(sigma_rel, dtype=np.float64)
    out = np.empty(s.shape, dtype=np.float64)
    for i, si in np.ndenumerate(s):
        if not 0 < si < MAX_SIGMA_REL:
            raise ValueError(f"EMA std (sigma_rel) must lie in (0, {MAX_SIGMA_REL}): wider profiles are not power "
                             f"functions with gamma > 0; got {si}")
        c = si ** -2
        roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
        out[i] = roots[np.abs(roots.imag) < 1e-9].real.max()
    return out if out.ndim else float(out)


# beta_t = (1 - 1/t)^(gamma + 1): the EMA decay at step t (t >= 1; beta_1 = 0 copies the first weights).
def power_beta(t: int, gamma: float) -> float:
    if t < 1:
        raise ValueError(f"power EMA step must be >= 1, got {t}")
    return float((1.0 - 1.0 / t) ** (gamma + 1.0))


# Weight of theta_k (k = 1..t) in the power EMA at step t: (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1).
def power_weights(t: int, gamma: float) -> np.ndarray:
    k = np.arange(t + 1, dtype=np.float64) / t
    c = k ** (gamma + 1.0)
    return np.diff(c)


class PowerEMA:
    """Tracks one power-function EMA of a network's weights per std (EDM2 uses std 0.050 and 0.100)."""

    def __init__(self, net: torch.nn.Module, stds=(0.050, 0.100)):
        self.stds = [float(s) for s in stds]
        if not self.stds:
            raise ValueError("PowerEMA needs at least one std (e.g. [0.05, 0.1])")
        self.gammas = [float(sigma_rel_to_gamma(s)) for s in self.stds]
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.stds]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, t: int) -> None:
        """Fold in the weights after training step t (1-based)."""
        src = list(net.parameters())
        src_buf = list(net.buffers())
        for gamma, ema in zip(self.gammas, self.emas):
            beta = power_beta(t, gamma)
            torch._foreach_lerp_(list(ema.parameters()), src, 1.0 - beta)
            for b_ema, b in zip(ema.buffers(), src_buf):
                b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {f"{s:.6f}": ema.state_dict() for s, ema in zip(self.stds, self.emas)}

    def load_state_dict(self, sd: dict) -> None:
        keys = [f"{s:.6f}" for s in self.stds]
        if sorted(sd) != sorted(keys):
            raise ValueError(f"EMA state holds profiles {sorted(sd)} but this run tracks {keys}; resume with the same ema.stds")
        for k, ema in zip(keys, self.emas):
            ema.load_state_dict(sd[k])
