"""Seconds per pretraining step of `distreward train-base`, eager against `train.compile: true`, in one process.

Runs the preset's real training loop (its data, network, AdamW, power EMA) for `--steps` steps per variant in
throw-away run directories, in the order eager, compiled, eager, so drift in the machine's load shows as a gap
between the two eager runs. A step's time is `sec_per_step` from metrics.jsonl (logged every 10 steps); the first
10 steps of each run are left out (the compiled run compiles there), and the compile's cost is reported apart.

    .venv/bin/python benchmarks/train_step.py --threads 2 --steps 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from distreward.utils.threads import set_threads


def timed_run(preset: str, steps: int, compile_net: bool, run_dir: Path) -> dict:
    """One short train-base run; its per-step times after the first 10 steps, and the first 10 steps' mean."""
    from distreward.config import load_config
    from distreward.train import train_base

    cfg = load_config(preset, [f"train.compile={str(compile_net).lower()}", "log_kimg=1.28", "tensorboard=false",
                               "ema.export_std=null", "checkpoint_kimg=1000", "ema.snapshot_kimg=1000"])
    batch = int(cfg.train.batch)
    cfg.train.total_kimg = steps * batch / 1000
    train_base(cfg, run_dir, progress=False)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["sec_per_step"] for r in recs if "sec_per_step" in r]
    return {"first10": times[0], "steady": times[1:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="fmnist_base", help="train-base preset (default: fmnist_base)")
    p.add_argument("--steps", type=int, default=60, help="steps per run, a multiple of 10 (default: 60)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.steps < 20 or args.steps % 10:
        p.error("--steps must be a multiple of 10, at least 20")
    set_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        runs = [(name, timed_run(args.config, args.steps, compile_net, Path(tmp) / name.replace(" ", "_")))
                for name, compile_net in (("eager", False), ("compiled", True), ("eager again", False))]
    print(f"{args.config}, {args.steps} steps per run, {args.threads} thread(s); s / step after the first 10 steps")
    for name, r in runs:
        s = r["steady"]
        print(f"{name:>12}: {statistics.mean(s):.3f} (min {min(s):.3f}, max {max(s):.3f}); first 10 steps "
              f"{r['first10']:.2f} s / step")
    eager = statistics.mean(runs[0][1]["steady"] + runs[2][1]["steady"])
    comp = statistics.mean(runs[1][1]["steady"])
    compile_cost = 10 * (runs[1][1]["first10"] - runs[0][1]["first10"])
    print(f"compiled / eager speed: {eager / comp:.2f}x; compiling costs about {compile_cost:.0f} s, repaid after "
          f"{compile_cost / max(eager - comp, 1e-9):.0f} steps")


if __name__ == "__main__":
    main()
