"""Samplers: the flow ODE (Euler / Heun), the RL rollout with per-step log-probs, EDM's sampler on a denoiser,
and SiT's Euler-Maruyama SDE in SiT's own convention.

`model` is a velocity model `v = model(x, sigma, labels)` (see adapters.py) unless stated otherwise. A sampler
starts from x = sigmas[0] * noise, i.e. the noise itself for schedules starting at 1 (sigma_schedule), and
sigma_max-scaled noise as EDM does for schedules starting below 1 (edm_flow_sigmas).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple, Sequence

import torch

from .adapters import edm_class_labels, sigma_vector
from .schedules import check_sigmas, edm_sigmas
from .steps import StepOutput, as_column, cps_step, euler_step, randn_like, sde_step

STEPS = {"sde": sde_step, "cps": cps_step}


def _step_fn(step: str):
    if step not in STEPS:
        raise ValueError(f"unknown stochastic step {step!r}; choose one of {', '.join(STEPS)}")
    return STEPS[step]


def _start(noise: torch.Tensor, sigma0: float) -> torch.Tensor:
    if noise.ndim != 4:
        raise ValueError(f"noise must be (B, C, H, W), got shape {tuple(noise.shape)}")
    x = noise.float()
    return x if sigma0 == 1.0 else x * sigma0


# Heun (trapezoidal) correction: x_next = x + (sigma_next - sigma) (v + v') / 2, v' the velocity at the Euler point.
def heun_correct(x: torch.Tensor, v: torch.Tensor, v_next: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    return x + (as_column(sigma_next, x) - as_column(sigma, x)) * (0.5 * v + 0.5 * v_next)


# Images per network call of the ODE sampler on the CPU. A larger batch runs as independent chunks of this many
# images, each through every step: the UNet's feature maps then stay a few MB. At the evaluation batch (500) they
# are about 100 MB per map, which glibc returns to the OS on every free and page-faults in again on the next
# allocation: the sampler ran 30-40% slower (docs/sampling.md "CPU speed"). Other devices take the whole batch.
CPU_CHUNK = 64
# The ODE sampler runs the UNet's channels_last path on the CPU (models/unet.py `nhwc`: full-resolution maps NHWC,
# faster). Another convolution kernel rounds differently, so the samples move, within the tolerance of a default:
# 1e-4 max abs on the samples, 1e-3 relative on FD (measured: docs/sampling.md "CPU speed"; tested).
# False: the NCHW path (bit for bit the samples before). Every ODE step without gradients (`ode_step`: the sampler,
# the distillation teacher) takes it; the RL rollouts and every step with gradients keep NCHW.
CPU_NHWC = True


@contextlib.contextmanager
def cpu_layout(model, device: torch.device):
    """Within the block, every UNet inside `model` (an nn.Module adapter) runs its NHWC path when CPU_NHWC and
    `device` is the CPU; each network's own `nhwc` setting is restored afterwards."""
    nets = ([m for m in model.modules() if isinstance(getattr(m, "nhwc", None), bool)]
            if CPU_NHWC and device.type == "cpu" and isinstance(model, torch.nn.Module) else [])
    saved = [m.nhwc for m in nets]
    for m in nets:
        m.nhwc = True
    try:
        yield
    finally:
        for m, v in zip(nets, saved):
            m.nhwc = v


