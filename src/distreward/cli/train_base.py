"""`distreward train-base --config fmnist_base [key=value ...] --run-dir DIR --device cpu|cuda [--resume]`.

Flow-matching training of a base generator with two power-function EMAs and periodic snapshots for post-hoc EMA.
A killed run continues with --resume (same run dir) to the same result as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json

from distreward.config import load_config
from distreward.train import DEFAULTS, train_base


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.total_kimg=64")
    p.add_argument("--config", default="fmnist_base", help="preset name in configs/ or a YAML path (default: fmnist_base)")
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/<config name>)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its training state")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides, defaults=DEFAULTS)
    run_dir = args.run_dir or f"runs/{cfg.name}"
    summary = train_base(cfg, run_dir, device=args.device, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0
