"""The first variation of the Frechet distance: how FD(set, real) moves when one member's features move.

FD = |mu - mu_r|^2 + tr Sigma + tr Sigma_r - 2 tr (R Sigma R)^{1/2}, R = Sigma_r^{1/2}, over a set of N rows with
mu = mean and Sigma = the unbiased covariance (N - 1). Its differential is dFD = 2 (mu - mu_r).dmu + tr(G dSigma)
with G = I - R (R Sigma R)^{-1/2} R (from d tr M^{1/2} = tr(M^{-1/2} dM) / 2). Moving member i by df moves
mu by df / N and Sigma by ((f_i - mu) df^T + df (f_i - mu)^T) / (N - 1) (the other rows' deviations sum to
-(f_i - mu) and cancel the mean's move), so

    dFD / df_i = (2 / N) (mu - mu_r) + (2 / (N - 1)) G (f_i - mu),

exact for the first order (the form (2 / N) [(mu - mu_r) + G (f_i - mu)] differs by O(1 / N^2)). The pathwise
trainer (distreward.rl.pathwise) back-propagates it through the feature network and the sampler.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fd_covariance_gradient", "fd_first_variation"]


# G = I - R (R Sigma R)^{-1/2} R: the gradient of FD w.r.t. Sigma (eigenvalues of R Sigma R floored at
# eps x the largest, so a rank-deficient Sigma gives a finite G).
def fd_covariance_gradient(sigma: np.ndarray, real_sigma_half: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    r = np.asarray(real_sigma_half, np.float64)
    m = r @ np.asarray(sigma, np.float64) @ r
    w, v = np.linalg.eigh((m + m.T) / 2)
    w = np.clip(w, max(float(w.max()), 0.0) * eps + np.finfo(np.float64).tiny, None)
    g = np.eye(r.shape[0]) - r @ ((v / np.sqrt(w)) @ v.T) @ r
    return (g + g.T) / 2


# dFD/df_i = (2 / N) (mu - mu_r) + (2 / (N - 1)) G (f_i - mu), one row per member f_i of a set of n rows with
# statistics (mu, sigma); G from fd_covariance_gradient.
def fd_first_variation(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray, real_mu: np.ndarray,
                       real_sigma_half: np.ndarray, n: int, eps: float = 1e-12) -> np.ndarray:
    f = np.asarray(features, np.float64)
    mu, real_mu = np.asarray(mu, np.float64).reshape(-1), np.asarray(real_mu, np.float64).reshape(-1)
    if f.ndim != 2 or f.shape[1] != mu.size or real_mu.size != mu.size:
        raise ValueError(f"fd_first_variation: features {f.shape}, mu {mu.shape} and real mu {real_mu.shape} must "
                         "share the feature dimension; compute all of them with the same feature network")
    if int(n) < 2:
        raise ValueError(f"fd_first_variation: a set of n = {n} rows has no covariance; pass n >= 2")
    g = fd_covariance_gradient(sigma, real_sigma_half, eps)
    return 2.0 / n * (mu - real_mu)[None, :] + 2.0 / (n - 1) * (f - mu[None, :]) @ g
