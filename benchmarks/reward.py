"""Cost and agreement of the subset-replace reward modes (METHOD.md §3; docs/reward.md).

For each feature dimension d, reference-set size N and group size k it prints, per scored unit (one candidate for
k = 1 with credit="sample", a group of k candidates with credit="group"): milliseconds of brute force ("exact",
with the cached Sigma_r^{1/2}; only a few units are timed, each is an eigendecomposition), of the fast exact mode
and of the linear mode; the per-state setup (M = R Sigma_g R, its eigh, P = V^T R: once per reference-set
change); the speedup of fast over brute force; the largest |fast - brute| relative to the largest |reward| on
the brute-forced units (and, as a check of the quadrature itself, against fast with half the step); and the Spearman correlation of linear with exact rewards over all units (exact = fast,
checked against brute force on the timed units).

Features are synthetic but shaped like real ones: real data is a mixture of 8 modes with a decaying spectrum
(lambda_j ~ j^-1.1, as Inception features); the generated reference set over-represents mode 0, misses mode 7
and is 20% less spread. Candidates mix the generated distribution, the over-represented and the missing mode.

    .venv/bin/python benchmarks/reward.py --threads 1            # the full table (d=2048, N=10k and 50k)
    .venv/bin/python benchmarks/reward.py --dims 256 --n 2000 --brute 2 --threads 1   # a quick run
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from scipy.stats import spearmanr

from distreward.reward import ReferenceSet
from distreward.utils.threads import set_threads

MODES = 8


def make_world(d: int, seed: int):
    """Mode centres, a shared eigenbasis and spectrum, and the mixture's exact (mu_r, Sigma_r)."""
    rng = np.random.default_rng(seed)
    spec = np.arange(1, d + 1, dtype=np.float64) ** -1.1
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    centers = (rng.standard_normal((MODES, d)) * np.sqrt(spec)) @ basis * 1.5
    mu_r = centers.mean(0)
    cc = centers - mu_r
    sigma_r = (basis.T * spec) @ basis + cc.T @ cc / MODES
    return rng, spec, basis, centers, mu_r, sigma_r


def draw(rng, spec, basis, centers, weights, n, spread=1.0, chunk=4096):
    """n rows of the mixture with mode weights `weights` (generated in chunks to bound memory)."""
    labels = rng.choice(MODES, size=n, p=np.asarray(weights) / np.sum(weights))
    out = np.empty((n, spec.size))
    for i in range(0, n, chunk):
        z = rng.standard_normal((min(chunk, n - i), spec.size)) * np.sqrt(spec * spread)
        out[i:i + chunk] = z @ basis + centers[labels[i:i + chunk]]
    return out


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_one(ref: ReferenceSet, cands: np.ndarray, k: int, n_brute: int) -> dict:
    credit = "sample" if k == 1 else "group"
    units = len(cands) // k
    groups = np.repeat(np.arange(units), k)
    ref._cache = None  # as after a push
    setup, _ = timed(lambda: ref.prepare("fast"))
    t_fast, fast = timed(lambda: ref.rewards(cands, groups, mode="fast", credit=credit), repeat=3)
    t_lin, lin = timed(lambda: ref.rewards(cands, groups, mode="linear", credit=credit), repeat=3)
    step = ref.quad_step
    ref.quad_step = step / 2
    fine = ref.rewards(cands, groups, mode="fast", credit=credit)
    ref.quad_step = step
    ref.fd()
    sub = cands[:n_brute * k]
    t_brute, brute = timed(lambda: ref.rewards(sub, groups[:n_brute * k], mode="exact", credit=credit))
    per_unit = lambda t, n: 1e3 * t / n  # noqa: E731
    fast_u, lin_u = fast[::k], lin[::k]
    return {
        "k": k, "units": units, "setup_s": setup,
        "brute_ms": per_unit(t_brute, n_brute), "fast_ms": per_unit(t_fast, units), "linear_ms": per_unit(t_lin, units),
        "speedup_fast_vs_brute": t_brute / n_brute / (t_fast / units),
        "fast_vs_brute_rel": float(np.abs(fast[:n_brute * k] - brute).max() / np.abs(brute).max()),
        "fast_step_rel": float(np.abs(fast - fine).max() / np.abs(fine).max()),
        "spearman_linear_exact": float(spearmanr(lin_u, fast_u).statistic) if units > 2 else float("nan"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[2048], help="feature dimensions d")
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 50_000], help="reference-set sizes N")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 8], help="group sizes (1: per-sample credit)")
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--brute", type=int, default=3, help="units timed by brute force (about 1 s each at d=2048)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts to run (e.g. 1 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if any(args.candidates % k for k in args.k):
        ap.error(f"--candidates {args.candidates} must be a multiple of every k in {args.k}")

    set_threads(args.threads[0])
    rows = []
    for d in args.dims:
        rng, spec, basis, centers, mu_r, sigma_r = make_world(d, args.seed)
        gen_w = np.r_[3.0, np.ones(MODES - 2), 0.0]
        cands = np.concatenate([draw(rng, spec, basis, centers, gen_w, args.candidates // 2, 0.8),
                                draw(rng, spec, basis, centers, np.eye(MODES)[0], args.candidates // 4, 0.8),
                                draw(rng, spec, basis, centers, np.eye(MODES)[-1], args.candidates // 4, 0.8)])
        cands = cands[rng.permutation(len(cands))]
        for n in args.n:
            t0 = time.perf_counter()
            ref = ReferenceSet(draw(rng, spec, basis, centers, gen_w, n, 0.8), mu_r, sigma_r)
            build = time.perf_counter() - t0
            for threads in args.threads:
                set_threads(threads)
                for k in args.k:
                    r = {"d": d, "N": n, "threads": threads, "fd": ref.fd(), "build_s": build,
                         **bench_one(ref, cands, k, args.brute)}
                    rows.append(r)
                    print(f"d={d} N={n} k={k} threads={threads}: setup {r['setup_s']:.2f} s | per unit: brute "
                          f"{r['brute_ms']:.0f} ms, fast {r['fast_ms']:.2f} ms, linear {r['linear_ms']:.3f} ms | "
                          f"fast/brute {r['speedup_fast_vs_brute']:.0f}x | |fast-brute| {r['fast_vs_brute_rel']:.1e} rel "
                          f"(fast at half step: {r['fast_step_rel']:.0e}) | Spearman(linear, exact) "
                          f"{r['spearman_linear_exact']:.4f}", file=sys.stderr if args.json else sys.stdout, flush=True)
            del ref
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
