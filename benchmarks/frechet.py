"""Frechet distance: the scipy.linalg.sqrtm formula (pytorch-fid, EDM2) against ours (METHOD.md §2).

    .venv/bin/python benchmarks/frechet.py                  # d = 2048 and 512, one thread, median of 3 runs
    .venv/bin/python benchmarks/frechet.py --dims 512 --repeats 5 --threads 2 --json runs/bench/frechet.json

Covariances are realistic: a power-law decaying spectrum (as feature covariances have) in a random basis, and a
second covariance with a partly rotated basis and a perturbed spectrum. Timed: `sqrtm` (scipy reference),
`ours` (frechet_distance: Cholesky route) and `ours_cached` (frechet_distance with a cached Sigma_2^{1/2}, as the
reward and evaluator use it). Prints the median time of each, the speed-ups and the largest relative difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def decaying_covariance(d: int, rng: np.random.Generator, alpha: float = 1.2, basis: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sigma = Q diag(lambda) Q^T with lambda_i = i^-alpha (times a log-normal jitter); returns (Sigma, Q)."""
    if basis is None:
        basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.arange(1, d + 1, dtype=np.float64) ** -alpha * np.exp(0.3 * rng.standard_normal(d))
    return (basis * lam) @ basis.T, basis


def covariance_pair(d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mu1, sigma1, mu2, sigma2): the generated side and the reference side, related but different."""
    rng = np.random.default_rng(seed)
    sigma2, q = decaying_covariance(d, rng)
    q1, _ = np.linalg.qr(q + 0.3 / np.sqrt(d) * rng.standard_normal((d, d)))
    sigma1, _ = decaying_covariance(d, rng, alpha=1.1, basis=q1)
    mu2 = rng.standard_normal(d) * 0.1
    mu1 = mu2 + rng.standard_normal(d) * 0.02
    return mu1, sigma1, mu2, sigma2


def median_time(fn, repeats: int) -> tuple[float, float]:
    """(median seconds, value of the last call)."""
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), value


def bench_dim(d: int, repeats: int, seed: int = 0) -> dict:
    from distreward.metrics import frechet_distance, frechet_distance_sqrtm, sqrtm_psd

    mu1, s1, mu2, s2 = covariance_pair(d, seed)
    half = sqrtm_psd(s2)
    t_ref, fd_ref = median_time(lambda: frechet_distance_sqrtm(mu1, s1, mu2, s2), repeats)
    t_ours, fd_ours = median_time(lambda: frechet_distance(mu1, s1, mu2, s2), repeats)
    t_cached, fd_cached = median_time(lambda: frechet_distance(mu1, s1, mu2, s2, sigma2_half=half), repeats)
    t_half, _ = median_time(lambda: sqrtm_psd(s2), repeats)
    rel = max(abs(fd_ours - fd_ref), abs(fd_cached - fd_ref)) / abs(fd_ref)
    return {"d": d, "repeats": repeats, "fd_sqrtm": fd_ref, "fd_ours": fd_ours, "fd_ours_cached": fd_cached,
            "seconds_sqrtm": t_ref, "seconds_ours": t_ours, "seconds_ours_cached": t_cached,
            "seconds_sigma2_half_once": t_half,
            "speedup_ours": t_ref / t_ours, "speedup_ours_cached": t_ref / t_cached, "max_rel_diff": rel}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2048, 512])
    p.add_argument("--repeats", type=int, default=3, help="runs per timing; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (one is often fastest on small machines)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the results as JSON")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from distreward.utils.threads import set_threads

    set_threads(args.threads)
    rows = []
    print(f"{'d':>5} {'sqrtm s':>9} {'ours s':>9} {'cached s':>9} {'x ours':>7} {'x cached':>9} {'max rel diff':>13}")
    for d in args.dims:
        r = bench_dim(d, args.repeats, args.seed)
        rows.append(r)
        print(f"{d:>5} {r['seconds_sqrtm']:>9.3f} {r['seconds_ours']:>9.3f} {r['seconds_ours_cached']:>9.3f} "
              f"{r['speedup_ours']:>7.1f} {r['speedup_ours_cached']:>9.1f} {r['max_rel_diff']:>13.2e}", flush=True)
    print(f"(median of {args.repeats} runs, {args.threads} thread(s); 'cached' reuses Sigma_2^(1/2), computed once)")
    if args.json:
        from distreward.utils.io import atomic_save_json

        atomic_save_json(args.json, {"threads": args.threads, "results": rows})
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
