"""The algebra of subset replacement (METHOD.md §3), as small pure float64 numpy functions.

Replacing k reference rows s_1..s_k by candidates x_1..x_k (N fixed) changes the generated statistics by
    mu'    = mu + U^T e / N
    Sigma' = Sigma + U^T C U
with U the (2k, d) stack of a_i = x_i - mu and b_j = s_j - mu, e = (1,..,1,-1,..,-1) and
    C = (D - e e^T / N) / (N - 1),   D = diag(e).
Sigma' is a rank-2k update, so M = Sigma_r^{1/2} Sigma Sigma_r^{1/2} gets the update W^T C W with W = P U^T and
P = V^T Sigma_r^{1/2} (V the eigenvectors of M). Everything below works on batches of "units" (a unit is the set
of candidates that replace rows together), shaped (G, 2k, d).
"""

from __future__ import annotations

import numpy as np


def replacement_signs(k: int) -> np.ndarray:
    """e = (+1 for each new row, -1 for each removed row)."""
    return np.concatenate([np.ones(k), -np.ones(k)])


def replacement_coupling(k: int, n: int) -> np.ndarray:
    """C = (D - e e^T / N) / (N - 1): Sigma' - Sigma = U^T C U for k rows replaced in a set of N."""
    e = replacement_signs(k)
    return (np.diag(e) - np.outer(e, e) / n) / (n - 1)


def mean_shift(u: np.ndarray, n: int) -> np.ndarray:
    """dmu = U^T e / N for units u (G, 2k, d) -> (G, d)."""
    k = u.shape[1] // 2
    return (u[:, :k].sum(1) - u[:, k:].sum(1)) / n


def weighted_grams(w: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """W^T diag(g) W for every unit and every weight column g: w (G, m, d), weights (d, T) -> (G, T, m, m).

    One matrix product: the m(m+1)/2 elementwise products of W's rows, stacked, times the weight matrix.
    """
    g, m, d = w.shape
    iu, ju = np.triu_indices(m)
    pairs = (w[:, iu, :] * w[:, ju, :]).reshape(g * iu.size, d)
    packed = (pairs @ weights).reshape(g, iu.size, weights.shape[1]).transpose(0, 2, 1)
    out = np.empty((g, weights.shape[1], m, m))
    out[:, :, iu, ju] = packed
    out[:, :, ju, iu] = packed
    return out


def quadrature_grid(t_lo: float, t_hi: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Log-spaced points t_i and trapezoid weights for int_{t_lo}^{t_hi} f(t) dt = sum w_i f(t_i) (dt = t du)."""
    count = max(int(np.ceil(np.log(t_hi / t_lo) / step)), 2) + 1
    u = np.linspace(np.log(t_lo), np.log(t_hi), count)
    h = u[1] - u[0]
    t = np.exp(u)
    w = h * t
    w[0] *= 0.5
    w[-1] *= 0.5
    return t, w


def trace_sqrt_update(lam: np.ndarray, w: np.ndarray, c: np.ndarray, *, step: float = 0.3,
                      lo: float | None = None, hi: float = 1e4) -> np.ndarray:
    """tr sqrt(M + W^T C W) - tr sqrt(M) for M = diag(lam) and each unit's W (G, m, d); returns (G,).

    Integral identity (METHOD.md §3, fast exact mode):
        tr sqrt(M') - tr sqrt(M) = (2/pi) int_0^inf t^2 tr[(M + t^2)^{-1} - (M' + t^2)^{-1}] dt,
    and by Woodbury, with H = W diag(1/(lam + t^2)) W^T and J = W diag(1/(lam + t^2)^2) W^T,
        tr[(M + t^2)^{-1} - (M' + t^2)^{-1}] = tr[(C^{-1} + H)^{-1} J].
    The integrand's 1/t^2 tail, tr(dM) t^2/(t^2 + a^2)^2, is integrated analytically (tr(dM) pi / (4a)); the rest
    decays like t^-4 and is integrated by the trapezoid rule in log t (spectrally accurate for these rational
    integrands) on [lo sqrt(lam_min+), hi sqrt(lam_max')], plus a head int_0^{t_lo} taken as flat (exact when M is
    singular, negligible otherwise).
    """
    lam = np.clip(lam, 0.0, None)
    lam_max = float(lam.max())
    if lam_max <= 0:
        raise ValueError("the generated covariance is zero in the metric of Sigma_r; the reference set has no spread")
    positive = lam > lam_max * 1e-12
    lam_pos = float(lam[positive].min())
    if lo is None:
        lo = 1e-4 if positive.all() else 1e-9
    wtw = weighted_grams(w, np.ones((lam.size, 1)))[:, 0]
    tr_dm = np.einsum("ij,gji->g", c, wtw)
    # the largest eigenvalue of M' is at most lam_max + |C|_2 |W|_F^2
    upd_norm = np.abs(np.linalg.eigvalsh(c)).max() * np.trace(wtw, axis1=1, axis2=2).max()
    a = np.sqrt(lam_max)
    t_lo, t_hi = lo * np.sqrt(lam_pos), hi * np.sqrt(lam_max + upd_norm)
    t, tw = quadrature_grid(t_lo, t_hi, step)
    inv = 1.0 / (lam[:, None] + t[None, :] ** 2)
    hj = weighted_grams(w, np.concatenate([inv, inv ** 2], 1))
    h, j = hj[:, :t.size], hj[:, t.size:]
    f = np.trace(np.linalg.solve(np.linalg.inv(c) + h, j), axis1=2, axis2=3) * t ** 2  # (G, T)
    rest = f - tr_dm[:, None] * (t ** 2 / (t ** 2 + a ** 2) ** 2)
    integral = rest @ tw + t_lo * rest[:, 0] + tr_dm * np.pi / (4 * a)
    return (2 / np.pi) * integral
