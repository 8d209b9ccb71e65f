"""The pieces of a run's state that every trainer shares (rl/context.py assembles them): the policy's weights with
their EMA copy and generator, the evaluator and the reward of a run, saving and restoring checkpoints, evaluating
the EMA weights with the served sampler, and writing weights as merge inputs."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..build import (build_codec, build_evaluator, build_generator, eval_plan, is_preset_model, load_base, make_decoder,
                     net_arch)
from ..config import to_dict
from ..evaluation import EvalPlan, Evaluator, evaluate_generator
from ..models import save_generator
from ..report import save_image_grid
from ..sampling import velocity_model
from ..utils import dist as D
from ..utils.checkpoint import checkpoint_exists, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..utils.io import RunDir, atomic_save_json
from ..utils.runlog import RunLog
from .settings import guidance_scale
from .setup import ReferenceSampler, build_reward_for_run, load_reward_state, reward_state


@dataclass
class PolicyWeights:
    """The trained network with what every trainer builds around it: architecture name, latent codec and decoder
    (samples -> images in [-1, 1]), the EMA copy (evaluated, saved), the run's generator, the guidance settings."""
    net: torch.nn.Module
    ema: torch.nn.Module
    arch: str
    codec: object
    decode: Callable[[torch.Tensor], torch.Tensor]
    generator: torch.Generator
    cfg_scale: float
    null_label: int | None

    @classmethod
    def build(cls, cfg, device, net: torch.nn.Module | None, seed: int) -> "PolicyWeights":
        """The policy of a finetune config: `net` when given, else cfg.model (a preset's random network or the base
        model's file); seeds torch, numpy and the run's generator with `seed`. The network is in eval mode (no
        dropout: the old and the new policy agree)."""
        if net is None:
            net = build_generator(cfg.model, device, seed=seed) if is_preset_model(cfg.model) \
                else load_base(cfg.model, device)
        arch = net_arch(net, cfg.model)
        codec = build_codec(cfg.model, device, seed=seed)
        torch.manual_seed(seed)
        np.random.seed(seed)
        gen = torch.Generator().manual_seed(seed)
        net = net.to(device).eval()
        return cls(net=net, ema=copy.deepcopy(net).requires_grad_(False), arch=arch, codec=codec,
                   decode=make_decoder(codec), generator=gen, cfg_scale=guidance_scale(cfg.model),
                   null_label=int(cfg.model.num_classes))

    def velocity(self, net: torch.nn.Module) -> torch.nn.Module:
        """The velocity adapter of `net` (this policy's architecture and guidance)."""
        return velocity_model(net, self.arch, self.cfg_scale, self.null_label)

    @property
    def model(self) -> torch.nn.Module:
        return self.velocity(self.net)

    def frozen_copy(self) -> torch.nn.Module:
        return copy.deepcopy(self.net).requires_grad_(False)

    def optimizer(self, rl) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=float(rl.lr), betas=tuple(rl.adam_betas),
                                 weight_decay=float(rl.weight_decay))

    def eval_plan(self, cfg, world: int) -> EvalPlan:
        """The served sampler's evaluation plan: one seeded draw of all eval.n (a single pixel UNet process), else
        per-batch seeds (shardable over ranks)."""
        one_draw = world == 1 and self.codec is None and self.arch == "unet" and not cfg.eval.get("sampler")
        return eval_plan(cfg, noise="seed" if one_draw else "batch")


def due(it: int, every: int, iterations: int) -> bool:
    """Whether iteration `it` (counted from 1) gets a periodic action of period `every` (0: never): a multiple of
    `every`, or the run's last iteration."""
    return every > 0 and (it % every == 0 or it == iterations)


def run_evaluator(cfg, device, evaluator, *, needed: bool):
    """The run's evaluator: the caller's, else cfg.eval.features', else (when `needed`) Fashion-MNIST's."""
    if evaluator is None and cfg.eval.get("features") is not None:
        return build_evaluator(cfg, device)
    if evaluator is None and needed:
        return Evaluator.for_fmnist(device=device)
    return evaluator


