"""Drawing images from a generator file with a deterministic ODE sampler (used by `distreward sample` and the
sample grids of `distreward phema`)."""

from __future__ import annotations

import torch


def velocity_model(net: torch.nn.Module, arch: str, cfg_scale: float = 1.0):
    """The velocity adapter for a generator of architecture `arch`, with classifier-free guidance if scale != 1."""
    from ..sampling import CFGVelocity, EDMVelocity, FlowVelocity, SiTVelocity

    adapters = {"unet": FlowVelocity, "sit": SiTVelocity, "edm2": EDMVelocity}
    if arch not in adapters:
        raise ValueError(f"no velocity adapter for architecture {arch!r}; known: {', '.join(adapters)}")
    model = adapters[arch](net)
    if cfg_scale != 1.0:
        null = getattr(net, "null_label", None)
        if null is None:
            null = getattr(net, "num_classes", None)
        if null is None:
            raise ValueError(f"--cfg {cfg_scale} needs a class-conditional network with a null label")
        model = CFGVelocity(model, cfg_scale, int(null))
    return model


def class_labels(n: int, num_classes: int) -> torch.Tensor | None:
    """Balanced labels 0, 1, ..., num_classes-1, 0, 1, ... (None for an unconditional network)."""
    if num_classes <= 0:
        return None
    return torch.arange(n, dtype=torch.long) % num_classes


@torch.no_grad()
def sample_images(net: torch.nn.Module, arch: str, labels: torch.Tensor | None, n: int, *, steps: int = 32,
                  method: str = "euler", shift: float = 1.0, cfg_scale: float = 1.0, seed: int = 0,
                  batch_size: int = 256, device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """n images, float32 (n, C, H, W) in about [-1, 1], on the CPU. The noise depends only on (seed, n), so
    models compared with the same seed start from the same noise."""
    from tqdm.auto import tqdm

    from ..sampling import ode_sample, sigma_schedule

    if n < 1:
        raise ValueError(f"number of images must be >= 1, got {n}")
    c = getattr(net, "img_channels", None) or getattr(net, "in_channels", None)
    r = getattr(net, "img_resolution", None) or getattr(net, "input_size", None)
    if not c or not r:
        raise ValueError("cannot tell the image shape of this network (no img_channels / img_resolution attribute)")
    model = velocity_model(net, arch, cfg_scale)
    sigmas = sigma_schedule(steps, shift)
    noise = torch.randn((n, c, r, r), generator=torch.Generator().manual_seed(int(seed)))
    out = []
    for i in tqdm(range(0, n, batch_size), desc="sample", disable=not progress, unit="batch"):
        y = labels[i:i + batch_size].to(device) if labels is not None else None
        out.append(ode_sample(model, noise[i:i + batch_size].to(device), y, sigmas, method=method).cpu())
    return torch.cat(out)
