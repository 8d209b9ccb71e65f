"""Weighted sums of checkpoints, theta(w) = sum_k w_k theta_k, streamed tensor by tensor from .safetensors files.

The K files are opened lazily (safetensors `safe_open` memory-maps them); each output tensor is accumulated in
float64 from one input tensor at a time, so the memory cost is about one model (the output) plus one tensor, not K
models. Non-float buffers (integer counters, masks) cannot be averaged: they must be equal in every input.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open

from ..models import GENERATOR_FIX, build_network, save_generator
from ..utils.errors import reading
from .blocks import GROUPS, block_groups


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class CheckpointSet:
    """K generator checkpoints with identical tensor names and shapes, merged on demand.

    `paths` are .safetensors files (written by `distreward.models.save_generator`, or any state dict whose
    network is described by `arch`/`kwargs`). `meta` holds each file's metadata (e.g. the EMA std of a snapshot).
    """

    paths: list[Path]
    tensors: dict[str, TensorInfo]
    arch: str | None = None
    kwargs: dict = field(default_factory=dict)
    meta: list[dict] = field(default_factory=list)
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)  # non-float tensors (equal in every input)
    groups: dict[str, int] | None = None      # float tensor -> block group (merge.blocks), found on first use

    @property
    def k(self) -> int:
        return len(self.paths)

    @classmethod
    def open(cls, paths: Sequence[str | os.PathLike]) -> "CheckpointSet":
        """Read the headers of every file and check that they can be merged (same names, shapes, dtypes)."""
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("no checkpoints to merge: pass at least one .safetensors file (--checkpoints A B ... or --snapshots DIR)")
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"checkpoint {p} not found; check the path (--checkpoints / merge.checkpoints, "
                                        "--snapshots / merge.snapshots, merge.include)")
            if p.suffix != ".safetensors":
                raise ValueError(f"checkpoint {p} is not a .safetensors file; convert it with distreward.models.save_generator")
        tensors: dict[str, TensorInfo] | None = None
        metas = []
        for p in paths:
            with reading(p, "safetensors file", GENERATOR_FIX), safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                info = {}
                for name in f.keys():
                    sl = f.get_slice(name)
                    info[name] = TensorInfo(tuple(sl.get_shape()), _dtype_of(sl.get_dtype()))
            metas.append(meta)
            if tensors is None:
                tensors = info
                continue
            missing, extra = sorted(set(tensors) - set(info)), sorted(set(info) - set(tensors))
            if missing or extra:
                raise ValueError(f"checkpoint {p} does not match {paths[0]}: missing tensors {missing[:5]}, "
                                 f"unexpected tensors {extra[:5]}; merge only checkpoints of the same network")
            for name, ti in info.items():
                if ti.shape != tensors[name].shape or ti.dtype != tensors[name].dtype:
                    raise ValueError(f"tensor {name!r} is {ti.dtype}{list(ti.shape)} in {p} but "
                                     f"{tensors[name].dtype}{list(tensors[name].shape)} in {paths[0]}; merge only checkpoints of the same network")
        arch = metas[0].get("arch")
        kwargs = json.loads(metas[0].get("kwargs", "{}"))
        for p, m in zip(paths[1:], metas[1:]):
            if m.get("arch") != arch or json.loads(m.get("kwargs", "{}")) != kwargs:
                raise ValueError(f"checkpoint {p} was saved for network {m.get('arch')} {m.get('kwargs')} but {paths[0]} for "
                                 f"{arch} {metas[0].get('kwargs')}; merge only checkpoints of the same network")
        out = cls(paths, tensors, arch, kwargs, [_decode_meta(m) for m in metas])
        out.fixed = out._check_fixed()
        return out

    def _check_fixed(self) -> dict[str, torch.Tensor]:
        fixed = {}
        names = [n for n, ti in self.tensors.items() if not ti.dtype.is_floating_point]
        if not names:
            return fixed
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(safe_open(str(p), framework="pt")) for p in self.paths]
            for name in names:
                first = files[0].get_tensor(name)
                for p, f in zip(self.paths[1:], files[1:]):
                    if not torch.equal(first, f.get_tensor(name)):
                        raise ValueError(f"non-float tensor {name!r} ({first.dtype}) differs between {self.paths[0]} and {p}: "
                                         "integer buffers cannot be averaged; merge checkpoints whose buffers agree")
                fixed[name] = first
        return fixed

    def block_groups(self) -> dict[str, int]:
        """{float tensor name: block group} of the inputs' network (`merge.blocks.block_groups`)."""
        if self.groups is None:
            names = [n for n, ti in self.tensors.items() if ti.dtype.is_floating_point]
            self.groups = block_groups(names, self.arch, self.kwargs)
        return self.groups

    def merge(self, weights, *, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """theta(w) = sum_k w_k theta_k as a state dict (float tensors keep their dtype; non-float ones are copied).
        `weights` (K,) merges every tensor alike; (len(GROUPS), K) gives each block group its own row
        (`merge.blocks`: input, middle, output blocks).

        `out` (e.g. a network's own state_dict()) is written in place, so merging into a live network costs no
        second copy of the model.
        """
        w = check_weights(weights, self.k)
        groups = self.block_groups() if w.ndim == 2 else None
        out = {} if out is None else out
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(safe_open(str(p), framework="pt")) for p in self.paths]
            for name, ti in self.tensors.items():
                if not ti.dtype.is_floating_point:
                    value = self.fixed[name]
                else:
                    row = w if groups is None else w[groups[name]]
                    value = weighted_sum((f.get_tensor(name) for f in files), row).to(ti.dtype)
                if name in out:
                    if out[name].shape != value.shape:
                        raise ValueError(f"tensor {name!r}: the target has shape {list(out[name].shape)}, the checkpoints {list(value.shape)}")
                    out[name].copy_(value)
                else:
                    out[name] = value
        return out

    def build_network(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """An (unloaded) network of the checkpoints' architecture, in eval mode."""
        if self.arch is None:
            raise ValueError(f"{self.paths[0]} has no 'arch' metadata: save the checkpoints with distreward.models.save_generator")
        return build_network(self.arch, self.kwargs).eval().to(device)

    @torch.no_grad()
    def merge_into(self, net: torch.nn.Module, weights) -> torch.nn.Module:
        """Load theta(w) into `net` in place (strict: every tensor of the checkpoints must be in the network)."""
        sd = net.state_dict()
        missing = sorted(set(self.tensors) - set(sd))
        extra = sorted(set(sd) - set(self.tensors))
        if missing or extra:
            raise ValueError(f"the network does not match the checkpoints: tensors not in the network {missing[:5]}, "
                             f"network tensors not in the checkpoints {extra[:5]}")
        self.merge(weights, out=sd)
        return net

    def save(self, path: str | os.PathLike, weights, extra: dict | None = None) -> Path:
        """Write theta(w) as a generator file that `distreward.models.load_generator` (so every command) can read."""
        if self.arch is None:
            raise ValueError(f"{self.paths[0]} has no 'arch' metadata: save the checkpoints with distreward.models.save_generator")
        sd = self.merge(weights)
        info = {"merge_weights": check_weights(weights, self.k).tolist(), "merge_sources": [str(p) for p in self.paths]}
        info.update(extra or {})
        return save_generator(path, None, self.arch, self.kwargs, extra=info, state_dict=sd)


# theta(w) = sum_k w_k theta_k, accumulated in float64 (a one-hot w reproduces theta_k bit for bit).
def weighted_sum(tensors, weights: Sequence[float]) -> torch.Tensor:
    acc = None
    for t, wk in zip(tensors, weights):
        if wk == 0.0 and acc is not None:
            continue
        term = t.double() * float(wk)
        acc = term if acc is None else acc.add_(term)
    return acc


def check_weights(weights, k: int) -> np.ndarray:
    """The coefficients as float64: (K,), or (len(GROUPS), K) for per-block coefficients."""
    w = np.asarray(weights.detach().cpu() if isinstance(weights, torch.Tensor) else weights, dtype=np.float64)
    w = w if w.ndim == 2 else w.reshape(-1)
    if w.shape[-1] != k or (w.ndim == 2 and w.shape[0] != len(GROUPS)):
        raise ValueError(f"got merging coefficients of shape {list(w.shape)} for {k} checkpoints; give one coefficient "
                         f"per checkpoint ({k},), or one row per block group ({len(GROUPS)}, {k}) for {', '.join(GROUPS)}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"merging coefficients must be finite, got {w.tolist()}")
    return w


def folder_files(folder: str | os.PathLike, pattern: str, missing: str, empty: str) -> list[Path]:
    """The files of `folder` that match `pattern`, by name; FileNotFoundError(missing / empty) when the folder or
    the files are not there ({folder} in the messages is filled in)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(missing.format(folder=folder))
    files = sorted(folder.glob(pattern))
    if not files:
        raise FileNotFoundError(empty.format(folder=folder))
    return files


def list_snapshots(folder: str | os.PathLike) -> list[Path]:
    """The .safetensors files of a snapshot folder, in training order (by the step in their metadata, else by name)."""
    files = folder_files(folder, "*.safetensors",
                         "snapshot folder {folder} not found (pass the folder that holds the EMA snapshot .safetensors files)",
                         "no .safetensors files in {folder}; train-base writes its EMA snapshots there")
    return sorted(files, key=lambda p: (_snapshot_step(p), p.name))


def _snapshot_step(path: Path) -> int:
    with reading(path, "safetensors file", GENERATOR_FIX), safe_open(str(path), framework="pt") as f:
        meta = _decode_meta(dict(f.metadata() or {}))
    extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
    for src in (meta, extra, extra.get("phema", {})):
        for key in ("step", "kimg", "iteration"):
            if isinstance(src, dict) and key in src:
                try:
                    return int(float(src[key]))
                except (TypeError, ValueError):
                    pass
    return -1


def _decode_meta(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _dtype_of(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unsupported safetensors dtype {name}")
    return _DTYPES[name]
