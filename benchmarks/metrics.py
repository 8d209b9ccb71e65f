"""Set metrics against a fixed real set, as the evaluator scores one generated set after another: KID and
precision/recall with the real side computed for every set (the one-call functions) against the real side kept
(`KIDReference`, `real_radii=`).

    .venv/bin/python benchmarks/metrics.py --threads 1
    .venv/bin/python benchmarks/metrics.py --threads 2 --real 10000 --fake 1000 500 --dim 128

Features are Gaussian (the metrics' cost does not depend on their values): `--real` rows, `--dim` dimensions (the
held-out Fashion-MNIST network's 128 by default), each generated size of `--fake`. Timed, median of --repeats sets:
`kid` (the one-call function: the real side's subsets and k(x, x') terms computed again), `kept` (a KIDReference
scoring a new set after its first), and precision/recall with and without the kept real radii. Prints seconds,
the speed-ups and the largest difference of the values. (Before KIDReference, KID built three kernel matrices per
subset: 3.8 s for 1,000 generated against 10,000 real rows at 128 dims, two BLAS threads.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="BLAS and torch threads (default 1)")
    p.add_argument("--real", type=int, default=10000, help="real rows (the evaluator keeps 10,000)")
    p.add_argument("--fake", type=int, nargs="+", default=[1000, 500], help="generated set sizes")
    p.add_argument("--dim", type=int, default=128, help="feature dimensions")
    p.add_argument("--subsets", type=int, default=100, help="KID subsets")
    p.add_argument("--repeats", type=int, default=3, help="sets per measurement (median)")
    args = p.parse_args()
    from distreward.utils.threads import set_threads

    set_threads(args.threads)
    from distreward.metrics import KIDReference, kid, knn_radii, precision_recall

    rng = np.random.default_rng(0)
    real = rng.standard_normal((args.real, args.dim))
    print(f"{args.real} real rows x {args.dim} dims, {args.subsets} KID subsets, {args.threads} thread(s), "
          f"load {os.getloadavg()[0]:.1f}, median of {args.repeats} sets")
    for n in args.fake:
        sets = iter([rng.standard_normal((n, args.dim)) + 0.05 * i for i in range(4 * args.repeats + 2)])
        t_kid, _ = timed(lambda: kid(real, next(sets), num_subsets=args.subsets), args.repeats)
        ref = KIDReference(real, args.subsets)
        fake = next(sets)
        t_first, v_ref = timed(lambda: ref(fake), 1)
        t_kept, _ = timed(lambda: ref(next(sets)), args.repeats)
        diff = max(abs(a - b) for a, b in zip(v_ref, kid(real, fake, num_subsets=args.subsets)))
        t_pr, _ = timed(lambda: precision_recall(real, next(sets), k=3), args.repeats)
        radii = knn_radii(real, 3)
        t_pr_kept, _ = timed(lambda: precision_recall(real, next(sets), k=3, real_radii=radii), args.repeats)
        print(f"n = {n}: KID kid() {t_kid:.2f} s, kept reference {t_kept:.3f} s (first set {t_first:.2f} s): "
              f"{t_kid / t_kept:.0f}x; max |value difference| {diff:.1e}")
        print(f"        precision/recall {t_pr:.2f} s, with kept real radii {t_pr_kept:.2f} s: {t_pr / t_pr_kept:.1f}x")


if __name__ == "__main__":
    main()
