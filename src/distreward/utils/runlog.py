"""The log of a run: metrics.jsonl (one JSON record per line) and TensorBoard scalars.

A resumed run first drops the records past the checkpoint it restarts from, so the log reads like an
uninterrupted run; only the main process writes (other ranks get a log that does nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

from .io import json_default, atomic_write_bytes


def truncate_jsonl(path: Path, last: int, key: str = "iteration") -> None:
    """Keep only the records of `path` whose `key` is <= last (last = -1 empties the file)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get(key, 0) <= last]
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


class NullWriter:
    """A TensorBoard writer that writes nothing (other ranks; environments without tensorboard)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def tensorboard_writer(logdir: Path, purge_step: int | None = None):
    """A SummaryWriter on `logdir` (events past purge_step are dropped), or a NullWriter without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # a dependency; keep training if a user environment lacks it
        return NullWriter()
    return SummaryWriter(str(logdir), purge_step=purge_step)


class RunLog:
    """metrics.jsonl + TensorBoard (tb/) under a run directory.

    start: the step the run (re)starts from; records with `key` > start are dropped first (start 0: a fresh
    log). enabled=False (ranks other than 0) writes nothing. tensorboard=False keeps only the jsonl.
    """

    def __init__(self, root: str | Path, *, start: int = 0, key: str = "iteration", enabled: bool = True,
                 tensorboard: bool = True, name: str = "metrics.jsonl", purge_step: int | None = None):
        self.root, self.key, self.enabled = Path(root), key, bool(enabled)
        self.path = self.root / name
        self.writer = NullWriter()
        if not self.enabled:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, start if start else -1, key)
        if tensorboard:
            self.writer = tensorboard_writer(self.root / "tb", purge_step if purge_step is not None else
                                             (start + 1 if start else None))

    def write(self, record: dict) -> None:
        """Append one record to metrics.jsonl."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=json_default) + "\n")
                f.flush()

    def scalars(self, record: dict, step: int, prefix: str = "") -> None:
        """Every number of `record` (but the step key) as a TensorBoard scalar at `step`."""
        for k, v in record.items():
            if k != self.key and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(prefix + k, v, step)

    def log(self, record: dict, step: int | None = None) -> None:
        """Both: the jsonl record and its scalars (at record[key] unless `step` is given)."""
        self.write(record)
        self.scalars(record, record.get(self.key, 0) if step is None else step)

    def close(self) -> None:
        self.writer.close()
