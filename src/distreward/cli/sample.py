"""`distreward sample --model M.safetensors -n 64 --steps 32 --sampler euler|heun -o grid.png | images.npz`.

Draws class-balanced images (labels 0, 1, ..., K-1, 0, ...) from a generator file with a deterministic ODE sampler.
A .png output is a grid; a .npz holds uint8 `images` (N, H, W, C) and `labels`, the format `evaluate` reads.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch

from distreward.data import to_uint8_images
from distreward.models import load_generator
from distreward.report import save_image_grid
from distreward.sampling.generate import balanced_labels, sample_images
from distreward.utils.errors import OptionError
from distreward.utils.io import atomic_write_bytes

from . import count, print_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="generator .safetensors (train-base / phema output)")
    p.add_argument("-n", "--num", type=count(), default=64, help="number of images (default 64)")
    p.add_argument("--steps", type=count(), default=32, help="ODE steps (default 32)")
    p.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    p.add_argument("--shift", type=float, default=1.0, help="SD3 time shift of the sigma schedule (1 = uniform)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--class", dest="class_label", type=int, default=None, help="draw only this class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=count(), default=256)
    p.add_argument("--nrow", type=count(), default=None, help="images per grid row (default: the number of classes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--out", required=True, help="output .png (grid) or .npz (uint8 images + labels)")


def run(args) -> int:
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise OptionError(f"output {out} must end in .png (a grid) or .npz (images and labels)")
    net = load_generator(args.model, args.device)
    arch = net.generator_meta["arch"]
    num_classes = int(net.generator_meta["kwargs"].get("num_classes", getattr(net, "num_classes", 0)) or 0)
    labels = balanced_labels(args.num, num_classes)
    if args.class_label is not None:
        if not 0 <= args.class_label < num_classes:
            raise OptionError(f"--class {args.class_label} is outside [0, {num_classes - 1}] for this network")
        labels = torch.full((args.num,), args.class_label, dtype=torch.long)
    x = sample_images(net, arch, labels, args.num, steps=args.steps, method=args.sampler, shift=args.shift,
                      cfg_scale=args.cfg, seed=args.seed, batch_size=args.batch_size, device=args.device,
                      progress=not args.no_progress)
    if out.suffix == ".png":
        save_image_grid(x, out, nrow=args.nrow or (num_classes if num_classes and args.class_label is None else None))
    else:
        buf = io.BytesIO()
        u8 = to_uint8_images(x).permute(0, 2, 3, 1).numpy()
        np.savez(buf, images=u8, labels=(labels if labels is not None else torch.full((args.num,), -1)).numpy())
        atomic_write_bytes(out, buf.getvalue())
    print_summary("sample", f"{out}: {args.num} images, {args.steps} {args.sampler} steps, cfg {args.cfg}")
    return 0
