"""Features -> numbers: Gaussian statistics, Frechet distance, KID, precision/recall, density/coverage.
float64 numpy only.

Evidence around an FD (`evidence`): bootstrap standard errors, paired differences, FD-infinity, per-class FD.
`merge_gaussian_stats` sums GaussianStats over torchrun ranks (metrics owns the all-reduce of its statistics).
"""

from .distributed import merge_gaussian_stats
from .evidence import (fd_bootstrap, fd_infinity, fd_infinity_fit, paired_difference, per_class_fd,
                       per_class_stats)
from .gaussian import (GaussianStats, frechet_distance, frechet_distance_sqrtm, sqrtm_psd,
                       trace_sqrt_cholesky, trace_sqrt_product)
from .kid import KIDReference, kid
from .prdc import density_coverage, knn_radii, precision_recall

__all__ = ["GaussianStats", "frechet_distance", "frechet_distance_sqrtm", "sqrtm_psd", "trace_sqrt_product",
           "trace_sqrt_cholesky", "kid", "KIDReference", "precision_recall", "density_coverage", "knn_radii",
           "merge_gaussian_stats",
           "fd_bootstrap", "paired_difference", "fd_infinity", "fd_infinity_fit", "per_class_fd", "per_class_stats"]
