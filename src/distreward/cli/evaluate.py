"""`distreward evaluate IMAGES --ref DATA`: FD on both feature networks, KID, precision and recall, density and
coverage.

    distreward evaluate fmnist-test --ref fmnist-train
    distreward evaluate samples.npz --ref fmnist-train --json runs/eval/metrics.json
    distreward evaluate samples/ --ref runs/stats/reward.npz runs/stats/eval.npz     # statistics only: FD only
    distreward evaluate fmnist-test --ref fmnist-train --perturb blur                 # sanity check

--ref is reference images (fmnist-train, fmnist-test, an .npz of uint8 images, an image folder) or one or more
statistics .npz files (from `distreward stats`, or pytorch-fid style mu/sigma). With statistics only, FD is
computed for the networks they match and KID / precision / recall / density / coverage (which need real
features) are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from distreward.data import check_images, load_images
from distreward.evaluation import Evaluator, fit_images, perturb_images, sample_rows
from distreward.features import get_feature_network
from distreward.metrics import GaussianStats
from distreward.utils.cache import cache_root
from distreward.utils.errors import InputFileError, OptionError, reading
from distreward.utils.io import atomic_save_json
from distreward.utils.progress import phase

from . import count, print_summary

STATS_FIX = "give statistics from 'distreward stats DATA --features F -o X.npz', or reference images"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", metavar="IMAGES", help="fmnist-train | fmnist-test | images.npz | image folder")
    p.add_argument("--ref", nargs="+", default=["fmnist-train"], metavar="DATA|STATS",
                   help="reference images (as IMAGES) or statistics .npz file(s) (default: fmnist-train)")
    p.add_argument("--features", nargs="+", default=["fmnist-reward", "fmnist-eval"],
                   help="feature networks, the reward's first and the held-out one last (names or .safetensors paths)")
    p.add_argument("--max-images", type=count(), default=None, help="evaluate a seeded random subset of N images")
    p.add_argument("--max-ref", type=count(), default=None, help="use a seeded random subset of N reference images")
    p.add_argument("--max-real", type=count(), default=10000,
                   help="reference features kept for KID, precision/recall and density/coverage")
    p.add_argument("--k", type=count(), default=3, help="nearest neighbour for precision/recall")
    p.add_argument("--kid-subsets", type=count(), default=100, help="KID subsets (of up to 1000 samples each)")
    p.add_argument("--perturb", choices=("blur", "noise"), default=None, help="degrade the images first (sanity check)")
    p.add_argument("--strength", type=float, default=None, help="blur sigma in pixels (default 1.0) or noise std (default 0.2)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the reference-feature cache")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the metrics as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=count(), default=500)
    p.add_argument("--device", default="cpu")


def _is_stats_file(spec: str) -> bool:
    p = Path(spec)
    if p.suffix != ".npz":
        return False
    if not p.is_file():
        raise FileNotFoundError(f"--ref {spec}: no such file; check the path, or make statistics with "
                                "'distreward stats DATA --features F -o X.npz'")
    with reading(p, "statistics or image .npz", STATS_FIX), np.load(p, allow_pickle=False) as z:
        return "mu" in z.files and "sigma" in z.files


def match_stats(paths: list[str], labels: list[str], dims: list[int]) -> dict:
    """Statistics files -> {network label: GaussianStats}, by the network name stored in the file, else by dimension."""
    out = {}
    for path in paths:
        st = GaussianStats.load(path)
        with reading(path, "statistics .npz", STATS_FIX), np.load(path, allow_pickle=False) as z:
            named = str(z["features"]) if "features" in z.files else None
        if named is not None and named in labels:
            label = named
        else:
            same_dim = [lab for lab, d in zip(labels, dims) if d == st.dim]
            if len(same_dim) != 1:
                raise InputFileError(f"{path}: {st.dim}-d statistics{f' of {named!r}' if named else ''} match "
                                 f"{'none' if not same_dim else 'several'} of the feature networks {dict(zip(labels, dims))}; "
                                 "make them with 'distreward stats DATA --features NAME' for one of these networks")
            label = same_dim[0]
        if label in out:
            raise OptionError(f"two statistics files for the feature network {label!r}")
        if st.dim != dims[labels.index(label)]:
            raise InputFileError(f"{path}: statistics of dimension {st.dim} but {label} gives {dims[labels.index(label)]}-d features")
        out[label] = st
    return out


def run(args) -> int:
    nets = [get_feature_network(f, device=args.device) for f in args.features]
    input_shape = getattr(nets[0], "input_shape", None)
    stats_refs = [r for r in args.ref if _is_stats_file(r)]
    if stats_refs and len(stats_refs) != len(args.ref):
        raise OptionError("--ref takes either reference images (one DATA) or statistics .npz files, not both")
    if not stats_refs and len(args.ref) != 1:
        raise OptionError(f"--ref takes one reference image set, got {len(args.ref)}: {args.ref}")

    ref_images, ref_stats = None, None
    if stats_refs:
        ref_stats = match_stats(stats_refs, list(args.features), [n.dim for n in nets])
        print(f"reference: statistics for {', '.join(ref_stats)}; KID, precision/recall and density/coverage need "
              "reference images (e.g. --ref fmnist-train) and are skipped")
    else:
        ref_images, _ = load_images(args.ref[0])
        keep = sample_rows(ref_images.shape[0], args.max_ref, args.seed)
        if keep is not None:
            ref_images = ref_images[keep]
        ref_images = fit_images(check_images(ref_images, name=args.ref[0]), input_shape, name=args.ref[0])

    images, _ = load_images(args.images)
    keep = sample_rows(images.shape[0], args.max_images, args.seed + 1)
    if keep is not None:
        images = images[keep]
    images = fit_images(check_images(images, name=args.images), input_shape, name=args.images)
    if args.perturb:
        images = perturb_images(images, args.perturb, args.strength, seed=args.seed)

    ev = Evaluator(ref_images, feature_nets=nets, device=args.device, k=args.k, max_real=args.max_real,
                   cache_dir=None if args.no_cache else cache_root(), ref_stats=ref_stats,
                   batch_size=args.batch_size, progress=not args.no_progress, seed=args.seed, kid_subsets=args.kid_subsets, labels=[str(f) for f in args.features])
    phase(f"evaluate: features and metrics of {images.shape[0]} images from {args.images}")
    metrics = ev.evaluate(images)
    metrics = {**metrics, "images": args.images, "ref": args.ref, "features": list(ev.labels), "perturb": args.perturb,
               "strength": args.strength, "kid_scale": 1e3, "k": args.k, "seed": args.seed,
               "max_images": args.max_images, "max_ref": args.max_ref, "max_real": args.max_real,
               "kid_subsets": args.kid_subsets}
    if args.json:
        atomic_save_json(args.json, metrics)
    row = {**{f"fd {label}": v for label, v in metrics["fd"].items()}, "kid_x1e3": metrics["kid"],
           "kid_x1e3_err": metrics["kid_std"], **{k: metrics.get(k) for k in ("precision", "recall", "density", "coverage")}}
    head = f"{args.images} ({metrics['n']} images) against {' '.join(args.ref)}" + (f"; metrics in {args.json}" if args.json else "")
    print_summary("evaluate", head, [("metrics", row)], keys=[k for k in row if not k.endswith("_err")])
    return 0
