"""Velocity adapters: every generator is seen by the samplers as `v = model(x, sigma, labels)` in the SD3 flow
convention (x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0, sigma from 1 to 0), with x (B, C, H, W),
sigma a float tensor (B,) (a scalar is broadcast) and labels int64 (B,) or None (unconditional).

The adapters are nn.Modules, so `.parameters()`, `.train()`, `.to()` reach the wrapped network; their output is
float32 whatever precision the network ran in (autocast), so the sampler arithmetic stays in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from .schedules import flow_to_edm_sigma


def sigma_vector(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a float32 (B,) tensor on x's device (a Python float or 0-dim tensor is broadcast)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.ndim == 0:
        return s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or of shape ({x.shape[0]},) for a batch of {x.shape[0]}, got {tuple(s.shape)}")
    return s


class FlowVelocity(nn.Module):
    """A network that predicts the flow velocity directly: v = net(x, sigma, labels) (our UNet)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, sigma_vector(sigma, x), labels).float()


# SiT convention (METHOD.md §4): x_t = t x1 + (1 - t) x0, t from 0 (noise) to 1 (data), u = x1 - x0.
# Hence t = 1 - sigma and v = eps - x0 = -u.
def flow_to_sit_time(sigma: torch.Tensor) -> torch.Tensor:
    return 1 - sigma


def sit_to_flow_velocity(u: torch.Tensor) -> torch.Tensor:
    return -u


def sit_null_label(net) -> int:
    """The label SiT reserves for 'no class' (its num_classes): used when labels is None."""
    n = getattr(net, "num_classes", None)
    if n is None and hasattr(net, "y_embedder"):
        n = getattr(net.y_embedder, "num_classes", None)
    if n is None:
        raise ValueError("labels=None needs the network's null label, but it has neither .num_classes nor "
                         ".y_embedder.num_classes; pass explicit labels (num_classes is the null label)")
    return int(n)


class SiTVelocity(nn.Module):
    """SiT (u = net(x, t, y) with t = 1 - sigma) as a flow velocity: v = -u."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        t = flow_to_sit_time(sigma_vector(sigma, x))
        if labels is None:
            labels = torch.full((x.shape[0],), sit_null_label(self.net), dtype=torch.long, device=x.device)
        u = self.net(x, t, labels)
        if u.shape[1] == 2 * x.shape[1]:  # learn_sigma output left unsplit: the first half is the velocity
            u = u[:, : x.shape[1]]
        return sit_to_flow_velocity(u.float())


# ---------------------------------------------------------------------------------------------------------------
# EDM (x = y + sigma n, denoiser D(x, sigma) ~ E[y | x]) <-> flow (METHOD.md §4):
#   s = sigma / (1 + sigma), x_rf = x / (1 + sigma), v_rf = (x - D) / sigma - D.
# The sampler holds the flow state (x_rf, s); the denoiser needs (x, sigma): the inverse mapping is
#   sigma = s / (1 - s) (schedules.flow_to_edm_sigma) and x = x_rf (1 + sigma) = x_rf / (1 - s).
# Substituting x = x_rf (1 + sigma) gives v_rf = (1 + sigma) / sigma (x_rf - D) = (x_rf - D) / s, the flow velocity of
# an x0-prediction, which stays finite as s -> 1 (sigma -> inf); the adapter uses this form.

# METHOD.md §4, inverse of x_rf = x / (1 + sigma): x = x_rf / (1 - s).
def flow_to_edm_x(x_rf: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x_rf / (1 - s)


# METHOD.md §4: v_rf = (x - D) / sigma - D, in EDM variables.
def edm_to_flow_velocity(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma - denoised


# The same velocity in flow variables: v_rf = (x_rf - D) / s.
def flow_velocity_from_x0(x_rf: torch.Tensor, denoised: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x_rf - denoised) / s


def edm_class_labels(net, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Integer labels (B,) -> EDM's one-hot float rows (B, label_dim); label == label_dim (the null label) -> zeros.

    Float (B, label_dim) rows pass through unchanged; a network with label_dim == 0 gets None. A plain callable
    without `label_dim` receives the labels as given.
    """
    if labels is None:
        return None
    label_dim = getattr(net, "label_dim", None)
    if label_dim is None:
        return labels
    if label_dim == 0:
        return None
    if labels.is_floating_point():
        if labels.ndim != 2 or labels.shape[1] != label_dim:
            raise ValueError(f"float class labels must be one-hot rows of shape (B, {label_dim}), got {tuple(labels.shape)}")
        return labels.float()
    labels = labels.long().reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() > label_dim):
        raise ValueError(f"labels must lie in [0, {label_dim}] ({label_dim} is the null label, i.e. no class); "
                         f"got [{labels.min().item()}, {labels.max().item()}]")
    return torch.nn.functional.one_hot(labels, label_dim + 1)[:, :label_dim].float()


