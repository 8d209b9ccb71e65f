"""The subset-replace reference set (METHOD.md §3): a ring buffer of generated features and its float64 sums.

r(x) = FD(G) - FD(G - {s} + {x}): the FD improvement when candidate x replaces reference row s. Three modes
share one description of the replacement (`lowrank.py`: mu' = mu + U^T e/N, Sigma' = Sigma + U^T C U):

- "exact":  brute force, Sigma' formed and FD recomputed by `distreward.metrics.frechet_distance` (cached
            Sigma_r^{1/2}); O(d^3) per candidate. The ground truth.
- "fast":   exact through the integral identity + Woodbury in the eigenbasis of M (the default). One
            eigendecomposition per reference-set state, then O(d^2 + d T (2k)^2) per candidate.
- "linear": the first-order change dFD = 2 (mu_g - mu_r).dmu + tr(A dSigma), A = I - R M^{-1/2} R; one matrix
            product per batch. Ranks like the exact reward when k/N is small; its values are biased.

Credit (which rows a candidate replaces) is explained in docs/reward.md: "sample" scores each candidate alone,
replacing the oldest row; "group" scores the k candidates of a group together, replacing the k oldest rows, and
gives every member the group's reward. Every unit of a call replaces the same (oldest) rows, so rewards of one call
are comparable across groups, and those are the rows the next `push` overwrites. `set_rewards` scores whole
candidate sets (e.g. the n samples of each merging candidate): r_c = FD(G) - FD(G - S + X_c), S the n oldest rows
(group credit with one group per set); `plain_set_rewards` is the reference-free case r_c = -FD(X_c).

Rewards are returned as float64 numpy arrays (B,); the reward objects convert to torch.
"""

from __future__ import annotations

import numpy as np
import torch

from ..metrics import frechet_distance, sqrtm_psd
from .lowrank import mean_shift, replacement_coupling, trace_sqrt_update, weighted_grams

MODES = ("fast", "exact", "linear")
CREDITS = ("sample", "group")


def as_f64_rows(x, name: str = "features", dim: int | None = None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be an (N, d) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]} but the reference set has {dim}: "
                         "use the same feature network for the reference set and the candidates")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf; check the images and the feature network")
    return x


def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def covariance_from_sums(s1: np.ndarray, s2: np.ndarray, n: int) -> np.ndarray:
    """Sigma = (S2 - S1 S1^T / N) / (N - 1) for sums of shifted features (the shift cancels)."""
    return (s2 - np.outer(s1, s1) / n) / (n - 1)


def linear_reward(dmu: np.ndarray, delta: np.ndarray, c: np.ndarray, utu: np.ndarray, w_am_w: np.ndarray) -> np.ndarray:
    """-dFD to first order: -(2 delta.dmu + tr(A U^T C U)), U A U^T = U U^T - W Lam^{-1/2} W^T."""
    tr_a = np.einsum("ij,gji->g", c, utu - w_am_w)
    return -(2 * dmu @ delta + tr_a)


def exact_terms_reward(dmu: np.ndarray, delta: np.ndarray, c: np.ndarray, utu: np.ndarray,
                       d_trsqrt: np.ndarray) -> np.ndarray:
    """FD - FD' = -(|delta + dmu|^2 - |delta|^2) - tr(U^T C U) + 2 (tr sqrt M' - tr sqrt M)."""
    d_mean = 2 * dmu @ delta + np.einsum("gi,gi->g", dmu, dmu)
    d_trace = np.einsum("ij,gji->g", c, utu)
    return -d_mean - d_trace + 2 * d_trsqrt


