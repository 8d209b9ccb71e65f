"""What the paper presets need from a config (configs/sit_xl2_imagenet256.yaml, configs/edm2_xs_img512.yaml).

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
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

# Feature network name -> metric of an EDM2 reference .pkl holding its statistics.
PKL_METRIC = {"inception": "fid", "dinov2": "fd_dinov2"}
RANDOM_FEATURE_DIM = 8


def _get(node, key, default=None):
    try:
        v = node.get(key, default)
    except AttributeError:
        return default
    return default if v is None else v


def _plain(node) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _find(p) -> Path:
    from ..config import repo_path

    path = Path(str(p))
    if not path.exists() and not path.is_absolute() and repo_path(str(path)).exists():
        return repo_path(str(path))
    return path


# ----------------------------------------------------------------------------------------------------------
# Dry run

def apply_dry_run(cfg):
    """The preset with its `dry_run` block merged over it (and the block removed); an error if it has none."""
    from omegaconf import OmegaConf

    block = cfg.get("dry_run")
    if block is None:
        raise ValueError(f"config {cfg.get('name', '?')!r} has no 'dry_run' block; --dry-run needs one "
                         "(see configs/sit_xl2_imagenet256.yaml)")
    out = OmegaConf.merge(cfg, block)
    OmegaConf.set_struct(out, False)
    del out["dry_run"]
    out.name = f"{cfg.get('name', 'run')}_dry_run"
    out.dry_run_of = str(cfg.get("name", "run"))
    return out


def load_dry_run_config(name_or_path, overrides=()):
    """The preset with its dry_run block applied, then the key=value overrides (they win over the block)."""
    from omegaconf import OmegaConf

    from ..config import load_config

    cfg = apply_dry_run(load_config(name_or_path))
    overrides = list(overrides)
    if overrides:
        cfg = load_config(None, overrides, defaults=OmegaConf.to_container(cfg))
    return cfg


def is_preset_model(model_cfg) -> bool:
    """True when the generator is described by the preset keys (arch/checkpoint/kwargs/vae), not model.path alone."""
    return any(_get(model_cfg, k) is not None for k in ("checkpoint", "kwargs", "vae")) or \
        _get(model_cfg, "arch", "unet") != "unet"


# ----------------------------------------------------------------------------------------------------------
# Generator

def build_generator(model_cfg, device="cpu", seed: int = 0) -> nn.Module:
    """The generator network of `model_cfg`, in eval mode, with `generator_meta` = {arch, kwargs} (for saving)."""
    from ..models import build_network, load_generator

    arch = str(_get(model_cfg, "arch", "unet"))
    ckpt, kwargs, path = _get(model_cfg, "checkpoint"), _get(model_cfg, "kwargs"), _get(model_cfg, "path")
    if ckpt is not None:
        ckpt = _find(ckpt)
        if not ckpt.is_file():
            raise FileNotFoundError(f"model.checkpoint {ckpt} not found; download the official {arch} checkpoint "
                                    "(docs/scale.md lists where) or use --dry-run for random weights")
        if arch == "sit":
            from ..models.sit import load_sit

            net = load_sit(ckpt, _get(model_cfg, "config"), device=device)
            net.generator_meta = {"arch": "sit", "kwargs": dict(net.sit_kwargs)}
        elif arch == "edm2":
            from ..models.edm2 import load_pkl

            net = load_pkl(ckpt, device=device)
            net.generator_meta = {"arch": "edm2", "kwargs": _jsonable(net.init_kwargs)}
        else:
            raise ValueError(f"model.checkpoint is for official sit/edm2 files; for arch {arch!r} use model.path")
        return net.eval()
    if kwargs is not None:
        torch.manual_seed(int(seed))
        kw = _plain(kwargs)
        net = randomise_zero_init(build_network(arch, kw), seed)
        net.generator_meta = {"arch": arch, "kwargs": kw}
        return net.float().eval().to(device)
    if path is None:
        raise ValueError("no generator: set model.checkpoint (official file), model.path (.safetensors) or "
                         "model.kwargs (random weights)")
    p = _find(path)
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


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def velocity_model(net: nn.Module, arch: str | None, cfg_scale: float = 1.0, null_label: int | None = None) -> nn.Module:
    """The sampler's view v = model(x, sigma, labels) of `net`, guided when cfg_scale != 1."""
    from .. import sampling

    names = {"unet": "FlowVelocity", "sit": "SiTVelocity", "edm2": "EDMVelocity", None: "FlowVelocity"}
    if arch not in names:
        raise ValueError(f"model.arch must be one of unet, sit, edm2; got {arch!r}")
    model = getattr(sampling, names[arch])(net)
    if float(cfg_scale) != 1.0:
        if null_label is None:
            raise ValueError("classifier-free guidance needs the null label: set model.num_classes")
        model = sampling.CFGVelocity(model, float(cfg_scale), int(null_label))
    return model


