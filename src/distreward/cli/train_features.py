"""`distreward train-features`: train the Fashion-MNIST feature networks and write them with their metadata.

    distreward train-features --which both --out weights/          # retrain the shipped files
    distreward train-features --which eval --epochs 1 --out runs/feat/eval.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distreward.features.fmnist import ROLES, save_classifier, train_feature_network
from distreward.utils.errors import OptionError
from distreward.utils.io import atomic_save_json

from . import count, print_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--which", choices=("reward", "eval", "both"), default="both",
                   help="which network: fmnist-reward (used by the reward), fmnist-eval (held out), or both")
    p.add_argument("--epochs", type=count(), default=None, help="epochs (default: 5 for reward, 6 for eval)")
    p.add_argument("--out", default="runs/train-features",
                   help="output folder (files <out>/fmnist-<which>.safetensors) or, with one network, a .safetensors path; "
                        "use --out weights/ to replace the shipped files")
    p.add_argument("--seed", type=int, default=None, help="seed (default: 0 for reward, 1 for eval)")
    p.add_argument("--batch-size", type=count(), default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-train", type=count(), default=None, help="train on the first N training images only (quick checks)")
    p.add_argument("--device", default="cpu")


def _out_path(out: str, name: str, single: bool) -> Path:
    p = Path(out)
    if p.suffix == ".safetensors":
        if not single:
            raise OptionError(f"--out {out} is a file but --which both writes two networks; give a folder instead")
        return p
    return p / f"{name}.safetensors"


def run(args) -> int:
    roles = ["reward", "eval"] if args.which == "both" else [args.which]
    summary = {}
    for role in roles:
        spec = ROLES[role]
        seed = spec["seed"] if args.seed is None else args.seed
        epochs = spec["epochs"] if args.epochs is None else args.epochs
        path = _out_path(args.out, spec["name"], single=len(roles) == 1)
        net, info = train_feature_network(spec["arch"], seed, epochs, kwargs=spec["kwargs"], batch_size=args.batch_size,
                                          lr=args.lr, max_train=args.max_train, device=args.device,
                                          progress=not args.no_progress)
        info = {"name": spec["name"], "dim": net.dim, **info}
        save_classifier(path, net.cpu(), spec["arch"], spec["kwargs"], info)
        summary[spec["name"]] = {"path": str(path), **info}
        print_summary("train-features", f"{path}: {spec['name']}, {spec['arch']} d={net.dim}, test accuracy "
                      f"{info['test_accuracy']:.4f} ({info['train_seconds']:.0f} s)")
    out = Path(args.out)
    if out.suffix != ".safetensors" and out.resolve() != Path("weights").resolve():
        atomic_save_json(out / "train-features.json", summary)
    return 0
