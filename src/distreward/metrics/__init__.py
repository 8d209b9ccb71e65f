"""Features -> numbers: Gaussian statistics, Frechet distance, KID, precision/recall. float64 numpy only."""

from .gaussian import (GaussianStats, frechet_distance, frechet_distance_sqrtm, sqrtm_psd,
                       trace_sqrt_cholesky, trace_sqrt_product)
from .kid import kid
from .prdc import precision_recall

__all__ = ["GaussianStats", "frechet_distance", "frechet_distance_sqrtm", "sqrtm_psd", "trace_sqrt_product", "trace_sqrt_cholesky", "kid", "precision_recall"]
