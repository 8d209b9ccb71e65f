"""Networks only: `unet` (the embedded default), `sit` (SiT), `edm2` (EDM2 Precond + UNet).

Generator files written by this project are .safetensors with metadata {"arch": ..., "kwargs": json}, so any
command can rebuild the network: `load_generator(path)` / `save_generator(path, net, arch, kwargs)`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..utils.errors import InputError, InputFileError, reading
from ..utils.io import atomic_save_safetensors

GENERATOR_FIX = ("give a generator .safetensors written by distreward (train-base, phema, finetune, merge) or "
                 "re-create it; check model.path / --model")

# arch -> "module:class"; the class takes **kwargs exactly as saved
ARCHS = {
    "unet": "distreward.models.unet:UNet",
    "sit": "distreward.models.sit:SiT",
    "edm2": "distreward.models.edm2:Precond",
}


def build_network(arch: str, kwargs: dict) -> torch.nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"unknown network architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    mod, cls = ARCHS[arch].split(":")
    net_class = getattr(importlib.import_module(mod), cls)
    try:
        inspect.signature(net_class).bind(**kwargs)
    except TypeError as e:          # a keyword the network does not take, or one it needs: the config's mistake
        raise InputError(f"{arch} network keywords: {e}; fix model.kwargs / network.kwargs") from None
    return net_class(**kwargs)


def save_generator(path: str | os.PathLike, net: torch.nn.Module, arch: str, kwargs: dict, extra: dict | None = None,
                   state_dict: dict | None = None) -> Path:
    """Atomic .safetensors with the metadata needed to rebuild the network (and any extra JSON-able info)."""
    meta = {"arch": arch, "kwargs": json.dumps(kwargs)}
    if extra:
        meta["extra"] = json.dumps(extra)
    sd = state_dict if state_dict is not None else net.state_dict()
    return atomic_save_safetensors(path, sd, metadata=meta)


def read_generator_metadata(path: str | os.PathLike) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"generator weights {path} not found; check model.path / --model")
    with reading(path, "safetensors file", GENERATOR_FIX):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    if "arch" not in meta:
        raise InputFileError(f"{path} has no 'arch' metadata: it was not written by distreward.models.save_generator; "
                             f"{GENERATOR_FIX}")
    if meta["arch"] not in ARCHS and "dim" in meta:
        raise InputFileError(f"{path} is a feature network ({meta.get('name', meta['arch'])}, {meta['dim']}-d "
                             "features), not a generator; --model / model.path take a generator .safetensors (from "
                             "train-base, phema, finetune or merge); feature networks go to --features or reward.features")
    with reading(path, "generator file (its metadata is not valid JSON)", GENERATOR_FIX):
        return {"arch": meta["arch"], "kwargs": json.loads(meta.get("kwargs", "{}")),
                "extra": json.loads(meta.get("extra", "{}"))}


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild and load (strictly) a generator saved by `save_generator`; returned in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator weights {path} not found; check the path (--model / model.path)")
    meta = read_generator_metadata(path)
    with reading(path, f"{meta['arch']} generator file (its tensors do not match its metadata)", GENERATOR_FIX):
        net = build_network(meta["arch"], meta["kwargs"])
        net.load_state_dict(load_file(str(path)), strict=True)
    net.generator_meta = meta
    return net.eval().to(device)
