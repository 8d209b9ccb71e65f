"""Run a worker in several gloo processes on this machine, with a deadline so a hang fails instead of blocking."""

import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, outdir: Path, world: int, deadline_s: float, what: str) -> list:
    """worker(rank, port, outdir) must save outdir/rank{r}.pt; returns those objects in rank order."""
    ctx = mp.start_processes(worker, args=(free_port(), str(outdir)), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"the {world}-process {what} did not finish within {deadline_s} s")
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]
