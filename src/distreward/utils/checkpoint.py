"""Checkpoints of every trainer (GRPO, merging, base training): everything needed to resume to the same result,
in one atomic file.

Files are written with torch.save and read with `torch.load(weights_only=True)`, so numpy arrays (the reward's
float64 reference set) are stored as tagged tensors and restored as arrays.

Rotation: `save_checkpoint` first keeps the current file as `<name>.prev` (a hard link, else a copy), then replaces
`<name>` atomically, so at every moment `<name>` is a whole checkpoint and `<name>.prev` the one before it.
`load_checkpoint` falls back to `<name>.prev` with a `CheckpointWarning` when `<name>` is damaged (truncated,
not a torch zip, a refused pickle) or missing, moving the damaged file aside to `<name>.damaged` so that the next
save does not rotate it over the good one; when neither loads it raises one `CheckpointError` line naming both.
"""

from __future__ import annotations

import ast
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_torch_save

_ND = "__ndarray__"


def to_storable(obj: Any) -> Any:
    """numpy arrays -> {'__ndarray__': tensor} (recursively), so that weights_only loading accepts the file."""
    if isinstance(obj, np.ndarray):
        return {_ND: torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_storable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_storable(v) for v in obj)
    return obj


def from_storable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_ND}:
            return obj[_ND].numpy()
        return {k: from_storable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_storable(v) for v in obj)
    return obj


def rng_state(generator: torch.Generator | None = None, device: torch.device | str | None = None) -> dict:
    """The trainer's generator (if any) plus the global torch / numpy / python RNGs (and CUDA's on a GPU device)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [np_state[0], np_state[1], *np_state[2:]],
             "python": repr(random.getstate())}
    if generator is not None:
        state["generator"] = generator.get_state()
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(generator: torch.Generator | None, state: dict, device: torch.device | str | None = None) -> None:
    """Restore what `rng_state` saved (states saved without some generator leave that one as it is)."""
    if generator is not None:
        generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "python" in state:
        random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


class CheckpointError(ValueError):
    """Neither a checkpoint nor its previous copy can be read (one line naming both files)."""


class CheckpointWarning(UserWarning):
    """A damaged or missing checkpoint was replaced by its previous copy (`<name>.prev`)."""


def previous_path(path: str | os.PathLike) -> Path:
    """Where the checkpoint before `path` is kept: `<name>.prev` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """Whether `path` or its previous copy exists (what `load_checkpoint` can start from)."""
    return Path(path).is_file() or previous_path(path).is_file()


def rotate(path: Path) -> None:
    """Keep the current `path` as `<name>.prev` (hard link, else copy) before it is replaced."""
    if not path.is_file():
        return
    prev = previous_path(path)
    tmp = prev.with_name(f".{prev.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copy2(path, tmp)
    os.replace(tmp, prev)


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write `state` atomically to `path`, keeping the file it replaces as `<name>.prev`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rotate(path)
    return atomic_torch_save(path, to_storable(state))


def read_checkpoint(path: Path) -> dict:
    return from_storable(torch.load(path, map_location="cpu", weights_only=True))


def first_line(e: BaseException, limit: int = 120) -> str:
    """The first sentence of an exception's message, shortened (torch's loading errors run to paragraphs)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The state saved at `path`; its previous copy (with a CheckpointWarning) when `path` is damaged or missing."""
    path = Path(path)
    prev = previous_path(path)
    if not path.is_file() and not prev.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; start the run without --resume")
    problem = "is missing"
    if path.is_file():
        try:
            return read_checkpoint(path)
        except Exception as e:          # truncated, not a zip, a refused global, ...: damaged
            problem = f"is damaged ({first_line(e)})"
            if not prev.is_file():
                raise CheckpointError(f"checkpoint {path} {problem} and there is no previous checkpoint {prev.name} to "
                                      "fall back to; start the run again without --resume (--overwrite)") from None
    try:
        state = read_checkpoint(prev)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} {problem} and its previous copy {prev} is damaged too "
                              f"({first_line(e)}); start the run again without --resume (--overwrite)") from None
    note = ""
    if path.is_file():                  # keep the damaged file for inspection, out of the rotation
        try:
            os.replace(path, path.with_name(path.name + ".damaged"))
            note = f"; the damaged file is kept as {path.name}.damaged"
        except OSError:
            pass
    warnings.warn(f"checkpoint {path} {problem}: resuming from the previous checkpoint {prev}{note}",
                  CheckpointWarning, stacklevel=2)
    return state
