"""Latent codecs: images in the project's range [-1, 1] <-> the latents that SiT and EDM2 models generate.

Both papers use a Stable Diffusion `AutoencoderKL` (diffusers) with 8x spatial down-sampling and 4 latent
channels, but they scale the data differently; `LatentCodec(path, convention)` implements both:

- "sit" (SiT/DiT, stabilityai/sd-vae-ft-ema): the VAE sees pixels in [-1, 1]; latents = posterior sample (or
  mean) * 0.18215; decoding divides by 0.18215 and the VAE's output is again in [-1, 1].
- "edm2" (EDM2, stabilityai/sd-vae-ft-mse, training/encoders.py): the VAE sees pixels in [0, 1]; the raw
  posterior is whitened per channel, latents = (mean + std n) * scale + bias with scale = final_std / raw_std,
  bias = final_mean - raw_mean * scale (raw_mean [5.81, 3.25, 0.12, -2.15], raw_std [4.17, 4.62, 3.71, 3.28],
  final_mean 0, final_std 0.5); decoding inverts the affine map and reads the VAE's output as [0, 1].

The VAE is loaded from a local folder only (config.json + diffusion_pytorch_model.safetensors); nothing is
downloaded. diffusers is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import check_images

__all__ = ["LatentCodec", "Convention", "CONVENTIONS", "load_autoencoder", "find_vae_dir", "raw_to_latents",
           "latents_to_raw", "posterior_sample"]


@dataclass(frozen=True)
class Convention:
    """How one model family maps pixels to latents: the VAE's pixel range and a per-channel affine map."""
    name: str
    vae: str                      # the Hugging Face repository the official code uses
    pixel_range: tuple[float, float]
    scale: tuple[float, ...]      # latents = raw * scale + bias, per channel (length 1: all channels)
    bias: tuple[float, ...]


# EDM2's whitening of the raw sd-vae-ft-mse latents (training/encoders.py, StabilityVAEEncoder defaults).
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_FINAL_MEAN = 0.0
EDM2_FINAL_STD = 0.5
SIT_SCALE = 0.18215               # Stable Diffusion's latent scaling factor, as SiT/DiT's train.py and sample.py use it


def edm2_affine(raw_mean=EDM2_RAW_MEAN, raw_std=EDM2_RAW_STD, final_mean=EDM2_FINAL_MEAN,
                final_std=EDM2_FINAL_STD) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """EDM2's whitening: scale = final_std / raw_std, bias = final_mean - raw_mean * scale (float32, as EDM2)."""
    raw_mean = torch.tensor(raw_mean, dtype=torch.float32)
    scale = torch.tensor(final_std, dtype=torch.float32) / torch.tensor(raw_std, dtype=torch.float32)
    bias = torch.tensor(final_mean, dtype=torch.float32) - raw_mean * scale
    return tuple(scale.tolist()), tuple(bias.tolist())


CONVENTIONS: dict[str, Convention] = {
    "sit": Convention("sit", "stabilityai/sd-vae-ft-ema", (-1.0, 1.0), (SIT_SCALE,), (0.0,)),
    "edm2": Convention("edm2", "stabilityai/sd-vae-ft-mse", (0.0, 1.0), *edm2_affine()),
}

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


# --- the equations ------------------------------------------------------------------------------------------------

