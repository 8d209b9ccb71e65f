"""One-line errors for bad input files: the file, the problem, the fix.

Loaders wrap their low-level read (safetensors, numpy, torch.load, the restricted unpickler, YAML, PIL, gzip) in
`reading(path, what, fix)`: whatever that call raises about the file's content (empty, truncated, another format)
becomes an `InputFileError` (an `InputError`) with one line "<path>: <problem>; <fix>", raised `from None`.
FileNotFoundError, InputFileError and the restricted unpickler's refusal `UnsafePickleError` pass unchanged; a
loader's own ValueError that names the file keeps its message as an InputFileError. The CLI turns these into `distreward CMD: error: ...` and exit code 2 (docs/DEVELOPING.md,
"Errors and logs").
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["InputError", "InputFileError", "InputTypeError", "OptionError", "RunDirError", "reading", "describe"]


class InputError(ValueError):
    """Bad input, said in one line that names the problem and the fix. The CLI prints these (and `ConfigError`)
    without a traceback; a bare ValueError or TypeError from deeper down is a bug and keeps its traceback."""


class OptionError(InputError):
    """A command-line value that cannot be used (a count below 1, a device this machine lacks)."""


class RunDirError(InputError):
    """A run directory refused (a previous run, a changed setting, a damaged record): one line, what to do."""


class InputFileError(InputError):
    """An input file exists but cannot be used; the message names the file, the problem and the fix.
    `original` holds the low-level exception when there was one (shown by the CLI's --debug)."""

    original: BaseException | None = None


def describe(exc: BaseException, limit: int = 160) -> str:
    """The first line (first sentence) of an exception's message, shortened; its type when it has no useful text."""
    mark = getattr(exc, "problem_mark", None)        # YAML: the problem and where it is
    if mark is not None and getattr(exc, "problem", None):
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if ". " in text:
        text = text.split(". ")[0]
    if len(text) < 8 or text.strip("'\"").isdigit():
        text = f"{type(exc).__name__}{': ' + text if text else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


class InputTypeError(InputFileError, TypeError):
    """An input file holding values of the wrong type (float pixels where uint8 are stored); also a TypeError."""


@contextmanager
def reading(path: str | os.PathLike, what: str, fix: str) -> Iterator[None]:
    """Turn a failed read of `path` (a `what`, e.g. "generator .safetensors file") into one InputFileError line."""
    try:
        yield
    except (FileNotFoundError, InputFileError, MemoryError):
        raise
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and str(path) in str(e):
            raise                   # already one line about this file (a refused pickle global)
        if isinstance(e, ValueError) and str(path) in str(e):
            err = InputFileError(" ".join(str(e).split()))      # a loader's own line about this file
            err.original = e
            raise err from None
        p = Path(path)
        try:
            empty = p.is_file() and p.stat().st_size == 0
        except OSError:
            empty = False
        a = "an" if what[:1].lower() in "aeio" or what.startswith("EDM") else "a"
        if p.is_dir():
            problem = f"is a folder, expected {a} {what}"
        elif empty:
            problem = f"is empty (0 bytes), expected {a} {what}"
        else:
            problem = f"is not a valid {what} (damaged, truncated or another format: {describe(e)})"
        err = InputFileError(f"{path}: {problem}; {fix}")
        err.original = e            # for --debug: the low-level error behind the one line
        raise err from None
