"""GaussianStats across ranks: every rank's float64 sums added by an all-reduce (torchrun; a copy in one process).

Uses only the generic collectives of `distreward.utils.dist`, so utils never depends on metrics.
"""

from __future__ import annotations

import numpy as np
import torch

from ..utils.dist import all_reduce_max_, all_reduce_sum_, is_distributed
from .gaussian import GaussianStats


def merge_gaussian_stats(stats: GaussianStats) -> GaussianStats:
    """Global GaussianStats: every rank's n, S1, S2 summed in float64 (a new object; the input is unchanged)."""
    if not stats.has_sums:
        raise ValueError("cannot merge statistics loaded from (mu, sigma) only: their sums are unknown; "
                         "accumulate features with GaussianStats.update on every rank")
    d = stats.dim
    if is_distributed():
        dims = torch.tensor([d, -d], dtype=torch.int64)
        dist_dims = all_reduce_max_(dims)
        if int(dist_dims[0]) != d or int(-dist_dims[1]) != d:
            raise ValueError(f"ranks hold statistics of different dimensions ({int(-dist_dims[1])}..{int(dist_dims[0])})")
    flat = torch.from_numpy(np.concatenate([[float(stats.n)], stats.s1, stats.s2.reshape(-1)]).astype(np.float64))
    all_reduce_sum_(flat)
    out = GaussianStats(d)
    arr = flat.numpy()
    out.n = int(round(arr[0]))
    out.s1 = arr[1:1 + d].copy()
    out.s2 = arr[1 + d:].reshape(d, d).copy()
    return out
