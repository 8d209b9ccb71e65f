"""The allowed values and key helpers the command schemas share (names, seeds, devices, dry-run blocks, shapes)."""

from __future__ import annotations

import torch

from .core import ABSENT, key

# Allowed values shared with the code that reads them (tests/test_config.py keeps them equal to the registries).
ARCHS = ("unet", "sit", "edm2")                          # distreward.models.ARCHS
VAE_CONVENTIONS = ("sit", "edm2")                        # distreward.models.vae.CONVENTIONS
REWARD_MODES = ("fast", "exact", "linear")               # distreward.reward.reference.MODES
REWARD_CREDITS = ("sample", "group")                     # distreward.reward.reference.CREDITS
ODE_METHODS = ("euler", "heun")
EMA_STD_MAX = 0.28                                       # distreward.train.ema.MAX_SIGMA_REL
# The keys each reward of distreward.reward.build_reward takes (it refuses others).
REWARD_KEYS: dict[str, frozenset[str]] = {
    "distribution": frozenset({"name", "features", "weights", "mode", "credit", "scale", "eps", "quad_step",
                               "batch_size", "real_stats", "init_features", "refresh_every", "per_class"}),
    "classifier": frozenset({"name", "features", "weights", "batch_size"}),
    "knn": frozenset({"name", "features", "weights", "k", "reduce", "batch_size", "real_features"}),
}


def check_device(value: str) -> str | None:
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return "a torch device: cpu, cuda, cuda:N, mps"
    return None


check_device.doc = "a torch device: cpu, cuda, cuda:N"


def check_window(value) -> str | None:
    if isinstance(value, int):
        return None if value >= 1 else ">= 1 (a length from step 0), or [start, end)"
    if len(value) != 2 or not 0 <= value[0] < value[1]:
        return "a length >= 1, or [start, end) with 0 <= start < end"
    return None


check_window.doc = "a length >= 1, or [start, end) with 0 <= start < end"


def check_export_std(value: float) -> str | None:
    return None if value == 0 or 0 < value < EMA_STD_MAX else \
        f"0 (no export) or in (0, {EMA_STD_MAX}): the power-EMA profiles"


check_export_std.doc = f"0 or null (no export), or in (0, {EMA_STD_MAX})"


def nonempty(value: list) -> str | None:
    return None if value else "at least one value"


nonempty.doc = "at least one value"


def name_key(default: str):
    return key(default, "run name: the run directory is runs/<name> unless --run-dir is given")


def seed_key():
    return key(0, "seed of every random draw (torch generators, numpy, python)")


def device_key():
    return key("cpu", "torch device; under torchrun cuda becomes cuda:LOCAL_RANK", check=check_device)


def dry_run_key():
    return key(ABSENT, "`--dry-run` merges this block over the preset (tiny random networks, one iteration); it is "
                       "checked as a partial config, and with the block applied")


def dry_run_of_key():
    return key(ABSENT, "set by --dry-run: the preset the dry run came from")


def shape_key(default, what: str):
    return key(default, what, gt=0, length=3, why="channels, height, width")
