"""Progress reporting that suits both a terminal and a log file; every module uses it instead of tqdm.

- `progress(iterable=None, *, desc, total, unit, disable, leave, initial)`: a tqdm bar when stderr is a terminal;
  otherwise plain lines every ~30 s ("desc: 12/40 it (30%), 1m05s elapsed, ~2m10s left, r=0.1"), and a last
  line when the loop ran long enough to print one, so a redirected log gets a handful of lines, not thousands of
  carriage returns. The object supports `update`, `set_postfix`, `close`, iteration and `with`.
- `phase(message)`: one line on stderr before a step that may take a while ("merge: 3 inputs from ..."), kept
  even when the bars are off, so a run is never silent for minutes.
- `configure(enabled=None, interval=None, quiet=None)`: the process-wide switches (the CLI's `--no-progress`
  sets enabled=False: no bars, no periodic lines; phase lines stay unless quiet=True).

Messages go to stderr; stdout stays for results.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator

from tqdm import tqdm

__all__ = ["progress", "phase", "configure", "settings", "format_seconds", "Progress"]

_SETTINGS = {"enabled": True, "interval": 30.0, "quiet": False}


def configure(enabled: bool | None = None, interval: float | None = None, quiet: bool | None = None) -> dict:
    """Set the process-wide switches; returns the previous ones (pass them back as **kwargs to restore)."""
    old = dict(_SETTINGS)
    if enabled is not None:
        _SETTINGS["enabled"] = bool(enabled)
    if interval is not None:
        if interval <= 0:
            raise ValueError(f"progress interval must be > 0 seconds, got {interval}")
        _SETTINGS["interval"] = float(interval)
    if quiet is not None:
        _SETTINGS["quiet"] = bool(quiet)
    return old


def settings() -> dict:
    return dict(_SETTINGS)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_seconds(s: float) -> str:
    """12s, 1m05s, 2h03m."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def phase(message: str) -> None:
    """One line on stderr announcing what starts now (silenced only by configure(quiet=True))."""
    if not _SETTINGS["quiet"]:
        print(message, file=sys.stderr, flush=True)


class Progress:
    """The plain-line bar: counts like tqdm, prints a line at most every `interval` seconds."""

    def __init__(self, iterable: Iterable | None, desc: str | None, total: int | None, unit: str, initial: int,
                 leave: bool, interval: float, stream):
        self.iterable, self.desc, self.unit, self.leave = iterable, desc or "progress", unit, leave
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.n, self.initial = total, int(initial), int(initial)
        self.interval, self.stream = interval, stream
        self.start = self.last = time.monotonic()
        self.postfix = ""
        self.printed = False
        self.closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress() without an iterable: call update() instead of iterating")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._emit(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def refresh(self) -> None:
        pass

    def write(self, s: str) -> None:
        print(s, file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        done = self.n - self.initial
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(f"{format_seconds(elapsed)} elapsed")
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"~{format_seconds(elapsed / done * (self.total - self.n))} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _emit(self, now: float) -> None:
        self.printed = True
        print(self.line(now), file=self.stream, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.printed and self.leave:     # a loop that ran long enough to report also reports its end
            self._emit(time.monotonic())


class _Null:
    """What `progress` returns when disabled: iterates, counts nothing, prints nothing."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        if self.iterable is None:
            raise TypeError("progress() without an iterable: call update() instead of iterating")
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def __getattr__(self, name):        # update, set_postfix, close, refresh, ...: no-ops
        return lambda *a, **k: None


def progress(iterable: Iterable | None = None, *, desc: str | None = None, total: int | None = None,
             unit: str = "it", disable: bool = False, leave: bool = True, initial: int = 0, **tqdm_kwargs: Any):
    """A progress bar over `iterable` (or a manual one with `total` and `update`): tqdm on a terminal, plain
    periodic lines on a log file, nothing when `disable` or when the bars are switched off (`configure`).
    Extra keyword arguments go to tqdm on a terminal (e.g. dynamic_ncols) and are ignored otherwise."""
    if disable or not _SETTINGS["enabled"]:
        return _Null(iterable)
    stream = sys.stderr
    if _is_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, initial=initial, file=stream, **tqdm_kwargs)
    return Progress(iterable, desc, total, unit, initial, leave, _SETTINGS["interval"], stream)
