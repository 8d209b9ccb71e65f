"""The arguments every run command shares (finetune, merge, train-base): preset, overrides, run directory,
resume / overwrite / allowed changes, dry run.

- `--resume` without `--config` continues the run with its own config.yaml; only the overrides on the line are
  compared with it (with `--config` the whole preset is).
- `--resume` on a finished run says so and exits 0 (to run it longer: `--allow-change` a length key).
- `--dry-run` into a folder an earlier dry run made replaces it (never a folder another run made)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ..build import load_dry_run_config
from ..config import load_config
from ..schema import validate
from ..utils.configdiff import changed_keys
from ..utils.errors import OptionError
from ..utils.progress import phase
from ..utils.rundir import CONFIG_FILE, LOG_FILE
from . import RUN_DIR, check_device, new_output


def add_run_arguments(p: argparse.ArgumentParser, default_config: str, example: str, dry_run: str | None) -> None:
    """--config PRESET, key=value overrides (anywhere on the line), --run-dir, --resume, --overwrite,
    --allow-change KEY, and --dry-run when the presets have a dry_run block (`dry_run` describes it)."""
    p.add_argument("--config", default=None,
                   help=f"preset name in configs/ or a YAML path (default: {default_config}; with --resume: the "
                        "run's own config.yaml)")
    p.set_defaults(default_config=default_config)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config overrides, anywhere among the options, e.g. {example}")
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in --run-dir (without it such a directory is refused)")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY", dest="allow_changes",
                   help="with --resume: accept a changed setting KEY (e.g. rl.iterations); repeatable")
    if dry_run is not None:
        p.add_argument("--dry-run", action="store_true",
                       help=f"build everything from the preset's dry_run block ({dry_run}) and run one iteration")


def check_run_flags(args) -> None:
    if args.resume and args.overwrite:
        raise OptionError("--resume continues the run in --run-dir and --overwrite replaces it; give one of them")
    if args.allow_changes and not args.resume:
        raise OptionError("--allow-change only applies with --resume (a new run takes any settings)")


def run_config(args, command: str | None = None):
    """The resolved config of a run command (the preset's dry_run block applied with --dry-run; with --resume and
    no --config, the run's own config.yaml), checked in full against `command`'s schema before any work
    (`schema.validate`, which also merges the command's defaults; with --dry-run the preset and its block first, so
    a mistake is named as written)."""
    check_run_flags(args)
    preset = args.config or args.default_config
    if getattr(args, "dry_run", False):
        if command is not None:
            validate(command, load_config(preset))
        cfg = load_dry_run_config(preset, args.overrides)
    else:
        cfg = load_config(preset, args.overrides)
    saved = default_run_dir(args, cfg) / CONFIG_FILE
    if args.resume and args.config is None and saved.is_file():
        phase(f"resume: the run's own settings ({saved}){' with ' + ' '.join(args.overrides) if args.overrides else ''}")
        cfg = load_config(saved, args.overrides)
    cfg = cfg if command is None else validate(command, cfg)
    if cfg.get("device") is not None:
        check_device(cfg.device, "device=")
    return cfg


def default_run_dir(args, cfg) -> Path:
    """--run-dir, else runs/<config name>."""
    return Path(args.run_dir) if args.run_dir else Path("runs") / str(cfg.get("name", Path(args.config or args.default_config).stem))


def made_by_a_dry_run(path: Path) -> bool:
    """Whether `path` holds a run that a dry run made (its config.yaml names the preset under dry_run_of)."""
    try:
        return OmegaConf.load(path / CONFIG_FILE).get("dry_run_of") is not None
    except Exception:           # no config, or not one we can read: not a dry run's folder
        return False


def run_dir(args, cfg) -> Path:
    """--run-dir, else runs/<config name>; registered so that a fresh folder is removed again when the command
    fails on bad input before saving anything. A new dry run replaces an earlier dry run's folder."""
    path = default_run_dir(args, cfg)
    if getattr(args, "dry_run", False) and not args.resume and not args.overwrite and made_by_a_dry_run(path):
        phase(f"{path}: replacing the earlier dry run")
        args.overwrite = True
    RUN_DIR.append(path)
    return new_output(path)


def finished(args, out: Path, cfg, marker: str, length: str) -> bool:
    """With --resume, no --allow-change and the saved settings unchanged: True (and one line saying so) when the run
    in `out` has finished, i.e. holds `marker` (the file its trainer writes last) and has logged nothing since (a
    run made longer with --allow-change and stopped again logs after its old marker: it resumes); `length` is the
    key that makes it longer. A changed setting goes on to the resume checks (refused, or applied with
    --allow-change)."""
    if not (args.resume and not args.allow_changes and (out / marker).is_file()):
        return False
    log = out / LOG_FILE
    if log.is_file() and log.stat().st_mtime_ns > (out / marker).stat().st_mtime_ns:
        return False
    try:
        saved = OmegaConf.load(out / CONFIG_FILE)
    except Exception:           # no readable config: the resume checks name the problem
        return False
    if changed_keys(saved, cfg):
        return False
    print(f"{out}: already finished ({out / marker}); nothing to resume. To run it longer: --resume {length}=N "
          f"--allow-change {length}; to start over: --overwrite", file=sys.stderr)
    return True


def run_options(args) -> dict:
    """The keyword arguments every trainer takes from the command line."""
    return {"resume": args.resume, "overwrite": args.overwrite, "allow_changes": tuple(args.allow_changes),
            "progress": not args.no_progress}
