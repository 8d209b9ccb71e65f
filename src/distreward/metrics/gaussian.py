"""Gaussian feature statistics and the Frechet distance (METHOD.md §2), in float64 numpy.

No torch modules here: features arrive as arrays (torch tensors are converted), sums are float64.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from ..utils.errors import reading
from ..utils.io import atomic_write_bytes
from .statfiles import read_reference_pkl


def as_f64_rows(features) -> np.ndarray:
    """Features (a numpy array or a torch tensor) as a finite float64 (N, d) array."""
    if hasattr(features, "detach"):
        features = features.detach().cpu().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf; check the images and the feature network")
    return x


class GaussianStats:
    """Streaming first and second moments: S1 = sum f, S2 = sum f f^T (float64).

    mu = S1/N, Sigma = (S2 - N mu mu^T)/(N-1). `merge` combines workers' stats (sums add exactly).
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"feature dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.n = 0
        self.s1 = np.zeros(self.dim, dtype=np.float64)
        self.s2 = np.zeros((self.dim, self.dim), dtype=np.float64)
        self._mu = self._sigma = None
        self._fixed = False   # True for statistics loaded from (mu, sigma) only: the sums are unknown

    @classmethod
    def from_features(cls, features) -> "GaussianStats":
        x = as_f64_rows(features)
        st = cls(x.shape[1])
        st.update(x)
        return st

    def update(self, features) -> "GaussianStats":
        x = as_f64_rows(features)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, these statistics {self.dim}")
        self.n += x.shape[0]
        self.s1 += x.sum(0)
        self.s2 += x.T @ x
        self._mu = self._sigma = None
        return self

    def merge(self, other: "GaussianStats") -> "GaussianStats":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        if not other.has_sums:
            raise ValueError("cannot merge statistics loaded from (mu, sigma) only: their sums are unknown")
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2
        self._mu = self._sigma = None
        return self

    @property
    def has_sums(self) -> bool:
        """Whether n, S1, S2 are known (False for statistics made from (mu, sigma) only, which cannot be merged)."""
        return not self._fixed

    @property
    def mu(self) -> np.ndarray:
        if self._mu is None:
            if self.n < 1:
                raise ValueError("no features accumulated")
            self._mu = self.s1 / self.n
        return self._mu

    @property
    def sigma(self) -> np.ndarray:
        if self._sigma is None:
            if self.n < 2:
                raise ValueError(f"need at least 2 features for a covariance, have {self.n}")
            mu = self.mu
            self._sigma = (self.s2 - self.n * np.outer(mu, mu)) / (self.n - 1)
        return self._sigma

    def fd(self, other: "GaussianStats") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: str | os.PathLike) -> Path:
        """.npz with 'mu' and 'sigma' (pytorch-fid / ADM format) plus 'n' and the sums when known."""
        extra = {} if not self.has_sums else {"s1": self.s1, "s2": self.s2}
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), **extra)
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def from_mu_sigma(cls, mu, sigma, n: int = 0) -> "GaussianStats":
        mu = np.asarray(mu, dtype=np.float64).reshape(-1)
        sigma = np.asarray(sigma, dtype=np.float64)
        if sigma.shape != (mu.size, mu.size):
            raise ValueError(f"sigma has shape {sigma.shape}, expected ({mu.size}, {mu.size}) to match mu")
        st = cls(mu.size)
        st.n = int(n)
        st._mu, st._sigma = mu, sigma
        st._fixed = True
        return st

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GaussianStats":
        """Reads our .npz, pytorch-fid/ADM .npz (mu, sigma) and EDM2 .pkl reference files ({'fid': {mu, sigma}})."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics {path} not found; make them with 'distreward stats DATA --features F -o {path.name}'")
        if path.suffix == ".pkl":
            return cls.from_mu_sigma(*read_reference_pkl(path))
        fix = f"make them with 'distreward stats DATA --features F -o {path.name}' (or give a .npz with 'mu' and 'sigma')"
        with reading(path, "statistics .npz", fix), np.load(path, allow_pickle=False) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {z.files}; {fix}")
            if "s1" in z.files and "s2" in z.files and "n" in z.files:
                st = cls(z["s1"].size)
                st.n, st.s1, st.s2 = int(z["n"]), z["s1"].astype(np.float64), z["s2"].astype(np.float64)
                if st.s2.shape != (st.dim, st.dim):
                    raise ValueError(f"{path}: s2 has shape {st.s2.shape}, expected ({st.dim}, {st.dim}); {fix}")
                return st
            return cls.from_mu_sigma(z["mu"], z["sigma"], int(z["n"]) if "n" in z.files else 0)


def sqrtm_psd(sigma: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Symmetric square root of a PSD matrix by eigh (negative eigenvalues from round-off clipped to 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, eps, None))) @ v.T


def trace_sqrt_product(sigma_r_half: np.ndarray, sigma_g: np.ndarray) -> float:
    """tr sqrt(Sigma_r^{1/2} Sigma_g Sigma_r^{1/2}) from the eigenvalues of the symmetric product."""
    m = sigma_r_half @ sigma_g @ sigma_r_half
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def trace_sqrt_cholesky(sigma_r: np.ndarray, sigma_g: np.ndarray) -> float:
    """The same trace from a Cholesky factor L of Sigma_r (eigvalsh of L^T Sigma_g L); eigen route if singular."""
    try:
        chol = np.linalg.cholesky(sigma_r)
    except np.linalg.LinAlgError:
        return trace_sqrt_product(sqrtm_psd(sigma_r), sigma_g)
    m = chol.T @ sigma_g @ chol
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, *, sigma2_half: np.ndarray | None = None) -> float:
    """FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S2^{1/2} S1 S2^{1/2}), clamped at 0.

    With `sigma2_half` (a cached Sigma_2^{1/2}) one eigvalsh is all it costs; otherwise a Cholesky factor of
    Sigma_2 is used (eigen route when Sigma_2 is singular). Never complex, never NaN.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).reshape(-1), np.asarray(mu2, np.float64).reshape(-1)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.size} vs {mu2.size} (computed with different feature networks?)")
    d = mu1.size
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}); got {sigma1.shape} and {sigma2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all() and np.isfinite(mu1).all() and np.isfinite(mu2).all()):
        raise ValueError("statistics contain NaN or inf")
    diff = mu1 - mu2
    if sigma2_half is not None:
        tr_sqrt = trace_sqrt_product(sigma2_half, sigma1)
    else:
        tr_sqrt = trace_sqrt_cholesky(sigma2, sigma1)
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt)
    return max(fd, 0.0)


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The scipy.linalg.sqrtm formula of pytorch-fid / EDM2, kept as the reference for tests and benchmarks."""
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
