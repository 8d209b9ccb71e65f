"""Run directories you can trust (docs/runs.md): one live run per directory, no silent reuse of a previous run,
resume only with the settings the run was started with (or an explicit change that can be honoured), and a
record of where every run came from.

    run = prepare_run("runs/x", cfg, command="finetune", resume=False, overwrite=False, allow_changes=(),
                      changeable={"rl.iterations": only_raise, "eval.every": None}, main=D.is_main())
    try:
        ...                         # the trainer writes under run.root
    finally:
        run.close()                 # releases the lock (a killed process releases it too)

- The lock: `<run>/.lock`, held with fcntl.flock for the life of the run and naming the holder (pid, command
  line). A second live run in the same directory is refused with one line naming that pid; the lock of a dead
  process is free (the kernel dropped it) and is taken over, saying so.
- Not resumed: a missing or empty directory starts; a directory holding a previous run is refused unless
  `overwrite` (then it is emptied first, except the lock and the trainer's `keep` inputs).
- Resumed: the saved config.yaml is compared key by key (dotted keys) with the new config; every changed key is
  named and refused, unless it is in `allow_changes` and in the trainer's `changeable` (then it is applied and
  written to provenance.json). An input file whose content changed since the run started is refused too.
- provenance.json: one entry per invocation: command line, package version, git commit, python / torch / numpy
  versions, thread count, device, world size, start time, and the sha256 of every input file.
- Keyed caches: `cache_valid(path, key)` / `save_cache_key(path, key)`: a cache file is reused only when the JSON
  key written beside it equals the key of what would be computed now.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from . import dist as D
from .io import RunDir, atomic_save_json, atomic_write_bytes, json_default

__all__ = ["CONFIG_FILE", "LOCK_FILE", "PROVENANCE_FILE", "ResumeWarning", "RunDirError", "RunLock", "RunLockedError",
           "add_inputs", "append_provenance", "cache_valid", "changed_keys", "file_sha256", "flatten", "hash_inputs",
           "input_files", "only_raise", "plain_config", "prepare_run", "provenance_entry", "read_provenance",
           "save_cache_key", "weight_files"]

LOCK_FILE = ".lock"
PROVENANCE_FILE = "provenance.json"
CONFIG_FILE = "config.yaml"
# A directory holding one of these holds a run (overwrite empties only such directories).
RUN_MARKERS = (CONFIG_FILE, PROVENANCE_FILE, "metrics.jsonl", "checkpoints", "result.json", "stage.json", LOCK_FILE)
# Config keys (any dotted component) whose string values may name input files.
FILE_KEYS = frozenset({"path", "checkpoint", "checkpoints", "snapshots", "include", "real_stats", "real_features",
                       "weights", "images", "vae", "ref"})
SOURCE_ROOT = Path(__file__).resolve().parents[3]      # the source checkout (src/distreward/utils -> repository)


class RunDirError(ValueError):
    """A run directory refused (a previous run, a changed setting, a damaged record): one line, what to do."""


class RunLockedError(RunDirError):
    """Another live process holds the run directory's lock."""


class ResumeWarning(UserWarning):
    """A resume that works but will not be bit-identical to an uninterrupted run (another thread count)."""


# ----------------------------------------------------------------------------------------------------------
# The lock

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
                  "command_line": " ".join(sys.argv), "since": now()}
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


# ----------------------------------------------------------------------------------------------------------
# Configs as dotted keys

def _plain_default(o: Any) -> Any:
    if isinstance(o, (DictConfig, ListConfig)):
        return OmegaConf.to_container(o, resolve=True)
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    return json_default(o)


def plain_config(cfg: Any) -> Any:
    """A config (DictConfig or dict, at any depth) as plain JSON values (lists, not tuples; paths as strings)."""
    return json.loads(json.dumps({} if cfg is None else cfg, default=_plain_default))


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"rl": {"iterations": 3}} -> {"rl.iterations": 3}; lists and empty mappings are values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_ABSENT = "(absent)"


