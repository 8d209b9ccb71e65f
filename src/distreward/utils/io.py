"""Atomic writes (a crash never leaves a half-written file) and the run directory layout."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=False, default=json_default) + "\n").encode())


def json_default(o: Any):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """torch.save atomically. Load these files with torch.load(weights_only=True)."""

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


class RunDir:
    """Everything a run writes lives under one folder: runs/<name>/ by default.

    config.yaml, provenance.json, .lock, metrics.jsonl, tb/ (TensorBoard), checkpoints/, samples/, report.md,
    metrics.json. A trainer gets its RunDir from `utils.rundir.prepare_run` (the lock, the checks, provenance);
    `close()` (or leaving a `with` block) releases the lock. `changes`: the settings changed on this resume
    ({key, from, to}); `provenance`: this invocation's entry of provenance.json.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = None            # a utils.rundir.RunLock while the run holds the directory
        self.changes: list[dict] = []
        self.provenance: dict = {}

    def close(self) -> None:
        """Release the run directory's lock (if this process holds it); idempotent."""
        lock, self.lock = getattr(self, "lock", None), None
        if lock is not None:
            lock.release()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def checkpoints(self) -> Path:
        p = self.root / "checkpoints"
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def samples(self) -> Path:
        p = self.root / "samples"
        p.mkdir(parents=True, exist_ok=True)
        return p
