"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel.

Computed on random subsets (drawn without replacement within each subset) and reported as the mean and standard
deviation over subsets, as in the KID paper and its common implementations. float64 numpy.
"""

from __future__ import annotations

import numpy as np

from .gaussian import as_f64_rows


def polynomial_kernel(a: np.ndarray, b: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (x.y / d + coef0)^degree."""
    base = a @ b.T
    base /= a.shape[1]
    base += coef0
    if degree == 3:
        return base * base * base  # numpy has no fast path for ** 3
    return base ** degree


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2: off-diagonal means of k(x, x') and k(y, y') minus twice the mean of k(x, y)."""
    m, n = kxx.shape[0], kyy.shape[0]
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def kid(feat_a, feat_b, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `num_subsets` random subsets of size min(max_subset_size, N_a, N_b).

    Unscaled; report it x1e3 as is customary (the evaluator does). Can be slightly negative for equal distributions.
    """
    a, b = as_f64_rows(feat_a), as_f64_rows(feat_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"KID: features of different dimensions {a.shape[1]} and {b.shape[1]} (different feature networks?)")
    m = min(a.shape[0], b.shape[0], int(max_subset_size))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {a.shape[0]} and {b.shape[0]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        values[i] = mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    return float(values.mean()), float(values.std())
