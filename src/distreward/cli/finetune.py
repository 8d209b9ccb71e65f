"""`distreward finetune --config PRESET [key=value ...]`: RL fine-tuning, GRPO or the forward-process trainer by
rl.algorithm (thin over distreward.rl.finetune)."""

from __future__ import annotations

import argparse

from ..rl import finetune
from ..utils.dist import is_main
from .run_args import add_run_arguments, run_config, run_dir, run_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "fmnist_grpo", "rl.iterations=10 reward.name=classifier", "tiny random networks")


def run(args) -> int:
    cfg = run_config(args, command="finetune")
    out = run_dir(args, cfg)
    res = finetune(cfg, out, **run_options(args))
    if not is_main():
        return 0
    final = res["final"] or {}
    figures = ", ".join(f"{k} {final[k]:.4g}"
                        for k in ("fd_reward", "fd_eval", "precision", "recall", "density", "coverage")
                        if final.get(k) is not None)
    print(f"finetune: {out} (EMA model: {out / 'model_ema.safetensors'}){'; ' + figures if figures else ''}")
    return 0
