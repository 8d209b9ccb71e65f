"""CMA-ES over the merging coefficients (rl.algorithm cma; `merge.search` lists the searchers and their interface).

In the spirit of LCSC (arXiv 2404.02241: evolutionary search over checkpoint coefficients), with the `cma`
package's CMAEvolutionStrategy: it starts at the RL policy's initial mean with sigma0 = policy.init_std and
population P = rl.candidates, proposes raw candidates (projected by the trainer like every searcher's) and is told
the negative rewards. The merged result is the strategy's mean, the like-for-like answer to the policy mean.
"""

from __future__ import annotations

import warnings

import cma
import numpy as np
import torch


class CmaSearch:
    """rl.algorithm cma: CMA-ES over w, minimising -reward; the result is the strategy's mean.

    Its normal draws come from a numpy Generator seeded with `seed` (the `randn` option), never from numpy's global
    RNG. The checkpoint holds `asked` (G, P, K) and `fitness` (G, P) of the G generations so far; `load_state_dict`
    replays them through a fresh strategy (ask, then tell the stored candidates and fitnesses), which reproduces
    the strategy bit for bit on the same machine and thread count.
    """

    name = "cma"
    generator = None        # no torch generator: the numpy one is rebuilt from the seed and replayed

    def __init__(self, init_mean, *, candidates: int = 8, init_std: float = 0.05, seed: int = 0):
        self.x0 = np.asarray(init_mean, np.float64).reshape(-1).copy()
        self.p, self.sigma0, self.seed = int(candidates), float(init_std), int(seed)
        self.asked = np.zeros((0, self.p, self.x0.size))
        self.fitness = np.zeros((0, self.p))
        self.es = self.fresh()

    def fresh(self) -> cma.CMAEvolutionStrategy:
        """A new strategy at x0, sigma0, population P, quiet, writing no files, drawing from its own seeded RNG."""
        rng = np.random.default_rng(self.seed)
        opts = {"popsize": self.p, "seed": np.nan, "randn": lambda *shape: rng.standard_normal(shape),
                "verbose": -9, "verb_disp": 0, "verb_log": 0, "verb_plot": 0}
        return cma.CMAEvolutionStrategy(self.x0.tolist(), self.sigma0, opts)

    def ask(self) -> torch.Tensor:
        x = np.array(self.es.ask(), np.float64)
        if x.shape != (self.p, self.x0.size):
            raise RuntimeError(f"CMA-ES asked {x.shape[0]} candidates, expected rl.candidates = {self.p}")
        return torch.from_numpy(x)

    def tell(self, w: torch.Tensor, r: np.ndarray) -> dict:
        x = np.array(w.numpy(), np.float64)
        f = -np.asarray(r, np.float64)          # CMA-ES minimises
        self.es.tell(list(x), f.tolist())
        self.asked = np.concatenate([self.asked, x[None]])
        self.fitness = np.concatenate([self.fitness, f[None]])
        return {"sigma": float(self.es.sigma)}

    def result(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.es.mean, np.float64))

    def std(self) -> torch.Tensor:
        """The per-coordinate std of the sampling distribution, sigma * sqrt(diag C)."""
        return torch.from_numpy(np.array(self.es.stds, np.float64))

    def state_dict(self) -> dict:
        return {"asked": self.asked.copy(), "fitness": self.fitness.copy()}

    def load_state_dict(self, st: dict) -> None:
        self.es = self.fresh()
        self.asked = np.asarray(st["asked"], np.float64).reshape(-1, self.p, self.x0.size)
        self.fitness = np.asarray(st["fitness"], np.float64).reshape(-1, self.p)
        for g, (x, f) in enumerate(zip(self.asked, self.fitness)):
            again = np.array(self.es.ask(), np.float64)
            if not np.array_equal(again, x):
                warnings.warn(f"CMA-ES replay: generation {g + 1} asked other candidates than the stored ones "
                              "(another thread count or cma version?); the stored ones are told", RuntimeWarning)
            self.es.tell(list(x), f.tolist())
