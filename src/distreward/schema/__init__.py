"""One typed schema per command (finetune, merge, train-base; demo = the finetune schema): every key, its type,
default and allowed values, checked in full before any work.

    from distreward.schema import validate
    cfg = validate("finetune", load_config("fmnist_grpo", ["rl.iterations=10"]))   # DictConfig, defaults merged

`validate` raises `ConfigError` (a ValueError) with one line naming the key, the value and what is allowed:
`config key rl.lr: value 'abc' is not a float`, `unknown config key rl.itrations (did you mean rl.iterations?)`,
`rl.group_size: 1 is not allowed (>= 2: advantages are relative within a group)`. A preset's `dry_run` block (and a
merge preset's `demo` block) is checked as a partial config of the same command, and with the block applied.
`python -m distreward.schema [COMMAND]` prints the key tables (docs/configs.md).
"""

from __future__ import annotations

import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .commands import (ARCHS, COMMANDS, REWARD_CREDITS, REWARD_KEYS, REWARD_MODES, VAE_CONVENTIONS, Finetune, Merge,
                       TrainBase)
from .core import (BLOCKS, ConfigError, Options, deep_merge, defaults as section_defaults, doc_rows, is_partial,
                   leaf_index, plain, show, walk)

__all__ = ["ARCHS", "COMMANDS", "ConfigError", "Finetune", "Merge", "REWARD_CREDITS", "REWARD_KEYS", "REWARD_MODES",
           "TrainBase", "VAE_CONVENTIONS", "defaults", "markdown", "validate"]


def schema_of(command: str):
    if command not in COMMANDS:
        raise ValueError(f"no config schema for command {command!r}; commands: {', '.join(COMMANDS)}")
    return COMMANDS[command]


def defaults(command: str) -> dict:
    """A command's defaults as a plain dict (its DEFAULTS): every key with a default, optional keys left out."""
    return section_defaults(schema_of(command)[0])


def validate(command: str, cfg: Any = None, *, own_reward: bool = False) -> DictConfig:
    """`cfg` (a DictConfig, a dict or None) merged over the command's defaults and checked in full: unknown keys,
    types, allowed values, the checks across keys, and the `dry_run` / `demo` blocks. Returns a DictConfig (not
    struct: the trainers add keys). `own_reward`: finetune got a reward object, so reward.name may be any name."""
    root, check = schema_of(command)
    opts = Options(root, own_reward=own_reward, leaves=leaf_index(root))
    user = plain(cfg) if cfg is not None else {}
    if not isinstance(user, dict):
        raise ConfigError(f"a {command} config is a mapping of keys, got {show(user)}")
    try:
        out = walk(deep_merge(section_defaults(root), user), root, "", opts)
        check(out)
    except ConfigError as e:
        owner = preset_command(command, user)
        if owner is None:
            raise
        name = f" {user['name']!r}" if isinstance(user.get("name"), str) else ""
        raise ConfigError(f"config{name} is a {owner} preset, not a {command} one ({e}); run 'distreward {owner} "
                          f"--config ...' with it, or give a {command} preset") from None
    base, hints = {k: v for k, v in out.items() if k not in BLOCKS}, typing.get_type_hints(root)
    for block in ("dry_run", "demo"):
        if isinstance(out.get(block), dict) and is_partial(hints.get(block)):
            try:
                check(deep_merge(base, out[block]))
            except ConfigError as e:
                raise ConfigError(f"with its {block} block applied: {e}") from None
    result = OmegaConf.create(out)
    OmegaConf.set_struct(result, False)
    return result


def preset_command(command: str, user: dict) -> str | None:
    """The other command whose schema `user` passes in full, when `command`'s refused it (a train-base preset given
    to finetune); None when no other command takes it either."""
    for other, (root, check) in COMMANDS.items():
        if other in (command, "demo"):
            continue
        try:
            check(walk(deep_merge(section_defaults(root), user), root, "", Options(root, leaves=leaf_index(root))))
        except ConfigError:
            continue
        return other
    return None


TITLES = {"finetune": "finetune (GRPO; also the demo's runs)", "merge": "merge", "train-base": "train-base"}


def markdown(commands=("finetune", "merge", "train-base")) -> str:
    """The key tables of the commands (docs/configs.md is this text)."""
    lines = ["# Configs: every key of every command", "",
             "Generated from `src/distreward/schema/` by `python -m distreward.schema > docs/configs.md`; do not edit "
             "by hand. A config is merged from the command's defaults <- the preset (`configs/*.yaml`) <- `key=value` "
             "overrides, then checked in full before any work (`distreward.schema.validate`): an unknown key is an "
             "error with a suggestion, and every value is checked against its type and the allowed values.", "",
             "- **default** `absent`: the key is optional and is not filled in; the meaning column says what the code "
             "does without it.",
             "- **free-form**: network keywords (`model.kwargs`, `network.kwargs`, `model.vae.config`) are passed to "
             "the network as they are; everything else is typed.",
             "- `dry_run` (finetune, merge) and a merge preset's `demo` block hold keys of the same table; they are "
             "checked as such, and the config with the block applied is checked too.",
             "- `distreward demo` runs the preset fmnist_nft (or `--config PRESET`, any finetune preset with the "
             "distribution-wise reward; finetune table, the `demo` section), with `--compare` the same config with the "
             "classifier reward, and fmnist_merge_ema / fmnist_merge_grpo (merge table, their `demo` blocks).",
             "- `reward` (finetune): each reward takes its own keys: "
             + "; ".join(f"{n}: {', '.join(sorted(k - {'name'}))}" for n, k in REWARD_KEYS.items())
             + " (and reference_size).", ""]
    for command in commands:
        root = schema_of(command)[0]
        lines += [f"## {TITLES.get(command, command)}", "", (root.__doc__ or "").strip(), "",
                  "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for row in doc_rows(root):
            cells = [f"`{row[0]}`"] + [c.replace("|", "\\|") for c in row[1:]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)

