"""Checkpoints of every trainer (GRPO, merging, base training): everything needed to resume to the same result,
in one atomic file.

Files are written with torch.save and read with `torch.load(weights_only=True)`, so numpy arrays (the reward's
float64 reference set) are stored as tagged tensors and restored as arrays.
"""

from __future__ import annotations

import ast
import os
import random
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


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    return atomic_torch_save(path, to_storable(state))


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; start the run without --resume")
    return from_storable(torch.load(path, map_location="cpu", weights_only=True))
