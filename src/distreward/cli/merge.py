"""`distreward merge --config PRESET (--checkpoints A B ... | --snapshots DIR)`: RL over merging coefficients.

Under torchrun (`torchrun --nproc_per_node=W --no-python distreward merge ...`) every rank runs the same command;
sampling is split over the ranks and only rank 0 writes and prints (docs/scale.md, "Merging under torchrun").
"""

from __future__ import annotations

import argparse

from ..merge import run_merge
from ..runreport import write_run_report
from ..utils import dist as D
from . import print_summary
from .run_args import add_run_arguments, finished, run_config, run_dir, run_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "fmnist_merge_ema", "rl.iterations=10 rl.candidates=8", "random checkpoints, tiny networks")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoints", nargs="+", default=None, metavar="FILE",
                     help="K generator .safetensors files in training order (overrides merge.checkpoints)")
    src.add_argument("--snapshots", default=None, metavar="DIR", help="a folder of EMA snapshots (overrides merge.snapshots)")
    p.add_argument("--include", nargs="+", default=None, metavar="FILE",
                   help="extra files appended to the inputs, e.g. the base model next to GRPO checkpoints")


def run(args) -> int:
    cfg = run_config(args, command="merge")
    if args.checkpoints is not None:
        cfg.merge.checkpoints, cfg.merge.snapshots = list(args.checkpoints), None
    if args.snapshots is not None:
        cfg.merge.snapshots, cfg.merge.checkpoints = args.snapshots, []
    if args.include is not None:
        cfg.merge.include = list(args.include)
    out = run_dir(args, cfg)
    if finished(args, out, cfg, "result.json", "rl.iterations"):
        return 0
    res = run_merge(cfg, out, **run_options(args))
    if not D.is_main():
        return 0
    rows = [(k, v) for k, v in res["baselines"].items()] + [("init", res["init"]), ("merged", res["merged"])]
    print_summary("merge", f"{out}: coefficients {out / 'coefficients.json'}, model {res['model']}, report "
                           f"{write_run_report(out)}", rows)
    return 0
