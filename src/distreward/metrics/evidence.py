"""Evidence around an FD: its bootstrap standard error, paired differences, FD-infinity, per-class FD (float64 numpy).

The real side is a fixed GaussianStats (every model is compared with the same real statistics, made from far
more images than a generated set); the uncertainty that matters is that of the finite generated set, so every
resampling here is over the generated rows only.

One route for all of them: the generated rows are centred once and multiplied by Sigma_r^{1/2} (the eigen route
of `gaussian.trace_sqrt_product`); a resample or a subset is then a vector of row weights w (counts, or 0/1), and
its FD needs one weighted Gram matrix (d x d) and one `eigvalsh`:

    mu_w = w.X / n_w,  tr Sigma_w = (w.|x|^2 - n_w |mu_w|^2) / (n_w - 1),
    Sigma_r^{1/2} Sigma_w Sigma_r^{1/2} = (Y^T diag(w) Y - n_w m_w m_w^T) / (n_w - 1),   Y = X Sigma_r^{1/2}.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from .gaussian import GaussianStats, as_f64_rows, frechet_distance, sqrtm_psd

DEFAULT_RESAMPLES = 50


def real_mu_sigma(real) -> tuple[np.ndarray, np.ndarray]:
    """(mu, Sigma) of the real side: a GaussianStats (or anything with .mu, .sigma) or a (mu, sigma) pair."""
    if hasattr(real, "mu") and hasattr(real, "sigma"):
        return np.asarray(real.mu, np.float64), np.asarray(real.sigma, np.float64)
    mu, sigma = real
    return np.asarray(mu, np.float64).reshape(-1), np.asarray(sigma, np.float64)


class WeightedFD:
    """FD of row-weighted versions of one generated feature set against fixed real statistics (see module doc)."""

    def __init__(self, features, real, sigma_half: np.ndarray | None = None):
        x = as_f64_rows(features)
        mu_r, sigma_r = real_mu_sigma(real)
        if x.shape[1] != mu_r.size:
            raise ValueError(f"features of dimension {x.shape[1]}, real statistics {mu_r.size} (another feature network?)")
        centre = x.mean(0)                  # FD is shift invariant: centring both sides keeps the sums well conditioned
        self.x = x - centre
        self.mu_r = mu_r - centre
        half = sqrtm_psd(sigma_r) if sigma_half is None else np.asarray(sigma_half, np.float64)
        self.y = self.x @ half
        self.x_sq = np.einsum("ij,ij->i", self.x, self.x)
        self.tr_r = float(np.trace(sigma_r))
        self.n, self.dim = x.shape

    def fd(self, w: np.ndarray) -> float:
        """FD of the set in which row i counts w[i] times (w >= 0, sum >= 2)."""
        w = np.asarray(w, np.float64)
        nw = float(w.sum())
        if nw < 2:
            raise ValueError(f"a weighted set needs a total weight >= 2, got {nw}")
        mu = w @ self.x / nw
        tr_g = (w @ self.x_sq - nw * (mu @ mu)) / (nw - 1)
        m = w @ self.y / nw
        keep = w > 0
        z = self.y[keep] * np.sqrt(w[keep])[:, None]
        prod = (z.T @ z - nw * np.outer(m, m)) / (nw - 1)     # Sigma_r^1/2 Sigma_w Sigma_r^1/2
        ev = np.linalg.eigvalsh((prod + prod.T) / 2)
        diff = mu - self.mu_r
        return max(float(diff @ diff + tr_g + self.tr_r - 2.0 * np.sqrt(np.clip(ev, 0, None)).sum()), 0.0)


def fd_of(features, real, sigma_half: np.ndarray | None = None) -> float:
    """The plain FD of a feature set against real statistics (the evaluator's number, same route)."""
    g = GaussianStats.from_features(features)
    mu_r, sigma_r = real_mu_sigma(real)
    return frechet_distance(g.mu, g.sigma, mu_r, sigma_r, sigma2_half=sigma_half)


# ------------------------------------------------------------------------------------------ bootstrap

def bootstrap_counts(n: int, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """`n_boot` resamples of n rows with replacement, as per-row counts (one (n,) int array each), from `seed`.
    Two calls with the same (n, n_boot, seed) give the same resamples: that pairs two models' bootstraps."""
    if n_boot < 2:
        raise ValueError(f"a bootstrap needs n_boot >= 2 resamples, got {n_boot}")
    rng = np.random.default_rng(seed)
    for _ in range(int(n_boot)):
        yield np.bincount(rng.integers(0, n, n), minlength=n)


def bootstrap_fds(features, real, n_boot: int = DEFAULT_RESAMPLES, seed: int = 0, *,
                  sigma_half: np.ndarray | None = None) -> np.ndarray:
    """FD of each of `n_boot` bootstrap resamples of the generated rows (real statistics fixed), float64 (n_boot,)."""
    wfd = WeightedFD(features, real, sigma_half)
    return np.array([wfd.fd(w) for w in bootstrap_counts(wfd.n, n_boot, seed)])


# Standard error: the standard deviation (ddof=1) of the bootstrap replicates.
def fd_bootstrap(features_fake, real_stats, n_boot: int = DEFAULT_RESAMPLES, seed: int = 0, *,
                 sigma_half: np.ndarray | None = None) -> tuple[float, float]:
    """(FD, one standard error) of a generated feature set against fixed real statistics.

    The FD is the plain one of all rows; the error is the std of the FD over `n_boot` resamples (with replacement)
    of the generated rows. Only the generated side is resampled: the real statistics are fixed (the same for every
    model compared, from far more images), so the error says how much the number would move with another draw
    of generated samples. `sigma_half`: a cached Sigma_r^{1/2} (the evaluator's `real_sigma_half`)."""
    reps = bootstrap_fds(features_fake, real_stats, n_boot, seed, sigma_half=sigma_half)
    return fd_of(features_fake, real_stats, sigma_half), float(reps.std(ddof=1))


def paired_difference(feats_a, feats_b, real_stats, n_boot: int = DEFAULT_RESAMPLES, seed: int = 0, *,
                      sigma_half: np.ndarray | None = None) -> tuple[float, float]:
    """(FD_a - FD_b, its standard error) with the same resampled row indices for both sets.

    Row i of a and row i of b must come from the same noise and label (two models, or two solvers, on the plan's
    samples); the shared part of their sampling noise then cancels and the error is that of the difference."""
    wa = WeightedFD(feats_a, real_stats, sigma_half)
    wb = WeightedFD(feats_b, real_stats, sigma_half)
    if wa.n != wb.n:
        raise ValueError(f"a paired difference needs the same rows on both sides (same noise and labels), "
                         f"got {wa.n} and {wb.n}")
    reps = np.array([wa.fd(w) - wb.fd(w) for w in bootstrap_counts(wa.n, n_boot, seed)])
    diff = fd_of(feats_a, real_stats, sigma_half) - fd_of(feats_b, real_stats, sigma_half)
    return diff, float(reps.std(ddof=1))


# ------------------------------------------------------------------------------------------ FD-infinity

class FDInfinityFit(NamedTuple):
    fd_inf: float        # the intercept: FD extrapolated to N = infinity
    slope: float         # FD_N ~ fd_inf + slope / N
    ns: np.ndarray       # the subset sizes
    fds: np.ndarray      # FD_N of one random subset of each size


def default_fd_ns(n: int, dim: int, points: int = 15) -> np.ndarray:
    """Subset sizes for FD-infinity: `points` sizes evenly spaced from n/10 (Chong & Forsyth: 5k of 50k) to n,
    the smallest at least 2 d (a covariance far from rank deficiency) but at most n/2."""
    lo = min(max(n // 10, 2 * dim), n // 2)
    if lo < 2:
        raise ValueError(f"FD-infinity needs more generated samples, got {n}")
    return np.unique(np.linspace(lo, n, points).astype(np.int64))


# FD_N = FD_inf + k / N (Chong & Forsyth 2020): a least-squares line of FD_N against 1/N, read at 1/N = 0.
def extrapolate_fd(ns: Sequence[int], fds: Sequence[float]) -> tuple[float, float]:
    inv = 1.0 / np.asarray(ns, np.float64)
    slope, intercept = np.polyfit(inv, np.asarray(fds, np.float64), 1)
    return float(intercept), float(slope)


def fd_infinity_fit(features, real_stats, ns: Sequence[int] | None = None, seed: int = 0, *,
                    sigma_half: np.ndarray | None = None) -> FDInfinityFit:
    """FD_N of one random subset (without replacement) of each size in `ns`, and the line through them."""
    wfd = WeightedFD(features, real_stats, sigma_half)
    ns = default_fd_ns(wfd.n, wfd.dim) if ns is None else np.asarray(sorted(int(k) for k in ns), np.int64)
    if ns.size < 2 or ns[0] < 2 or ns[-1] > wfd.n:
        raise ValueError(f"FD-infinity needs at least 2 subset sizes in [2, {wfd.n}], got {ns.tolist()}")
    rng = np.random.default_rng(seed)
    fds = np.empty(ns.size)
    for i, k in enumerate(ns):
        w = np.zeros(wfd.n)
        w[rng.permutation(wfd.n)[:k]] = 1.0
        fds[i] = wfd.fd(w)
    fd_inf, slope = extrapolate_fd(ns, fds)
    return FDInfinityFit(fd_inf, slope, ns, fds)


def fd_infinity(features, real_stats, ns: Sequence[int] | None = None, seed: int = 0, *,
                sigma_half: np.ndarray | None = None) -> float:
    """FD extrapolated to infinitely many generated samples (Chong & Forsyth 2020): FD_N is biased upwards by
    about k/N, so a line of FD_N against 1/N over random subsets is read at 1/N = 0. May be below 0 for two
    samples of one distribution (an unbiased estimate of 0)."""
    return fd_infinity_fit(features, real_stats, ns, seed, sigma_half=sigma_half).fd_inf


# ------------------------------------------------------------------------------------------ per class

def class_ids(labels) -> np.ndarray:
    """Labels (numpy or torch) as an int64 (N,) array."""
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    lab = np.asarray(labels)
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be a 1-d integer array, got shape {lab.shape} and dtype {lab.dtype}")
    return lab.astype(np.int64)


def per_class_stats(features, labels) -> dict[int, GaussianStats]:
    """GaussianStats of the rows of each class (the real side of a per-class FD)."""
    x, lab = as_f64_rows(features), class_ids(labels)
    if lab.size != x.shape[0]:
        raise ValueError(f"{lab.size} labels for {x.shape[0]} feature rows")
    return {int(c): GaussianStats.from_features(x[lab == c]) for c in np.unique(lab)}


def labels_key(labels) -> str:
    """A digest of a label vector: stored beside cached per-class statistics to tell which labels made them."""
    return hashlib.blake2b(np.ascontiguousarray(class_ids(labels)).tobytes(), digest_size=12).hexdigest()


def class_stats_arrays(stats: Mapping[int, GaussianStats], key: str) -> dict[str, np.ndarray]:
    """Per-class sums as arrays for an .npz (class_ids, class_n, class_s1, class_s2, class_key)."""
    ids = sorted(stats)
    return {"class_ids": np.array(ids, np.int64), "class_n": np.array([stats[c].n for c in ids], np.int64),
            "class_s1": np.stack([stats[c].s1 for c in ids]), "class_s2": np.stack([stats[c].s2 for c in ids]),
            "class_key": np.array(key)}


def class_stats_from_arrays(z, key: str) -> dict[int, GaussianStats]:
    """The inverse of `class_stats_arrays`; KeyError when the arrays are missing or were made from other labels."""
    if "class_key" not in getattr(z, "files", z) or str(z["class_key"]) != key:
        raise KeyError("no per-class statistics for these labels")
    out = {}
    for c, n, s1, s2 in zip(z["class_ids"], z["class_n"], z["class_s1"], z["class_s2"]):
        st = GaussianStats(s1.size)
        st.n, st.s1, st.s2 = int(n), s1.astype(np.float64), s2.astype(np.float64)
        out[int(c)] = st
    return out


def per_class_fd(features, labels, real_per_class: Mapping, *, halves: Mapping | None = None) -> dict:
    """FD of each class's generated rows against that class's real statistics, their mean and the worst class.

    real_per_class: {class: GaussianStats or real (N_c, d) features}; labels: the generated rows' (conditioning)
    labels. Every generated class needs real statistics and >= 2 rows. Returns {'fd': {class: FD}, 'mean',
    'worst', 'worst_class'}. Per-class FDs from few rows are strongly biased upwards: compare them at equal n."""
    x, lab = as_f64_rows(features), class_ids(labels)
    if lab.size != x.shape[0]:
        raise ValueError(f"{lab.size} labels for {x.shape[0]} feature rows")
    fds = {}
    for c in (int(c) for c in np.unique(lab)):
        if c not in real_per_class:
            raise ValueError(f"class {c} has generated samples but no real statistics (real classes: {sorted(real_per_class)})")
        rows = x[lab == c]
        if rows.shape[0] < 2:
            raise ValueError(f"class {c} has {rows.shape[0]} generated sample; per-class FD needs >= 2 per class")
        real = real_per_class[c]
        real = real if hasattr(real, "mu") else GaussianStats.from_features(real)
        fds[c] = fd_of(rows, real, None if halves is None else halves.get(c))
    worst = max(fds, key=fds.get)
    return {"fd": fds, "mean": float(np.mean(list(fds.values()))), "worst": fds[worst], "worst_class": worst}
