"""`distreward finetune --config PRESET [key=value ...]`: GRPO fine-tuning (thin over distreward.rl.finetune)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="fmnist_grpo", help="preset name in configs/ or a YAML path (default: fmnist_grpo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rl.iterations=10 reward.name=classifier")
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="build everything from the preset's dry_run block (tiny random networks) and run one iteration")


def run(args) -> int:
    from pathlib import Path

    from ..config import load_config
    from ..rl.grpo import finetune

    if args.dry_run:
        from ..rl.scale import load_dry_run_config

        cfg = load_dry_run_config(args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / str(cfg.get("name", Path(args.config).stem))
    res = finetune(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    from ..utils.dist import is_main

    if not is_main():
        return 0
    final = res["final"] or {}
    figures = ", ".join(f"{k} {final[k]:.4g}" for k in ("fd_reward", "fd_eval", "precision", "recall")
                        if final.get(k) is not None)
    print(f"finetune: {run_dir} (EMA model: {run_dir / 'model_ema.safetensors'}){'; ' + figures if figures else ''}")
    return 0