@torch.no_grad()
def ode_sample(model: Callable, noise: torch.Tensor, labels: torch.Tensor | None, sigmas: torch.Tensor,
               method: str = "euler") -> torch.Tensor:
    """Integrate the flow ODE from sigmas[0] to sigmas[-1]; returns x at sigmas[-1] (float32).

    Heun skips its correction on a step that lands on sigma = 0 (as EDM does), so T steps cost 2T - 1 calls.
    On the CPU the batch is integrated in chunks of `CPU_CHUNK` images (the same per-image result, faster), with
    the UNet's channels_last path (`CPU_NHWC`, in `ode_step`).
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}; choose 'euler' or 'heun'")
    sig = check_sigmas(sigmas).tolist()
    x = _start(noise, sig[0])
    chunk = CPU_CHUNK if x.device.type == "cpu" else x.shape[0]
    if x.shape[0] <= chunk:
        return _ode_chunk(model, x, labels, sig, method)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for i in range(0, x.shape[0], chunk):
        out[i:i + chunk] = _ode_chunk(model, x[i:i + chunk], None if labels is None else labels[i:i + chunk], sig, method)
    return out


def ode_step(model: Callable, x: torch.Tensor, labels: torch.Tensor | None, s: float, s_next: float,
             method: str) -> torch.Tensor:
    """One step of the flow ODE from sigma s to s_next (Euler, or Heun, which skips its correction on a step that
    lands on sigma = 0). Without gradients on the CPU, UNets run their channels_last path (`CPU_NHWC`)."""
    with cpu_layout(model, x.device) if not torch.is_grad_enabled() else contextlib.nullcontext():
        v = model(x, sigma_vector(s, x), labels)
        x_next = euler_step(x, v, s, s_next)
        if method == "heun" and s_next > 0:
            x_next = heun_correct(x, v, model(x_next, sigma_vector(s_next, x), labels), s, s_next)
    return x_next


def _ode_chunk(model: Callable, x: torch.Tensor, labels: torch.Tensor | None, sig: list[float],
               method: str) -> torch.Tensor:
    for s, s_next in zip(sig[:-1], sig[1:]):
        x = ode_step(model, x, labels, s, s_next, method)
    return x


class Trajectory(NamedTuple):
    xs: torch.Tensor         # (T+1, B, C, H, W): xs[0] the start (the noise), xs[-1] the sample
    log_probs: torch.Tensor  # (T, B): log p_old(xs[i+1] | xs[i]) per sample (mean over dimensions)
    sigmas: torch.Tensor     # (T+1,) float32, on CPU


def noise_levels(a, steps: int) -> list[float]:
    """The noise level of each step: a scalar for all steps, or a sequence of `steps` values (e.g. 0 outside the
    trained window, or 0 on the last step for a clean final sample)."""
    if isinstance(a, torch.Tensor):
        a = a.tolist()
    if isinstance(a, (int, float)):
        levels = [float(a)] * steps
    elif isinstance(a, Sequence):
        levels = [float(x) for x in a]
        if len(levels) != steps:
            raise ValueError(f"got {len(levels)} noise levels for {steps} steps; pass one per step or a single number")
    else:
        raise TypeError(f"noise level a must be a number or a sequence of numbers, got {type(a).__name__}")
    if any(not math.isfinite(x) or x < 0 for x in levels):
        raise ValueError(f"noise levels must be finite and >= 0, got {levels}")
    return levels


@torch.no_grad()
def rollout(model: Callable, noise: torch.Tensor, labels: torch.Tensor | None, sigmas: torch.Tensor, a,
            generator: torch.Generator | None = None, step: str = "sde") -> Trajectory:
    """Sample T = len(sigmas) - 1 stochastic steps ('sde': Flow-GRPO, 'cps': coefficient-preserving), keeping
    every state and the log-prob of every transition (the old policy's, for the GRPO ratio)."""
    fn = _step_fn(step)
    sig_t = check_sigmas(sigmas)
    sig = sig_t.tolist()
    levels = noise_levels(a, len(sig) - 1)
    x = _start(noise, sig[0])
    xs, log_probs = [x], []
    for s, s_next, a_i in zip(sig[:-1], sig[1:], levels):
        v = model(x, sigma_vector(s, x), labels)
        out = fn(x, v, s, s_next, a_i, generator=generator)
        x = out.x_next
        xs.append(x)
        log_probs.append(out.log_prob)
    return Trajectory(torch.stack(xs), torch.stack(log_probs), sig_t)


def step_log_prob(model: Callable, x: torch.Tensor, x_next: torch.Tensor, sigma, sigma_next, a,
                  labels: torch.Tensor | None, step: str = "sde") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log_prob (B,), mean, std) of the given transition x -> x_next under `model`, WITH gradients.

    The trainer calls it per trained step: log_prob for the ratio, mean/std for the KL to the reference policy.
    """
    v = model(x, sigma_vector(sigma, x), labels)
    out: StepOutput = _step_fn(step)(x, v, sigma, sigma_next, a, x_next=x_next)
    return out.log_prob, out.mean, out.std


# ---------------------------------------------------------------------------------------------------------------
# EDM sampler (Karras et al. 2022, Algorithm 2), on an EDM denoiser D = net(x, sigma, class_labels) in EDM units.

# Churn (Algorithm 2, line 5): gamma = min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max], else 0.
def edm_gamma(sigma: float, steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    return min(S_churn / steps, math.sqrt(2) - 1) if S_churn > 0 and S_min <= sigma <= S_max else 0.0


# EDM ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma.
def edm_derivative(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    return (x - denoised) / sigma


@torch.no_grad()
def edm_sample(net: Callable, noise: torch.Tensor, labels: torch.Tensor | None = None, sigmas: torch.Tensor | None = None,
               *, steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
               second_order: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's Heun sampler (deterministic at S_churn = 0; EDM2 uses 32 steps, rho = 7), float32.

    `sigmas` (EDM units, decreasing, ending at 0) overrides the rho schedule. Integer labels are one-hot encoded
    for a Precond (`label_dim`); the last step (to sigma = 0) is Euler.
    """
    t = edm_sigmas(steps, sigma_min, sigma_max, rho) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32).cpu()
    if t.ndim != 1 or t.numel() < 2 or not bool((t[1:] < t[:-1]).all()) or t[-1] < 0:
        raise ValueError("EDM sigmas must be a decreasing 1-D schedule ending at >= 0; build one with edm_sigmas(steps)")
    ts = t.tolist()
    n = len(ts) - 1
    class_labels = edm_class_labels(net, labels)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return net(x, sigma_vector(sigma, x), class_labels).float()

    x = noise.float() * ts[0]
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        gamma = edm_gamma(t_cur, n, S_churn, S_min, S_max)
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:  # raise the noise level from t_cur to t_hat: x_hat = x + sqrt(t_hat^2 - t_cur^2) S_noise eps
            x = x + math.sqrt(t_hat**2 - t_cur**2) * S_noise * randn_like(x, generator)
        d = edm_derivative(x, denoise(x, t_hat), t_hat)
        x_next = x + (t_next - t_hat) * d
        if second_order and i < n - 1 and t_next > 0:
            d_next = edm_derivative(x_next, denoise(x_next, t_next), t_next)
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