# Pixel range change: the project's [-1, 1] -> the VAE's [lo, hi] (identity for "sit", (x + 1) / 2 for "edm2").
def to_vae_pixels(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (x + 1) * ((hi - lo) / 2) + lo


# Its inverse, clamped to the VAE's range first: [lo, hi] -> [-1, 1].
def from_vae_pixels(y: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (y.clamp(lo, hi) - lo) * (2 / (hi - lo)) - 1


# Reparameterised posterior draw: z = mean + std * n, n ~ N(0, I).
def posterior_sample(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return mean + std * noise


# Raw VAE latents -> model latents: z * scale + bias, per channel.
def raw_to_latents(z: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return z * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


# Model latents -> raw VAE latents: (x - bias) / scale, the exact inverse of raw_to_latents.
def latents_to_raw(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return (x - bias.reshape(1, -1, 1, 1)) / scale.reshape(1, -1, 1, 1)


# --- loading ------------------------------------------------------------------------------------------------------

def _where_to_get(convention: str | None) -> str:
    repos = [CONVENTIONS[convention].vae] if convention in CONVENTIONS else [c.vae for c in CONVENTIONS.values()]
    return " or ".join(f"https://huggingface.co/{r}" for r in repos)


def find_vae_dir(path: str | os.PathLike, convention: str | None = None) -> Path:
    """The folder holding config.json and the weights: `path` itself, or the single snapshot of a Hugging Face
    cache folder (models--stabilityai--sd-vae-ft-*/snapshots/<hash>/). Missing files raise FileNotFoundError."""
    path = Path(path).expanduser()
    need = f"config.json and {WEIGHT_FILES[0]} (or {WEIGHT_FILES[1]})"
    get = (f"download them from {_where_to_get(convention)} (e.g. `huggingface-cli download "
           f"{CONVENTIONS[convention].vae if convention in CONVENTIONS else 'stabilityai/sd-vae-ft-ema'} "
           f"--local-dir DIR`) and pass that folder")
    if not path.is_dir():
        raise FileNotFoundError(f"VAE folder {path} not found: it must hold {need}; {get}")
    if not (path / "config.json").is_file():
        snaps = sorted(p for p in (path / "snapshots").glob("*") if (p / "config.json").is_file())
        if len(snaps) == 1:
            path = snaps[0]
        else:
            raise FileNotFoundError(f"VAE folder {path} has no config.json: it must hold {need}; {get}")
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise FileNotFoundError(f"VAE folder {path} has config.json but no weights ({' or '.join(WEIGHT_FILES)}); {get}")
    return path


def load_autoencoder(path: str | os.PathLike, convention: str | None = None):
    """diffusers' AutoencoderKL from a local folder (never the network), in eval mode without gradients."""
    folder = find_vae_dir(path, convention)
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # a declared dependency; say so if an environment lacks it
        raise ImportError("the latent models need diffusers: pip install diffusers") from e
    safetensors = (folder / WEIGHT_FILES[0]).is_file()
    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=safetensors,
                                        low_cpu_mem_usage=False)
    return vae.eval().requires_grad_(False)


# --- the codec ----------------------------------------------------------------------------------------------------

class LatentCodec(torch.nn.Module):
    """encode(images in [-1, 1]) -> model latents; decode(latents) -> images in [-1, 1], batch by batch.

    `convention` is "sit" or "edm2" (module docstring). `dtype` is the VAE's compute dtype (e.g. torch.float16
    on a GPU); inputs and outputs stay float32. Use `LatentCodec.load(path, convention)` to read a folder, or pass
    an AutoencoderKL instance.
    """

    def __init__(self, vae, convention: str = "sit", *, batch_size: int = 8, dtype: torch.dtype | None = None):
        super().__init__()
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown latent convention {convention!r}; use one of {', '.join(CONVENTIONS)} "
                             "(sit: sd-vae-ft-ema, latents x 0.18215; edm2: sd-vae-ft-mse, per-channel whitening)")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.convention = CONVENTIONS[convention]
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.batch_size = int(batch_size)
        c = self.convention
        if len(c.scale) not in (1, self.latent_channels):
            raise ValueError(f"convention {c.name!r} has {len(c.scale)} channel scales, the VAE {self.latent_channels} "
                             "latent channels")
        expand = (lambda v: v * self.latent_channels) if len(c.scale) == 1 else (lambda v: v)
        self.register_buffer("scale", torch.tensor(expand(c.scale), dtype=torch.float32), persistent=False)
        self.register_buffer("bias", torch.tensor(expand(c.bias), dtype=torch.float32), persistent=False)
        if dtype is not None:
            self.vae.to(dtype=dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, convention: str = "sit", *, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None, batch_size: int = 8) -> "LatentCodec":
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown latent convention {convention!r}; use one of {', '.join(CONVENTIONS)}")
        return cls(load_autoencoder(path, convention), convention, batch_size=batch_size, dtype=dtype).to(device)

    @property
    def device(self) -> torch.device:
        return self.scale.device

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        """(C, H, W) of the latents of (3, H, W) images."""
        _, h, w = image_shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the VAE's down-sampling factor {self.factor}")
        return (self.latent_channels, h // self.factor, w // self.factor)

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's raw posterior (mean, std) of images in [-1, 1], float32 on the codec's device."""
        images = check_images(images, channels=3)
        self.latent_shape(images.shape[1:])
        lo, hi = self.convention.pixel_range
        means, stds = [], []
        for x in images.split(self.batch_size):
            x = to_vae_pixels(x.to(self.device, torch.float32), lo, hi).to(self.vae_dtype)
            d = self.vae.encode(x).latent_dist
            means.append(d.mean.float())
            stds.append(d.std.float())
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Model latents (B, 4, H/8, W/8), float32. sample=False uses the posterior mean (deterministic).

        The posterior noise is drawn once for the whole input, on the generator's device, so the result does not
        depend on batch_size."""
        mean, std = self.posterior(images)
        raw = mean
        if sample:
            gen_device = generator.device if generator is not None else self.device
            noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=torch.float32)
            raw = posterior_sample(mean, std, noise.to(self.device))
        return raw_to_latents(raw, self.scale, self.bias)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 8H, 8W) in [-1, 1], float32, from model latents (B, 4, H, W)."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a tensor (B, {self.latent_channels}, H, W), got {shape}")
        lo, hi = self.convention.pixel_range
        out = []
        for x in latents.split(self.batch_size):
            raw = latents_to_raw(x.to(self.device, torch.float32), self.scale, self.bias)
            y = self.vae.decode(raw.to(self.vae_dtype)).sample.float()
            out.append(from_vae_pixels(y, lo, hi))
        if not out:
            return torch.zeros((0, 3, latents.shape[2] * self.factor, latents.shape[3] * self.factor), device=self.device)
        return torch.cat(out)

    def extra_repr(self) -> str:
        return f"convention={self.convention.name}, factor={self.factor}, batch_size={self.batch_size}"
