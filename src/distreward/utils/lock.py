"""One live run per directory: `<run>/.lock`, an exclusive flock held for the life of the run and naming the holder
(pid, command line). A second live run is refused with one line naming that pid; the lock of a dead process is free
(the kernel dropped it) and is taken over, saying so."""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from .errors import RunDirError

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "pid_alive"]

LOCK_FILE = ".lock"


class RunLockedError(RunDirError):
    """Another live process holds the run directory's lock."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


class RunLock:
    """`<root>/.lock`: an exclusive flock held while the run lives, holding the holder's pid and command line.

    The kernel releases a flock when its process dies (even by SIGKILL), so a lock left by a dead process is free
    and is taken over; `took_over` then names the dead pid."""

    def __init__(self, root: str | os.PathLike, command: str = ""):
        self.root, self.command = Path(root), command
        self.path = self.root / LOCK_FILE
        self.fd: int | None = None
        self.took_over: dict | None = None

    @staticmethod
    def holder(path: Path) -> dict:
        try:
            text = path.read_text().strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self.holder(self.path)
            who = f"pid {h.get('pid', '?')}" + (f" on {h['host']}" if h.get("host") not in (None, socket.gethostname()) else "")
            cmd = f" ({h['command_line']})" if h.get("command_line") else ""
            raise RunLockedError(f"{self.root} is in use by a live run: {who}{cmd} holds {self.path}; wait for it to "
                                 "end, stop it, or choose another --run-dir") from None
        previous = self.holder(self.path)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            self.took_over = previous
            state = "still running but no longer holds it" if pid_alive(previous["pid"]) else "no longer running"
            print(f"{self.root}: taking over the lock of pid {previous['pid']} ({state})", file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "command_line": " ".join(sys.argv), "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file, then unlock it (the file stays: removing it would race with a new holder)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
