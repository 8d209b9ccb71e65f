"""The user's cache folder and keyed cache files.

- `cache_root()`: where reusable computations go (real-data features, model evaluations): the CLI's `--cache-dir`
  (`set_cache_root`), else `$DISTREWARD_CACHE`, else `$XDG_CACHE_HOME/distreward`, else `~/.cache/distreward`, as
  torch and pip keep theirs: one folder per user, whatever folder a command runs in.
- `cache_valid(path, key)` / `save_cache_key(path, key)`: a cache file is reused only when the JSON key written
  beside it equals the key of what would be computed now.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .io import atomic_save_json, json_default

__all__ = ["cache_root", "cache_valid", "save_cache_key", "set_cache_root"]

_ROOT: list[Path | None] = [None]


def set_cache_root(path: str | os.PathLike | None) -> Path | None:
    """Use `path` as the cache folder of this process (None: back to the environment's); returns the previous."""
    old, _ROOT[0] = _ROOT[0], None if path is None else Path(path).expanduser()
    return old


def cache_root() -> Path:
    """--cache-dir, else $DISTREWARD_CACHE, else $XDG_CACHE_HOME/distreward, else ~/.cache/distreward."""
    if _ROOT[0] is not None:
        return _ROOT[0]
    if os.environ.get("DISTREWARD_CACHE"):
        return Path(os.environ["DISTREWARD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distreward"


def key_path_of(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _canonical(key: Any) -> Any:
    return json.loads(json.dumps(key, default=json_default, sort_keys=True))


def cache_valid(path: str | os.PathLike, key: Any, key_path: str | os.PathLike | None = None) -> bool:
    """Whether the cache file `path` exists and was computed from `key` (the JSON beside it, `<path>.json`)."""
    path = Path(path)
    meta = Path(key_path) if key_path is not None else key_path_of(path)
    try:
        return path.is_file() and _canonical(json.loads(meta.read_text())) == _canonical(key)
    except (OSError, ValueError):
        return False


def save_cache_key(path: str | os.PathLike, key: Any, key_path: str | os.PathLike | None = None) -> None:
    """Write the key of a cache file beside it (after the file itself, so a key never names a missing file)."""
    atomic_save_json(Path(key_path) if key_path is not None else key_path_of(Path(path)), _canonical(key))