def changed_keys(old: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every setting that differs (a missing key reads '(absent)')."""
    a, b = flatten(plain_config(old)), flatten(plain_config(new))
    out = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, _ABSENT), b.get(k, _ABSENT)
        if va != vb or type(va) is bool and type(vb) is not bool or type(vb) is bool and type(va) is not bool:
            out[k] = (va, vb)
    return out


def show(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=json_default)
    return s if len(s) <= 60 else s[:57] + "..."


def only_raise(old: Any, new: Any) -> str | None:
    """A `changeable` check: the value may go up, not down (a run cannot be made shorter than it has run)."""
    try:
        return None if float(new) >= float(old) else f"can only be raised ({old} -> {new} would lower it)"
    except (TypeError, ValueError):
        return f"must be a number, got {new!r}"


# ----------------------------------------------------------------------------------------------------------
# Input files and their hashes

_HASHES: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (memoised per path, size and modification time within the process)."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


def expand_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and every file inside a folder (sorted, hidden names skipped), without duplicates."""
    out: list[Path] = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                               and not any(part.startswith(".") for part in f.relative_to(p).parts)) \
            if p.is_dir() else []
        out += [f for f in files if f not in out]
    return out


def input_files(cfg: Any, find: Callable[[str], Path] = Path) -> list[Path]:
    """The files a config names: string values (or lists of them) under a key with a component in FILE_KEYS
    (model.path, model.vae.path, merge.checkpoints, merge.snapshots, reward.real_stats, eval.weights.*, ...)
    that `find` resolves to an existing file or folder; a folder stands for every file in it."""
    found = []
    for key, value in flatten(plain_config(cfg)).items():
        if not FILE_KEYS & set(key.split(".")):
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and v:
                p = find(v)
                if p.exists():
                    found.append(p)
    return expand_files(found)


def hash_inputs(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """{absolute path: sha256} of every file among `paths` (folders expanded)."""
    return {os.path.abspath(p): file_sha256(p) for p in expand_files(paths)}


def weight_files(*objects) -> list[Path]:
    """The weight files behind built objects: their `weights_path`, their `.net`'s and their `.nets`' (feature
    networks loaded from a file carry it), for provenance."""
    nets = []
    for o in objects:
        nets += [o, getattr(o, "net", None), *(getattr(o, "nets", None) or [])]
    paths = [getattr(n, "weights_path", None) for n in nets if n is not None]
    return [Path(p) for p in dict.fromkeys(p for p in paths if p) if Path(p).is_file()]


# ----------------------------------------------------------------------------------------------------------
# Provenance

def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_version() -> str:
    try:
        return importlib.metadata.version("distreward")
    except importlib.metadata.PackageNotFoundError:       # not installed: the package's own version string
        return str(getattr(sys.modules.get(__name__.split(".")[0]), "__version__", "unknown"))


def git_state(root: Path = SOURCE_ROOT) -> dict | None:
    """{"commit", "dirty"} of the source checkout the package runs from; None outside a git checkout."""
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit or None, "dirty": bool(dirty)}


def provenance_entry(command: str, cfg: Any = None, *, inputs: Mapping[str, str] | None = None, **extra) -> dict:
    """Where this invocation comes from: command line, versions, git commit, threads, device, inputs' sha256."""
    device = (plain_config(cfg).get("device") if cfg is not None else None) or "cpu"
    return {"command": command, "argv": list(sys.argv), "cwd": os.getcwd(), "started": now(),
            "package_version": package_version(), "git": git_state(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "world_size": D.world_size(), "host": socket.gethostname(), "pid": os.getpid(),
            **extra, "inputs": dict(inputs or {})}


def read_provenance(root: str | os.PathLike) -> list[dict]:
    path = Path(root) / PROVENANCE_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} is damaged ({e}); move it away to continue this run") from None
    return data if isinstance(data, list) else []


def append_provenance(root: str | os.PathLike, entry: dict) -> list[dict]:
    entries = read_provenance(root) + [entry]
    atomic_save_json(Path(root) / PROVENANCE_FILE, entries)
    return entries


def add_inputs(run: RunDir, paths: Iterable[str | os.PathLike], *, main: bool = True) -> None:
    """Input files known only once the run's objects are built (feature-network weights): hashed into this
    invocation's provenance entry; on resume, one whose content changed since the run started is refused."""
    if not main or not run.provenance:
        return
    hashes = {p: h for p, h in hash_inputs(paths).items() if p not in run.provenance["inputs"]}
    if not hashes:
        return
    history = read_provenance(run.root)
    if run.provenance.get("resume"):
        check_inputs(run.root, history[:-1], hashes)
    run.provenance["inputs"].update(hashes)
    atomic_save_json(run.root / PROVENANCE_FILE, history[:-1] + [run.provenance])


# ----------------------------------------------------------------------------------------------------------
# Keyed caches

