"""GRPO's settings: the defaults under every preset (docs/rl.md explains each key) and their checks."""

from __future__ import annotations

from typing import Any

from omegaconf import ListConfig

from ..config import with_defaults

# Defaults under every preset (configs/fmnist_grpo*.yaml override them); docs/rl.md explains each key.
DEFAULTS: dict[str, Any] = {
    "name": "grpo",
    "seed": 0,
    "device": "cpu",
    "model": {"path": "weights/fmnist-base.safetensors", "num_classes": 10, "image_shape": [1, 32, 32]},
    "rl": {
        "iterations": 30,
        "labels_per_iter": 16,      # P
        "labels": "balanced",       # balanced: every class equally often over iterations (draw_labels) | random
        "shared_noise": False,      # one starting noise per group (start_noise)
        "push": "all",              # all | one_per_group: the samples that enter the reference set after a step
        "reference": "rollout",     # rollout: the reference set holds the rollouts | ode: Euler-ODE samples (a = 0)
        "group_size": 8,            # G
        "steps": 10,                # T
        "shift": 1.0,
        "noise_level": 0.7,         # a
        "clean_last_step": True,    # a = 0 on the last (never trained) step: rewards score noise-free samples
        "noise_steps": "all",       # all: a on every step | window: a only on the trained window, ODE elsewhere
        "train_steps": {"mode": "window", "window": 6, "fraction": 0.5, "count": None},
        "inner_epochs": 1,
        "minibatches": 2,
        "clip_eps": 0.2,            # eps
        "beta": 0.01,               # KL weight
        "adv_std": "group",         # group | global
        "adv_clip": 5.0,
        "lr": 1e-4,
        "weight_decay": 0.0,
        "adam_betas": [0.9, 0.999],
        "grad_clip": 1.0,
        "ema_decay": 0.9,
        "batch_size": 256,          # rollout / reference-set generation batch
    },
    # passed to distreward.reward.build_reward (its keys: docs/reward.md), except reference_size (N, used here)
    "reward": {"name": "distribution", "features": "fmnist-reward", "reference_size": 1000},
    "eval": {"every": 10, "n": 2000, "steps": 20, "method": "euler", "seed": 1234, "grid": 64, "batch_size": 500},
    "checkpoint": {"every": 5},
}


def resolve(cfg) -> Any:
    """The run's config: the defaults with `cfg` (a DictConfig or a dict) merged over them."""
    return with_defaults(DEFAULTS, cfg)


def window(w) -> int | list:
    """rl.train_steps.window as given: a length from step 0, or [start, end)."""
    return list(w) if isinstance(w, (list, tuple, ListConfig)) else int(w)


def check_config(cfg, world: int = 1) -> None:
    """Refuse settings GRPO cannot run with, naming the key, the value and what is allowed."""
    rl = cfg.rl
    for key in ("iterations", "labels_per_iter", "group_size", "steps", "inner_epochs", "minibatches"):
        if int(rl[key]) < 1:
            raise ValueError(f"rl.{key} must be >= 1, got {rl[key]}")
    if rl.labels not in ("balanced", "random"):
        raise ValueError(f"rl.labels must be 'balanced' or 'random', got {rl.labels!r}")
    if rl.push not in ("all", "one_per_group"):
        raise ValueError(f"rl.push must be 'all' or 'one_per_group', got {rl.push!r}")
    if rl.get("reference", "rollout") not in ("rollout", "ode"):
        raise ValueError(f"rl.reference must be 'rollout' or 'ode', got {rl.reference!r}")
    if int(rl.group_size) < 2:
        raise ValueError(f"rl.group_size must be >= 2 (advantages are relative within a group), got {rl.group_size}")
    if float(rl.noise_level) <= 0:
        raise ValueError(f"rl.noise_level (a) must be > 0 for GRPO (a = 0 is the deterministic ODE: no log-prob); "
                         f"got {rl.noise_level}")
    if not 0 < float(rl.clip_eps) < 1:
        raise ValueError(f"rl.clip_eps must be in (0, 1), got {rl.clip_eps}")
    if cfg.reward.get("name") == "distribution" and cfg.reward.get("credit") == "group":
        raise ValueError("reward.credit=group gives every member of a group the group's reward, so the group-relative "
                         "advantages are all zero; use reward.credit=sample (each sample replaces the same row)")
    if not 0 <= float(rl.ema_decay) < 1:
        raise ValueError(f"rl.ema_decay must be in [0, 1), got {rl.ema_decay}")
    if int(rl.labels_per_iter) < world:
        raise ValueError(f"rl.labels_per_iter (P = {rl.labels_per_iter} groups) is split over the {world} processes: "
                         f"use P >= {world} or fewer processes")
