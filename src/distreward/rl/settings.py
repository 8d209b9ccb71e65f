"""GRPO's settings: the defaults under every preset and their checks, both from the finetune schema
(`distreward.schema`, docs/configs.md lists every key; docs/rl.md explains them)."""

from __future__ import annotations

import copy
from typing import Any

from omegaconf import ListConfig

from ..schema import ConfigError, defaults, validate

# Defaults under every preset (configs/fmnist_grpo*.yaml override them), derived from the schema.
DEFAULTS: dict[str, Any] = defaults("finetune")


def resolve(cfg, *, own_reward: bool = False) -> Any:
    """The run's config: the defaults with `cfg` (a DictConfig or a dict) merged over them, checked in full
    (`schema.validate`; `own_reward`: the caller passes its own reward object, so reward.name is free)."""
    return validate("finetune", cfg, own_reward=own_reward)


def window(w) -> int | list:
    """rl.train_steps.window as given: a length from step 0, or [start, end)."""
    return list(w) if isinstance(w, (list, tuple, ListConfig)) else int(w)


def check_world(cfg, world: int) -> None:
    """What depends on the number of processes: the P groups are split over them."""
    P = int(cfg.rl.labels_per_iter)
    if P < world:
        raise ConfigError(f"rl.labels_per_iter (P = {P} groups) is split over the {world} processes: "
                         f"use P >= {world} or fewer processes")


def check_config(cfg, world: int = 1, *, own_reward: bool = False) -> None:
    """Refuse settings GRPO cannot run with, naming the key, the value and what is allowed: the schema's checks
    (`schema.validate`, a ConfigError) and the split over `world` processes."""
    check_world(validate("finetune", cfg, own_reward=own_reward), world)


def guidance_scale(model_cfg) -> float:
    """model.cfg_scale, an optional key (absent or null: no guidance, 1)."""
    return float(model_cfg.get("cfg_scale") or 1.0)


def ode_grid(section, cfg) -> tuple[str, int]:
    """(section.method, section.steps) of a trainer's own ODE (its config section: nft, pathwise), the served
    sampler's step count (eval.steps) where section.steps is null."""
    steps = section.steps
    return str(section.method), int(cfg.eval.steps if steps is None else steps)


# The sample-wise baseline's reward (METHOD.md section 6): the reward network's classifier log-probability of the
# intended class.
SAMPLE_REWARD = {"name": "classifier", "features": "fmnist-reward"}


def with_sample_reward(cfg):
    """A copy of a finetune config with the sample-wise baseline's reward in place of its own (the same trainer,
    budget and settings otherwise), checked."""
    c = copy.deepcopy(cfg)
    c.reward = {**SAMPLE_REWARD, "reference_size": int(cfg.reward.reference_size)}
    return resolve(c)
