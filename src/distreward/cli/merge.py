"""`distreward merge --config PRESET (--checkpoints A B ... | --snapshots DIR)`: RL over merging coefficients.

Under torchrun (`torchrun --nproc_per_node=W --no-python distreward merge ...`) every rank runs the same command;
sampling is split over the ranks and only rank 0 writes and prints (docs/scale.md, "Merging under torchrun").
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="fmnist_merge_ema", help="preset in configs/ or a YAML path (default: fmnist_merge_ema)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoints", nargs="+", default=None, metavar="FILE",
                     help="K generator .safetensors files in training order (overrides merge.checkpoints)")
    src.add_argument("--snapshots", default=None, metavar="DIR", help="a folder of EMA snapshots (overrides merge.snapshots)")
    p.add_argument("--include", nargs="+", default=None, metavar="FILE",
                   help="extra files appended to the inputs, e.g. the base model next to GRPO checkpoints")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rl.iterations=10 rl.candidates=8")
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="build everything from the preset's dry_run block (random checkpoints, tiny networks) and run one iteration")


def run(args) -> int:
    from pathlib import Path

    from ..config import load_config
    from ..merge import run_merge
    from ..utils import dist as D

    if args.dry_run:
        from ..rl.scale import load_dry_run_config

        cfg = load_dry_run_config(args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.checkpoints is not None:
        cfg.merge.checkpoints, cfg.merge.snapshots = list(args.checkpoints), None
    if args.snapshots is not None:
        cfg.merge.snapshots, cfg.merge.checkpoints = args.snapshots, []
    if args.include is not None:
        cfg.merge.include = list(args.include)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / str(cfg.get("name", Path(args.config).stem))
    device = D.init_distributed(cfg.get("device", "cpu"))   # joins torchrun's group; one process: the device as given
    parts = {}
    if args.dry_run or _is_preset(cfg):
        from ..rl.scale import merge_parts

        parts = merge_parts(cfg, run_dir, str(device))
    res = run_merge(cfg, run_dir, resume=args.resume, progress=not args.no_progress, **parts)
    if not D.is_main():
        return 0
    rows = [(k, v) for k, v in res["baselines"].items()] + [("init", res["init"]), ("merged", res["merged"])]
    for name, m in rows:
        figures = ", ".join(f"{k} {m[k]:.4g}" for k in ("fd_reward", "fd_eval", "precision", "recall")
                            if m.get(k) is not None)
        print(f"  {name:>14}: {figures}")
    print(f"merge: coefficients {run_dir / 'coefficients.json'}, model {res['model']}")
    return 0


def _is_preset(cfg) -> bool:
    """A paper preset (latent model, EDM2 pickles or EDM's schedule): its parts come from distreward.rl.scale."""
    merge, model, sampler = cfg.get("merge") or {}, cfg.get("model") or {}, cfg.get("sampler") or {}
    return (merge.get("format") == "edm2-pkl" or model.get("vae") is not None or sampler.get("schedule") == "edm"
            or bool(merge.get("random_checkpoints")))
