"""How much room a richer merging space holds, measured before a searcher is pointed at it (docs/merge.md).

`distreward merge` searches one coefficient per input: theta(w) = sum_k w_k theta_k for every tensor and every
noise level. Two richer spaces give each part of the sampler its own merged model:

- switch: one model above the noise level `edge`, another below it (per-noise-level switching, `Switch`);
- blocks: the input, middle and output blocks of the network (`merge.blocks`) each taken from a different model
  (the corners of per-block coefficients, `merge.space: blocks`; `block_weights`).

`headroom` evaluates a grid of the space's corners: three anchor models (`anchors`), every ordered pair of anchors
switched at each edge, and every assignment of the two best anchors to the three block groups. All models draw the
same n samples (shared noise and class-balanced labels of the validation seed) with the converged solver (Heun),
and each is compared with the best anchor by the paired bootstrap of the evaluation (the same resampled rows for
both, so the shared noise cancels). The best variant on the validation seed (by FD on the reward's features: the
held-out network chooses nothing) is then evaluated again beside the best anchor on the report seed.
`benchmarks/merge_headroom.py` is its command line.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np
import torch

from ..metrics.evidence import fd_of, paired_difference
from ..sampling import sigma_schedule, velocity_model
from ..sampling.generate import generate, network_image_shape, shared_noise
from .blocks import GROUPS
from .inputs import phema_weights
from .streaming import CheckpointSet, list_snapshots


def block_weights(anchor_w: dict[str, np.ndarray], assign: dict[str, str]) -> np.ndarray:
    """The (len(GROUPS), K) per-block coefficients (`merge.space: blocks`) whose block group g is the anchor
    `assign[g]`: merged by `CheckpointSet.merge`, each group's tensors are that anchor's."""
    return np.stack([anchor_w[assign[g]] for g in GROUPS])


class Switch(torch.nn.Module):
    """The velocity of `high` at noise levels sigma > edge, of `low` at sigma <= edge (per sample)."""

    def __init__(self, high, low, edge: float):
        super().__init__()
        self.high, self.low, self.edge = high, low, float(edge)

    def forward(self, x, sigma, labels=None):
        above = sigma.reshape(-1) > self.edge
        if bool(above.all()) or not bool(above.any()):
            return (self.high if bool(above.all()) else self.low)(x, sigma, labels)
        out = torch.empty_like(x)
        for mask, model in ((above, self.high), (~above, self.low)):
            out[mask] = model(x[mask], sigma.reshape(-1)[mask], None if labels is None else labels[mask]).to(x.dtype)
        return out


def anchors(*, checkpoints: Sequence | None = None, snapshots=None,
            ema: Sequence[float] = (0.05, 0.10, 0.20)) -> tuple[CheckpointSet, dict[str, np.ndarray]]:
    """(CheckpointSet, {anchor name: coefficient vector}): the post-hoc EMA lengths `ema` of a folder of
    `snapshots`, else the first, the last and the uniform soup of `checkpoints`."""
    if snapshots:
        ckpts = CheckpointSet.open(list_snapshots(snapshots))
        return ckpts, {f"phema@{s:g}": phema_weights(ckpts, s) for s in ema}
    ckpts = CheckpointSet.open(checkpoints)
    k = ckpts.k
    return ckpts, {"first": np.eye(k)[0], "last": np.eye(k)[k - 1], "uniform": np.full(k, 1.0 / k)}


def headroom(ckpts: CheckpointSet, anchor_w: dict[str, np.ndarray], evaluator, *, n: int = 500, steps: int = 16,
             edges: Sequence[float] = (0.3, 0.6), seed: int = 1234, report_seed: int = 4321, resamples: int = 200,
             on_row: Callable[[str, str, dict], None] | None = None) -> dict:
    """Every anchor, switch and block variant on the validation `seed`, paired against the best anchor; the best
    variant and the best anchor again on `report_seed`. `on_row(stage, name, row)` ("validation" or "report") is
    called as each row is ready; rows hold fd_reward, fd_eval and, against the best anchor, <key>_diff =
    (difference, its paired standard error)."""
    sigmas = sigma_schedule(steps)

    def velocity(w):
        return velocity_model(ckpts.merge_into(ckpts.build_network().requires_grad_(False), w), ckpts.arch)

    models = {name: velocity(w) for name, w in anchor_w.items()}
    probe = ckpts.build_network()
    shape, num_classes = network_image_shape(probe), int(ckpts.kwargs.get("num_classes") or 0)

    def features(model, at: int) -> list[np.ndarray]:
        noise, labels = shared_noise(n, shape, num_classes, at)
        return evaluator.features(generate(model, noise, labels, sigmas, method="heun", batch_size=500))

    def row(feats, ref=None) -> dict:
        out = {}
        for i, (label, key) in enumerate(zip(evaluator.labels, ("fd_reward", "fd_eval"))):
            real, half = evaluator.real_stats[i], evaluator.real_sigma_half[i]
            out[key] = fd_of(feats[i], real, half)
            if ref is not None:
                out[f"{key}_diff"] = paired_difference(feats[i], ref[i], real, resamples, seed, sigma_half=half)
        return out

    def report(stage: str, name: str, r: dict) -> None:
        if on_row is not None:
            on_row(stage, name, r)

    feats, alone = {}, {}
    for name, model in models.items():
        feats[name] = features(model, seed)
        alone[name] = row(feats[name])
        report("validation", name, alone[name])
    ranked = sorted(models, key=lambda a: alone[a]["fd_reward"])
    best = ranked[0]
    variants = {}
    for edge in edges:
        for high, low in itertools.permutations(models, 2):
            variants[f"switch {high} > {edge:g} > {low}"] = Switch(models[high], models[low], edge)
    for choice in itertools.product(ranked[:2], repeat=len(GROUPS)):
        if len(set(choice)) > 1:
            variants["blocks " + "/".join(choice)] = dict(zip(GROUPS, choice))
    results = {name: row(feats[name], feats[best]) for name in models}

    def model_of(variant):
        """A Switch as it is, a block assignment as the network merged with its per-block coefficients."""
        return velocity(block_weights(anchor_w, variant)) if isinstance(variant, dict) else variant

    for name, v in variants.items():
        feats[name] = features(model_of(v), seed)
        results[name] = row(feats[name], feats[best])
        report("validation", name, results[name])
    chosen = min(variants, key=lambda v: results[v]["fd_reward"])
    fresh_best = features(models[best], report_seed)
    fresh = features(model_of(variants[chosen]), report_seed)
    confirm = {best: row(fresh_best), chosen: row(fresh, fresh_best)}
    for name, r in confirm.items():
        report("report", name, r)
    return {"validation": {"seed": seed, "n": n, "best_anchor": best, "chosen": chosen, "rows": results},
            "report": {"seed": report_seed, "n": n, "rows": confirm}, "steps": steps}
