"""`distreward finetune --config PRESET [key=value ...]`: RL fine-tuning with the trainer that
rl.algorithm names (grpo, nft, pool, pathwise) (thin over distreward.rl.finetune)."""

from __future__ import annotations

import argparse

from ..rl import finetune
from ..runreport import write_run_report
from ..utils.dist import is_main
from ..utils.progress import phase
from . import print_summary
from .run_args import add_run_arguments, finished, run_config, run_dir, run_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "fmnist_grpo", "rl.iterations=10 reward.name=classifier", "tiny random networks")


def run(args) -> int:
    cfg = run_config(args, command="finetune")
    out = run_dir(args, cfg)
    if finished(args, out, cfg, "result.json", "rl.iterations"):
        return 0
    phase(f"finetune: {cfg.name} -> {out} ({cfg.rl.get('algorithm', 'grpo')}, {cfg.rl.iterations} iterations, "
          f"reward {cfg.reward.name}){' resumed' if args.resume else ''}")
    res = finetune(cfg, out, **run_options(args))
    if not is_main():
        return 0
    print_summary("finetune", f"{out}: EMA model {out / 'model_ema.safetensors'}, report {write_run_report(out)}",
                  [("final", res["final"] or {})])
    return 0
