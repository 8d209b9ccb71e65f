"""A merge candidate from its drawn coefficients to its reward: the coefficient space, the samples and features of
merged models (split over the ranks under torchrun), and the set-replace FD reward.

- `coefficient_rows` / `as_merged`: one row of K coefficients (merge.space global) or one per block group
  (blocks), each row projected onto sum(w) = 1 under merge.constraint sum1;
- `CandidateSampler`: one live network; theta(w) merged into it, then the n samples of the shared noise and labels
  drawn by the run's sampler and turned into reward features. Under torchrun the models x samples are split over
  the ranks in whole sampler batches (`utils.dist.shard_blocks`) and the features gathered in single-process order;
- `SetReward`: r_c = FD(G) - FD(G - S + X_c) (`reward.ReferenceSet.set_rewards`, group credit: every candidate's n
  samples X_c replacing the same n oldest rows S of the reference set G), or -FD(X_c) without a reference set.
"""

from __future__ import annotations

import numpy as np
import torch

from ..metrics import sqrtm_psd
from ..reward import ReferenceSet, plain_set_rewards
from ..sampling.generate import shared_noise
from ..utils import dist as D
from .blocks import GROUPS
from .policy import project_sum_one
from .streaming import CheckpointSet


# ----------------------------------------------------------------------------------------------------------
# The coefficient space

def coefficient_rows(cfg, ckpts: CheckpointSet) -> int:
    """Rows of coefficients: 1 (merge.space global) or one per block group (blocks; the network's tensors are
    checked to fall in the groups here, before any sampling)."""
    space = str(cfg.merge.get("space", "global"))
    if space == "global":
        return 1
    if space != "blocks":
        raise ValueError(f"merge.space must be 'global' or 'blocks', got {space!r}")
    ckpts.block_groups()
    return len(GROUPS)


def as_merged(w: torch.Tensor, rows: int, constraint: str) -> torch.Tensor:
    """A drawn w as merged: (K,), or (rows, K) rows of a flat per-block draw; each row projected onto sum(w) = 1
    under merge.constraint = sum1."""
    if rows > 1:
        w = w.reshape(rows, -1)
    if constraint == "sum1":
        return project_sum_one(w)
    if constraint == "none":
        return w
    raise ValueError(f"merge.constraint must be 'sum1' or 'none', got {constraint!r}")


# ----------------------------------------------------------------------------------------------------------
# Samples and features of merged models

class CandidateSampler:
    """Samples and reward features of merged models on one live network. `sample_key`: the settings sample_fn was
    built from (None: the caller's own sampler, whose evaluations are not cached)."""

    def __init__(self, cfg, ckpts: CheckpointSet, *, sample_fn, feature_fn, device="cpu",
                 sample_key: dict | None = None):
        self.cfg, self.ckpts, self.device = cfg, ckpts, device
        self.sample_fn, self.feature_fn, self.sample_key = sample_fn, feature_fn, sample_key
        self.net = ckpts.build_network(device).requires_grad_(False)

    @property
    def block(self) -> int:
        """Rows per work unit across ranks: the sampler's batch size, so every batch is the one-process batch."""
        return int(self.cfg.sampler.batch_size)

    def noise(self, n: int, seed: int):
        """Shared noise and class-balanced labels of `seed` (the same for every candidate)."""
        m = self.cfg.model
        return shared_noise(n, tuple(m.image_shape), int(m.num_classes), seed)

    def images(self, w, noise, labels) -> torch.Tensor:
        self.ckpts.merge_into(self.net, w)
        return self.sample_fn(self.net, noise, labels)

    def local_images(self, weights: list, noise, labels):
        """(model index, images) of this rank's pieces of len(weights) models x noise.shape[0] samples, one
        sampler batch at a time; each model is merged once."""
        for c, rows in D.shard_blocks(len(weights), noise.shape[0], self.block):
            self.ckpts.merge_into(self.net, weights[c])
            for lo in range(rows.start, rows.stop, self.block):
                hi = min(rows.stop, lo + self.block)
                yield c, self.sample_fn(self.net, noise[lo:hi], None if labels is None else labels[lo:hi])

    def features(self, weights: list, noise, labels, dim: int) -> list[np.ndarray]:
        """The reward features (n, dim) of the samples of each model in `weights`, all from the same noise and
        labels: model by model in one process; under torchrun computed over the ranks and gathered, so every rank
        gets all of them in single-process order."""
        if D.world_size() == 1:
            return [self.feature_fn(self.images(w, noise, labels)) for w in weights]
        local = [np.asarray(self.feature_fn(im), np.float64) for _, im in self.local_images(weights, noise, labels)]
        n = noise.shape[0]
        f = D.all_gather_rows(np.concatenate(local) if local else np.zeros((0, dim)))
        return [f[i * n:(i + 1) * n] for i in range(len(weights))]


# ----------------------------------------------------------------------------------------------------------
# The set-replace FD reward

class SetReward:
    """The candidates' reward against the real statistics; `reference` is the ReferenceSet G (None before
    `start`, and with reward.reference_size 0: then r_c = -FD(X_c))."""

    def __init__(self, real_mu, real_sigma):
        self.real_mu = np.asarray(real_mu, np.float64).reshape(-1)
        self.real_sigma = np.asarray(real_sigma, np.float64)
        self.real_sigma_half = sqrtm_psd(self.real_sigma)
        self.reference: ReferenceSet | None = None

    @property
    def dim(self) -> int:
        return self.real_mu.size

    def start(self, rows: np.ndarray) -> None:
        """G: the reference set's first rows (features of the initial mean model's samples)."""
        self.reference = ReferenceSet(rows, self.real_mu, self.real_sigma)

    def fd(self) -> float | None:
        """FD(G) before a step (None without a reference set)."""
        return self.reference.fd() if self.reference is not None else None

    def __call__(self, feats: list[np.ndarray]) -> np.ndarray:
        """One reward per candidate feature set (each (n, d), the same n for all), higher is better."""
        if self.reference is None:
            return plain_set_rewards(feats, self.real_mu, self.real_sigma, self.real_sigma_half)
        if feats[0].shape[0] >= self.reference.n:
            raise ValueError(f"a candidate's {feats[0].shape[0]} samples would replace the whole reference set of "
                             f"{self.reference.n}; set reward.reference_size larger than rl.samples (or 0 for the "
                             "plain set FD)")
        return self.reference.set_rewards(feats)

    def push(self, feats: np.ndarray) -> None:
        """The chosen candidate's samples enter G (nothing without a reference set)."""
        if self.reference is not None:
            self.reference.push(feats)

    def state_dict(self) -> dict:
        return {"rows": None, "ptr": 0} if self.reference is None else self.reference.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        """The reference set of a checkpoint: ReferenceSet.state_dict(), or the {rows, ptr} of runs written before
        the merge reward was a ReferenceSet (its sums are then recomputed from the rows)."""
        self.reference = None if sd["rows"] is None else ReferenceSet(sd["rows"], self.real_mu, self.real_sigma)
        if self.reference is not None and "s1" in sd:
            self.reference.load_state_dict(sd)
        elif self.reference is not None:
            self.reference.ptr = int(sd["ptr"]) % self.reference.n
