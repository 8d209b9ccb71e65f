"""Published reference statistics (real-data mu, Sigma) read safely.

- EDM2 .pkl (`calculate_metrics.py ref`): {'num_images': N, 'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}}
  with numpy arrays; read by `distreward.utils.safe_pickle.safe_load`, which rebuilds numpy arrays and nothing
  else (no code in the file runs).
- ADM / pytorch-fid / EDM .npz: arrays 'mu', 'sigma' (ADM's reference batches also hold 'mu_s', 'sigma_s' for
  spatial features and the images 'arr_0'; those are ignored); our own .npz (with the sums) too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .gaussian import GaussianStats

METRICS = ("fid", "fd_dinov2")


def _stats_from_arrays(mu, sigma, n: int, where: str) -> GaussianStats:
    mu = np.asarray(mu, dtype=np.float64).reshape(-1)
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{where}: sigma has shape {sigma.shape}, expected ({mu.size}, {mu.size}) to match mu")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{where}: mu or sigma contains NaN or inf; the reference file is damaged")
    return GaussianStats.from_mu_sigma(mu, sigma, n)


def load_reference_pkl(path: str | os.PathLike, metric: str = "fid") -> GaussianStats:
    """GaussianStats (mu, sigma) of `metric` ('fid' or 'fd_dinov2') from an EDM2 reference .pkl, read safely."""
    from ..utils.safe_pickle import safe_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found (EDM2 references: "
                                "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/)")
    data = safe_load(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an EDM2 reference dict {{'fid': {{'mu', 'sigma'}}, ...}}, "
                         f"got {type(data).__name__}")
    stats = {k: v for k, v in data.items() if isinstance(v, dict) and "mu" in v and "sigma" in v}
    if metric not in stats:
        raise ValueError(f"{path}: no statistics for metric {metric!r}; the file has {sorted(stats) or 'none'} "
                         f"(use metric= one of those)")
    n = data.get("num_images", 0)
    n = int(n) if isinstance(n, (int, np.integer)) else 0
    return _stats_from_arrays(stats[metric]["mu"], stats[metric]["sigma"], n, f"{path} [{metric}]")


def load_reference(path: str | os.PathLike, metric: str = "fid") -> GaussianStats:
    """Reference statistics from an EDM2 .pkl (`metric` selects 'fid' or 'fd_dinov2') or a .npz with 'mu', 'sigma'.

    A .npz holds one feature space; an ADM batch (it has 'mu_s') is Inception, so only metric='fid' is accepted.
    """
    path = Path(path)
    if path.suffix == ".pkl":
        return load_reference_pkl(path, metric)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: unknown reference format; expected an EDM2 .pkl or a .npz with 'mu' and 'sigma'")
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found; make them with "
                                f"'distreward stats DATA --features F -o {path.name}'")
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
    if metric != "fid" and "mu_s" in files:
        raise ValueError(f"{path} is an ADM reference batch (Inception features); it has no {metric!r} statistics. "
                         "Use metric='fid', or an EDM2 .pkl for fd_dinov2")
    return GaussianStats.load(path)
