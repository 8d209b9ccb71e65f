"""Published reference statistics (real-data mu, Sigma) read safely, as GaussianStats.

- EDM2 .pkl (`calculate_metrics.py ref`): {'num_images': N, 'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}}
  with numpy arrays; read by `distreward.utils.safe_pickle.safe_load`, which rebuilds numpy arrays and nothing
  else (no code in the file runs). The file reading itself is `statfiles.read_reference_pkl`.
- ADM / pytorch-fid / EDM .npz: arrays 'mu', 'sigma' (ADM's reference batches also hold 'mu_s', 'sigma_s' for
  spatial features and the images 'arr_0'; those are ignored); our own .npz (with the sums) too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..utils.errors import InputFileError, reading
from .gaussian import GaussianStats
from .statfiles import read_reference_pkl

METRICS = ("fid", "fd_dinov2")


def load_reference_pkl(path: str | os.PathLike, metric: str = "fid") -> GaussianStats:
    """GaussianStats (mu, sigma) of `metric` ('fid' or 'fd_dinov2') from an EDM2 reference .pkl, read safely."""
    return GaussianStats.from_mu_sigma(*read_reference_pkl(path, metric))


def load_reference(path: str | os.PathLike, metric: str = "fid") -> GaussianStats:
    """Reference statistics from an EDM2 .pkl (`metric` selects 'fid' or 'fd_dinov2') or a .npz with 'mu', 'sigma'.

    A .npz holds one feature space; an ADM batch (it has 'mu_s') is Inception, so only metric='fid' is accepted.
    """
    path = Path(path)
    if path.suffix == ".pkl":
        return load_reference_pkl(path, metric)
    if path.suffix != ".npz":
        raise InputFileError(f"{path}: unknown reference format; expected an EDM2 .pkl or a .npz with 'mu' and 'sigma'")
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found; make them with "
                                f"'distreward stats DATA --features F -o {path.name}'")
    with reading(path, "statistics .npz", f"make them with 'distreward stats DATA --features F -o {path.name}'"), \
            np.load(path, allow_pickle=False) as z:
        files = set(z.files)
    if metric != "fid" and "mu_s" in files:
        raise InputFileError(f"{path} is an ADM reference batch (Inception features); it has no {metric!r} statistics. "
                         "Use metric='fid', or an EDM2 .pkl for fd_dinov2")
    return GaussianStats.load(path)
