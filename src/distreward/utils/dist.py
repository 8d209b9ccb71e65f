"""Multi-process helpers for torchrun (NCCL on GPUs, gloo on CPU); every helper is a no-op in a single process.

    torchrun --nproc_per_node=8 --no-python distreward finetune ...   # sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT

Conventions: rank 0 is the main process and the only one that writes files (`main_only`, `main_first`); work is
split into contiguous blocks (`shard_indices`), so gathering the blocks in rank order (`all_gather_rows`) restores
the original order; sums are added over ranks with `all_reduce_sum_` (`distreward.metrics.merge_gaussian_stats` merges
feature statistics that way, so every rank scores with the same global statistics). Collectives on a NCCL group move
CPU tensors to the GPU and back. Nothing here depends on the rest of distreward.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["init_distributed", "destroy_distributed", "is_distributed", "rank", "world_size", "local_rank", "is_main",
           "barrier", "all_reduce_sum_", "all_gather_rows", "broadcast_object", "all_reduce_max_", "shard_indices",
           "shard_rows", "shard_blocks", "main_only", "main_first", "seed_for_rank"]

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_MAX_DIMS = 8   # trailing dimensions checked by all_gather_rows
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not an integer; launch with torchrun, which sets it") from None


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str | torch.device = "cpu", *, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group described by torchrun's environment; returns the device this rank should use.

    Without WORLD_SIZE > 1 in the environment this does nothing and returns `device`. On CUDA the backend is
    NCCL and each rank takes cuda:LOCAL_RANK; otherwise gloo. Calling it again is harmless.
    """
    device = torch.device(device)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return device
    missing = [v for v in ENV_VARS if not os.environ.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun "
                         "(e.g. torchrun --nproc_per_node=2 -m distreward.cli ...) or unset WORLD_SIZE")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is cuda but no GPU is visible; use --device cpu (gloo) or run on a GPU machine")
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=_env_int("RANK", 0), world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_world_size() -> int:
    """How many processes this one was launched among: torchrun's WORLD_SIZE (before or after init_distributed),
    or the size of a process group already initialised."""
    return max(_env_int("WORLD_SIZE", 1), world_size())


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective must run: the GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return t.device if t.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; returns it."""
    if not is_distributed():
        return tensor
    dev = _comm_device(tensor)
    buf = tensor if tensor.device == dev and tensor.is_contiguous() else tensor.to(dev).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def _shape_row(t: torch.Tensor) -> list[int]:
    if t.ndim - 1 > _MAX_DIMS:
        raise ValueError(f"all_gather_rows handles up to {_MAX_DIMS} trailing dimensions, got shape {tuple(t.shape)}")
    code = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1
    return [t.shape[0], code, t.ndim] + list(t.shape[1:]) + [0] * (_MAX_DIMS - (t.ndim - 1))


def all_gather_rows(tensor):
    """Concatenate every rank's rows (dim 0) in rank order; row counts may differ between ranks.

    Accepts a torch tensor (returned on its own device) or a numpy array (returned as numpy); the trailing shape
    and the dtype must agree on all ranks.
    """
    as_numpy = isinstance(tensor, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(tensor)) if as_numpy else tensor
    if t.ndim < 1:
        raise ValueError("all_gather_rows needs a tensor with a row dimension, got a scalar")
    if not is_distributed():
        return tensor
    dev = _comm_device(t)
    world = dist.get_world_size()
    shape = torch.tensor(_shape_row(t), dtype=torch.int64, device=dev)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes = [s.tolist() for s in shapes]
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise ValueError("all_gather_rows: ranks hold tensors of different trailing shapes or dtypes: " + ", ".join(
            f"rank {r}: {tuple(s[3:3 + s[2] - 1])} {_DTYPES[s[1]] if s[1] >= 0 else 'other'}" for r, s in enumerate(shapes)))
    counts = [s[0] for s in shapes]
    most = max(counts)
    if most == 0:
        return tensor
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:n] for p, n in zip(parts, counts)])
    return out.cpu().numpy() if as_numpy else out.to(t.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank (other ranks' `obj` is ignored). Only for objects this run
    made itself: the bytes come from our own processes, never from a file."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(box, src=src, device=dev)
    return box[0]


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over all ranks, in place."""
    if not is_distributed():
        return tensor
    dev = _comm_device(tensor)
    buf = tensor.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    tensor.copy_(buf)
    return tensor


# Contiguous split of n items over W ranks: rank r gets [r n // W, (r + 1) n // W) (sizes differ by at most 1).
def shard_bounds(n: int, r: int, w: int) -> tuple[int, int]:
    return r * n // w, (r + 1) * n // w


def shard_indices(n: int, *, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous block of range(n); the blocks of all ranks, in rank order, are range(n)."""
    if int(n) < 0:
        raise ValueError(f"cannot shard a negative number of items ({n})")
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is outside a world of size {w}")
    return range(*shard_bounds(int(n), r, w))


def shard_rows(x):
    """This rank's block of the rows of a tensor, array or list (see shard_indices)."""
    idx = shard_indices(len(x))
    return x[idx.start:idx.stop]


def shard_blocks(items: int, rows: int, block: int, *, rank_: int | None = None,
                 world: int | None = None) -> list[tuple[int, range]]:
    """This rank's share of `items` row sets of `rows` rows each (e.g. P models x n samples), as (item, row range)
    pieces in global order, at most one per item.

    Each set is cut into blocks of `block` rows and the items x blocks units are split contiguously over the ranks
    (`shard_indices`): a block is never split, so it is computed in the same batch as in one process, and
    gathering the ranks' rows in rank order gives item 0's rows, then item 1's, and so on.
    """
    if int(block) <= 0:
        raise ValueError(f"shard_blocks needs a block size >= 1, got {block}")
    if int(items) < 0 or int(rows) < 0:
        raise ValueError(f"cannot shard a negative number of items or rows ({items}, {rows})")
    per_item = -(-int(rows) // int(block))
    pieces: list[tuple[int, range]] = []
    for u in shard_indices(int(items) * per_item, rank_=rank_, world=world):
        item, b = divmod(u, per_item)
        lo, hi = b * int(block), min(int(rows), (b + 1) * int(block))
        if pieces and pieces[-1][0] == item:
            pieces[-1] = (item, range(pieces[-1][1].start, hi))
        else:
            pieces.append((item, range(lo, hi)))
    return pieces


def main_only(fn: Callable) -> Callable:
    """Decorator: run `fn` on the main rank only (others return None). For file writes and printing."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main() else None
    return wrapper


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """The main rank runs the block first (e.g. builds a cache file) while the others wait, then the others run
    it (e.g. read that file). Yields is_main()."""
    if not is_main():
        barrier()
    try:
        yield is_main()
    finally:
        if is_main():
            barrier()


def seed_for_rank(seed: int, rank_: int | None = None, world: int | None = None) -> int:
    """Per-rank seed seed * W + r (SiT/DiT's sample_ddp.py convention): distinct for every (seed, rank), and
    the seed itself in a single process. Streams depend on W; to reproduce a run exactly at another world size,
    draw global noise from `seed` and take this rank's rows with `shard_indices`."""
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    return int(seed) * w + r