class ReferenceSet:
    """N generated feature rows (ring buffer, oldest replaced first) with running float64 sums.

    Args:
        features: (N, d) initial rows (samples of the starting policy), N >= 2.
        real_mu, real_sigma: the fixed real-data statistics; Sigma_r^{1/2} is computed once and cached.
        eps: floor on the eigenvalues of M relative to the largest, used for M^{-1/2} in the linear mode.
        quad_step: spacing in log t of the fast mode's quadrature (0.3 gives about 1e-12 relative for N > d).
        refresh_every: recompute the sums from the rows after this many pushed rows (default N) so that
            round-off never accumulates over a long run.
    """

    def __init__(self, features, real_mu, real_sigma, *, eps: float = 1e-10, quad_step: float = 0.3,
                 refresh_every: int | None = None):
        rows = as_f64_rows(features, "reference features")
        n, d = rows.shape
        if n < 2:
            raise ValueError(f"a reference set needs at least 2 rows, got {n}")
        if eps < 0 or quad_step <= 0:
            raise ValueError(f"eps must be >= 0 and quad_step > 0, got eps={eps}, quad_step={quad_step}")
        self.eps, self.quad_step = float(eps), float(quad_step)
        self.refresh_every = int(refresh_every or n)
        self._set_real(real_mu, real_sigma, d)
        self.rows = rows.copy()
        self.shift = rows.mean(0)
        self.ptr = 0
        self.pushed = 0
        self.since_refresh = 0
        self._refresh_sums()

    # ----- state -------------------------------------------------------------------------------------------
    def _set_real(self, real_mu, real_sigma, d: int) -> None:
        mu = np.asarray(_as_numpy(real_mu), np.float64).reshape(-1)
        sigma = np.asarray(_as_numpy(real_sigma), np.float64)
        if mu.size != d or sigma.shape != (d, d):
            raise ValueError(f"real statistics have shapes {mu.shape} and {sigma.shape} but the features have dimension {d}: "
                             "compute the real statistics with the reward's feature network")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError("real statistics contain NaN or inf")
        self.real_mu, self.real_sigma = mu, sigma
        self.real_sigma_half = sqrtm_psd(sigma)
        self._cache = None

    def _refresh_sums(self) -> None:
        self.s1 = np.zeros(self.dim)
        self.s2 = np.zeros((self.dim, self.dim))
        for i in range(0, self.n, 4096):  # in chunks: no second copy of a large buffer
            x = self.rows[i:i + 4096] - self.shift
            self.s1 += x.sum(0)
            self.s2 += x.T @ x
        self.since_refresh = 0
        self._cache = None

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    @property
    def mu(self) -> np.ndarray:
        return self.shift + self.s1 / self.n

    @property
    def sigma(self) -> np.ndarray:
        return covariance_from_sums(self.s1, self.s2, self.n)

    def oldest(self, k: int) -> np.ndarray:
        """Indices of the k oldest rows (the ones the next push overwrites)."""
        if not 1 <= k <= self.n:
            raise ValueError(f"cannot replace {k} rows of a reference set of {self.n}: use groups of at most N candidates")
        return (self.ptr + np.arange(k)) % self.n

    def push(self, features) -> None:
        """Make new samples permanent: they replace the oldest rows; the sums get the exact low-rank update."""
        x = as_f64_rows(features, "pushed features", self.dim)
        if x.shape[0] > self.n:  # as if pushed one by one: the first rows would be overwritten again
            skip = x.shape[0] - self.n
            self.ptr, self.pushed, x = (self.ptr + skip) % self.n, self.pushed + skip, x[skip:]
        idx = self.oldest(x.shape[0]) if x.shape[0] else np.arange(0)
        old, new = self.rows[idx] - self.shift, x - self.shift
        self.s1 += new.sum(0) - old.sum(0)
        self.s2 += new.T @ new - old.T @ old
        self.rows[idx] = x
        self.ptr = int((self.ptr + x.shape[0]) % self.n)
        self.pushed += x.shape[0]
        self.since_refresh += x.shape[0]
        self._cache = None
        if self.since_refresh >= self.refresh_every:
            self._refresh_sums()

    def state_dict(self) -> dict:
        """Plain float64 tensors and ints: loads with torch.load(weights_only=True)."""
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a).copy())  # noqa: E731
        return {"rows": t(self.rows), "shift": t(self.shift), "s1": t(self.s1), "s2": t(self.s2),
                "real_mu": t(self.real_mu), "real_sigma": t(self.real_sigma), "ptr": int(self.ptr),
                "pushed": int(self.pushed), "since_refresh": int(self.since_refresh),
                "refresh_every": int(self.refresh_every), "eps": float(self.eps), "quad_step": float(self.quad_step)}

    def load_state_dict(self, sd: dict) -> None:
        missing = {"rows", "shift", "s1", "s2", "real_mu", "real_sigma", "ptr"} - set(sd)
        if missing:
            raise ValueError(f"reference-set state lacks {sorted(missing)}; was it written by ReferenceSet.state_dict()?")
        rows = np.asarray(_as_numpy(sd["rows"]), np.float64)
        if rows.ndim != 2 or rows.shape[0] < 2:
            raise ValueError(f"reference-set state has rows of shape {rows.shape}, expected (N >= 2, d)")
        d = rows.shape[1]
        s1, s2, shift = (np.asarray(_as_numpy(sd[k]), np.float64) for k in ("s1", "s2", "shift"))
        if s1.shape != (d,) or shift.shape != (d,) or s2.shape != (d, d):
            raise ValueError(f"reference-set state is inconsistent: rows {rows.shape}, s1 {s1.shape}, s2 {s2.shape}")
        self._set_real(sd["real_mu"], sd["real_sigma"], d)
        self.rows, self.s1, self.s2, self.shift = rows.copy(), s1.copy(), s2.copy(), shift.copy()
        self.ptr = int(sd["ptr"]) % rows.shape[0]
        self.pushed = int(sd.get("pushed", 0))
        self.since_refresh = int(sd.get("since_refresh", 0))
        self.refresh_every = int(sd.get("refresh_every", rows.shape[0]))
        self.eps = float(sd.get("eps", self.eps))
        self.quad_step = float(sd.get("quad_step", self.quad_step))
        self._cache = None

    # ----- per-state cache -----------------------------------------------------------------------------------
    def _state(self, need_eig: bool) -> dict:
        """mu_g, Sigma_g, delta = mu_g - mu_r and (when asked) M = R Sigma_g R = V Lam V^T with P = V^T R."""
        if self._cache is None:
            mu, sigma = self.mu, self.sigma
            self._cache = {"mu": mu, "sigma": sigma, "delta": mu - self.real_mu}
        st = self._cache
        if need_eig and "lam" not in st:
            r = self.real_sigma_half
            m = r @ st["sigma"] @ r
            lam, v = np.linalg.eigh((m + m.T) / 2)
            st["lam"] = np.clip(lam, 0.0, None)
            st["p"] = v.T @ r
        return st

    def fd(self) -> float:
        """The current FD(G, real) (metrics.frechet_distance with the cached Sigma_r^{1/2})."""
        st = self._state(False)
        if "fd" not in st:
            st["fd"] = frechet_distance(st["mu"], st["sigma"], self.real_mu, self.real_sigma,
                                        sigma2_half=self.real_sigma_half)
        return st["fd"]

    def prepare(self, mode: str = "fast") -> None:
        """Compute the per-state work of `mode` now (it is otherwise done by the first `rewards` call)."""
        self._check_mode(mode, "sample")
        if mode == "exact":
            self.fd()
        else:
            self._state(True)

    # ----- rewards ---------------------------------------------------------------------------------------------
    @staticmethod
    def _check_mode(mode: str, credit: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown reward mode {mode!r}: use one of {', '.join(MODES)}")
        if credit not in CREDITS:
            raise ValueError(f"unknown credit {credit!r}: use 'sample' (each candidate alone) or 'group' "
                             "(the candidates of a group replace rows together)")

    def _units(self, b: int, groups, credit: str) -> list[np.ndarray]:
        """Candidate indices of each unit: one per candidate ("sample") or one per group id ("group")."""
        if groups is None:
            gid = np.zeros(b, dtype=np.int64)
        else:
            gid = _as_numpy(groups)
            if gid.shape != (b,) or not np.issubdtype(gid.dtype, np.integer):
                raise ValueError(f"groups must be an integer array of shape ({b},) (a group id per candidate), "
                                 f"got {gid.dtype} {gid.shape}")
        if credit == "sample":
            return [np.array([i]) for i in range(b)]
        return [np.flatnonzero(gid == g) for g in np.unique(gid)]

    def rewards(self, candidates, groups=None, mode: str = "fast", credit: str = "sample") -> np.ndarray:
        """FD improvement of each candidate (float64 numpy, (B,), higher is better).

        credit="sample": candidate i alone replaces the oldest row (every group the same row).
        credit="group": the k_g candidates of group g together replace the k_g oldest rows; each member gets the
        group's reward (groups=None: the whole batch is one group).
        """
        self._check_mode(mode, credit)
        x = as_f64_rows(candidates, "candidate features", self.dim)
        if x.shape[0] == 0:
            raise ValueError("no candidates to score: pass an (B >= 1, d) array of features")
        units = self._units(x.shape[0], groups, credit)
        out = np.empty(x.shape[0])
        st = self._state(mode != "exact")
        mu = st["mu"]
        k_max = max(len(u) for u in units)
        a = x - mu
        b = self.rows[self.oldest(k_max)] - mu
        if mode != "exact":
            p = st["p"]
            wa, wb = a @ p.T, b @ p.T
        for k in sorted({len(u) for u in units}):
            batch = [u for u in units if len(u) == k]
            idx = np.stack(batch)                                                   # (G, k)
            u_rows = np.concatenate([a[idx], np.broadcast_to(b[:k], (len(batch), k, self.dim))], 1)
            c = replacement_coupling(k, self.n)
            dmu = mean_shift(u_rows, self.n)
            if mode == "exact":
                r = np.array([self._exact_one(ur, c, dm) for ur, dm in zip(u_rows, dmu)])
            else:
                w_rows = np.concatenate([wa[idx], np.broadcast_to(wb[:k], (len(batch), k, self.dim))], 1)
                utu = np.einsum("gid,gjd->gij", u_rows, u_rows)
                if mode == "linear":
                    floor = self.eps * st["lam"].max()
                    inv_sqrt = 1.0 / np.sqrt(np.maximum(st["lam"], floor))
                    r = linear_reward(dmu, st["delta"], c, utu, weighted_grams(w_rows, inv_sqrt[:, None])[:, 0])
                else:
                    dts = trace_sqrt_update(st["lam"], w_rows, c, step=self.quad_step)
                    r = exact_terms_reward(dmu, st["delta"], c, utu, dts)
            for u, ru in zip(batch, r):
                out[u] = ru
        return out

    def set_rewards(self, candidates, mode: str = "exact") -> np.ndarray:
        """r_c = FD(G) - FD(G - S + X_c) for each candidate set X_c (float64 numpy, (P,), higher is better).

        `candidates`: a list of (n, d) feature arrays, the same n for all (1 <= n <= N). Every set replaces the same
        n rows S, the n oldest (those the next `push` of n rows overwrites). This is group credit with one group per
        set; mode "exact" (default) forms Sigma' and recomputes the FD, "fast" is exact to about 1e-12 too.
        """
        sets = [as_f64_rows(c, f"candidate set {i}", self.dim) for i, c in enumerate(candidates)]
        if not sets:
            raise ValueError("no candidate sets to score: pass a list of (n, d) feature arrays")
        sizes = sorted({s.shape[0] for s in sets})
        if len(sizes) != 1:
            raise ValueError(f"every candidate set must have the same number of samples, got {sizes}")
        m = sizes[0]
        if not 1 <= m <= self.n:
            raise ValueError(f"candidate sets of {m} samples cannot replace rows of a reference set of {self.n}: "
                             "use sets of 1 to N samples (a larger reference set)")
        groups = np.repeat(np.arange(len(sets)), m)
        return self.rewards(np.concatenate(sets), groups, mode=mode, credit="group")[::m].copy()

    def _exact_one(self, u_rows: np.ndarray, c: np.ndarray, dmu: np.ndarray) -> float:
        st = self._state(False)
        sigma_new = st["sigma"] + u_rows.T @ c @ u_rows
        fd_new = frechet_distance(st["mu"] + dmu, sigma_new, self.real_mu, self.real_sigma,
                                  sigma2_half=self.real_sigma_half)
        return self.fd() - fd_new


def plain_set_rewards(candidates, real_mu, real_sigma, real_sigma_half: np.ndarray | None = None) -> np.ndarray:
    """r_c = -FD(X_c, real) for each candidate set X_c ((n, d), n >= 2): the set reward without a reference set.

    mu and Sigma come from the sums (mu = S1/n, Sigma = (S2 - n mu mu^T)/(n - 1)); the FD uses Sigma_r^{1/2}
    (`real_sigma_half`, computed once per call when not given).
    """
    mu_r = np.asarray(_as_numpy(real_mu), np.float64).reshape(-1)
    sigma_r = np.asarray(_as_numpy(real_sigma), np.float64)
    half = sqrtm_psd(sigma_r) if real_sigma_half is None else np.asarray(real_sigma_half, np.float64)
    out = []
    for i, c in enumerate(candidates):
        x = as_f64_rows(c, f"candidate set {i}", mu_r.size)
        if x.shape[0] < 2:
            raise ValueError(f"candidate set {i} has {x.shape[0]} samples; a covariance needs at least 2")
        n = x.shape[0]
        mu = x.sum(0) / n
        sigma = (x.T @ x - n * np.outer(mu, mu)) / (n - 1)
        out.append(-frechet_distance(mu, sigma, mu_r, sigma_r, sigma2_half=half))
    return np.array(out)
