"""Improved precision and recall (Kynkaanniemi et al. 2019) and density and coverage (Naeem et al. 2020) from
k-nearest-neighbour balls in feature space.

Each set's manifold is the union of balls centred at its samples with radius the distance to the k-th nearest
other sample of the same set. Precision: the fraction of fake samples inside the real manifold (fidelity).
Recall: the fraction of real samples inside the fake manifold (coverage). Density and coverage use the real balls
only: density counts how many real balls hold each fake sample (fidelity), coverage is the fraction of real balls
that hold at least one fake sample (diversity). float64, distances in row chunks.
"""

from __future__ import annotations

import numpy as np

from .gaussian import as_f64_rows


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def pairwise_sq_dists(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray | None = None, b_sq: np.ndarray | None = None) -> np.ndarray:
    """|a_i - b_j|^2 = |a_i|^2 + |b_j|^2 - 2 a_i.b_j, clipped at 0 against round-off."""
    a_sq = _sq_norms(a) if a_sq is None else a_sq
    b_sq = _sq_norms(b) if b_sq is None else b_sq
    return np.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T), 0.0)


def knn_radii(x: np.ndarray, k: int = 3, batch: int = 1000) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row (itself excluded)."""
    if x.shape[0] <= k:
        raise ValueError(f"k-NN radii need more than k={k} samples, got {x.shape[0]}")
    sq = _sq_norms(x)
    out = np.empty(x.shape[0])
    for i in range(0, x.shape[0], batch):
        d = pairwise_sq_dists(x[i:i + batch], x, sq[i:i + batch], sq)
        d[np.arange(d.shape[0]), np.arange(i, i + d.shape[0])] = np.inf
        out[i:i + batch] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return out


def manifold_coverage(centres: np.ndarray, radii: np.ndarray, queries: np.ndarray, batch: int = 1000) -> float:
    """Fraction of `queries` that lie in at least one ball (centre, radius) (radii squared)."""
    c_sq, q_sq = _sq_norms(centres), _sq_norms(queries)
    inside = np.zeros(queries.shape[0], dtype=bool)
    for i in range(0, queries.shape[0], batch):
        d = pairwise_sq_dists(queries[i:i + batch], centres, q_sq[i:i + batch], c_sq)
        inside[i:i + batch] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real, fake, k: int = 3, batch: int = 1000, real_radii: np.ndarray | None = None) -> dict[str, float]:
    """{'precision', 'recall'} of `fake` features against `real` features (both (N, d)), k-NN radii with k=3.
    `real_radii`: knn_radii(real, k), when the caller keeps them between generated sets."""
    r, f = as_f64_rows(real), as_f64_rows(fake)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"precision/recall: features of different dimensions {r.shape[1]} and {f.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    precision = manifold_coverage(r, knn_radii(r, k, batch) if real_radii is None else real_radii, f, batch)
    recall = manifold_coverage(f, knn_radii(f, k, batch), r, batch)
    return {"precision": precision, "recall": recall}


def real_ball_hits(real: np.ndarray, radii: np.ndarray, fake: np.ndarray,
                   batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Per fake row, how many real balls (centre, squared radius) contain it; per real ball, whether any fake does."""
    r_sq, f_sq = _sq_norms(real), _sq_norms(fake)
    counts = np.zeros(fake.shape[0], dtype=np.int64)
    hit = np.zeros(real.shape[0], dtype=bool)
    for i in range(0, fake.shape[0], batch):
        inside = pairwise_sq_dists(fake[i:i + batch], real, f_sq[i:i + batch], r_sq) <= radii[None, :]
        counts[i:i + batch] = inside.sum(axis=1)
        hit |= inside.any(axis=0)
    return counts, hit


# density (Naeem et al. 2020): 1/(k M) sum_j sum_i 1[fake_j in B(real_i, NND_k(real_i))]
def density(counts: np.ndarray, k: int) -> float:
    """Mean number of real balls around a fake sample, over k (about 1 for matching sets; can exceed 1)."""
    return float(counts.sum()) / (k * counts.size)


# coverage (Naeem et al. 2020): 1/N sum_i 1[some fake_j in B(real_i, NND_k(real_i))]
def coverage(hit: np.ndarray) -> float:
    """Fraction of real balls that contain at least one fake sample."""
    return float(hit.mean())


def density_coverage(real, fake, k: int = 5, batch: int = 1000, real_radii: np.ndarray | None = None) -> dict[str, float]:
    """{'density', 'coverage'} of `fake` features against `real` features (both (N, d)), real k-NN radii with k=5
    (`real_radii`: knn_radii(real, k), when the caller keeps them)."""
    r, f = as_f64_rows(real), as_f64_rows(fake)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"density/coverage: features of different dimensions {r.shape[1]} and {f.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if r.shape[0] <= k:
        raise ValueError(f"density/coverage need more than k={k} real samples, got {r.shape[0]}")
    if f.shape[0] == 0:
        raise ValueError("density/coverage: no fake samples")
    counts, hit = real_ball_hits(r, knn_radii(r, k, batch) if real_radii is None else real_radii, f, batch)
    return {"density": density(counts, k), "coverage": coverage(hit)}
