"""The arguments every training command shares (finetune, merge): preset, overrides, run directory, resume."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..build import load_dry_run_config
from ..config import load_config


def add_run_arguments(p: argparse.ArgumentParser, default_config: str, example: str, dry_run: str) -> None:
    """--config PRESET, key=value overrides, --run-dir, --resume, --no-progress, --dry-run."""
    p.add_argument("--config", default=default_config,
                   help=f"preset name in configs/ or a YAML path (default: {default_config})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help=f"build everything from the preset's dry_run block ({dry_run}) and run one iteration")


def run_config(args):
    """The resolved config of a run command (the preset's dry_run block applied with --dry-run)."""
    return load_dry_run_config(args.config, args.overrides) if args.dry_run else load_config(args.config, args.overrides)


def run_dir(args, cfg) -> Path:
    """--run-dir, else runs/<config name>."""
    return Path(args.run_dir) if args.run_dir else Path("runs") / str(cfg.get("name", Path(args.config).stem))
