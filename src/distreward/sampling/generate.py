"""Batched image generation: the one loop that draws n images from a generator in batches.

Every trainer, evaluation and command draws images here: class-balanced labels, noise from a seed, the
deterministic ODE sampler (`ode_images`, `generate`), the RL's stochastic sampler (`sde_images`), and the
evaluation sampler of a config (`SamplerSpec`, `eval_batch`): the flow ODE, or SiT's own SDE for the SiT-XL/2
protocol. Samples are finished by `decode` (latents -> pixels; the identity for pixel models) and clamped to
[-1, 1], never the latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..utils.progress import progress as tqdm
from .adapters import velocity_model
from .samplers import ode_sample, rollout, sit_sde_sample
from .schedules import sigma_schedule


def balanced_labels(n: int, num_classes: int) -> torch.Tensor | None:
    """Labels 0, 1, ..., num_classes - 1, 0, 1, ... (None for an unconditional model, num_classes <= 0)."""
    if num_classes <= 0:
        return None
    return torch.arange(n, dtype=torch.long) % num_classes


def seeded_noise(n: int, image_shape, seed: int) -> torch.Tensor:
    """n standard-normal starting points from one seed: models compared with a seed start from the same noise."""
    return torch.randn((n, *image_shape), generator=torch.Generator().manual_seed(int(seed)))


def shared_noise(n: int, image_shape, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n noise images and class-balanced labels from one seed (paired comparisons: every model gets these)."""
    return seeded_noise(n, image_shape, seed), balanced_labels(n, num_classes)


def _finish(x: torch.Tensor, decode: Callable | None, clamp: bool) -> torch.Tensor:
    x = x if decode is None else decode(x)
    return x.clamp(-1, 1) if clamp else x


