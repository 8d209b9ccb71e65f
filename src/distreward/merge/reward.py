"""The distribution-wise reward of one merging candidate: what its n samples do to a reference set's FD.

Choice (METHOD.md §3 applied to sets): the reference set G (N feature rows, a ring buffer of recent samples of the
policy) loses the same n rows S (the oldest) for every candidate c, which puts its n samples X_c in their place:

    r_c = FD(G) - FD(G - S + X_c)

with FD against the fixed real statistics. All candidates replace the same rows and see the same noise and labels,
so their rewards differ only through their weights. The new sums are exact low-rank updates
(S1' = S1 - sum S + sum X_c, S2' = S2 - S^T S + X_c^T X_c); with d small one eigendecomposition per candidate is
cheap, so no approximation is used. After the update, the best candidate's n samples enter G (oldest rows
replaced), so G follows the improving policy without being flooded by the P*n samples of noisy candidates. With `reference_size: 0` the reward is the plain set FD, r_c = -FD(X_c).
"""

from __future__ import annotations

import numpy as np

from ..metrics import frechet_distance, sqrtm_psd


# Gaussian moments from the sums: mu = S1/N, Sigma = (S2 - N mu mu^T)/(N - 1).
def moments(s1: np.ndarray, s2: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    mu = s1 / n
    return mu, (s2 - n * np.outer(mu, mu)) / (n - 1)


class SetReplaceReward:
    """r_c = FD(G) - FD(G - S + X_c) for candidate feature sets X_c (float64), G a ring buffer of N rows."""

    def __init__(self, real_mu, real_sigma, reference=None):
        self.real_mu = np.asarray(real_mu, np.float64).reshape(-1)
        self.real_sigma = np.asarray(real_sigma, np.float64)
        self.real_half = sqrtm_psd(self.real_sigma)
        self.rows = None if reference is None else np.array(reference, dtype=np.float64)
        self.ptr = 0
        if self.rows is not None and self.rows.shape[1] != self.real_mu.size:
            raise ValueError(f"reference features have dimension {self.rows.shape[1]}, the real statistics {self.real_mu.size}")

    @property
    def n(self) -> int:
        return 0 if self.rows is None else self.rows.shape[0]

    def fd_of(self, s1: np.ndarray, s2: np.ndarray, n: int) -> float:
        mu, sigma = moments(s1, s2, n)
        return frechet_distance(mu, sigma, self.real_mu, self.real_sigma, sigma2_half=self.real_half)

    def fd(self) -> float:
        """FD(G) of the current reference set."""
        return self.fd_of(self.rows.sum(0), self.rows.T @ self.rows, self.n)

    def replaced_rows(self, m: int) -> np.ndarray:
        """Indices of the m oldest rows (the ring buffer's next m slots), shared by every candidate."""
        return (self.ptr + np.arange(m)) % self.n

    def rewards(self, candidates: list[np.ndarray]) -> np.ndarray:
        """One reward per candidate feature set (each (n, d), the same n for all)."""
        sizes = {c.shape[0] for c in candidates}
        if len(sizes) != 1:
            raise ValueError(f"every candidate must have the same number of samples, got {sorted(sizes)}")
        m = sizes.pop()
        if self.rows is None:
            return np.array([-self.fd_of(c.sum(0), c.T @ c, m) for c in candidates])
        if m >= self.n:
            raise ValueError(f"a candidate's {m} samples would replace the whole reference set of {self.n}; "
                             "set reward.reference_size larger than rl.samples (or 0 for the plain set FD)")
        s1, s2 = self.rows.sum(0), self.rows.T @ self.rows
        fd0 = self.fd_of(s1, s2, self.n)
        gone = self.rows[self.replaced_rows(m)]
        s1g, s2g = s1 - gone.sum(0), s2 - gone.T @ gone
        return np.array([fd0 - self.fd_of(s1g + c.sum(0), s2g + c.T @ c, self.n) for c in candidates])

    def push(self, features: np.ndarray) -> None:
        """New samples replace the oldest rows (the most recent N rows are kept when more than N arrive)."""
        if self.rows is None:
            return
        f = np.asarray(features, np.float64)[-self.n:]
        idx = self.replaced_rows(f.shape[0])
        self.rows[idx] = f
        self.ptr = int((self.ptr + f.shape[0]) % self.n)

    def state_dict(self) -> dict:
        return {"rows": self.rows, "ptr": self.ptr}

    def load_state_dict(self, sd: dict) -> None:
        self.rows = None if sd["rows"] is None else np.array(sd["rows"], dtype=np.float64)
        self.ptr = int(sd["ptr"])
