"""Configs as dotted keys: plain JSON values, flattened, compared key by key (what a resume checks)."""

from __future__ import annotations

import json
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from .io import json_default

__all__ = ["ABSENT", "changed_keys", "flatten", "only_raise", "plain_config", "show"]


def _plain_default(o: Any) -> Any:
    if isinstance(o, (DictConfig, ListConfig)):
        return OmegaConf.to_container(o, resolve=True)
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    return json_default(o)


def plain_config(cfg: Any) -> Any:
    """A config (DictConfig or dict, at any depth) as plain JSON values (lists, not tuples; paths as strings)."""
    return json.loads(json.dumps({} if cfg is None else cfg, default=_plain_default))


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"rl": {"iterations": 3}} -> {"rl.iterations": 3}; lists and empty mappings are values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


ABSENT = "(absent)"


def changed_keys(old: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every setting that differs (a missing key reads '(absent)')."""
    a, b = flatten(plain_config(old)), flatten(plain_config(new))
    out = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, ABSENT), b.get(k, ABSENT)
        if va != vb or type(va) is bool and type(vb) is not bool or type(vb) is bool and type(va) is not bool:
            out[k] = (va, vb)
    return out


def show(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=json_default)
    return s if len(s) <= 60 else s[:57] + "..."


def only_raise(old: Any, new: Any) -> str | None:
    """A `changeable` check: the value may go up, not down (a run cannot be made shorter than it has run)."""
    try:
        return None if float(new) >= float(old) else f"can only be raised ({old} -> {new} would lower it)"
    except (TypeError, ValueError):
        return f"must be a number, got {new!r}"
