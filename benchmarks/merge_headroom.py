"""How much room a richer merging space holds, measured before a searcher is pointed at it.

`distreward merge` searches one coefficient per input: theta(w) = sum_k w_k theta_k for every tensor and every
noise level. Two richer spaces give each part of the sampler its own merged model:

- switch: one model above the noise level `edge`, another below it (per-noise-level switching);
- blocks: the input, middle and output blocks of the network (`distreward.merge.blocks`) each taken from a
  different model (the corners of per-block coefficients, `merge.space: blocks`).

A searcher over such a space can only find what the space holds, so this check evaluates a grid of its corners:
three anchor models (the first input, the last input and the uniform soup of `--checkpoints`; or three post-hoc EMA
lengths of `--snapshots`), every ordered pair of anchors switched at each `--edges`, and every assignment of the two
best anchors to the three block groups. All models draw the same `--n` samples (shared noise and class-balanced
labels of the validation seed) with the converged solver (Heun, `--steps`), and each is compared with the best
anchor by the paired bootstrap of the evaluation (the same resampled rows for both, so the shared noise cancels).
The best variant on the validation seed (by FD on the reward's features: the held-out network chooses nothing) is
then evaluated again beside the best anchor on the report seed: the number to quote.

    .venv/bin/python benchmarks/merge_headroom.py --threads 1 --checkpoints weights/fmnist-base.safetensors \\
        R/checkpoints/ema_00005.safetensors ... R/model_ema.safetensors
    .venv/bin/python benchmarks/merge_headroom.py --threads 1 --snapshots weights/fmnist-base-snapshots
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

from distreward.utils.threads import set_threads


def block_weights(anchor_w: dict[str, np.ndarray], assign: dict[str, str]) -> np.ndarray:
    """The (len(GROUPS), K) per-block coefficients (`merge.space: blocks`) whose block group g is the anchor
    `assign[g]`: merged by `CheckpointSet.merge`, each group's tensors are that anchor's."""
    from distreward.merge.blocks import GROUPS

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


def anchors_of(args):
    """(CheckpointSet, {anchor name: coefficient vector})."""
    from distreward.merge.inputs import phema_weights
    from distreward.merge.streaming import CheckpointSet, list_snapshots

    if args.snapshots:
        ckpts = CheckpointSet.open(list_snapshots(args.snapshots))
        return ckpts, {f"phema@{s:g}": phema_weights(ckpts, s) for s in args.ema}
    ckpts = CheckpointSet.open(args.checkpoints)
    k = ckpts.k
    return ckpts, {"first": np.eye(k)[0], "last": np.eye(k)[k - 1], "uniform": np.full(k, 1.0 / k)}


def headroom(args) -> dict:
    from distreward.evaluation import Evaluator
    from distreward.merge.blocks import GROUPS
    from distreward.metrics.evidence import fd_of, paired_difference
    from distreward.sampling import velocity_model, sigma_schedule
    from distreward.sampling.generate import generate, network_image_shape, shared_noise

    t_start = time.perf_counter()
    ckpts, anchor_w = anchors_of(args)
    evaluator = Evaluator.for_fmnist(per_class=False)
    sigmas = sigma_schedule(args.steps)

    def velocity(w):
        return velocity_model(ckpts.merge_into(ckpts.build_network().requires_grad_(False), w), ckpts.arch)

    anchors = {name: velocity(w) for name, w in anchor_w.items()}
    probe = ckpts.build_network()
    shape, num_classes = network_image_shape(probe), int(ckpts.kwargs.get("num_classes") or 0)

    def features(model, seed: int) -> list[np.ndarray]:
        noise, labels = shared_noise(args.n, shape, num_classes, seed)
        return evaluator.features(generate(model, noise, labels, sigmas, method="heun", batch_size=500))

    def row(feats, ref=None) -> dict:
        out = {}
        for i, (label, key) in enumerate(zip(evaluator.labels, ("fd_reward", "fd_eval"))):
            real, half = evaluator.real_stats[i], evaluator.real_sigma_half[i]
            out[key] = fd_of(feats[i], real, half)
            if ref is not None:
                out[f"{key}_diff"] = paired_difference(feats[i], ref[i], real, args.resamples, args.seed,
                                                       sigma_half=half)
        return out

    def report(name: str, r: dict) -> None:
        diffs = "  ".join(f"{k[:-5]} {r[k][0]:+.4f} ± {r[k][1]:.4f}" for k in r if k.endswith("_diff"))
        print(f"{name:34s} fd_reward {r['fd_reward']:.3f}  fd_eval {r['fd_eval']:.4f}  {diffs}", flush=True)

    feats, alone = {}, {}
    for name, model in anchors.items():
        feats[name] = features(model, args.seed)
        alone[name] = row(feats[name])
        report(name, alone[name])
    ranked = sorted(anchors, key=lambda a: alone[a]["fd_reward"])
    best = ranked[0]
    variants = {}
    for edge in args.edges:
        for high, low in itertools.permutations(anchors, 2):
            variants[f"switch {high} > {edge:g} > {low}"] = Switch(anchors[high], anchors[low], edge)
    for choice in itertools.product(ranked[:2], repeat=len(GROUPS)):
        if len(set(choice)) > 1:
            assign = dict(zip(GROUPS, choice))
            variants["blocks " + "/".join(choice)] = assign
    results = {name: row(feats[name], feats[best]) for name in anchors}

    def model_of(variant):
        """A Switch as it is, a block assignment as the network merged with its per-block coefficients."""
        return velocity(block_weights(anchor_w, variant)) if isinstance(variant, dict) else variant

    for name, v in variants.items():
        feats[name] = features(model_of(v), args.seed)
        results[name] = row(feats[name], feats[best])
        report(name, results[name])
    chosen = min(variants, key=lambda v: results[v]["fd_reward"])
    print(f"best variant on the validation seed {args.seed}: {chosen}; report seed {args.report_seed}:", flush=True)
    fresh_best = features(anchors[best], args.report_seed)
    fresh = features(model_of(variants[chosen]), args.report_seed)
    confirm = {best: row(fresh_best), chosen: row(fresh, fresh_best)}
    for name, r in confirm.items():
        report(name, r)
    return {"validation": {"seed": args.seed, "n": args.n, "best_anchor": best, "rows": results},
            "report": {"seed": args.report_seed, "n": args.n, "rows": confirm}, "steps": args.steps,
            "minutes": (time.perf_counter() - t_start) / 60}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", nargs="+", help="generator files in training order (anchors: first, last, uniform)")
    src.add_argument("--snapshots", help="a folder of power-EMA snapshots (anchors: the post-hoc EMA lengths --ema)")
    p.add_argument("--ema", type=float, nargs=3, default=[0.05, 0.10, 0.20], help="three post-hoc EMA lengths")
    p.add_argument("--edges", type=float, nargs="+", default=[0.3, 0.6], help="noise levels sigma to switch at")
    p.add_argument("--n", type=int, default=500, help="samples per model")
    p.add_argument("--steps", type=int, default=16, help="Heun steps: the converged solver")
    p.add_argument("--seed", type=int, default=1234, help="validation seed (chooses the variant)")
    p.add_argument("--report-seed", type=int, default=4321, help="fresh seed for the chosen variant")
    p.add_argument("--resamples", type=int, default=200, help="bootstrap resamples of the paired differences")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    set_threads(args.threads)
    result = headroom(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
