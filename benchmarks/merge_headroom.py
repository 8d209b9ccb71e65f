"""How much room a richer merging space holds (per-noise-level switching, per-block mixing of anchor models),
measured before a searcher is pointed at it: the command line of `distreward.merge.headroom` (what it evaluates and
how is said there). Anchors: the first input, the last input and the uniform soup of `--checkpoints`, or three
post-hoc EMA lengths of `--snapshots`; every ordered pair switched at each `--edges`; every assignment of the two
best anchors to the three block groups; `--n` samples each with Heun at `--steps`, paired against the best anchor;
the best variant on the validation seed then beside the best anchor on the report seed: the number to quote.

    .venv/bin/python benchmarks/merge_headroom.py --threads 1 --checkpoints weights/fmnist-base.safetensors \\
        R/checkpoints/ema_00005.safetensors ... R/model_ema.safetensors
    .venv/bin/python benchmarks/merge_headroom.py --threads 1 --snapshots weights/fmnist-base-snapshots
"""

from __future__ import annotations

import argparse
import json
import time

from distreward.evaluation import Evaluator
from distreward.merge.headroom import anchors, headroom
from distreward.utils.threads import set_threads


class Printer:
    """One line per row as it is ready; the report seed's rows after a line that says what they are."""

    def __init__(self, args):
        self.args, self.stage = args, "validation"

    def __call__(self, stage: str, name: str, r: dict) -> None:
        if stage != self.stage:
            self.stage = stage
            print(f"report seed {self.args.report_seed}: the best anchor, then the best variant on the validation "
                  f"seed {self.args.seed}:", flush=True)
        diffs = "  ".join(f"{k[:-5]} {r[k][0]:+.4f} ± {r[k][1]:.4f}" for k in r if k.endswith("_diff"))
        print(f"{name:34s} fd_reward {r['fd_reward']:.3f}  fd_eval {r['fd_eval']:.4f}  {diffs}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", nargs="+", help="generator files in training order (anchors: first, last, uniform)")
    src.add_argument("--snapshots", help="a folder of power-EMA snapshots (anchors: the post-hoc EMA lengths --ema)")
    p.add_argument("--ema", type=float, nargs=3, default=[0.05, 0.10, 0.20], help="three post-hoc EMA lengths")
    p.add_argument("--edges", type=float, nargs="+", default=[0.3, 0.6], help="noise levels sigma to switch at")
    p.add_argument("--n", type=int, default=500, help="samples per model")
    p.add_argument("--steps", type=int, default=16, help="Heun steps: the converged solver")
    p.add_argument("--seed", type=int, default=1234, help="validation seed (chooses the variant)")
    p.add_argument("--report-seed", type=int, default=4321, help="fresh seed for the chosen variant")
    p.add_argument("--resamples", type=int, default=200, help="bootstrap resamples of the paired differences")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    set_threads(args.threads)
    t_start = time.perf_counter()
    ckpts, anchor_w = anchors(checkpoints=args.checkpoints, snapshots=args.snapshots, ema=args.ema)
    result = headroom(ckpts, anchor_w, Evaluator.for_fmnist(per_class=False), n=args.n, steps=args.steps,
                      edges=args.edges, seed=args.seed, report_seed=args.report_seed, resamples=args.resamples,
                      on_row=Printer(args))
    result["minutes"] = (time.perf_counter() - t_start) / 60
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
