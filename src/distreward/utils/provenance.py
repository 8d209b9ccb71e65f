"""provenance.json: one entry per invocation of a run (command line, package version, git commit, python / torch /
numpy versions, thread count, device, world size, start time, the sha256 of every input file)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from . import dist as D
from .configdiff import plain_config
from .errors import RunDirError
from .io import atomic_save_json

__all__ = ["PROVENANCE_FILE", "append_provenance", "first_command", "git_state", "now", "package_version",
           "provenance_entry", "read_provenance"]

PROVENANCE_FILE = "provenance.json"
SOURCE_ROOT = Path(__file__).resolve().parents[3]      # the source checkout (src/distreward/utils -> repository)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_version() -> str:
    try:
        return importlib.metadata.version("distreward")
    except importlib.metadata.PackageNotFoundError:       # not installed: the package's own version string
        return str(getattr(sys.modules.get(__name__.split(".")[0]), "__version__", "unknown"))


def git_state(root: Path = SOURCE_ROOT) -> dict | None:
    """{"commit", "dirty"} of the source checkout the package runs from; None outside a git checkout."""
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit or None, "dirty": bool(dirty)}


def provenance_entry(command: str, cfg: Any = None, *, inputs: Mapping[str, str] | None = None, **extra) -> dict:
    """Where this invocation comes from: command line, versions, git commit, threads, device, inputs' sha256."""
    device = (plain_config(cfg).get("device") if cfg is not None else None) or "cpu"
    return {"command": command, "argv": list(sys.argv), "cwd": os.getcwd(), "started": now(),
            "package_version": package_version(), "git": git_state(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "world_size": D.world_size(), "host": socket.gethostname(), "pid": os.getpid(),
            **extra, "inputs": dict(inputs or {})}


def read_provenance(root: str | os.PathLike) -> list[dict]:
    path = Path(root) / PROVENANCE_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} is damaged ({e}); move it away to continue this run") from None
    return data if isinstance(data, list) else []


def first_command(root: str | os.PathLike) -> str | None:
    """The command line that started the run in `root` (its first provenance entry; the program by its name), for
    the metadata of the models it writes."""
    entries = read_provenance(root)
    argv = entries[0].get("argv") if entries else None
    if not argv:
        return None
    return shlex.join([Path(argv[0]).name, *argv[1:]])


def append_provenance(root: str | os.PathLike, entry: dict) -> list[dict]:
    entries = read_provenance(root) + [entry]
    atomic_save_json(Path(root) / PROVENANCE_FILE, entries)
    return entries
