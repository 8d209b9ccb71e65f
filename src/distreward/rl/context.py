"""What every RL trainer shares: `RunContext`, built once per run from a validated config (the policy's weights,
EMA and generator, the optimizer, the reward, the evaluator, the run directory, the world, logging, the loop's
history), and `Algorithm`, the base of a trainer, which holds only its own equations and its one iteration.

The loop that drives them is rl/run.py; a trainer reads the context and never builds what a run shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..pg import group_advantages
from ..reward import Reward
from ..utils import dist as D
from ..utils.io import RunDir
from ..utils.hashing import weight_files
from ..utils.rundir import add_inputs
from . import parallel
from .loopstate import PolicyWeights, run_evaluator, run_reward
from .rollout import draw_labels

__all__ = ["Algorithm", "RunContext", "check_reward", "null_permutation", "reward_record"]


def null_permutation(r: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The null control (rl.null_control = permute): the batch's rewards given to random members of the batch, so
    the advantages keep the real rewards' scale and spread but carry no information about the samples."""
    return r[torch.randperm(r.numel(), generator=generator).to(r.device)]


def check_reward(reward):
    """A reward given by the caller must implement the interface the trainers use (`distreward.reward.Reward`)."""
    if reward is not None and not isinstance(reward, Reward):
        raise TypeError(f"reward: a {type(reward).__name__} is not a distreward.reward.Reward; subclass it and define "
                        "score_features (and features / push_features when it needs a network or keeps state)")
    return reward


@dataclass
class RunContext:
    """One run's shared state. `history` and `evals` grow as the loop goes; `start` is the first iteration (past
    the checkpoint on resume)."""
    cfg: object
    run: RunDir
    device: torch.device
    world: int
    main: bool
    weights: PolicyWeights
    optimizer: torch.optim.Optimizer
    reward: object
    evaluator: object
    rows: range
    progress: bool = True
    start: int = 0
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)

    @classmethod
    def build(cls, cfg, run: RunDir, device, *, uses_reward: bool, net, reward, evaluator,
              progress: bool) -> "RunContext":
        """The policy (cfg.model or `net`), its AdamW, the evaluator and (when `uses_reward`) the reward with its
        reference set, in this order (the order of their random draws)."""
        world, main = D.world_size(), D.is_main()
        reward = reward if uses_reward else None
        weights = PolicyWeights.build(cfg, device, net, int(cfg.seed))
        optimizer = weights.optimizer(cfg.rl)
        needed = int(cfg.eval.every) > 0 or (uses_reward and reward is None)
        evaluator = run_evaluator(cfg, device, evaluator, needed=needed)
        if uses_reward:
            reward = run_reward(cfg, run, reward, weights, evaluator, progress=progress)
        add_inputs(run, weight_files(evaluator, reward), main=main)
        rows = parallel.group_rows(int(cfg.rl.labels_per_iter), int(cfg.rl.group_size))
        return cls(cfg=cfg, run=run, device=device, world=world, main=main, weights=weights, optimizer=optimizer,
                   reward=reward, evaluator=evaluator, rows=rows, progress=progress)

    @property
    def rl(self):
        return self.cfg.rl

    @property
    def generator(self) -> torch.Generator:
        return self.weights.generator

    @property
    def batch(self) -> int:
        """P x G: the global batch of one iteration."""
        return int(self.rl.labels_per_iter) * int(self.rl.group_size)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.cfg.model.image_shape)

    def mine(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global-batch tensor."""
        return t[self.rows.start:self.rows.stop]

    def draw_labels(self, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Iteration `it`'s P labels x G samples and group ids (the global batch, drawn alike on every rank)."""
        rl = self.rl
        return draw_labels(int(rl.labels_per_iter), int(rl.group_size), int(self.cfg.model.num_classes),
                           self.generator, balanced=rl.labels == "balanced", start=it * int(rl.labels_per_iter),
                           seed=int(self.cfg.seed))

    def score(self, images: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor):
        """Rewards r of the whole batch from this rank's samples (permuted under the null control) and the gathered
        rows to push (None for a reward without state)."""
        r, gathered = parallel.score(self.reward, images, labels, groups)
        return self.null_control(r), gathered

    def null_control(self, r: torch.Tensor) -> torch.Tensor:
        """The batch's rewards `r` as the update sees them: permuted under rl.null_control = permute, else as
        they are."""
        return null_permutation(r, self.generator) if self.rl.null_control == "permute" else r

    def advantages(self, r: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A of the global batch (rl.adv_std, rl.adv_clip) and, per sample, whether its group's rewards were equal."""
        return group_advantages(r, groups, std=str(self.rl.adv_std), clip=float(self.rl.adv_clip))

    @property
    def push_every(self) -> int:
        """G when only each group's first sample enters the reference set (rl.push = one_per_group), else 1."""
        return int(self.rl.group_size) if self.rl.push == "one_per_group" else 1

    def push(self, gathered, labels: torch.Tensor) -> float | None:
        """The new rows enter the reward's state, alike on every rank; returns the reference set's FD (or None)."""
        parallel.push(self.reward, gathered, labels, every=self.push_every)
        return self.reward_fd()

    def reward_fd(self) -> float | None:
        fd = self.reward.fd()
        return None if fd is None else float(fd)


def reward_record(r: torch.Tensor, zero_std: torch.Tensor, fd_ref: float | None) -> dict:
    """The logged summary of one iteration's rewards: their mean and spread, the reference set's FD, the share of
    samples whose group had no reward spread."""
    return {"r_mean": float(r.mean()), "r_std": float(r.std()), "fd_ref": fd_ref,
            "zero_std_frac": float(zero_std.float().mean())}


class Algorithm:
    """The base of a trainer: `name` (its key in rl/run.py's ALGORITHMS), `command` (the schema it validates with and
    the run's provenance), whether it `uses_reward` and whether it runs in `one_process` only. A trainer builds what
    is its own in `__init__(ctx)` (frozen copies, grids), runs one iteration in `iteration(ctx, it) -> record` (the
    logged dict, its "iteration" is it + 1), and saves what is its own in `state_dict` / `load_state_dict`."""

    name = "algorithm"
    command = "finetune"
    uses_reward = True
    one_process = False

    def __init__(self, ctx: RunContext):
        """Build what is the trainer's own from the run's context (nothing here)."""

    def iteration(self, ctx: RunContext, it: int) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved (the checkpoint holds it among the loop's entries)."""

    def meta(self, ctx: RunContext) -> dict:
        """What the written model files record of the trainer (their metadata)."""
        return {"rl": self.name, "reward": ctx.cfg.reward.name}

    def postfix(self, record: dict) -> dict:
        """What the progress bar shows of an iteration's record."""
        fd = record.get("fd_ref")
        return {"r": f"{record['r_mean']:.3g}", "fd_ref": f"{fd:.3g}" if fd is not None else "-"}
