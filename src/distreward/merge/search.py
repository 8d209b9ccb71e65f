"""Searchers over the merging coefficients: one ask/tell interface, several strategies (docs/merge.md, "Searchers").

Each iteration a searcher proposes P raw candidate vectors (`ask`, (P, K) float64); the trainer projects them as
merge.constraint says, merges, samples and scores them with the one reward (`MergeRL.step`), and tells the searcher
the rewards (`tell`, higher is better). `result()` is the raw vector the run merges in the end. Every searcher
therefore spends the same iterations x candidates x samples generated images on the same reward.

- `ppo` / `reinforce` (`PolicySearch`): the diagonal Gaussian policy updated by PPO-clip or REINFORCE with Adam;
  the result is the policy mean.
- `cma` (`merge.cmaes.CmaSearch`): CMA-ES (the `cma` package) from the same initial mean with sigma0 =
  policy.init_std and population P, told the negative rewards; the result is CMA's mean (like the policy mean, not
  a lucky draw). Its module is imported only when it is asked for: `cma` loads scipy and matplotlib.
- `random` (`RandomSearch`): P draws per iteration from the initial policy N(init, init_std^2), never updated; the
  result is the best-scoring candidate seen.

Every searcher has `name`, `generator` (its torch generator, checkpointed with the RNG states; None for CMA-ES),
`ask`, `tell`, `result`, `std` (per-coordinate std of its sampling distribution) and `state_dict` /
`load_state_dict` with plain values only (tensors, arrays, numbers): CMA-ES is stored as the history of its asked
candidates and their fitnesses and rebuilt on resume by replaying it through a fresh strategy with the same seed.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from .policy import GaussianPolicy, normalise_rewards, policy_update

SEARCHERS = ("ppo", "reinforce", "cma", "random")


class PolicySearch:
    """rl.algorithm ppo / reinforce: the Gaussian policy, updated by policy_update from normalised rewards."""

    def __init__(self, init_mean, *, algorithm: str = "ppo", candidates: int = 8, init_std: float = 0.05,
                 learn_std: bool = True, min_std: float = 1e-3, lr: float = 0.01, epochs: int = 4, clip: float = 0.2,
                 entropy: float = 0.0, seed: int = 0):
        self.name, self.p = algorithm, int(candidates)
        self.epochs, self.clip, self.entropy = int(epochs), float(clip), float(entropy)
        self.policy = GaussianPolicy(init_mean, float(init_std), bool(learn_std), float(min_std))
        self.optimizer = torch.optim.Adam([p for p in self.policy.parameters() if p.requires_grad], lr=float(lr))
        self.generator = torch.Generator().manual_seed(int(seed))

    def ask(self) -> torch.Tensor:
        return self.policy.sample(self.p, self.generator)

    def tell(self, w: torch.Tensor, r: np.ndarray) -> dict:
        adv = normalise_rewards(torch.from_numpy(r))
        return policy_update(self.policy, self.optimizer, w, adv, algorithm=self.name, epochs=self.epochs,
                             clip=self.clip, entropy=self.entropy)

    def result(self) -> torch.Tensor:
        return self.policy.mean.detach()

    def std(self) -> torch.Tensor:
        return self.policy.std().detach()

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        self.policy.load_state_dict(st["policy"])
        self.optimizer.load_state_dict(st["optimizer"])


class RandomSearch:
    """rl.algorithm random: P draws per iteration from N(init, init_std^2) (the initial policy, never updated),
    projected like every candidate; the result is the best-scoring candidate seen (ties: the earliest)."""

    name = "random"

    def __init__(self, init_mean, *, candidates: int = 8, init_std: float = 0.05, seed: int = 0):
        self.p = int(candidates)
        self.policy = GaussianPolicy(init_mean, float(init_std), learn_std=False, min_std=float(init_std))
        self.generator = torch.Generator().manual_seed(int(seed))
        self.best_w = self.policy.mean.detach().clone()     # the initial mean until a candidate is scored
        self.best_r = -float("inf")

    def ask(self) -> torch.Tensor:
        return self.policy.sample(self.p, self.generator)

    def tell(self, w: torch.Tensor, r: np.ndarray) -> dict:
        i = int(np.argmax(r))
        if float(r[i]) > self.best_r:
            self.best_w, self.best_r = w[i].detach().clone(), float(r[i])
        return {"best_r": self.best_r}

    def result(self) -> torch.Tensor:
        return self.best_w

    def std(self) -> torch.Tensor:
        return self.policy.std().detach()

    def state_dict(self) -> dict:
        return {"best_w": self.best_w.clone(), "best_r": self.best_r}

    def load_state_dict(self, st: dict) -> None:
        self.best_w, self.best_r = st["best_w"].clone(), float(st["best_r"])


def make_searcher(cfg, init_mean):
    """The searcher of cfg.rl.algorithm, starting at init_mean with the policy's init_std, seeded from cfg.seed."""
    rl, pc, seed = cfg.rl, cfg.policy, int(cfg.seed)
    algorithm, p, std = str(rl.algorithm), int(rl.candidates), float(pc.init_std)
    if algorithm in ("ppo", "reinforce"):
        return PolicySearch(init_mean, algorithm=algorithm, candidates=p, init_std=std, learn_std=bool(pc.learn_std),
                            min_std=float(pc.min_std), lr=float(rl.lr), epochs=int(rl.epochs), clip=float(rl.clip),
                            entropy=float(rl.entropy), seed=seed)
    if algorithm == "cma":     # imported here: the cma package loads scipy and matplotlib
        cma_search = importlib.import_module("distreward.merge.cmaes").CmaSearch
        return cma_search(init_mean, candidates=p, init_std=std, seed=seed)
    if algorithm == "random":
        return RandomSearch(init_mean, candidates=p, init_std=std, seed=seed)
    raise ValueError(f"rl.algorithm must be one of {', '.join(SEARCHERS)}, got {algorithm!r}")