class EDMVelocity(nn.Module):
    """An EDM denoiser D = precond(x, sigma, class_labels) (EDM2's Precond) as a flow velocity.

    Exact for flow sigmas s <= s_max = sigma_max / (1 + sigma_max). Above it (up to s = 1, EDM's infinite noise,
    where sigma_schedule starts) the denoiser is queried at sigma_max on the same direction x_rf / s, i.e.
    D(sigma_max x_rf / s, sigma_max): the noise dominates there, and EDM models are not trained beyond sigma_max.
    For EDM's own discretisation use `edm_flow_sigmas(steps)` (starts at s_max, rho = 7).
    """

    def __init__(self, precond: nn.Module, sigma_max: float = 80.0):
        super().__init__()
        if not sigma_max > 0:
            raise ValueError(f"sigma_max must be > 0, got {sigma_max}")
        self.net, self.sigma_max = precond, float(sigma_max)

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        s = sigma_vector(sigma, x)
        if bool(((s <= 0) | (s > 1)).any()):
            raise ValueError(f"EDMVelocity needs flow sigmas in (0, 1], got [{s.min().item()}, {s.max().item()}]; "
                             "at sigma = 0 the velocity of a denoiser is undefined (ode_sample's last step never queries it)")
        col = s.reshape(-1, *([1] * (x.ndim - 1)))
        s_eval = col.clamp(max=self.sigma_max / (1 + self.sigma_max))
        x_edm = flow_to_edm_x(x.float(), s_eval) * (s_eval / col)  # = x_rf / (1 - s) below s_max
        sigma_edm = flow_to_edm_sigma(s_eval)
        denoised = self.net(x_edm, sigma_edm.reshape(-1), edm_class_labels(self.net, labels)).float()
        return flow_velocity_from_x0(x.float(), denoised, col)


# Classifier-free guidance: v = v_uncond + scale (v_cond - v_uncond).
def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


class CFGVelocity(nn.Module):
    """Classifier-free guidance over any velocity model: one batched call on [labels, null_label].

    scale = 1 is the conditional model (and costs one call); every channel is guided (unlike the official SiT
    `forward_with_cfg`, which guides only the first three).
    """

    def __init__(self, model: nn.Module, scale: float, null_label: int):
        super().__init__()
        self.model, self.scale, self.null_label = model, float(scale), int(null_label)

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("classifier-free guidance needs class labels; for unconditional sampling use the model "
                             "without CFGVelocity")
        if self.scale == 1.0:
            return self.model(x, sigma, labels).float()
        s = sigma_vector(sigma, x)
        null = torch.full_like(labels, self.null_label)
        v = self.model(torch.cat([x, x]), torch.cat([s, s]), torch.cat([labels, null])).float()
        v_cond, v_uncond = v.chunk(2)
        return cfg_combine(v_cond, v_uncond, self.scale)


ADAPTERS = {"unet": FlowVelocity, "sit": SiTVelocity, "edm2": EDMVelocity}


def velocity_model(net: nn.Module, arch: str | None = "unet", cfg_scale: float = 1.0,
                   null_label: int | None = None) -> nn.Module:
    """The sampler's view v = model(x, sigma, labels) of a generator of architecture `arch` (unet, sit, edm2),
    guided when cfg_scale != 1 (null label: `null_label`, else the network's `null_label` / `num_classes`)."""
    arch = "unet" if arch is None else str(arch)
    if arch not in ADAPTERS:
        raise ValueError(f"no velocity adapter for architecture {arch!r}; known: {', '.join(ADAPTERS)} (model.arch)")
    model = ADAPTERS[arch](net)
    if float(cfg_scale) != 1.0:
        if null_label is None:
            null_label = getattr(net, "null_label", None)
        if null_label is None:
            null_label = getattr(net, "num_classes", None)
        if null_label is None:
            raise ValueError(f"classifier-free guidance (scale {cfg_scale}) needs the null label: set model.num_classes "
                             "or use a class-conditional network")
        model = CFGVelocity(model, float(cfg_scale), int(null_label))
    return model
