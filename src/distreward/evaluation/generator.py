"""Evaluating a generator: draw the plan's n class-balanced samples, batch by batch, and score them.

Under torchrun each rank samples a contiguous block of the batches and keeps only features (never all images);
FD comes from the merged float64 sums, KID and precision/recall (where the evaluator has real features) from the
gathered features. One process is the world-size-1 case of the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..features import compute_features
from ..metrics import GaussianStats, frechet_distance, merge_gaussian_stats
from ..sampling.generate import SamplerSpec, balanced_labels, eval_batch, eval_batch_generator, seeded_noise
from ..utils import dist as D


@dataclass(frozen=True)
class EvalPlan:
    """What an evaluation draws: n class-balanced samples from `seed` with `sampler`, in batches of batch_size.

    noise `seed`: the n starting points are one draw from the seed (the embedded default's protocol; one process);
    `batch`: batch b draws from its own stream (seed, b), so any number of processes draw the same samples and no
    process ever holds all n starting points. `grid`: how many images the caller gets back for a sample grid
    (`keep_images` returns all of them, one process only).
    """
    n: int
    seed: int
    batch_size: int = 500
    grid: int = 64
    num_classes: int = 10
    image_shape: tuple = (1, 32, 32)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    noise: str = "batch"

    def __post_init__(self):
        if self.noise not in ("seed", "batch"):
            raise ValueError(f"evaluation noise must be 'seed' or 'batch', got {self.noise!r}")
        if self.n < 2 or self.batch_size < 1:
            raise ValueError(f"an evaluation needs eval.n >= 2 and eval.batch_size >= 1, got {self.n} and {self.batch_size}")


def evaluator_network(evaluator, name: str):
    """(feature network, real statistics, real features) of the evaluator's network `name`; Nones when it has none."""
    lookup = getattr(evaluator, "network", None)
    return lookup(name) if callable(lookup) else (None, None, None)


def fd_from_stats(evaluator, stats: list) -> dict:
    """The evaluator's FD metrics from generated-side statistics (one GaussianStats per feature network)."""
    fds = {}
    for label, g, st, half in zip(evaluator.labels, stats, evaluator.real_stats, evaluator.real_sigma_half):
        fds[label] = None if st is None or g.n < 2 else frechet_distance(g.mu, g.sigma, st.mu, st.sigma, sigma2_half=half)
    values = list(fds.values())
    return {"fd_reward": values[0], "fd_eval": values[1] if len(values) > 1 else None, "fd": fds, "kid": None,
            "kid_std": None, "precision": None, "recall": None, "n": int(stats[0].n)}


def sharded_metrics(evaluator, batches: Iterable[torch.Tensor], empty_shape) -> dict:
    """The evaluator's metrics of every rank's image batches together (`batches`: this rank's image tensors).

    A stand-in evaluator without networks scores the gathered images (`empty_shape`: the trailing shape a rank
    without batches sends)."""
    nets = getattr(evaluator, "nets", None)
    if nets is None:
        local = list(batches)
        return dict(evaluator.evaluate(D.all_gather_rows(torch.cat(local) if local else torch.zeros((0, *empty_shape)))))
    stats = [GaussianStats(int(f.dim)) for f in nets]
    keep = evaluator.has_real_features
    feats: list[list] = [[] for _ in nets]
    for images in batches:
        for i, fnet in enumerate(nets):
            f = compute_features(fnet, images, batch_size=getattr(evaluator, "batch_size", 500))
            stats[i].update(f)
            if keep:
                feats[i].append(f)
    if keep:
        return evaluator.evaluate_features([D.all_gather_rows(np.concatenate(f) if f else np.zeros((0, st.dim)))
                                            for f, st in zip(feats, stats)])
    return fd_from_stats(evaluator, [merge_gaussian_stats(st) for st in stats])


def plain_metrics(metrics: dict) -> dict:
    """numpy scalars -> Python floats (JSON-ready); nested values unchanged."""
    return {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in metrics.items()}


def evaluate_generator(net, evaluator, plan: EvalPlan, *, arch: str = "unet", decode: Callable | None = None,
                       device="cpu", keep_images: bool = False, progress: bool = False,
                       desc: str = "eval") -> tuple[dict, torch.Tensor]:
    """Metrics of the plan's samples of `net` and the images shown: the first plan.grid of rank 0, or all n with
    keep_images (one process)."""
    n, bs, shape = plan.n, plan.batch_size, tuple(plan.image_shape)
    if plan.noise == "seed" and D.world_size() > 1:
        raise ValueError("evaluation noise 'seed' draws all n starting points in one process; use 'batch' under torchrun")
    decode = decode or (lambda x: x.clamp(-1, 1))
    labels_all = balanced_labels(n, plan.num_classes)
    noise_all = seeded_noise(n, shape, plan.seed) if plan.noise == "seed" else None
    shown, limit = [], (n if keep_images else plan.grid)

    def batches():
        for b in tqdm(D.shard_indices((n + bs - 1) // bs), desc=desc, disable=not progress, unit="batch", leave=False):
            lo, hi = b * bs, min(n, (b + 1) * bs)
            g = eval_batch_generator(plan.seed, b)
            noise = noise_all[lo:hi] if noise_all is not None else torch.randn((hi - lo, *shape), generator=g)
            images = eval_batch(net, labels_all[lo:hi], noise, plan.sampler, arch=arch, generator=g, decode=decode,
                                device=device).cpu()
            if sum(x.shape[0] for x in shown) < limit:
                shown.append(images[:limit])
            yield images

    metrics = plain_metrics(sharded_metrics(evaluator, batches(), shape))
    return metrics, (torch.cat(shown)[:limit] if shown else torch.zeros((0, *shape)))
