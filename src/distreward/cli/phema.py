"""`distreward phema --snapshots DIR --std 0.08 [--std ...] -o out.safetensors`: post-hoc EMA reconstruction.

Combines the power-function EMA snapshots written by `train-base` (EDM2's least-squares solve) into the EMA of any
length (std = sigma_rel), at the latest snapshot step or at --step. `--list` shows the snapshots; `--grid PNG`
draws a sample grid for each reconstructed std (one row per std, shared noise).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from distreward.models import build_network
from distreward.report import save_image_grid
from distreward.sampling.generate import balanced_labels, sample_images
from distreward.train.ema import MAX_SIGMA_REL
from distreward.train.phema import list_snapshots, phema_coefficients, reconstruct, save_phema
from distreward.utils.errors import OptionError
from distreward.utils.progress import phase

from . import count, print_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshots", required=True, help="folder of snapshots (a train-base run dir or its snapshots/)")
    p.add_argument("--std", type=ema_std, action="append", default=[],
                   help=f"target EMA std (sigma_rel, in (0, {MAX_SIGMA_REL})); repeatable")
    p.add_argument("--step", type=count(0), default=None, help="reconstruct at this training step (default: latest snapshot)")
    p.add_argument("--method", choices=["continuous", "discrete"], default="continuous",
                   help="profile inner products: EDM2's closed form (default) or the exact per-step weights")
    p.add_argument("-o", "--out", default=None,
                   help="output .safetensors (with several --std: X-<std>.safetensors each, or a path containing "
                        "{std}); any other path is a folder of phema-<std>.safetensors files")
    p.add_argument("--list", action="store_true", help="list the snapshots and exit")
    p.add_argument("--grid", default=None, help="also write a sample grid PNG (rows: the stds, columns: classes)")
    p.add_argument("--grid-n", type=count(), default=20, help="images per std in the grid (default 20)")
    p.add_argument("--steps", type=count(), default=32, help="ODE steps for the grid (default 32)")
    p.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


def ema_std(text: str) -> float:
    """An argparse type: a power-function EMA std, in (0, MAX_SIGMA_REL) (wider profiles have no gamma > 0)."""
    try:
        std = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < std < MAX_SIGMA_REL:
        raise argparse.ArgumentTypeError(f"must lie in (0, {MAX_SIGMA_REL}) (wider profiles are not power functions), "
                                         f"got {std}")
    return std


def _out_path(out: str, std: float, several: bool) -> Path:
    """-o for one std: a path containing {std} is formatted; with several stds, x.safetensors becomes
    x-<std>.safetensors (one file each) and any other path is a folder of phema-<std>.safetensors files."""
    if "{std" in out:
        return Path(out.format(std=std))
    p = Path(out)
    if p.suffix == ".safetensors" and not p.is_dir():
        return p.with_name(f"{p.stem}-{std:.3f}.safetensors") if several else p
    return p / f"phema-{std:.3f}.safetensors"


def run(args) -> int:
    snaps = list_snapshots(args.snapshots)
    if args.list:
        print(f"{'file':<40} {'std':>6} {'step':>8} {'kimg':>9}")
        for s in snaps:
            print(f"{s.name:<40} {s.std:>6.3f} {s.step:>8d} {s.kimg:>9.2f}")
        print(f"{len(snaps)} snapshots, profiles {sorted({s.std for s in snaps})}, steps {snaps[0].step}..{snaps[-1].step}")
        return 0
    if not args.std:
        raise OptionError("give at least one --std (e.g. --std 0.08), or --list to see the snapshots")
    if not args.out and not args.grid:
        raise OptionError("nothing to write: give -o OUT.safetensors and/or --grid GRID.png")
    outs = []
    for std in args.std:
        used, x = phema_coefficients(snaps, std, args.step, args.method)
        phase(f"std {std:.3f}: {len(used)} snapshots, coefficients in [{x.min():+.3f}, {x.max():+.3f}]")
        if args.out:
            path = save_phema(_out_path(args.out, std, len(args.std) > 1), snaps, std, args.step, args.method)
            outs.append(str(path))
    grid = _grid(args, snaps) if args.grid else None
    print_summary("phema", ", ".join(outs + ([f"{grid} (rows: std {', '.join(f'{s:.3f}' for s in args.std)})"] if grid else [])))
    return 0


def _grid(args, snaps) -> Path:
    rows = []
    for std in args.std:
        sd, info = reconstruct(snaps, std, args.step, args.method)
        net = build_network(info["arch"], info["kwargs"])
        net.load_state_dict(sd, strict=True)
        net = net.eval().to(args.device)
        labels = balanced_labels(args.grid_n, int(info["kwargs"].get("num_classes", 0)))
        rows.append(sample_images(net, info["arch"], labels, args.grid_n, steps=args.steps, method=args.sampler,
                                  seed=args.seed, device=args.device))
    return save_image_grid(torch.cat(rows), args.grid, nrow=args.grid_n)
