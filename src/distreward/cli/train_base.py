"""`distreward train-base --config fmnist_base [key=value ...] --run-dir DIR --device cpu|cuda [--resume]`.

Flow-matching training of a base generator with two power-function EMAs and periodic snapshots for post-hoc EMA.
A killed run continues with --resume (same run dir) to the same result as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json

from distreward.train import DEFAULTS, train_base

from .run_args import add_run_arguments, run_config, run_dir, run_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "fmnist_base", "train.total_kimg=64", None)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def run(args) -> int:
    cfg = run_config(args, defaults=DEFAULTS, command="train-base")
    out = run_dir(args, cfg)
    summary = train_base(cfg, out, device=args.device, **run_options(args))
    print(json.dumps(summary, indent=2))
    return 0
