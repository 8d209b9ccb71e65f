"""The machinery of the config schema: typed keys (dataclass fields with a default, allowed values and a help
line), the walk that checks a config against them, and the rows of the docs table.

A schema is a dataclass per section; a field is a key. Its annotation is its type (int, float, bool, str,
list[...], dict[str, ...], a Union of those, Optional[...] for null, another section, `Any` / bare `dict` for
free-form content, `Partial` for a block of the same command's keys). `key(...)` gives its default (or `ABSENT`:
an optional key, not filled in when missing) and what is allowed. Every mistake is a `ConfigError` with one line
naming the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ABSENT", "ConfigError", "Options", "Partial", "conform", "deep_merge", "defaults", "doc_rows", "fail",
           "key", "plain", "section", "show", "walk"]


class ConfigError(ValueError):
    """A config mistake, in one line: the dotted key, the value and what is allowed."""


class _Absent:
    """Default of an optional key: it is not filled in when the config lacks it (the code's fallback applies)."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


ABSENT = _Absent()


class Partial:
    """Type of a block holding some of the same command's keys, merged over the config later (`dry_run`, the
    `demo` block of a merge preset); it may not hold blocks itself."""


BLOCKS = ("dry_run", "demo", "dry_run_of")     # not allowed inside a Partial block


@dataclass
class Options:
    """What a walk needs besides the schema: the command's root section and whether finetune got its own reward
    object (then reward.name may be any name and the reward's keys are free-form)."""
    root: type
    own_reward: bool = False
    leaves: dict = field(default_factory=dict)     # leaf name -> dotted keys (for "did you mean" across sections)


def key(default: Any = ABSENT, help: str = "", *, choices=None, ge=None, gt=None, le=None, lt=None, length=None,
        why: str = "", check: Callable[[Any], str | None] | None = None, absent: str = "", allowed: str = ""):
    """A config key: its default (ABSENT: optional, not filled in), help line and what is allowed. `why` explains a
    bound; `check(value)` returns what is allowed when the value is not; `absent`: what the code does without the
    key; `allowed`: the docs' text when choices/bounds do not say it."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "ge": ge, "gt": gt, "le": le,
            "lt": lt, "length": length, "why": why, "check": check, "absent": absent, "allowed": allowed}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str = "", *, optional: bool = False, absent: str = ""):
    """A nested section: always present with its defaults, or (optional) only when the config has it."""
    meta = {"help": help, "absent": absent, "section": cls}
    if optional:
        return field(default=ABSENT, metadata=meta)
    return field(default_factory=cls, metadata=meta)


# ----------------------------------------------------------------------------------------------------------
# Plain values, defaults, merging

def plain(cfg: Any) -> Any:
    """A config (DictConfig, a mapping, None) as plain dicts / lists / scalars, interpolations resolved."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:   # an interpolation that does not resolve
            raise ConfigError(f"config interpolation does not resolve: {str(e).splitlines()[0]}") from None
    if isinstance(cfg, typing.Mapping):
        return {k: plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [plain(v) for v in cfg]
    return cfg


def defaults(cls: type) -> dict:
    """The defaults of a section as a plain dict (ABSENT keys left out), in declaration order."""
    out = {}
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("section")
        if f.default is ABSENT:
            continue
        out[f.name] = defaults(sub) if sub is not None else (
            f.default_factory() if f.default is dataclasses.MISSING else copy.deepcopy(f.default))
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base` as OmegaConf.merge does: mappings recursively, anything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else copy.deepcopy(v)
    return out


# ----------------------------------------------------------------------------------------------------------
# Messages

def show(value: Any) -> str:
    """A value as the YAML a user wrote: 'text', 3, 0.5, null, true, [1, 2]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def fail(path: str, value: Any, rule: str) -> typing.NoReturn:
    raise ConfigError(f"{path}: {show(value)} is not allowed ({rule})")


def join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def suggestion(word: str, candidates) -> str | None:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.75)
    return close[0] if close else None


def unknown_key(prefix: str, name: Any, known: list[str], opts: Options, context: str = "") -> ConfigError:
    """`unknown config key rl.itrations (did you mean rl.iterations?)`; a key of another section is named too."""
    close = suggestion(name, known)
    if close is not None:
        hint = f"did you mean {join(prefix, close)}?"
    elif opts.leaves.get(str(name)):
        hint = f"did you mean {' or '.join(opts.leaves[str(name)])}?"
    else:
        hint = f"keys{' of ' + prefix if prefix else ''}: {', '.join(known)}"
    return ConfigError(f"unknown config key {join(prefix, name)}{context} ({hint})")


# ----------------------------------------------------------------------------------------------------------
# Types

def is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def is_partial(tp) -> bool:
    return tp is Partial or Partial in (union_args(tp) or ())


def union_args(tp) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else None


def describe(tp, plural: bool = False) -> str:
    """A type in words: 'an int', 'a list of floats', 'a string or null'."""
    args = union_args(tp)
    if args is not None:
        parts = [describe(a, plural) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    origin = typing.get_origin(tp)
    if origin is list:
        return f"{'lists' if plural else 'a list'} of {describe(typing.get_args(tp)[0], True)}"
    if origin is dict:
        return f"{'mappings' if plural else 'a mapping'} of names to {describe(typing.get_args(tp)[1], True)}"
    words = {int: ("an int", "ints"), float: ("a float", "floats"), bool: ("a bool (true or false)", "bools"),
             str: ("a string", "strings"), dict: ("a mapping", "mappings"), Any: ("anything", "anything"),
             Partial: ("a section of this command's keys", "sections")}
    if tp in words:
        return words[tp][plural]
    if is_section(tp):
        return "sections" if plural else "a section (a mapping of its keys)"
    return str(tp)


def kind_of(tp) -> str:
    """Which YAML shape a type takes: number / bool / str / list / map."""
    origin = typing.get_origin(tp)
    if tp in (int, float):
        return "number"
    if tp is bool:
        return "bool"
    if tp is str:
        return "str"
    if origin is list:
        return "list"
    return "map"     # dict, dict[...], sections, Partial


def kind_of_value(v) -> str | None:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, (str, os.PathLike)):
        return "str"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return "map"
    return None


def conform(v: Any, tp, path: str, opts: Options) -> Any:
    """`v` as type `tp` (an int where a float is wanted becomes a float; a path-like becomes a string), or a
    ConfigError `config key PATH: value V is not T`."""
    def wrong() -> ConfigError:
        return ConfigError(f"config key {path}: value {show(v)} is not {describe(tp)}")

    if tp is Any:
        return v
    args = union_args(tp)
    if args is not None:
        if v is None and type(None) in args:
            return None
        for a in args:      # the member of the value's shape decides (its own errors name the inner key)
            if a is not type(None) and kind_of(a) == kind_of_value(v) and (a is not int or not isinstance(v, float)):
                return conform(v, a, path, opts)
        raise wrong()
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise wrong()
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise wrong()
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise wrong()
    if tp is str:
        if isinstance(v, (str, os.PathLike)):
            return os.fspath(v)
        raise wrong()
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(v, list):
            raise wrong()
        item = typing.get_args(tp)[0]
        return [conform(x, item, f"{path}[{i}]", opts) for i, x in enumerate(v)]
    if not isinstance(v, dict):
        raise wrong()
    if tp is dict:
        return copy.deepcopy(v)
    if origin is dict:
        item = typing.get_args(tp)[1]
        return {k: conform(x, item, join(path, k), opts) for k, x in v.items()}
    if tp is Partial:
        return walk(v, opts.root, path, opts, exclude=BLOCKS)
    if is_section(tp):
        return walk(v, tp, path, opts)
    raise TypeError(f"schema type {tp!r} of {path} is not supported")


def bounds_text(meta: dict) -> str:
    """'>= 1', '> 0', 'in [0, 1)': the bounds of a key in words."""
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    lo = ("[", ge) if ge is not None else ("(", gt) if gt is not None else None
    hi = ("]", le) if le is not None else (")", lt) if lt is not None else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {hi[1]}"
    return ""


def in_bounds(x: float, meta: dict) -> bool:
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    return not ((ge is not None and x < ge) or (gt is not None and x <= gt) or (le is not None and x > le)
                or (lt is not None and x >= lt))


def constrain(v: Any, meta: dict, path: str, shown: Any = None) -> None:
    """The allowed values of a key (choices, bounds, length, its own check), for a value of the right type;
    `shown`: the value as written (before an int became a float), for the message."""
    if v is None:
        return
    why = f": {meta['why']}" if meta.get("why") else ""
    written = v if shown is None else shown
    if meta.get("choices") is not None and isinstance(v, str) and v not in meta["choices"]:
        close = suggestion(v, meta["choices"])
        fail(path, written, f"one of: {', '.join(meta['choices'])}" + (f"; did you mean {close!r}?" if close else ""))
    if meta.get("length") is not None and isinstance(v, list) and len(v) != meta["length"]:
        fail(path, written, f"{meta['length']} values{why}")
    rule = bounds_text(meta)
    if rule:
        numbers = [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else \
            [x for x in v if isinstance(x, (int, float))] if isinstance(v, list) else []
        if any(not in_bounds(x, meta) for x in numbers):
            fail(path, written, f"{'each ' if isinstance(v, list) else ''}{rule}{why}")
    if meta.get("check") is not None:
        problem = meta["check"](v)
        if problem:
            fail(path, written, problem)


def walk(value: Any, cls: type, path: str, opts: Options, exclude: tuple = ()) -> dict:
    """Check the keys a section holds (it is not completed with defaults here): no unknown key, each of its type
    and allowed values. Returns the section with values conformed to their types."""
    if not isinstance(value, dict):
        raise ConfigError(f"config key {path}: value {show(value)} is not {describe(cls)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    allowed, context = None, ""
    if hasattr(cls, "allowed_keys"):
        allowed, context = cls.allowed_keys(value, path, opts)     # None, or the keys this section may hold here
    out = {}
    for name, v in value.items():
        if allowed == "free" and name not in fields:
            out[name] = copy.deepcopy(v)
            continue
        p = join(path, name)
        if name in exclude:
            raise ConfigError(f"config key {p}: a {path} block cannot hold a {name} block")
        restricted = isinstance(allowed, (set, frozenset))
        if name in fields and restricted and name not in allowed:
            raise ConfigError(f"config key {p} is not used{context} (its keys: {', '.join(sorted(allowed))})")
        if name not in fields:
            raise unknown_key(path, name, [k for k in fields if not restricted or k in allowed],
                              Options(opts.root) if restricted else opts, context)
        out[name] = conform(v, hints[name], p, opts)
        constrain(out[name], fields[name].metadata, p, shown=v)
    return out


def leaf_index(cls: type, prefix: str = "", out: dict | None = None) -> dict:
    """Leaf name -> every dotted key of that name in the schema (a misplaced key names where it belongs)."""
    out = {} if out is None else out
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        p = join(prefix, f.name)
        out.setdefault(f.name, []).append(p)
        sub = section_type(hints[f.name])
        if sub is not None:
            leaf_index(sub, p, out)
    return out


def section_type(tp) -> type | None:
    """The section class of a field's type (also inside Optional[...]), else None."""
    if is_section(tp):
        return tp
    for a in union_args(tp) or ():
        if is_section(a):
            return a
    return None


# ----------------------------------------------------------------------------------------------------------
# Docs

def is_list_type(tp) -> bool:
    return typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in union_args(tp) or ())


def doc_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(dotted key, type, default, allowed, meaning) for every key of a section, nested sections expanded."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, tp, p = f.metadata, hints[f.name], join(prefix, f.name)
        sub = section_type(tp)
        why = f" ({meta['why']})" if meta.get("why") else ""
        absent = f" (absent: {meta['absent']})" if meta.get("absent") else ""
        meaning = meta.get("help", "") + why + absent
        if sub is not None:
            if f.default is ABSENT:
                rows.append((p, "section or null" if union_args(tp) else "section", "absent", "its keys below",
                             meaning))
            rows += doc_rows(sub, p)
            continue
        if f.default is ABSENT:
            default = "absent"
        else:
            default = f"`{show(f.default_factory() if f.default is dataclasses.MISSING else f.default)}`"
        allowed = [meta["allowed"]] if meta.get("allowed") else []
        if meta.get("choices") is not None:
            allowed.append(" / ".join(f"`{c}`" for c in meta["choices"]))
        if meta.get("length") is not None:
            allowed.append(f"{meta['length']} values")
        if bounds_text(meta):
            allowed.append(("each " if is_list_type(tp) else "") + bounds_text(meta))
        if meta.get("check") is not None and getattr(meta["check"], "doc", ""):
            allowed.append(meta["check"].doc)
        if is_partial(tp):
            allowed.append("keys of this table (not dry_run, demo)")
        kind = "section or null" if is_partial(tp) else describe(tp)
        rows.append((p, kind, default, "; ".join(allowed) or "any", meaning))
    return rows