def net_arch(net: nn.Module, model_cfg=None) -> str:
    meta = getattr(net, "generator_meta", None)
    if meta is not None:
        return meta["arch"]
    return str(_get(model_cfg, "arch", "unet"))


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
    vae = _get(model_cfg, "vae")
    if vae is None:
        return None
    from ..models.vae import LatentCodec

    convention = str(_get(vae, "convention", "sit"))
    name = str(_get(vae, "dtype", "float32"))
    dtype = None if name == "float32" else getattr(torch, name)     # float32 is the VAE's own dtype
    batch_size = int(_get(vae, "batch_size", 8))
    if _get(vae, "path") is not None:
        return LatentCodec.load(_find(vae.path), convention, device=device, dtype=dtype, batch_size=batch_size)
    if _get(vae, "config") is not None:
        return LatentCodec(random_autoencoder(_plain(vae.config), seed), convention, batch_size=batch_size,
                           dtype=dtype).to(device)
    raise ValueError("model.vae needs 'path' (a local AutoencoderKL folder such as weights/sd-vae-ft-ema) or "
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
    from ..features import get_feature_network

    return get_feature_network(str(name), weights=weights, device=device)


def random_stats(dim: int, seed: int = 0):
    """Random positive-definite real statistics (GaussianStats) for dry runs."""
    from ..metrics import GaussianStats

    rng = np.random.default_rng(int(seed) + 1)
    a = rng.normal(size=(dim, 2 * dim)) / np.sqrt(2 * dim)
    return GaussianStats.from_mu_sigma(rng.normal(size=dim) * 0.1, a @ a.T + 0.05 * np.eye(dim), n=1000)


def real_stats_for(name: str, path, dim: int, seed: int = 0):
    """The real side of a feature space: from a .npz/.pkl file, or random for the `random` network."""
    if path is None:
        if str(name) == "random":
            return random_stats(dim, seed)
        raise ValueError(f"no real statistics for feature network {name!r}: set the path to a .npz (mu, sigma) or "
                         "an EDM2 .pkl (reward.real_stats / eval.real_stats)")
    from ..metrics.reference import load_reference

    st = load_reference(_find(path), PKL_METRIC.get(str(name), "fid"))
    if st.dim != dim:
        raise ValueError(f"{path}: statistics of dimension {st.dim}, but {name!r} gives {dim}-d features; "
                         "use the statistics of that network")
    return st


def build_evaluator(cfg, device="cpu", reuse: dict | None = None):
    """An FD evaluator from eval.features (names) with real statistics from eval.real_stats; None without
    eval.features. `reuse` maps a feature name to an already built network (the reward's)."""
    names = _get(cfg.get("eval", {}), "features")
    if names is None:
        return None
    from ..evaluation import Evaluator

    names = [str(n) for n in _plain(names)]
    paths = _plain(_get(cfg.eval, "real_stats", {})) or {}
    weights = _plain(_get(cfg.eval, "weights", {})) or {}
    if not isinstance(paths, dict):
        paths = {names[0]: paths}
    nets, stats = [], {}
    for i, name in enumerate(names):
        net = (reuse or {}).get(name) or feature_network(name, weights.get(name), device)
        nets.append(net)
        stats[name] = real_stats_for(name, paths.get(name), int(net.dim), seed=i)
    return Evaluator(None, feature_nets=nets, labels=names, ref_stats=stats, device=device, cache_dir=None,
                     batch_size=int(_get(cfg.eval, "feature_batch_size", 64)))


# ----------------------------------------------------------------------------------------------------------
# The merge trainer's parts for a preset (EDM2-XS): inputs, ODE sampler with decoding, features, statistics

def random_checkpoints(cfg, folder: Path, k: int) -> list[Path]:
    """k random generator files (model.arch / model.kwargs, seeds 0..k-1) for a dry run of the merge trainer."""
    from ..models import save_generator

    paths = []
    for i in range(int(k)):
        net = build_generator(cfg.model, "cpu", seed=i)
        meta = net.generator_meta
        paths.append(save_generator(Path(folder) / f"random_{i}.safetensors", net, meta["arch"], meta["kwargs"],
                                    extra={"dry_run": True}))
    return paths


def edm2_pkl_paths(merge_cfg) -> list[Path]:
    snaps = _get(merge_cfg, "snapshots")
    if snaps:
        folder = _find(snaps)
        if not folder.is_dir():
            raise FileNotFoundError(f"merge.snapshots {folder} not found (EDM2 raw snapshots, docs/scale.md)")
        paths = sorted(folder.glob("*.pkl"))
        if not paths:
            raise FileNotFoundError(f"no EDM2 .pkl snapshots in {folder}")
        return paths
    return [_find(p) for p in (_plain(_get(merge_cfg, "checkpoints", [])) or [])]


def _edm2_phema(path: Path) -> dict | None:
    """EDM2 snapshot names <prefix>-<kimg, 7 digits>-<std>.pkl -> power-EMA metadata for the post-hoc solve."""
    parts = path.stem.split("-")
    try:
        kimg, std = int(parts[-2]), float(parts[-1])
    except (IndexError, ValueError):
        return None
    return {"std": std, "step": kimg, "kimg": float(kimg), "batch": 0}


def convert_edm2_pkls(paths: list[Path], folder: Path) -> list[Path]:
    """EDM2 pickles (read without executing them) -> our generator .safetensors, once (kept in `folder`)."""
    from ..models import save_generator
    from ..models.edm2 import load_pkl

    out = []
    for p in paths:
        target = Path(folder) / (p.stem + ".safetensors")
        if not target.is_file():
            net = load_pkl(p)
            extra = {"source": str(p)}
            ph = _edm2_phema(p)
            if ph is not None:
                extra["phema"] = ph
            save_generator(target, net, "edm2", _jsonable(net.init_kwargs), extra=extra)
        out.append(target)
    return out


def merge_parts(cfg, run_dir: Path, device="cpu") -> dict:
    """ckpts, sample_fn, feature_fn, real_stats, evaluator for `merge.run_merge` from a preset."""
    from ..features import compute_features
    from ..merge.streaming import CheckpointSet
    from ..sampling import edm_flow_sigmas, ode_sample, sigma_schedule
    from ..utils import dist as D

    run_dir = Path(run_dir)
    k_random = _get(cfg.merge, "random_checkpoints")
    if k_random:
        folder = run_dir / "dry_run_inputs"
        with D.main_first() as first:
            paths = random_checkpoints(cfg, folder, int(k_random)) if first else \
                sorted(folder.glob("random_*.safetensors"))
    elif _get(cfg.merge, "format") == "edm2-pkl":
        with D.main_first():
            paths = convert_edm2_pkls(edm2_pkl_paths(cfg.merge), run_dir / "inputs")
        paths += [_find(p) for p in (_plain(_get(cfg.merge, "include", [])) or [])]
    else:
        from ..merge.trainer import open_checkpoints

        paths = list(open_checkpoints(cfg.merge).paths)
    ckpts = CheckpointSet.open(paths)

    codec = build_codec(cfg.model, device, seed=int(cfg.get("seed", 0)))
    decode = make_decoder(codec)
    s = cfg.sampler
    if str(_get(s, "schedule", "flow")) == "edm":
        sigmas = edm_flow_sigmas(int(s.steps), float(_get(s, "sigma_min", 0.002)), float(_get(s, "sigma_max", 80.0)),
                                 float(_get(s, "rho", 7.0)))
    else:
        sigmas = sigma_schedule(int(s.steps), shift=float(_get(s, "shift", 1.0)))
    sigmas = sigmas.to(device)
    arch, bs, method = ckpts.arch, int(_get(s, "batch_size", 64)), str(_get(s, "method", "heun"))
    cfg_scale, null = float(_get(cfg.model, "cfg_scale", 1.0)), _get(cfg.model, "num_classes")

    @torch.no_grad()
    def sample_fn(net, noise, labels):
        model = velocity_model(net, arch, cfg_scale, null)
        out = []
        for i in range(0, noise.shape[0], bs):
            lab = None if labels is None else labels[i:i + bs].to(device)
            out.append(decode(ode_sample(model, noise[i:i + bs].to(device), lab, sigmas, method=method)).cpu())
        return torch.cat(out)

    rc = cfg.reward
    fnet = feature_network(rc.features, _get(rc, "weights"), device)
    real = real_stats_for(str(rc.features), _get(rc, "real_stats"), int(fnet.dim))
    evaluator = build_evaluator(cfg, device, reuse={str(rc.features): fnet})
    return {"ckpts": ckpts, "sample_fn": sample_fn, "feature_fn": lambda im: compute_features(fnet, im, batch_size=bs),
            "real_stats": (real.mu, real.sigma), "evaluator": evaluator}

