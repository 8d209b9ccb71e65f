"""What a merge run is built from: its K inputs, the post-hoc EMA coefficients over them, the ODE sampler and the
reward's features and real statistics.

- checkpoint lists: `merge.snapshots` (a folder of power-EMA snapshots) or `merge.checkpoints` (files), plus
  `merge.include`; `phema_weights` (the train package's least-squares solve over the snapshots' metadata);
- `preset_inputs`: those lists, random generator files for a dry run (`merge.random_checkpoints`), or EDM2 pickles
  converted once to our .safetensors (`merge.format: edm2-pkl`);
- `merge_parts`: the one builder of a run's parts (what `run_merge` is not given): the inputs, the ODE sampler with
  the config's schedule, guidance and latent decoding (`run_sampler`), the reward's feature network with its
  weights (`reward_features`), the real statistics (`real_statistics`) and the evaluator;
- inputs holding the same weights are used once (`distinct_inputs`, a printed note names the dropped file): a
  duplicate would count twice in the uniform soup and in every coefficient vector.

Every sampler here is `sampling.generate` on `sampling.velocity_model`: deterministic, no randomness beyond the
noise it is given.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open

from ..build import build_codec, build_evaluator, build_generator, feature_network, jsonable, real_stats_for
from ..config import find_file, get, plain
from ..schema import ConfigError
from ..data import load_fmnist
from ..evaluation import Evaluator, images_hash, network_hash
from ..features import compute_features
from ..metrics import GaussianStats
from ..models import GENERATOR_FIX, save_generator
from ..models.edm2 import load_pkl
from ..sampling import edm_flow_sigmas, sigma_schedule, velocity_model
from ..sampling.generate import generate
from ..train.phema import Snapshot, list_snapshots as list_phema, phema_coefficients
from ..utils import dist as D
from ..utils.errors import reading
from ..utils.progress import phase
from ..utils.cache import cache_valid, save_cache_key
from ..utils.hashing import file_sha256
from .streaming import CheckpointSet, folder_files, list_snapshots

Sampler = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# Checkpoint lists

def open_checkpoints(merge_cfg) -> CheckpointSet:
    """The K inputs: merge.snapshots (a folder) or merge.checkpoints (files), plus merge.include."""
    snaps = merge_cfg.get("snapshots")
    ckpts = list(merge_cfg.get("checkpoints") or [])
    if snaps and ckpts:
        raise ConfigError("give either merge.snapshots (a folder) or merge.checkpoints (files), not both")
    paths = snapshot_paths(find_file(snaps)) if snaps else [find_file(p) for p in ckpts]
    paths += include_paths(merge_cfg)
    if not paths:
        raise ConfigError("nothing to merge: pass --checkpoints A B ... or --snapshots DIR (merge.checkpoints / merge.snapshots)")
    return CheckpointSet.open(distinct_inputs(paths))


def weights_digest(path: Path) -> str:
    """A digest of a .safetensors file's tensors (names, dtypes, shapes, values), not of its metadata: the same
    weights saved twice with other notes (a GRPO run's model_ema.safetensors and its last checkpoints/ema_<it>)
    give the same digest. Memoised per path, size and modification time."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.blake2b(digest_size=20)
        with reading(p, "safetensors file", GENERATOR_FIX), safe_open(str(p), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name)
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


_DIGESTS: dict[tuple, str] = {}


def distinct_inputs(paths: list[Path], *, note: bool = True) -> list[Path]:
    """`paths` with every file whose weights equal a later file's dropped (the last copy keeps its place, so the
    `last` baseline is unchanged); with `note`, one line on stderr per dropped file names it and its twin. Files
    that are missing or not .safetensors are kept as they are (CheckpointSet.open reports them)."""
    paths = [Path(p) for p in paths]
    keys = [weights_digest(p) if p.is_file() and p.suffix == ".safetensors" else f"path:{p}" for p in paths]
    last = {k: i for i, k in enumerate(keys)}
    kept = [p for i, (p, k) in enumerate(zip(paths, keys)) if last[k] == i]
    if note and D.is_main():
        for i, (p, k) in enumerate(zip(paths, keys)):
            if last[k] != i:
                phase(f"merge: input {p} dropped: the same weights as {paths[last[k]]} (used once, not counted twice)")
    return kept


def include_paths(merge_cfg) -> list[Path]:
    """merge.include: extra files appended to the inputs (e.g. the base model next to GRPO checkpoints)."""
    return [find_file(p) for p in (plain(get(merge_cfg, "include", [])) or [])]


def snapshot_paths(folder: Path) -> list[Path]:
    """A folder's power-EMA snapshots in (step, std) order (train.phema), else its .safetensors by training step."""
    try:
        return [s.path for s in list_phema(folder)]
    except FileNotFoundError:
        return list_snapshots(folder)


# ----------------------------------------------------------------------------------------------------------
# Post-hoc EMA coefficients (the train package's least-squares solve)

def phema_weights(ckpts: CheckpointSet, sigma_rel: float) -> np.ndarray:
    """Coefficients over the K inputs that emulate an EMA of relative std `sigma_rel` at the latest snapshot step
    (the train package's least-squares solve; inputs without power-EMA metadata get 0)."""
    snaps = snapshots_of(ckpts)
    used, x = phema_coefficients([s for s in snaps if s is not None], float(sigma_rel))
    coef = dict(zip([u.path for u in used], np.asarray(x, np.float64)))
    return np.array([coef.get(p, 0.0) for p in ckpts.paths])


def snapshots_of(ckpts: CheckpointSet) -> list:
    """A `train.phema.Snapshot` per input (None where the file carries no power-EMA metadata)."""
    out = []
    for path, meta in zip(ckpts.paths, ckpts.meta):
        p = (meta.get("extra") or {}).get("phema") if isinstance(meta.get("extra"), dict) else None
        out.append(None if not p else Snapshot(path, float(p["std"]), int(p["step"]), float(p.get("kimg", 0.0)),
                                               int(p.get("batch", 0))))
    return out


def has_phema(ckpts: CheckpointSet) -> bool:
    """True when the inputs include power-EMA snapshots of at least two EMA profiles (the solve needs them)."""
    return len({s.std for s in snapshots_of(ckpts) if s is not None}) >= 2


# ----------------------------------------------------------------------------------------------------------
# The deterministic inference sampler, the reward's features and the real statistics

def ode_sampler(arch: str | None, sigmas: torch.Tensor, *, method: str = "heun", batch_size: int = 500, device="cpu",
                cfg_scale: float = 1.0, null_label: int | None = None, decode: Callable | None = None) -> Sampler:
    """sample(net, noise, labels) -> images in [-1, 1]: `sampling.generate` (decoded, then clamped) on the
    network's velocity adapter (`sampling.velocity_model`)."""
    def sample(net, noise, labels):
        return generate(velocity_model(net, arch, cfg_scale, null_label), noise, labels, sigmas, method=method,
                        batch_size=batch_size, device=device, decode=decode)

    return sample


def make_ode_sampler(arch: str | None, steps: int, method: str = "heun", shift: float = 1.0, batch_size: int = 500,
                     device="cpu") -> Sampler:
    """The flow ODE sampler of `steps` steps (shifted schedule), clamped to [-1, 1]."""
    return ode_sampler(arch, sigma_schedule(int(steps), shift=float(shift)).to(device), method=method,
                       batch_size=int(batch_size), device=device)


def reward_features(cfg, device="cpu") -> Callable[[torch.Tensor], np.ndarray]:
    """The reward's feature function: reward.features (a registry name, or random) with reward.weights, in batches
    of sampler.batch_size. `.dim` is checked against the real statistics, `.network` keys their cache."""
    rc = cfg.reward
    net = feature_network(str(rc.features), get(rc, "weights"), device)
    batch_size = int(cfg.sampler.batch_size)

    def features(images):
        return compute_features(net, images, batch_size=batch_size)

    features.dim = int(net.dim)
    features.network = net
    return features


def real_statistics(cfg, feature_fn, cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu_r, Sigma_r) of the reward's features: the reward.real_stats file (.npz or EDM2 .pkl), random ones for the
    random network, else computed on Fashion-MNIST train (`cache`: a file reused only when its key, `<cache>.json`,
    names the same feature network and images)."""
    path, name, dim = cfg.reward.real_stats, str(cfg.reward.features), getattr(feature_fn, "dim", None)
    if path or name == "random":
        st = real_stats_for(name, path or None, dim)
        return st.mu, st.sigma
    images, _ = load_fmnist("train")
    net = getattr(feature_fn, "network", None)      # a feature function of unknown weights is never cached
    key = None if net is None else {"data": "fmnist-train", "images": images_hash(images),
                                    "features": name, "network": network_hash(net)}
    if cache is not None and key is not None and cache_valid(cache, key):
        st = GaussianStats.load(cache)
        return st.mu, st.sigma
    st = GaussianStats.from_features(feature_fn(images))
    if cache is not None and key is not None:
        st.save(cache)
        save_cache_key(cache, key)
    return st.mu, st.sigma


# ----------------------------------------------------------------------------------------------------------
# The run's inputs (random files for dry runs, EDM2 pickles, checkpoint lists) and the one builder of its parts

def random_checkpoints(cfg, folder: Path, k: int) -> list[Path]:
    """k random generator files (model.arch / model.kwargs, seeds 0..k-1) for a dry run of the merge trainer."""
    paths = []
    for i in range(int(k)):
        net = build_generator(cfg.model, "cpu", seed=i)
        meta = net.generator_meta
        paths.append(save_generator(Path(folder) / f"random_{i}.safetensors", net, meta["arch"], meta["kwargs"],
                                    extra={"dry_run": True}))
    return paths


def edm2_pkl_paths(merge_cfg) -> list[Path]:
    """The EDM2 pickles to merge: merge.snapshots (a folder of *.pkl) or merge.checkpoints (files)."""
    snaps = get(merge_cfg, "snapshots")
    if snaps:
        return folder_files(find_file(snaps), "*.pkl", "merge.snapshots {folder} not found (EDM2 raw snapshots, docs/scale.md)",
                            "no EDM2 .pkl snapshots in {folder}")
    return [find_file(p) for p in (plain(get(merge_cfg, "checkpoints", [])) or [])]


def edm2_phema(path: Path) -> dict | None:
    """EDM2 snapshot names <prefix>-<kimg, 7 digits>-<std>.pkl -> power-EMA metadata for the post-hoc solve."""
    parts = path.stem.split("-")
    try:
        kimg, std = int(parts[-2]), float(parts[-1])
    except (IndexError, ValueError):
        return None
    return {"std": std, "step": kimg, "kimg": float(kimg), "batch": 0}


def convert_edm2_pkls(paths: list[Path], folder: Path) -> list[Path]:
    """EDM2 pickles (read without executing them) -> our generator .safetensors, kept in `folder` and reused
    while the key beside each (`<file>.json`: the source's path and sha256) matches."""
    out = []
    for p in paths:
        target = Path(folder) / (p.stem + ".safetensors")
        key = {"source": str(p), "sha256": file_sha256(p)}
        if not cache_valid(target, key):
            net = load_pkl(p)
            extra = {"source": str(p)}
            ph = edm2_phema(p)
            if ph is not None:
                extra["phema"] = ph
            save_generator(target, net, "edm2", jsonable(net.init_kwargs), extra=extra)
            save_cache_key(target, key)
        out.append(target)
    return out


def preset_inputs(cfg, run_dir: Path) -> CheckpointSet:
    """The K inputs of a config: random files (dry run), converted EDM2 pickles, or `open_checkpoints`."""
    k_random = get(cfg.merge, "random_checkpoints")
    if k_random:
        folder = run_dir / "dry_run_inputs"
        with D.main_first() as first:
            paths = random_checkpoints(cfg, folder, int(k_random)) if first else \
                sorted(folder.glob("random_*.safetensors"))
        return CheckpointSet.open(paths)
    if get(cfg.merge, "format") == "edm2-pkl":
        with D.main_first():
            paths = convert_edm2_pkls(edm2_pkl_paths(cfg.merge), run_dir / "inputs")
        return CheckpointSet.open(distinct_inputs(paths + include_paths(cfg.merge)))
    return open_checkpoints(cfg.merge)


def edm_settings(sampler_cfg) -> list[float]:
    """[sigma_min, sigma_max, rho] of sampler.schedule edm (EDM's values where the keys are left out)."""
    return [float(get(sampler_cfg, k, d)) for k, d in (("sigma_min", 0.002), ("sigma_max", 80.0), ("rho", 7.0))]


def preset_sigmas(sampler_cfg) -> torch.Tensor:
    """sampler.schedule: `edm` (EDM's rho schedule as flow sigmas) or `flow` (the shifted flow schedule)."""
    s = sampler_cfg
    if str(get(s, "schedule", "flow")) == "edm":
        return edm_flow_sigmas(int(s.steps), *edm_settings(s))
    return sigma_schedule(int(s.steps), shift=float(get(s, "shift", 1.0)))


def run_sampler(cfg, arch: str | None, device="cpu") -> tuple[Sampler, dict]:
    """The run's inference sampler and its key (what it is built from: the evaluation cache's sampler entry):
    sampler.schedule, steps, method and batch size, model.cfg_scale guidance, and model.vae decoding."""
    s, m = cfg.sampler, cfg.model
    codec = build_codec(m, device, seed=int(cfg.seed))
    cfg_scale = float(get(m, "cfg_scale", 1.0))
    sample_fn = ode_sampler(arch, preset_sigmas(s).to(device), method=str(s.method), batch_size=int(s.batch_size),
                            device=device, cfg_scale=cfg_scale, null_label=int(m.num_classes),
                            decode=None if codec is None else codec.decode)
    key = {"kind": "ode", "steps": int(s.steps), "method": str(s.method), "shift": float(s.shift),
           "batch_size": int(s.batch_size), "schedule": str(get(s, "schedule", "flow")), "cfg_scale": cfg_scale,
           "decode": None if codec is None else {"vae": plain(m.vae), "seed": int(cfg.seed)}}
    if key["schedule"] == "edm":
        key["edm"] = edm_settings(s)
    return sample_fn, key


@dataclass
class MergeParts:
    """What a merge run is built from (`merge_parts`). `sample_key`: the settings sample_fn was built from (the
    evaluation cache's key of its samples; None for a sampler of the caller's)."""
    ckpts: CheckpointSet
    sample_fn: Sampler
    sample_key: dict | None
    feature_fn: Callable[[torch.Tensor], np.ndarray]
    real_stats: tuple[np.ndarray, np.ndarray]
    evaluator: Any


def merge_parts(cfg, run_dir, device="cpu", *, ckpts: CheckpointSet | None = None, sample_fn: Sampler | None = None,
                feature_fn=None, real_stats=None, evaluator=None) -> MergeParts:
    """What a merge run is built from, each part given or built from the (validated) cfg, in this order: ckpts
    (`preset_inputs`), sample_fn (`run_sampler`, with its sample_key), feature_fn
    (`reward_features`), real_stats (`real_statistics`, cached in run_dir; rank 0's on every rank) and evaluator
    (eval.features through `build.build_evaluator`, else Fashion-MNIST's)."""
    run_dir, main = Path(run_dir), D.is_main()
    ckpts = preset_inputs(cfg, run_dir) if ckpts is None else ckpts
    sample_key = None
    if sample_fn is None:
        sample_fn, sample_key = run_sampler(cfg, ckpts.arch, device)
    if feature_fn is None:
        feature_fn = reward_features(cfg, device)
    if real_stats is None:
        cache, given, name = run_dir / "real_stats_reward.npz", cfg.reward.real_stats, str(cfg.reward.features)
        if main:
            phase(f"real statistics ({name}): " + (f"reading {given}" if given else "random (the random network)"
                  if name == "random" else f"from {cache}" if cache.is_file()
                  else f"computing on Fashion-MNIST train, cached in {cache}"))
        real_stats = D.broadcast_object(real_statistics(cfg, feature_fn, cache=cache) if main else None)
    if evaluator is None:
        net = getattr(feature_fn, "network", None)
        evaluator = build_evaluator(cfg, device, reuse=None if net is None else {str(cfg.reward.features): net})
    if evaluator is None:
        if main:
            phase("evaluator: Fashion-MNIST train features of fmnist-reward and fmnist-eval (cached after the first "
                  "run)")
        with D.main_first():    # rank 0 fills the real-feature cache, the others read it
            evaluator = Evaluator.for_fmnist(device=device)
    return MergeParts(ckpts, sample_fn, sample_key, feature_fn, real_stats, evaluator)
