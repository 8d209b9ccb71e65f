"""From a config to objects: the generator, its velocity adapter, the latent codec, feature networks, real
statistics, the evaluator and its plan (configs/*.yaml; the paper presets sit_xl2_imagenet256, edm2_xs_img512).

- the generator: `model.arch` sit | edm2 | unet, from an official checkpoint (`model.checkpoint`: SiT .pt, EDM2
  .pkl read without executing it), our .safetensors (`model.path`), or random weights (`model.kwargs`);
- its velocity adapter (SiT, EDM, flow) with optional classifier-free guidance (`model.cfg_scale`);
- the latent codec (`model.vae.{path, convention, dtype, batch_size}`, or `model.vae.config`: a small random
  AutoencoderKL for dry runs); samples are decoded, then clamped to [-1, 1] (never the latents);
- feature networks by name (`inception`, `dinov2`, `fmnist-*`, `random`: a small random network) and the real
  side's statistics from a file (.npz, or EDM2's .pkl: metric `fid` for inception, `fd_dinov2` for dinov2);
- the evaluator from `eval.features` / `eval.real_stats` / `eval.weights` (FD only: no real images);
- `--dry-run`: the preset's `dry_run` block merged over it (tiny random networks, one iteration).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from .config import find_file, get, load_config, plain
from .evaluation import EvalPlan, Evaluator
from .features import get_feature_network
from .metrics import GaussianStats
from .metrics.reference import load_reference
from .models import build_network, load_generator
from .models.edm2 import load_pkl
from .models.sit import load_sit
from .models.vae import LatentCodec
from .sampling.generate import SamplerSpec
from .schema import ConfigError
from .utils.errors import InputFileError

# Feature network name -> metric of an EDM2 reference .pkl holding its statistics.
PKL_METRIC = {"inception": "fid", "dinov2": "fd_dinov2"}
RANDOM_FEATURE_DIM = 8


# ----------------------------------------------------------------------------------------------------------
# Dry run

def apply_dry_run(cfg):
    """The preset with its `dry_run` block merged over it (the block removed, and the `demo` block: a dry run is not
    the demo's size); an error if it has none."""
    block = cfg.get("dry_run")
    if block is None:
        raise ConfigError(f"config {cfg.get('name', '?')!r} has no 'dry_run' block; --dry-run needs one: copy the "
                          "block of a preset of the same command (configs/fmnist_grpo_tiny.yaml for finetune, "
                          "configs/fmnist_merge_ema.yaml for merge, configs/fmnist_base.yaml for train-base)")
    out = OmegaConf.merge(cfg, block)
    OmegaConf.set_struct(out, False)
    for block in ("dry_run", "demo"):
        out.pop(block, None)
    out.name = f"{cfg.get('name', 'run')}_dry_run"
    out.dry_run_of = str(cfg.get("name", "run"))
    return out


def load_dry_run_config(name_or_path, overrides=()):
    """The preset with its dry_run block applied, then the key=value overrides (they win over the block)."""
    cfg = apply_dry_run(load_config(name_or_path))
    overrides = list(overrides)
    if overrides:
        cfg = load_config(None, overrides, defaults=OmegaConf.to_container(cfg))
    return cfg


def is_preset_model(model_cfg) -> bool:
    """True when the generator is described by the preset keys (arch/checkpoint/kwargs/vae), not model.path alone."""
    return any(get(model_cfg, k) is not None for k in ("checkpoint", "kwargs", "vae")) or \
        get(model_cfg, "arch", "unet") != "unet"


# ----------------------------------------------------------------------------------------------------------
# Generator

def generator_file(model_cfg) -> Path | None:
    """The file the generator's weights come from (model.checkpoint, else model.path); None for random weights."""
    if get(model_cfg, "checkpoint") is not None:
        return find_file(get(model_cfg, "checkpoint"))
    if get(model_cfg, "kwargs") is not None or get(model_cfg, "path") is None:
        return None
    return find_file(get(model_cfg, "path"))


def build_generator(model_cfg, device="cpu", seed: int = 0) -> nn.Module:
    """The generator network of `model_cfg`, in eval mode, with `generator_meta` = {arch, kwargs} (for saving)."""
    arch = str(get(model_cfg, "arch", "unet"))
    ckpt, kwargs, path = get(model_cfg, "checkpoint"), get(model_cfg, "kwargs"), get(model_cfg, "path")
    if ckpt is not None:
        ckpt = find_file(ckpt)
        if not ckpt.is_file():
            raise FileNotFoundError(f"model.checkpoint {ckpt} not found; download the official {arch} checkpoint "
                                    "(docs/scale.md lists where) or use --dry-run for random weights")
        if arch == "sit":
            net = load_sit(ckpt, get(model_cfg, "config"), device=device)
            net.generator_meta = {"arch": "sit", "kwargs": dict(net.sit_kwargs)}
        elif arch == "edm2":
            net = load_pkl(ckpt, device=device)
            net.generator_meta = {"arch": "edm2", "kwargs": jsonable(net.init_kwargs)}
        else:
            raise ConfigError(f"model.checkpoint is for official sit/edm2 files; for arch {arch!r} use model.path")
        return net.eval()
    if kwargs is not None:
        torch.manual_seed(int(seed))
        kw = plain(kwargs)
        net = randomise_zero_init(build_network(arch, kw), seed)
        net.generator_meta = {"arch": arch, "kwargs": kw}
        return net.float().eval().to(device)
    if path is None:
        raise ConfigError("no generator: set model.checkpoint (official file), model.path (.safetensors) or "
                         "model.kwargs (random weights)")
    p = find_file(path)
    if not p.is_file():
        raise FileNotFoundError(f"generator {p} not found; pass model.path=PATH")
    return load_generator(p, device=device)


@torch.no_grad()
def randomise_zero_init(net: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Random weights for dry runs and benchmarks: SiT (adaLN, final layer) and EDM2 (output gain) start with zero
    tensors, which make every random network output the same thing; those get small random values."""
    g = torch.Generator().manual_seed(int(seed) + 12345)
    for p in net.parameters():
        if p.is_floating_point() and p.numel() and not bool(p.any()):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def net_arch(net: nn.Module, model_cfg=None) -> str:
    meta = getattr(net, "generator_meta", None)
    if meta is not None:
        return meta["arch"]
    return str(get(model_cfg, "arch", "unet"))


# ----------------------------------------------------------------------------------------------------------
# Latent codec

def random_autoencoder(config: dict, seed: int = 0):
    """A small randomly initialised diffusers AutoencoderKL from a partial config (no download): the block types
    are filled in to match `block_out_channels`."""
    from diffusers import AutoencoderKL

    cfg = dict(config)
    n = len(cfg.get("block_out_channels", (64,)))
    cfg.setdefault("down_block_types", ["DownEncoderBlock2D"] * n)
    cfg.setdefault("up_block_types", ["UpDecoderBlock2D"] * n)
    cfg.setdefault("latent_channels", 4)
    torch.manual_seed(int(seed))
    return AutoencoderKL(**cfg).eval().requires_grad_(False)


def build_codec(model_cfg, device="cpu", seed: int = 0):
    """`LatentCodec` of model.vae (a folder, or a random one from model.vae.config), or None for pixel models."""
    vae = get(model_cfg, "vae")
    if vae is None:
        return None
    convention = str(get(vae, "convention", "sit"))
    name = str(get(vae, "dtype", "float32"))
    dtype = None if name == "float32" else getattr(torch, name)     # float32 is the VAE's own dtype
    batch_size = int(get(vae, "batch_size", 8))
    if get(vae, "path") is not None:
        return LatentCodec.load(find_file(vae.path), convention, device=device, dtype=dtype, batch_size=batch_size)
    if get(vae, "config") is not None:
        return LatentCodec(random_autoencoder(plain(vae.config), seed), convention, batch_size=batch_size,
                           dtype=dtype).to(device)
    raise ConfigError("model.vae needs 'path' (a local AutoencoderKL folder such as weights/sd-vae-ft-ema) or "
                     "'config' (a random one, for dry runs)")


def make_decoder(codec) -> Callable[[torch.Tensor], torch.Tensor]:
    """Samples -> images in [-1, 1]: pixels are clamped; latents are decoded, then clamped."""
    if codec is None:
        return lambda x: x.clamp(-1, 1)
    return lambda x: codec.decode(x).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------
# Feature networks and real statistics

class RandomFeatures(nn.Module):
    """A random conv feature network for dry runs: any (B, C, H, W) images -> (B, dim) features."""

    def __init__(self, dim: int = RANDOM_FEATURE_DIM, channels: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.dim, self.channels = int(dim), int(channels)
        self.conv = nn.Conv2d(channels, 16, 3, stride=2, padding=1)
        self.proj = nn.Linear(16, self.dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True).expand(-1, self.channels, -1, -1)
        return self.proj(torch.tanh(self.conv(x.float())).mean((2, 3)))


def feature_network(name: str, weights=None, device="cpu", dim: int | None = None) -> nn.Module:
    """A feature network by registry name, or `random` (RandomFeatures of `dim`, default 8)."""
    if str(name) == "random":
        return RandomFeatures(int(dim or RANDOM_FEATURE_DIM)).eval().requires_grad_(False).to(device)
    return get_feature_network(str(name), weights=weights, device=device)


def random_stats(dim: int, seed: int = 0):
    """Random positive-definite real statistics (GaussianStats) for dry runs."""
    rng = np.random.default_rng(int(seed) + 1)
    a = rng.normal(size=(dim, 2 * dim)) / np.sqrt(2 * dim)
    return GaussianStats.from_mu_sigma(rng.normal(size=dim) * 0.1, a @ a.T + 0.05 * np.eye(dim), n=1000)


def real_stats_for(name: str, path, dim: int | None, seed: int = 0):
    """The real side of a feature space: from a .npz/.pkl file (its dimension checked against `dim` unless None), or
    random for the `random` network."""
    if path is None:
        if str(name) == "random":
            return random_stats(dim, seed)
        raise ConfigError(f"no real statistics for feature network {name!r}: set the path to a .npz (mu, sigma) or "
                         "an EDM2 .pkl (reward.real_stats / eval.real_stats)")
    st = load_reference(find_file(path), PKL_METRIC.get(str(name), "fid"))
    if dim is not None and st.dim != dim:
        raise InputFileError(f"{path}: statistics of dimension {st.dim}, but {name!r} gives {dim}-d features; "
                             f"use the statistics of that network ('distreward stats DATA --features {name} -o X.npz')")
    return st


def build_evaluator(cfg, device="cpu", reuse: dict | None = None):
    """An FD evaluator from eval.features (names) with real statistics from eval.real_stats; None without
    eval.features. `reuse` maps a feature name to an already built network (the reward's)."""
    names = get(cfg.get("eval", {}), "features")
    if names is None:
        return None
    names = [str(n) for n in plain(names)]
    paths = plain(get(cfg.eval, "real_stats", {})) or {}
    weights = plain(get(cfg.eval, "weights", {})) or {}
    if not isinstance(paths, dict):
        paths = {names[0]: paths}
    nets, stats = [], {}
    for i, name in enumerate(names):
        net = (reuse or {}).get(name) or feature_network(name, weights.get(name), device)
        nets.append(net)
        stats[name] = real_stats_for(name, paths.get(name), int(net.dim), seed=i)
    return Evaluator(None, feature_nets=nets, labels=names, ref_stats=stats, device=device, cache_dir=None,
                     batch_size=int(get(cfg.eval, "feature_batch_size", 64)))


# ----------------------------------------------------------------------------------------------------------
# Base loading and the evaluation plan

def load_base(model_cfg, device="cpu") -> nn.Module:
    """The base generator of model.path (a .safetensors generator file, also looked up in the checkout)."""
    path = find_file(model_cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"base generator {model_cfg.path} not found; train one with 'distreward train-base' "
                                f"and pass model.path=PATH")
    return load_generator(path, device=device)


def sampler_spec(eval_cfg, model_cfg, shift: float = 1.0, steps: int | None = None, method: str | None = None) -> SamplerSpec:
    """The evaluation sampler of a config: eval.sampler (ode | sit-sde), eval.steps, eval.method, the rollout
    grid's shift, model.cfg_scale and its null label (model.num_classes)."""
    return SamplerSpec(kind=str(get(eval_cfg, "sampler", "ode")), steps=int(steps if steps is not None else eval_cfg.steps),
                       method=str(method or eval_cfg.method), shift=float(shift),
                       cfg_scale=float(get(model_cfg, "cfg_scale", 1.0)), null_label=get(model_cfg, "num_classes"),
                       sde=dict(plain(get(eval_cfg, "sde", {}))))


def eval_plan(cfg, *, noise: str = "batch", shift: float | None = None, steps: int | None = None,
              method: str | None = None) -> EvalPlan:
    """The evaluation plan of a run config (eval.n, eval.seed, eval.batch_size, eval.grid, model shape/classes;
    the evidence options eval.uncertainty (bootstrap resamples, 0 = off), eval.fd_infinity, eval.per_class)."""
    ev, model = cfg.eval, cfg.model
    shift = float(cfg.rl.shift) if shift is None else float(shift)
    return EvalPlan(n=int(ev.n), seed=int(ev.seed), batch_size=int(ev.batch_size), grid=int(get(ev, "grid", 0)),
                    num_classes=int(model.num_classes), image_shape=tuple(model.image_shape),
                    sampler=sampler_spec(ev, model, shift, steps, method), noise=noise,
                    uncertainty=int(get(ev, "uncertainty", 0) or 0), fd_infinity=bool(get(ev, "fd_infinity", False)),
                    per_class=bool(get(ev, "per_class", False)))
