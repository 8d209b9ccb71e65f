"""`distreward demo [--config PRESET] [--compare]`: the main job on Fashion-MNIST (thin over distreward.demo.run_demo)."""

from __future__ import annotations

import argparse

from ..demo import DISTRIBUTION_PRESET, run_demo
from . import new_output, print_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DISTRIBUTION_PRESET, metavar="PRESET",
                   help=f"the distribution-wise fine-tuning preset, a name in configs/ or a YAML file (default: "
                        f"{DISTRIBUTION_PRESET}; e.g. fmnist_pathwise for the pathwise trainer)")
    p.add_argument("--compare", action="store_true", help="also run the sample-wise baseline on the same budget")
    p.add_argument("--run-dir", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--fresh", action="store_true", help="recompute every stage instead of reusing finished ones")
    p.add_argument("--eval-cache", default="auto", metavar="DIR",
                   help="folder of the evaluation cache shared by demos (base, cross-check and merge-baseline "
                        "evaluations; default: <cache folder>/evals, beside the real-feature cache; --cache-dir)")
    p.add_argument("--no-eval-cache", action="store_true", help="evaluate every model afresh, without the cache")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the fine-tuning preset (both runs), anywhere among the options, e.g. "
                        "model.path=my-base.safetensors rl.iterations=10")


def run(args) -> int:
    metrics = run_demo(new_output(args.run_dir), preset=args.config, compare=args.compare, overrides=args.overrides,
                       fresh=args.fresh, progress=not args.no_progress,
                       eval_cache=None if args.no_eval_cache else args.eval_cache)
    rows = {k: v for k, v in metrics.items() if isinstance(v, dict) and "fd_reward" in v}
    cross = metrics.get("crosscheck")
    extra = [(f"{k} @{cross['steps']}", v) for k, v in (cross or {}).get("models", {}).items()]
    for sname in ("converged", "training_free"):
        entry = metrics.get(sname)
        extra += [(f"{k} {entry['method']} {entry['steps']}", v) for k, v in (entry or {}).get("models", {}).items()]
    print_summary("demo", f"{args.run_dir}: report {args.run_dir}/report.md", list(rows.items()) + extra)
    return 0