# ---------------------------------------------------------------------------------------------------------------
# SiT's Euler-Maruyama SDE (SiT transport, linear path, velocity model), in SiT's own convention:
# x_t = t x1 + (1 - t) x0, t from 0 (noise) to 1 (data), u = net(x, t, y). dx = [u + w score] dt + sqrt(2 w) dW.

# Score from velocity on the linear path: score = (t u - x) / (1 - t).
def sit_score(u: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (t * u - x) / (1 - t)


# Diffusion coefficient, SiT's default form "sigma": w = norm * (1 - t).
def sit_diffusion(t: torch.Tensor, norm: float) -> torch.Tensor:
    return norm * (1 - t)


# SDE drift: u + w * score.
def sit_drift(u: torch.Tensor, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return u + w * sit_score(u, x, t)


@torch.no_grad()
def sit_sde_sample(net: Callable, noise: torch.Tensor, labels: torch.Tensor | None, *, steps: int = 250,
                   diffusion_norm: float = 1.0, last_step: str | None = "mean", last_step_size: float = 0.04,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """SiT's SDE sampler (its defaults: 250 steps, diffusion form 'sigma', last step 'Mean' of size 0.04).

    `net` is SiT-convention: u = net(x, t, y) (a SiT network; `SiTVelocity(...).net`). t runs over
    linspace(0, 1 - last_step_size, steps): steps - 1 Euler-Maruyama steps, then one drift-only step ('mean'),
    a velocity-only step ('euler'), or none (None), so `steps` network calls in all.
    """
    if last_step not in ("mean", "euler", None):
        raise ValueError(f"last_step must be 'mean', 'euler' or None, got {last_step!r}")
    if int(steps) != steps or steps < 2:
        raise ValueError(f"SiT's SDE needs steps >= 2, got {steps!r}")
    if last_step is None:
        last_step_size = 0.0
    if not 0 <= last_step_size < 1:
        raise ValueError(f"last_step_size must lie in [0, 1), got {last_step_size}")
    if last_step is not None and last_step_size == 0:
        raise ValueError("a 'mean'/'euler' last step needs last_step_size > 0 (the score is singular at t = 1)")
    t_end = 1.0 - last_step_size
    ts = torch.linspace(0.0, t_end, int(steps), dtype=torch.float32)
    dt = (ts[1] - ts[0]).item()
    x = noise.float()

    def velocity(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        tv = sigma_vector(t, x)
        return net(x, tv, labels).float()[:, : x.shape[1]], tv.reshape(-1, 1, 1, 1)

    for t in ts[:-1].tolist():
        u, tc = velocity(x, t)
        w = sit_diffusion(tc, diffusion_norm)
        x_mean = x + sit_drift(u, x, tc, w) * dt                          # Euler-Maruyama mean
        x = x_mean + torch.sqrt(2 * w) * math.sqrt(dt) * randn_like(x, generator)  # + sqrt(2 w) dW
    if last_step is not None:
        u, tc = velocity(x, t_end)
        if last_step == "mean":
            x = x + sit_drift(u, x, tc, sit_diffusion(tc, diffusion_norm)) * last_step_size
        else:
            x = x + u * last_step_size
    return x
