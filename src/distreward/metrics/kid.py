"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel.

Computed on random subsets (drawn without replacement within each subset) and reported as the mean and standard
deviation over subsets, as in the KID paper and its common implementations. float64 numpy.

`KIDReference` keeps the real side: the subsets of a draw and their k(x, x') terms depend on the real features
only, so an evaluator that scores many generated sets computes them once. When each subset takes the whole
generated set (its size <= the subset size, e.g. 1,000 samples against 10,000 real rows), the k(y, y') term is the
same for every subset and k(x, y) is a mean of per-real-row means: two kernel matrices per generated set instead of
three per subset. Same estimator, same subsets; the sums differ only in float64 rounding order.
"""

from __future__ import annotations

import numpy as np

from .gaussian import as_f64_rows

ROW_BLOCK = 2000   # real rows per block of the real x generated kernel


def polynomial_kernel(a: np.ndarray, b: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (x.y / d + coef0)^degree."""
    base = a @ b.T
    base /= a.shape[1]
    base += coef0
    if degree == 3:
        return base * base * base  # numpy has no fast path for ** 3
    return base ** degree


def offdiag_mean(k: np.ndarray) -> float:
    """Mean of a square kernel matrix without its diagonal: the unbiased within-set term of MMD^2."""
    m = k.shape[0]
    return float((k.sum() - np.trace(k)) / (m * (m - 1)))


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2: off-diagonal means of k(x, x') and k(y, y') minus twice the mean of k(x, y)."""
    return offdiag_mean(kxx) + offdiag_mean(kyy) - 2.0 * float(kxy.mean())


def subset_size(n_real: int, n_fake: int, max_subset_size: int) -> int:
    m = min(n_real, n_fake, int(max_subset_size))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {n_real} and {n_fake}")
    return m


class KIDReference:
    """KID of generated feature sets against one real feature set, with the real side's work kept between calls."""

    def __init__(self, real, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0):
        if num_subsets < 1:
            raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
        self.real = as_f64_rows(real)
        self.num_subsets, self.max_subset_size, self.seed = int(num_subsets), int(max_subset_size), int(seed)
        self._draws: dict[tuple[int, int], tuple[list, list, np.ndarray]] = {}

    def draws(self, n_fake: int) -> tuple[list, list, np.ndarray]:
        """(real subsets, generated subsets, their k(x, x') terms) for generated sets of n_fake rows: the subsets
        are drawn as kid() always drew them (real then generated, subset after subset, from `seed`)."""
        m = subset_size(self.real.shape[0], n_fake, self.max_subset_size)
        key = (n_fake, m)
        if key not in self._draws:
            rng = np.random.default_rng(self.seed)
            xs, ys = [], []
            for _ in range(self.num_subsets):
                xs.append(rng.choice(self.real.shape[0], m, replace=False))
                ys.append(rng.choice(n_fake, m, replace=False))
            xx = np.array([offdiag_mean(polynomial_kernel(self.real[i], self.real[i])) for i in xs])
            self._draws[key] = (xs, ys, xx)
        return self._draws[key]

    def __call__(self, fake) -> tuple[float, float]:
        """(mean, std) of the unbiased MMD^2 over the subsets."""
        y_all = as_f64_rows(fake)
        if y_all.shape[1] != self.real.shape[1]:
            raise ValueError(f"KID: features of different dimensions {self.real.shape[1]} and {y_all.shape[1]} "
                             "(different feature networks?)")
        xs, ys, xx = self.draws(y_all.shape[0])
        if ys[0].size == y_all.shape[0]:    # every subset is the whole generated set, permuted
            yy = offdiag_mean(polynomial_kernel(y_all, y_all))
            used = np.unique(np.concatenate(xs))
            row_mean = np.zeros(self.real.shape[0])
            for i in range(0, used.size, ROW_BLOCK):
                rows = used[i:i + ROW_BLOCK]
                row_mean[rows] = polynomial_kernel(self.real[rows], y_all).mean(axis=1)
            values = np.array([xx[s] + yy - 2.0 * row_mean[x].mean() for s, x in enumerate(xs)])
        else:
            values = np.empty(len(xs))
            for s, (x, y) in enumerate(zip(xs, ys)):
                fx, fy = self.real[x], y_all[y]
                values[s] = xx[s] + offdiag_mean(polynomial_kernel(fy, fy)) - 2.0 * float(polynomial_kernel(fx, fy).mean())
        return float(values.mean()), float(values.std())


def kid(feat_a, feat_b, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `num_subsets` random subsets of size min(max_subset_size, N_a, N_b).

    Unscaled; report it x1e3 as is customary (the evaluator does). Can be slightly negative for equal distributions.
    """
    return KIDReference(feat_a, num_subsets, max_subset_size, seed)(feat_b)