def generate_batches(model: Callable, noise: torch.Tensor, labels: torch.Tensor | None, sigmas: torch.Tensor, *,
                     method: str = "euler", batch_size: int = 500, device="cpu", decode: Callable | None = None,
                     clamp: bool = True, progress: bool = False, desc: str = "ODE samples") -> Iterator[torch.Tensor]:
    """ODE samples of a velocity model from the given noise and labels, one batch at a time (on the CPU)."""
    sigmas = sigmas.to(device)
    for i in tqdm(range(0, noise.shape[0], batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        lab = None if labels is None else labels[i:i + batch_size].to(device)
        x = ode_sample(model, noise[i:i + batch_size].to(device), lab, sigmas, method=method)
        yield _finish(x, decode, clamp).cpu()


@torch.no_grad()
def generate(model: Callable, noise: torch.Tensor, labels: torch.Tensor | None, sigmas: torch.Tensor,
             **kwargs) -> torch.Tensor:
    """All of `generate_batches` in one tensor."""
    return torch.cat(list(generate_batches(model, noise, labels, sigmas, **kwargs)))


@torch.no_grad()
def ode_images(net, n: int, *, num_classes: int, image_shape, steps: int, method: str = "euler", shift: float = 1.0,
               seed: int = 0, batch_size: int = 500, device="cpu", progress: bool = False, arch: str = "unet",
               desc: str = "ODE samples") -> tuple[torch.Tensor, torch.Tensor | None]:
    """n class-balanced samples from fixed noise seeds with the deterministic inference sampler, clamped."""
    noise, labels = shared_noise(n, image_shape, num_classes, seed)
    images = generate(velocity_model(net, arch), noise, labels, sigma_schedule(steps, shift=shift), method=method,
                      batch_size=batch_size, device=device, progress=progress, desc=desc)
    return images, labels


@torch.no_grad()
def sde_images(net, n: int, *, num_classes: int, image_shape, steps: int, a, shift: float = 1.0, seed: int = 0,
               batch_size: int = 256, device="cpu", progress: bool = False, arch: str = "unet",
               desc: str = "SDE samples") -> tuple[torch.Tensor, torch.Tensor | None]:
    """n class-balanced samples from the RL's stochastic sampler (noise level a), clamped; each batch draws its
    starting noise, then its step noise, from one generator."""
    model = velocity_model(net, arch)
    sigmas = sigma_schedule(steps, shift=shift).to(device)
    gen = torch.Generator().manual_seed(int(seed))
    labels = balanced_labels(n, num_classes)
    out = []
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        lab = None if labels is None else labels[i:i + batch_size]
        noise = torch.randn((min(batch_size, n - i), *image_shape), generator=gen).to(device)
        traj = rollout(model, noise, None if lab is None else lab.to(device), sigmas, a, generator=gen)
        out.append(traj.xs[-1].clamp(-1, 1).cpu())
    return torch.cat(out), labels


def network_image_shape(net) -> tuple[int, int, int]:
    """(C, H, W) of a generator network, from its img_channels/in_channels and img_resolution/input_size."""
    c = getattr(net, "img_channels", None) or getattr(net, "in_channels", None)
    r = getattr(net, "img_resolution", None) or getattr(net, "input_size", None)
    if not c or not r:
        raise ValueError("cannot tell the image shape of this network (no img_channels / img_resolution attribute)")
    return int(c), int(r), int(r)


@torch.no_grad()
def sample_images(net: torch.nn.Module, arch: str, labels: torch.Tensor | None, n: int, *, steps: int = 32,
                  method: str = "euler", shift: float = 1.0, cfg_scale: float = 1.0, seed: int = 0,
                  batch_size: int = 256, device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """n images of a generator file's network, float32 (n, C, H, W) in about [-1, 1] (not clamped), on the CPU.
    The noise depends only on (seed, n), so models compared with the same seed start from the same noise."""
    if n < 1:
        raise ValueError(f"number of images must be >= 1, got {n}")
    noise = seeded_noise(n, network_image_shape(net), seed)
    return generate(velocity_model(net, arch, cfg_scale), noise, labels, sigma_schedule(steps, shift), method=method,
                    batch_size=batch_size, device=device, clamp=False, progress=progress, desc="sample")


# ----------------------------------------------------------------------------------------------------------
# The evaluation sampler of a config

@dataclass(frozen=True)
class SamplerSpec:
    """How evaluation images are drawn: `ode` (eval.method euler | heun on the flow schedule with `shift`) or
    `sit-sde` (SiT's SDE sampler: the SiT-XL/2 protocol; its options in `sde`)."""
    kind: str = "ode"
    steps: int = 20
    method: str = "euler"
    shift: float = 1.0
    cfg_scale: float = 1.0
    null_label: int | None = None
    sde: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("ode", "sit-sde"):
            raise ValueError(f"eval.sampler must be 'ode' or 'sit-sde', got {self.kind!r}")


def eval_batch_generator(seed: int, b: int) -> torch.Generator:
    """Evaluation batch b's own noise stream: samples do not depend on how batches are spread over ranks."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(b))


@torch.no_grad()
def eval_batch(net, labels: torch.Tensor, noise: torch.Tensor, spec: SamplerSpec, *, arch: str,
               generator: torch.Generator, decode: Callable, device="cpu") -> torch.Tensor:
    """One batch of evaluation images with the sampler `spec`, decoded (and clamped by `decode`)."""
    noise, labels = noise.to(device), labels.to(device)
    if spec.kind == "sit-sde":
        if arch != "sit":
            raise ValueError(f"eval.sampler sit-sde needs a SiT generator (model.arch sit), got {arch!r}")
        sde = dict(spec.sde)
        x = sit_sde_sample(net, noise, labels, steps=spec.steps, diffusion_norm=float(sde.get("diffusion_norm", 1.0)),
                           last_step=sde.get("last_step", "mean"), last_step_size=float(sde.get("last_step_size", 0.04)),
                           generator=generator)
    else:
        model = velocity_model(net, arch, spec.cfg_scale, spec.null_label)
        x = ode_sample(model, noise, labels, sigma_schedule(spec.steps, shift=spec.shift).to(device), method=spec.method)
    return decode(x)
