"""The input files a config names and their sha256 (for provenance and the resume check)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from .configdiff import flatten, plain_config

__all__ = ["FILE_KEYS", "expand_files", "file_sha256", "hash_inputs", "input_files", "weight_files"]

# Config keys (any dotted component) whose string values may name input files.
FILE_KEYS = frozenset({"path", "checkpoint", "checkpoints", "snapshots", "include", "real_stats", "real_features",
                       "weights", "images", "vae", "ref"})

_HASHES: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (memoised per path, size and modification time within the process)."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


def expand_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and every file inside a folder (sorted, hidden names skipped), without duplicates."""
    out: list[Path] = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                               and not any(part.startswith(".") for part in f.relative_to(p).parts)) \
            if p.is_dir() else []
        out += [f for f in files if f not in out]
    return out


def input_files(cfg: Any, find: Callable[[str], Path] = Path) -> list[Path]:
    """The files a config names: string values (or lists of them) under a key with a component in FILE_KEYS
    (model.path, model.vae.path, merge.checkpoints, merge.snapshots, reward.real_stats, eval.weights.*, ...)
    that `find` resolves to an existing file or folder; a folder stands for every file in it."""
    found = []
    for key, value in flatten(plain_config(cfg)).items():
        if not FILE_KEYS & set(key.split(".")):
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and v:
                p = find(v)
                if p.exists():
                    found.append(p)
    return expand_files(found)


def hash_inputs(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """{absolute path: sha256} of every file among `paths` (folders expanded)."""
    return {os.path.abspath(p): file_sha256(p) for p in expand_files(paths)}


def weight_files(*objects) -> list[Path]:
    """The weight files behind built objects: their `weights_path`, their `.net`'s and their `.nets`' (feature
    networks loaded from a file carry it), for provenance."""
    nets = []
    for o in objects:
        nets += [o, getattr(o, "net", None), *(getattr(o, "nets", None) or [])]
    paths = [getattr(n, "weights_path", None) for n in nets if n is not None]
    return [Path(p) for p in dict.fromkeys(p for p in paths if p) if Path(p).is_file()]