def run_reward(cfg, run: RunDir, reward, policy: PolicyWeights, evaluator, *, progress: bool):
    """The run's reward: the caller's, else cfg.reward's with its reference set of the base policy's samples
    (`setup.build_reward_for_run`, cached in the run directory)."""
    if reward is not None:
        return reward
    sampler = ReferenceSampler.of_run(cfg, int(cfg.reward.reference_size))
    return build_reward_for_run(to_dict(cfg)["reward"], sampler, policy.net, run.root, evaluator,
                                model=policy.model, decode=policy.decode, progress=progress)


def save_state(path: Path, policy: PolicyWeights, optimizer, reward, entries: dict, *, merge_extra: dict,
               main: bool = True) -> None:
    """Checkpoint (atomic) the policy, its EMA, the optimizer, the reward's state, the generator and the loop's
    `entries` (iteration, history, evals, ...), and write the EMA weights as merge input ema_<iteration>; rank 0
    writes, every rank waits."""
    if main:
        save_checkpoint(path, {"net": policy.net.state_dict(), "ema": policy.ema.state_dict(),
                               "optimizer": optimizer.state_dict(), "reward": reward_state(reward),
                               "rng": rng_state(policy.generator), **entries})
        save_merge_input(policy.ema, path.parent / f"ema_{int(entries['iteration']):05d}.safetensors", merge_extra)
    D.barrier()


def restore_checkpoint(path: Path, net, ema, optimizer, generator: torch.Generator, reward=None) -> dict | None:
    """Load `path` (or its .prev when damaged) into the policy, its EMA, the optimizer, the generator and the
    reward's reference set; returns the checkpoint (the caller reads its own entries: iteration, history, evals),
    None when there is none."""
    if not checkpoint_exists(path):
        return None
    st = load_checkpoint(path)
    net.load_state_dict(st["net"])
    ema.load_state_dict(st["ema"])
    optimizer.load_state_dict(st["optimizer"])
    set_rng_state(generator, st["rng"])
    if reward is not None:
        load_reward_state(reward, st["reward"])
    return st


class EmaEvaluation:
    """evaluate(it): the EMA weights' metrics with the plan's sampler appended to `evals`, logged (eval/<key>) and
    their sample grid saved (samples/ema_<it>.png); `final_images` keeps the images of iteration `iterations`."""

    def __init__(self, ema, evaluator, plan: EvalPlan, evals: list, log: RunLog, *, arch: str, decode, device,
                 samples: Path, grid: int, iterations: int, progress: bool, main: bool = True):
        self.ema, self.evaluator, self.plan, self.evals, self.log = ema, evaluator, plan, evals, log
        self.arch, self.decode, self.device = arch, decode, device
        self.samples, self.grid, self.iterations, self.progress, self.main = samples, grid, iterations, progress, main
        self.final_images = None

    def first(self, start: int, initial_eval: dict | None, every: int) -> None:
        """Iteration 0 of a run that starts now: the caller's evaluation of the base (`initial_eval`, it is the EMA
        model's) or a new one (when there is an evaluator and every > 0); nothing on resume."""
        if start == 0 and initial_eval is not None:
            self.evals.append({**initial_eval, "iteration": 0})
        elif start == 0 and self.evaluator is not None and every > 0:
            self(0)

    def __call__(self, it: int) -> None:
        metrics, images = evaluate_generator(self.ema, self.evaluator, self.plan, arch=self.arch, decode=self.decode,
                                             device=self.device, keep_images=self.plan.noise == "seed",
                                             progress=self.progress and self.main, desc=f"eval @ {it}")
        self.evals.append({**metrics, "iteration": it})
        if it == self.iterations:
            self.final_images = images
        if self.main:
            save_image_grid(images[:self.grid], self.samples / f"ema_{it:04d}.png")
            self.log.log({"iteration": it, **{f"eval/{k}": v for k, v in metrics.items()}})


def save_merge_input(weights: torch.nn.Module, path: Path, extra: dict) -> None:
    """A generator file of `weights` (an input for RL merging, METHOD.md §5), when the network knows its
    architecture (`generator_meta`; the EMA copy has the trained network's)."""
    meta = getattr(weights, "generator_meta", None)
    if meta is not None:
        save_generator(path, weights, meta["arch"], meta["kwargs"], extra=extra)
