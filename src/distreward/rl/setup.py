"""The reward of a GRPO run and its reference set's initial rows (METHOD.md §3; docs/reward.md).

A distribution-wise reward starts from N = reward.reference_size samples of the base policy drawn with the
reference set's sampler (rl.reference: the rollouts' SDE, or the ODE on the rollout grid). Their features are
cached in the run directory (`base_reference_features.npy`) under a key of everything they depend on (N, the
sampler, the seed, guidance, the latent decoder, the base and feature networks' weights), written beside it
(`base_reference_features.npy.json`), so a changed setting never reuses a stale set (docs/runs.md).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..build import feature_network, real_stats_for
from ..evaluation import evaluator_network, network_hash
from ..features import compute_features
from ..reward import build_reward
from ..sampling import ode_sample, sigma_schedule
from ..sampling.generate import balanced_labels
from ..schema import ConfigError
from ..utils import dist as D
from ..utils.io import atomic_write_bytes
from ..utils.cache import cache_valid, save_cache_key
from ..utils.configdiff import plain_config
from ..utils.progress import progress as tqdm
from .parallel import rollout_rows
from .rollout import reference_noise_levels
from .settings import guidance_scale, ode_grid

REFERENCE_CACHE = "base_reference_features.npy"


def reward_state(reward) -> dict | None:
    """The reward's resumable state (the reference set of a distribution-wise reward; {} for sample-wise), None
    for a run without a reward."""
    return None if reward is None else reward.state_dict()


def load_reward_state(reward, state: dict | None) -> None:
    if state is not None:
        reward.load_state_dict(state)


@dataclass(frozen=True)
class ReferenceSampler:
    """How the reference set's initial rows are drawn: n class-balanced samples of the base policy from `seed`, on
    the rollout grid (steps, shift) with the reference set's noise levels, in batches; `extra` holds what else the
    samples depend on (guidance scale, latent decoder) for the cache key."""
    n: int
    seed: int
    steps: int
    shift: float
    noise_levels: float | tuple
    batch_size: int
    image_shape: tuple
    num_classes: int
    device: str = "cpu"
    extra: str = "{}"
    method: str = "euler"       # heun: the ODE sampler with Heun steps (noise_levels must be 0)

    @classmethod
    def of_run(cls, cfg, n: int) -> "ReferenceSampler":
        """The sampler of a finetune run's config: GRPO's rollouts or Euler ODE (rl.reference decides the noise
        levels), or the ODE of the forward-process or the pathwise trainer's samples (rl.algorithm = nft, pathwise)."""
        rl, model = cfg.rl, cfg.model
        levels = reference_noise_levels(rl)
        steps, method = int(rl.steps), "euler"
        if rl.algorithm in ("nft", "pathwise"):      # the trainer's own ODE samples (its config section)
            (method, steps), levels = ode_grid(cfg[rl.algorithm], cfg), 0.0
        extra = {"cfg_scale": guidance_scale(model), "vae": plain_config({"v": model.get("vae")})["v"]}
        return cls(n=int(n), seed=int(cfg.seed), steps=steps, shift=float(rl.shift),
                   noise_levels=tuple(levels) if isinstance(levels, list) else float(levels),
                   batch_size=int(rl.batch_size), image_shape=tuple(model.image_shape),
                   num_classes=int(model.num_classes), device=str(cfg.device), extra=json.dumps(extra, sort_keys=True),
                   method=method)

    def key(self, net, feature_net) -> dict:
        """Everything the initial rows depend on (written beside the cache and compared before reusing it)."""
        levels = list(self.noise_levels) if isinstance(self.noise_levels, tuple) else self.noise_levels
        method = {} if self.method == "euler" else {"method": self.method}
        return {"n": self.n, "seed": self.seed, "steps": self.steps, "shift": self.shift, "noise_levels": levels,
                "batch_size": self.batch_size, "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                **json.loads(self.extra), **method, "base": network_hash(net), "features": network_hash(feature_net)}


@torch.no_grad()
def reference_features(model, decode, feature_net, sampler: ReferenceSampler, *, progress: bool = False) -> np.ndarray:
    """Features of the sampler's n samples of the base policy, batch by batch (images are never all held); each
    batch's rows are spread over the ranks and gathered back in order."""
    n, bs, shape = sampler.n, sampler.batch_size, sampler.image_shape
    levels = list(sampler.noise_levels) if isinstance(sampler.noise_levels, tuple) else sampler.noise_levels
    sigmas = sigma_schedule(sampler.steps, shift=sampler.shift)
    gen = torch.Generator().manual_seed(sampler.seed + 7919)
    labels = balanced_labels(n, sampler.num_classes)
    out, index = [], []
    for i in tqdm(range(0, n, bs), desc="reference set: base samples", disable=not progress, unit="batch", leave=False):
        lab = labels[i:i + bs]
        noise = torch.randn((lab.shape[0], *shape), generator=gen)
        rows = D.shard_indices(lab.shape[0])
        if sampler.method == "euler":
            x = rollout_rows(model, noise, lab, sigmas, levels, gen, rows, sampler.device).xs[-1]
        elif len(rows):
            my_lab = None if lab is None else lab[rows.start:rows.stop].to(sampler.device)
            x = ode_sample(model, noise[rows.start:rows.stop].to(sampler.device), my_lab, sigmas.to(sampler.device),
                           sampler.method)
        if len(rows):
            out.append(compute_features(feature_net, decode(x).cpu(), batch_size=bs))
            index.append(np.arange(i + rows.start, i + rows.stop))
    dim = int(feature_net.dim)
    feats = D.all_gather_rows(np.concatenate(out) if out else np.zeros((0, dim)))
    order = np.argsort(D.all_gather_rows(np.concatenate(index) if index else np.zeros(0, np.int64)), kind="stable")
    return feats[order]


def cache_matches(run_dir: Path, key: dict) -> bool:
    """Whether run_dir holds initial rows computed from `key`."""
    return cache_valid(Path(run_dir) / REFERENCE_CACHE, key)


def save_reference(run_dir: Path, key: dict, feats: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(feats, dtype=np.float64))
    atomic_write_bytes(Path(run_dir) / REFERENCE_CACHE, buf.getvalue())
    save_cache_key(Path(run_dir) / REFERENCE_CACHE, key)


def build_reward_for_run(reward_cfg: dict, sampler: ReferenceSampler, net, run_dir: Path, evaluator=None, *, model,
                         decode, progress: bool = False):
    """The reward named by the config's reward section. Real statistics (and features, for k-NN) come from
    reward.real_stats (.npz, or an EDM2 .pkl) or from the evaluator's cache of the same feature network; a
    distribution-wise reward gets its reference set from the `sampler`'s base samples (`reference_features`), cached
    in the run directory. `model` is the base policy's velocity adapter, `decode` maps samples to images."""
    rcfg = {k: v for k, v in reward_cfg.items() if k != "reference_size"}
    device = sampler.device
    name = rcfg["name"]
    features_name = str(rcfg["features"])
    feature_net, real_stats, real_feats = evaluator_network(evaluator, features_name)
    if rcfg.get("weights") is not None:
        feature_net = real_stats = real_feats = None    # another network than the evaluator's
    if name == "classifier":
        return build_reward(rcfg, device=device, feature_net=feature_net)
    if name == "knn":
        return build_reward(rcfg, device=device, feature_net=feature_net,
                            real_features=None if rcfg.get("real_features") else real_feats)
    if feature_net is None:
        feature_net = feature_network(features_name, weights=rcfg.get("weights"), device=device)
    if rcfg.get("real_stats") is not None:
        real_stats = real_stats_for(features_name, rcfg["real_stats"], int(feature_net.dim))
    elif real_stats is None and features_name == "random":
        real_stats = real_stats_for("random", None, int(feature_net.dim))
    class_stats = class_statistics(evaluator, features_name) if rcfg.get("per_class") else None
    key = sampler.key(net, feature_net)
    if D.broadcast_object(cache_matches(Path(run_dir), key)):      # rank 0's answer: every rank reads the same file
        feats = np.load(Path(run_dir) / REFERENCE_CACHE, allow_pickle=False)
    else:
        feats = reference_features(model, decode, feature_net, sampler, progress=progress and D.is_main())
        if D.is_main():
            save_reference(Path(run_dir), key, feats)
    return build_reward(rcfg, device=device, feature_net=feature_net, real_stats=real_stats,
                        init_features=feats, class_stats=class_stats,
                        init_labels=balanced_labels(sampler.n, sampler.num_classes))


def class_statistics(evaluator, name: str) -> dict:
    """The evaluator's per-class real statistics of its network `name` (reward.per_class)."""
    labels = list(getattr(evaluator, "labels", None) or [])
    stats = evaluator.real_class_stats[labels.index(name)] if name in labels else None
    if stats is None:
        raise ConfigError(f"reward.per_class needs per-class real statistics of the {name!r} features: the evaluator "
                         "has none (build it with the real images' class labels, as Evaluator.for_fmnist does), or "
                         "set reward.per_class=false")
    return stats
