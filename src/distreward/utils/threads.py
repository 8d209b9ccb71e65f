"""One setting for the thread count of torch and of numpy's BLAS.

On a small machine multi-threaded BLAS can be far slower than one thread (METHOD.md §3), so every command
takes `--threads` (default: $DISTREWARD_THREADS, else all cores) and keeps torch and BLAS in step.
"""

from __future__ import annotations

import os

import torch
from threadpoolctl import threadpool_limits

from .errors import OptionError

_limiter = None


def default_threads() -> int:
    env = os.environ.get("DISTREWARD_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise OptionError(f"DISTREWARD_THREADS={env!r} is not an integer; set it to a thread count such as 1 or 2") from None
        if n < 1:
            raise OptionError(f"DISTREWARD_THREADS must be >= 1, got {n}")
        return n
    return os.cpu_count() or 1


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container limits it), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(n: int | None = None) -> int:
    """Use `n` threads for torch intra-op work and for numpy/scipy BLAS. Returns the count used."""
    global _limiter
    n = default_threads() if n is None else int(n)
    if n < 1:
        raise OptionError(f"thread count must be >= 1, got {n} (--threads / DISTREWARD_THREADS)")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    _limiter = threadpool_limits(limits=n)
    return n
