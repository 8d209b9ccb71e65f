"""`distreward stats DATA --features F -o ref.npz`: reference statistics (mu, sigma) of a dataset or image folder.

DATA is fmnist-train, fmnist-test, an .npz of uint8 images, or an image folder. The .npz holds `mu` and `sigma`
(the pytorch-fid / ADM format) plus `n`, the sums `s1`, `s2`, and the feature network's name under `features`.
Without -o the file is runs/stats/<DATA>-<features>-<N>.npz: keyed by the number of images N, so a run on a subset
(--max-images) or on a grown folder never overwrites statistics of another size.
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import numpy as np

from distreward.data import check_images, load_images
from distreward.evaluation import fit_images, sample_rows
from distreward.features import compute_features, get_feature_network
from distreward.metrics import GaussianStats
from distreward.utils.errors import InputFileError, OptionError
from distreward.utils.io import atomic_write_bytes

from . import count, print_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="fmnist-train | fmnist-test | images.npz | image folder")
    p.add_argument("--features", default="fmnist-reward", help="feature network: a registry name or a .safetensors path")
    p.add_argument("-o", "--out", default=None,
                   help="output .npz (default: runs/stats/<DATA>-<features>-<N>.npz, N the number of images used, so "
                        "statistics of another number of images never replace these)")
    p.add_argument("--max-images", type=count(2), default=None, help="use a seeded random subset of N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=count(), default=500)
    p.add_argument("--device", default="cpu")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(s.rstrip("/")).stem or s)


def save_stats_npz(path, stats, features: str) -> Path:
    """Atomic .npz of the statistics with the feature network's name, so `evaluate` can match them."""
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), s1=stats.s1, s2=stats.s2, features=np.array(features))
    return atomic_write_bytes(path, buf.getvalue())


def run(args) -> int:
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix != ".npz":
        raise OptionError(f"-o {out}: statistics are written as .npz; give a path ending in .npz")
    net = get_feature_network(args.features, device=args.device)
    images, _ = load_images(args.data)
    keep = sample_rows(images.shape[0], args.max_images, args.seed)
    if keep is not None:
        images = images[keep]
    images = fit_images(check_images(images, name=args.data), getattr(net, "input_shape", None), name=args.data)
    if images.shape[0] < 2:
        raise InputFileError(f"{args.data}: need at least 2 images for a covariance, got {images.shape[0]}")
    out = out or Path("runs/stats") / f"{_slug(args.data)}-{_slug(args.features)}-{images.shape[0]}.npz"
    feats = compute_features(net, images, batch_size=args.batch_size, progress=not args.no_progress, desc=f"features ({args.features})")
    stats = GaussianStats.from_features(feats)
    save_stats_npz(out, stats, str(args.features))
    print_summary("stats", f"{out}: {args.data}, {stats.n} images, {args.features} d={stats.dim}")
    return 0
