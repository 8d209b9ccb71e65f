"""Run directories you can trust (docs/runs.md): no silent reuse of a previous run, resume only with the settings
the run was started with (or an explicit change that can be honoured). The lock is `utils.lock`, the record of
each invocation `utils.provenance`, the input files' hashes `utils.hashing`, the config comparison
`utils.configdiff`.

    run = prepare_run("runs/x", cfg, command="finetune", resume=False, overwrite=False, allow_changes=(),
                      changeable={"rl.iterations": only_raise, "eval.every": None}, main=D.is_main())
    try:
        ...                         # the trainer writes under run.root
    finally:
        run.close()                 # releases the lock (a killed process releases it too)

- Not resumed: a missing or empty directory starts; a directory holding a previous run is refused unless
  `overwrite` (then it is emptied first, except the lock and the trainer's `keep` inputs).
- Resumed: the saved config.yaml is compared key by key (dotted keys) with the new config; every changed key is
  named and refused, unless it is in `allow_changes` and in the trainer's `changeable` (then it is applied and
  written to provenance.json). An input file whose content changed since the run started is refused too.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from omegaconf import OmegaConf

from . import dist as D
from .configdiff import ABSENT, changed_keys, flatten, plain_config, show
from .errors import RunDirError
from .hashing import hash_inputs, input_files
from .io import RunDir, atomic_save_json, atomic_write_bytes
from .lock import LOCK_FILE, RunLock
from .provenance import PROVENANCE_FILE, append_provenance, provenance_entry, read_provenance

__all__ = ["CONFIG_FILE", "LOG_FILE", "ResumeWarning", "RunDirError", "add_inputs", "check_changes", "prepare_run",
           "trained_threads"]

CONFIG_FILE = "config.yaml"
LOG_FILE = "metrics.jsonl"          # utils.runlog.RunLog's default file
# A directory holding one of these holds a run (overwrite empties only such directories).
RUN_MARKERS = (CONFIG_FILE, PROVENANCE_FILE, LOG_FILE, "checkpoints", "result.json", "stage.json", LOCK_FILE)


class ResumeWarning(UserWarning):
    """A resume that works but will not be bit-identical to an uninterrupted run (another thread count)."""


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
               if not (a == ABSENT and k in base and base[k] == b and type(base[k]) is type(b))}
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


def started_at(entry: dict) -> float:
    try:
        return _dt.datetime.fromisoformat(str(entry.get("started"))).timestamp()
    except ValueError:
        return float("-inf")


def trained_threads(root: Path, history: list[dict]) -> int | None:
    """The thread count of the invocation that wrote the checkpoint a resume starts from: the last provenance entry
    started before the newest checkpoint file (an invocation that stopped before saving one trained nothing)."""
    saved = [p.stat().st_mtime for p in (root / "checkpoints").glob("*.pt*")] if (root / "checkpoints").is_dir() else []
    entries = [e for e in history if e.get("threads")]
    if saved:
        entries = [e for e in entries if started_at(e) <= max(saved)]
    return int(entries[-1]["threads"]) if entries else None


def check_threads(root: Path, history: list[dict]) -> None:
    before = trained_threads(root, history)
    n = torch.get_num_threads()
    if before is not None and before != n:
        warnings.warn(f"resuming {root} with {n} thread(s) but its checkpoint was trained with {before}: the results "
                      f"will differ from an uninterrupted run at about 1e-6 (float summation order); pass --threads "
                      f"{before} for a bit-identical resume", ResumeWarning, stacklevel=3)


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
