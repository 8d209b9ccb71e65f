"""YAML presets with key=value overrides (OmegaConf), resolved once and saved with the run; every key is
declared and checked by `distreward.schema` (`validate(command, cfg)`, docs/configs.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from .utils.errors import InputFileError, OptionError, describe, reading
from .utils.io import atomic_write_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_path(*parts: str) -> Path:
    """A path inside the source checkout (configs/, weights/), where the shipped files live."""
    return REPO_ROOT.joinpath(*parts)


def find_file(p: str | os.PathLike) -> Path:
    """A path as given, else relative to the source checkout (where configs/ and weights/ ship)."""
    path = Path(str(p))
    if not path.exists() and not path.is_absolute() and repo_path(str(path)).exists():
        return repo_path(str(path))
    return path


def resolve_preset(name_or_path: str | os.PathLike) -> Path:
    """A config file path, or a preset name looked up in ./configs and in the checkout's configs/."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidates = [Path("configs") / p, repo_path("configs") / p]
    candidates += [c.with_suffix(".yaml") for c in candidates if c.suffix != ".yaml"]
    for c in candidates:
        if c.is_file():
            return c
    available = sorted(x.stem for x in repo_path("configs").glob("*.yaml"))
    raise FileNotFoundError(f"config {str(name_or_path)!r} not found (looked at {p} and in configs/); presets: {', '.join(available) or 'none'}")


def load_config(name_or_path: str | os.PathLike | None, overrides: Iterable[str] = (), defaults: dict | None = None) -> DictConfig:
    """Merge defaults <- preset file <- key=value overrides (dotted keys, YAML values)."""
    parts = [OmegaConf.create(defaults or {})]
    if name_or_path is not None:
        path = resolve_preset(name_or_path)
        with reading(path, "YAML config", "fix the YAML (indentation, brackets, 'key: value' lines) or use a preset "
                     "from configs/"):
            preset = OmegaConf.load(path)
        if not isinstance(preset, DictConfig):
            raise InputFileError(f"{path}: a config must be a mapping of 'key: value' lines, this file holds a "
                                 f"{type(preset).__name__}; fix the YAML or use a preset from configs/")
        parts.append(preset)
    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise OptionError(f"overrides must look like key=value (e.g. rl.iterations=10); got {bad}")
    for o in overrides:
        try:
            parts.append(OmegaConf.from_dotlist([o]))
        except Exception as e:
            raise OptionError(f"override {o!r}: the value is not valid YAML ({describe(e)}); "
                             "quote it, e.g. key='[1, 2]'") from None
    cfg = OmegaConf.merge(*parts)
    OmegaConf.set_struct(cfg, False)
    return cfg


def plain(node: Any) -> Any:
    """A config node as plain Python (dicts, lists, scalars); anything else unchanged."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def get(node: Any, key: str, default: Any = None) -> Any:
    """node[key], or `default` when the node lacks the key, holds None there, or is not a mapping."""
    try:
        value = node.get(key, default)
    except AttributeError:
        return default
    return default if value is None else value


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))).encode())
