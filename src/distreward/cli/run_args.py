"""The arguments every run command shares (finetune, merge, train-base): preset, overrides, run directory,
resume / overwrite / allowed changes, dry run."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..build import load_dry_run_config
from ..config import load_config
from ..schema import validate
from . import new_output


def add_run_arguments(p: argparse.ArgumentParser, default_config: str, example: str, dry_run: str | None) -> None:
    """--config PRESET, key=value overrides (anywhere on the line), --run-dir, --resume, --overwrite,
    --allow-change KEY, and --dry-run when the presets have a dry_run block (`dry_run` describes it)."""
    p.add_argument("--config", default=default_config,
                   help=f"preset name in configs/ or a YAML path (default: {default_config})")
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
        raise ValueError("--resume continues the run in --run-dir and --overwrite replaces it; give one of them")
    if args.allow_changes and not args.resume:
        raise ValueError("--allow-change only applies with --resume (a new run takes any settings)")


def run_config(args, defaults: dict | None = None, command: str | None = None):
    """The resolved config of a run command (the preset's dry_run block applied with --dry-run), checked in full
    against `command`'s schema before any work (`schema.validate`; with --dry-run the preset and its block first,
    so a mistake is named as written)."""
    check_run_flags(args)
    if getattr(args, "dry_run", False):
        if command is not None:
            validate(command, load_config(args.config))
        cfg = load_dry_run_config(args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides, defaults=defaults)
    return cfg if command is None else validate(command, cfg)


def run_dir(args, cfg) -> Path:
    """--run-dir, else runs/<config name>; registered so that a fresh folder is removed again when the command
    fails on bad input before saving anything."""
    path = Path(args.run_dir) if args.run_dir else Path("runs") / str(cfg.get("name", Path(args.config).stem))
    return new_output(path)


def run_options(args) -> dict:
    """The keyword arguments every trainer takes from the command line."""
    return {"resume": args.resume, "overwrite": args.overwrite, "allow_changes": tuple(args.allow_changes),
            "progress": not args.no_progress}
