"""`distreward finetune --config PRESET [key=value ...]`: GRPO fine-tuning (thin over distreward.rl.finetune)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="fmnist_grpo", help="preset name in configs/ or a YAML path (default: fmnist_grpo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rl.iterations=10 reward.name=classifier")
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from pathlib import Path

    from ..config import load_config
    from ..rl.grpo import finetune

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / str(cfg.get("name", Path(args.config).stem))
    res = finetune(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    final = res["final"] or {}
    figures = ", ".join(f"{k} {final[k]:.4g}" for k in ("fd_reward", "fd_eval", "precision", "recall") if k in final)
    print(f"finetune: {run_dir} (EMA model: {run_dir / 'model_ema.safetensors'}){'; ' + figures if figures else ''}")
    return 0
