"""Checkpoint plumbing of the GRPO loop: everything needed to resume to the same result, in one atomic file.

Files are written with torch.save and read with `torch.load(weights_only=True)`, so numpy arrays (the reward's
float64 reference set) are stored as tagged tensors and restored as arrays.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def rng_state(generator: torch.Generator) -> dict:
    """The trainer's generator plus the global torch / numpy / python RNGs."""
    np_state = np.random.get_state()
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], np_state[1], *np_state[2:]], "python": repr(random.getstate())}


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    import ast

    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(ast.literal_eval(state["python"]))


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    from ..utils.io import atomic_torch_save

    return atomic_torch_save(path, to_storable(state))


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; start the run without --resume")
    return from_storable(torch.load(path, map_location="cpu", weights_only=True))