def key_path_of(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _canonical(key: Any) -> Any:
    return json.loads(json.dumps(key, default=json_default, sort_keys=True))


def cache_valid(path: str | os.PathLike, key: Any, key_path: str | os.PathLike | None = None) -> bool:
    """Whether the cache file `path` exists and was computed from `key` (the JSON beside it, `<path>.json`)."""
    path = Path(path)
    meta = Path(key_path) if key_path is not None else key_path_of(path)
    try:
        return path.is_file() and _canonical(json.loads(meta.read_text())) == _canonical(key)
    except (OSError, ValueError):
        return False


def save_cache_key(path: str | os.PathLike, key: Any, key_path: str | os.PathLike | None = None) -> None:
    """Write the key of a cache file beside it (after the file itself, so a key never names a missing file)."""
    atomic_save_json(Path(key_path) if key_path is not None else key_path_of(Path(path)), _canonical(key))


# ----------------------------------------------------------------------------------------------------------
# prepare_run

def holds_run(root: Path, keep: Sequence[str] = ()) -> list[str]:
    """The entries of `root` that are not the lock or kept inputs (sorted names)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name != LOCK_FILE and p.name not in keep)


def empty_run_dir(root: Path, keep: Sequence[str] = ()) -> None:
    """Remove a previous run's files (never the lock or the kept inputs); refuses folders that are not runs."""
    entries = holds_run(root, keep)
    if not entries:
        return
    here = Path.cwd().resolve()
    r = root.resolve()
    if r == Path(r.anchor) or r == Path.home().resolve() or r == here or r in here.parents:
        raise RunDirError(f"--overwrite refuses to empty {root}: it is the current folder, a parent of it, your home "
                          "or the root; choose a run directory of its own")
    if not any((root / m).exists() for m in RUN_MARKERS if m != LOCK_FILE):
        raise RunDirError(f"{root} is not empty and holds no run (no {CONFIG_FILE}, {PROVENANCE_FILE} or "
                          f"checkpoints/: {', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}); "
                          "--overwrite empties only run directories: choose another --run-dir")
    for name in entries:
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_changes(root: Path, old: Mapping, new: Mapping, allow_changes: Sequence[str],
                  changeable: Mapping[str, Callable | None], defaults: Mapping | None = None) -> list[dict]:
    """The changes of a resume that are allowed and honourable ({key, from, to}); raises naming every other. A key
    the saved config lacks whose new value is its default in `defaults` is not a change."""
    changes = changed_keys(old, new)
    base = flatten(plain_config(defaults)) if defaults is not None else {}
    changes = {k: (a, b) for k, (a, b) in changes.items()
               if not (a == _ABSENT and k in base and base[k] == b and type(base[k]) is type(b))}
    allowed = set(allow_changes)
    bad = []
    for k, (a, b) in changes.items():
        check = changeable.get(k) if k in changeable else None
        why = check(a, b) if (k in allowed and k in changeable and check is not None) else None
        if k not in allowed or k not in changeable or why:
            bad.append(f"{k}: {show(a)} -> {show(b)}" + (f" ({why})" if why else ""))
    if bad:
        asked = sorted(k for k in allowed & set(changes) if k not in changeable)
        how = (f"{', '.join(asked)} cannot be changed on resume; " if asked else "")
        options = ", ".join(sorted(changeable)) or "none"
        raise RunDirError(f"cannot resume {root}: the config differs from the saved run's in {len(bad)} setting(s): "
                          f"{'; '.join(bad)}. {how}Resume with the saved settings ({root / CONFIG_FILE}), pass "
                          f"--allow-change KEY for a key that can change on resume ({options}), or start over with "
                          "--overwrite or another --run-dir")
    unused = sorted(allowed - set(changes))
    if unused:
        warnings.warn(f"--allow-change {', '.join(unused)}: not changed from the saved run; nothing to apply",
                      ResumeWarning, stacklevel=3)
    return [{"key": k, "from": a, "to": b} for k, (a, b) in changes.items()]


def check_inputs(root: Path, history: list[dict], inputs: Mapping[str, str]) -> None:
    """Refuse to resume when an input file's content differs from what the run started with."""
    first = {}
    for entry in history:
        for p, h in (entry.get("inputs") or {}).items():
            first.setdefault(p, h)
    changed = [p for p, h in inputs.items() if p in first and first[p] != h]
    if changed:
        raise RunDirError(f"cannot resume {root}: input file(s) changed since the run started: "
                          f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} (sha256 in "
                          f"{root / PROVENANCE_FILE}); restore them, or start over with --overwrite or another --run-dir")


def check_threads(root: Path, history: list[dict]) -> None:
    before = next((e.get("threads") for e in reversed(history) if e.get("threads")), None)
    n = torch.get_num_threads()
    if before is not None and int(before) != n:
        warnings.warn(f"resuming {root} with {n} thread(s) but the run so far used {before}: the results will differ "
                      f"from an uninterrupted run at about 1e-6 (float summation order); pass --threads {before} for a "
                      "bit-identical resume", ResumeWarning, stacklevel=3)


def prepare_run(path: str | os.PathLike, cfg: Any, *, command: str, resume: bool, overwrite: bool = False,
                allow_changes: Sequence[str] = (), changeable: Mapping[str, Callable | None] | Iterable[str] = (),
                main: bool = True, inputs: Iterable[str | os.PathLike] | None = None, keep: Sequence[str] = (),
                save_config: bool = True, defaults: Mapping | None = None) -> RunDir:
    """Lock and check a run directory before any work; returns its `RunDir` (close it, or use it as a context
    manager, when the run ends).

    `changeable`: the settings this trainer can honour on resume, as names or {name: check(old, new) -> reason
    or None}; `inputs`: the input files (default: those the config names, `input_files(cfg)`); `keep`: entries of
    the directory that are inputs, not a previous run (kept by `overwrite`); `defaults`: the command's default config
    (a key the saved run lacks, e.g. one added to the schema since, is no change when the new value is its default).
    Only the main process (`main`) looks
    at or writes files; under torchrun every rank gets the main process's verdict (the same error on every rank).
    Writes config.yaml (the new config) and appends this invocation to provenance.json.
    """
    root = Path(path)
    changeable = dict(changeable) if isinstance(changeable, Mapping) else {k: None for k in changeable}
    run = RunDir(root) if main else None
    err, info = None, {}
    if main:
        try:
            info = _prepare_main(run, cfg, command=command, resume=resume, overwrite=overwrite,
                                 allow_changes=allow_changes, changeable=changeable, inputs=inputs, keep=keep,
                                 save_config=save_config, defaults=defaults)
        except BaseException as e:
            run.close()
            if D.world_size() <= 1:
                raise
            err = e
    if D.world_size() > 1:
        verdict = D.broadcast_object(None if err is None else f"{type(err).__name__}: {err}")
        if err is not None:
            raise err
        if verdict is not None:
            raise RunDirError(verdict.split(": ", 1)[-1])
        info = D.broadcast_object(info)
    if run is None:
        run = RunDir(root)              # other ranks: no lock, no checks, no writes
    run.changes = info.get("changes", [])
    return run


def _prepare_main(run: RunDir, cfg, *, command, resume, overwrite, allow_changes, changeable, inputs, keep,
                  save_config, defaults=None) -> dict:
    root = run.root
    if resume and overwrite:
        raise RunDirError("give either --resume (continue the run) or --overwrite (replace it), not both")
    run.lock = RunLock(root, command).acquire()
    entries = holds_run(root, keep)
    new = plain_config(cfg)
    hashes = hash_inputs(input_files(cfg) if inputs is None else inputs)
    history: list[dict] = []
    changes: list[dict] = []
    if not resume:
        if entries and not overwrite:
            raise RunDirError(f"{root} holds a previous run ({', '.join(entries[:4])}{' ...' if len(entries) > 4 else ''});"
                              " pass --overwrite to replace it or --resume to continue it")
        if entries:
            empty_run_dir(root, keep)
            print(f"{root}: --overwrite: removed the previous run ({len(entries)} entries)", file=sys.stderr)
        if allow_changes:
            warnings.warn("--allow-change applies to --resume only; ignored", ResumeWarning, stacklevel=3)
    else:
        history = read_provenance(root)
        saved = root / CONFIG_FILE
        if saved.is_file():
            try:
                old = plain_config(OmegaConf.load(saved))
            except Exception as e:      # a damaged YAML: name it
                raise RunDirError(f"{saved} is not readable ({str(e).splitlines()[0]}); restore it, or start over "
                                  "with --overwrite") from None
            changes = check_changes(root, old, new, allow_changes, changeable, defaults)
            for c in changes:
                print(f"{root}: resume: applying {c['key']}: {show(c['from'])} -> {show(c['to'])}", file=sys.stderr)
        check_inputs(root, history, hashes)
        check_threads(root, history)
    entry = provenance_entry(command, cfg, inputs=hashes, resume=bool(resume), overwrite=bool(overwrite),
                             allow_changes=list(allow_changes), changes=changes,
                             took_over_lock_of=(run.lock.took_over or {}).get("pid"))
    append_provenance(root, entry)
    run.provenance = entry
    if save_config:
        atomic_write_bytes(root / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(new)).encode())
    return {"changes": changes}
