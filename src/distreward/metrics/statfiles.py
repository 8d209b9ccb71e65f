"""Readers of published reference-statistics files, as plain float64 arrays (no GaussianStats here).

`gaussian.GaussianStats.load` and `reference.load_reference*` build statistics objects from these arrays; this
module imports neither of them, so the dependency goes one way (statfiles <- gaussian <- reference).

- EDM2 .pkl (`calculate_metrics.py ref`): {'num_images': N, 'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}}
  with numpy arrays; read by `distreward.utils.safe_pickle.safe_load`, which rebuilds numpy arrays and nothing
  else (no code in the file runs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..utils.errors import InputFileError, reading
from ..utils.safe_pickle import safe_load


def check_mu_sigma(mu, sigma, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as float64 (d,) and (d, d), finite; errors name `where`."""
    mu = np.asarray(mu, dtype=np.float64).reshape(-1)
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.shape != (mu.size, mu.size):
        raise InputFileError(f"{where}: sigma has shape {sigma.shape}, expected ({mu.size}, {mu.size}) to match mu")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputFileError(f"{where}: mu or sigma contains NaN or inf; the reference file is damaged")
    return mu, sigma


def read_reference_pkl(path: str | os.PathLike, metric: str = "fid") -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, num_images) of `metric` ('fid' or 'fd_dinov2') from an EDM2 reference .pkl, read safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found (EDM2 references: "
                                "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/)")
    with reading(path, "EDM2 reference .pkl", "give an EDM2 reference .pkl (calculate_metrics.py ref) or a .npz "
                 "with 'mu' and 'sigma' ('distreward stats')"):
        data = safe_load(path)
    if not isinstance(data, dict):
        raise InputFileError(f"{path}: expected an EDM2 reference dict {{'fid': {{'mu', 'sigma'}}, ...}}, "
                         f"got {type(data).__name__}")
    stats = {k: v for k, v in data.items() if isinstance(v, dict) and "mu" in v and "sigma" in v}
    if metric not in stats:
        raise InputFileError(f"{path}: no statistics for metric {metric!r}; the file has {sorted(stats) or 'none'} "
                         f"(use metric= one of those)")
    n = data.get("num_images", 0)
    n = int(n) if isinstance(n, (int, np.integer)) else 0
    mu, sigma = check_mu_sigma(stats[metric]["mu"], stats[metric]["sigma"], f"{path} [{metric}]")
    return mu, sigma, n
