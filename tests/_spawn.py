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


def kill_when(child, ckpt: Path, counter: str, reach: int, deadline_s: float) -> str:
    """SIGKILL a child process once its checkpoint `ckpt` records `counter` >= reach (or at the deadline); fails
    the test when the child ended by itself first. Returns the child's stderr."""
    import os
    import signal

    deadline, reached = time.time() + deadline_s, 0
    while time.time() < deadline and child.poll() is None and reached < reach:
        try:
            reached = torch.load(ckpt, weights_only=True)[counter]
        except Exception:       # not written yet
            time.sleep(0.05)
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    _, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, f"the child ended (rc {child.returncode}) before the kill: {err[-2000:]}"
    return err
