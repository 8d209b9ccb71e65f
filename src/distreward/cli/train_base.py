"""`distreward train-base --config fmnist_base [key=value ...] --run-dir DIR --device cpu|cuda [--resume]`.

Flow-matching training of a base generator with two power-function EMAs and periodic snapshots for post-hoc EMA.
A killed run continues with --resume (same run dir) to the same result as an uninterrupted run.
"""

from __future__ import annotations

import argparse

from distreward.train import train_base

from . import print_summary
from .run_args import add_run_arguments, finished, run_config, run_dir, run_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "fmnist_base", "train.total_kimg=64", "a tiny network on 64 images, 2 steps")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def run(args) -> int:
    cfg = run_config(args, command="train-base")
    out = run_dir(args, cfg)
    if finished(args, out, cfg, "model.safetensors", "train.total_kimg"):
        return 0
    s = train_base(cfg, out, device=args.device, **run_options(args))
    model = f", model {s['model']}" if s.get("model") else ""
    print_summary("train-base", f"{out}: step {s['step']} of {s['total_steps']} ({s['kimg']:g} kimg){model}")
    return 0
