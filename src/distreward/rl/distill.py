"""The distillation control of a GRPO run (docs/rl.md "The distillation control"): the same budget spent on plain
distillation instead of a reward.

One iteration, top to bottom:
  1. the same P x G labels and starting noises as a GRPO iteration (the same label stream and generator);
  2. teacher: the frozen base model's ODE (distill.teacher_method, m = ceil(teacher_steps / T) equal sub-steps in
     sigma per served interval) from each noise, keeping its states x_k at the served grid points s_0..s_T;
  3. update on GRPO's trained steps: regress the policy's velocity v_theta(x_k, s_k) onto the target
     v*_k = (x_{k+1} - x_k) / (s_{k+1} - s_k) (one Euler step of the policy on the served grid lands on the
     teacher's x_{k+1}); inner_epochs x minibatches, AdamW, grad-norm clip, EMA after every optimizer step;
the frame (rl/run.py) then logs, evaluates the EMA weights and checkpoints, exactly as for GRPO. One process only.
"""

from __future__ import annotations

import math
import time

import torch

from ..sampling import check_sigmas, ode_step, sigma_schedule, sigma_vector
from ..sampling.steps import as_column
from ..schema import ConfigError
from .context import Algorithm, RunContext
from .rollout import iteration_steps, start_noise
from .step import minibatch_steps, stat_sums

__all__ = ["Distill", "distill_loss", "target_velocity", "teacher_grid", "teacher_trajectory", "teacher_steps_of",
           "substeps", "distill_update"]

DEFAULT_TEACHER_STEPS = 32      # without distill.teacher_steps and evidence.converged_steps


# --------------------------------------------------------------------------------------------- the equations

# Target velocity of served step k: v*_k = (x_{k+1} - x_k) / (s_{k+1} - s_k), so the policy's Euler step
# x_k + (s_{k+1} - s_k) v*_k lands on the teacher's x_{k+1} (the step difference in float32, as euler_step's).
def target_velocity(x: torch.Tensor, x_next: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    return (x_next.float() - x.float()) / (as_column(sigma_next, x) - as_column(sigma, x))


# Distillation loss per sample: mean over dimensions of (v_theta(x_k, s_k, y) - v*_k)^2; the trainer averages it
# over the samples and the trained steps.
def distill_loss(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (v - target).pow(2).flatten(1).mean(1)


# --------------------------------------------------------------------------------------------- the teacher

def teacher_steps_of(cfg) -> int:
    """The teacher's step count: distill.teacher_steps, else evidence.converged_steps, else 32."""
    n = cfg.distill.teacher_steps
    if n is None:
        n = cfg.evidence.converged_steps
    return int(n) if n is not None else DEFAULT_TEACHER_STEPS


def substeps(teacher_steps: int, T: int) -> int:
    """m = ceil(teacher_steps / T): teacher sub-steps per served interval (at least teacher_steps in all)."""
    return max(1, math.ceil(int(teacher_steps) / int(T)))


def teacher_grid(sigmas: torch.Tensor, m: int) -> torch.Tensor:
    """The teacher's sigmas (T m + 1,) float32: every served interval [s_k, s_{k+1}] cut into m equal sub-steps in
    sigma; the served points are kept exactly (grid[k m] == s_k)."""
    s = check_sigmas(sigmas).double()
    parts = [torch.linspace(float(a), float(b), int(m) + 1, dtype=torch.float64)[:-1] for a, b in zip(s[:-1], s[1:])]
    return check_sigmas(torch.cat([*parts, s[-1:]]).float())


@torch.no_grad()
def teacher_trajectory(model, noise: torch.Tensor, labels: torch.Tensor | None, sigmas: torch.Tensor, m: int,
                       method: str = "heun", batch_size: int | None = None) -> torch.Tensor:
    """(T+1, B, C, H, W): the teacher's ODE from `noise` (m sub-steps of `method` per interval of the served grid
    `sigmas`, which starts at sigma = 1) at the served grid points: [0] the noise, [-1] the converged sample.
    The batch is integrated in chunks of `batch_size`."""
    if method not in ("euler", "heun"):
        raise ConfigError(f"distill.teacher_method must be 'euler' or 'heun', got {method!r}")
    fine = teacher_grid(sigmas, m).tolist()
    if fine[0] != 1.0:
        raise ValueError(f"the served grid must start at sigma = 1 (the noise), got {fine[0]}; use sigma_schedule")
    T, bs = (len(fine) - 1) // m, noise.shape[0] if batch_size is None else max(1, int(batch_size))
    chunks = []
    for i in range(0, noise.shape[0], bs):
        x, lab = noise[i:i + bs].float(), None if labels is None else labels[i:i + bs]
        xs = [x]
        for k in range(T):
            for s, s_next in zip(fine[k * m:(k + 1) * m], fine[k * m + 1:(k + 1) * m + 1]):
                x = ode_step(model, x, lab, s, s_next, method)
            xs.append(x)
        chunks.append(torch.stack(xs))
    return torch.cat(chunks, 1)


# --------------------------------------------------------------------------------------------- the update

def distill_update(net, model, ema, optimizer, xs: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor,
                   steps: list[int], rl, generator: torch.Generator) -> dict:
    """Inner epochs x minibatches of the distillation loss on the trained steps (gradients accumulated over the
    steps, as GRPO's update; `step.minibatch_steps`). Returns the logged means over the updates: loss_distill
    (over samples and steps before each step) and grad_norm."""
    batch, n_steps = labels.shape[0], len(steps)
    sig = check_sigmas(sigmas).tolist()

    def backward(mb, _):
        acc = torch.zeros(1, dtype=torch.float64, device=xs.device)
        rows = mb.idx.to(xs.device)
        for j in steps:
            x, lab = xs[j, rows], labels[rows]
            target = target_velocity(x, xs[j + 1, rows], sig[j], sig[j + 1])
            loss = distill_loss(model(x, sigma_vector(sig[j], x), lab), target)
            (loss.mean() / n_steps).backward()
            acc += stat_sums(loss.sum())
        return acc

    return minibatch_steps(net, ema, optimizer, rl, generator, batch=batch, rows=range(batch),
                           names=("loss_distill",), divisors=(n_steps,), backward=backward)


# --------------------------------------------------------------------------------------------- the trainer

class Distill(Algorithm):
    """The distillation control: the policy regressed onto the frozen base model's (the teacher's) fine ODE on
    the served grid. No reward; one process."""

    name = "distill"
    command = "distill"
    uses_reward = False
    one_process = True

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        cfg, weights = ctx.cfg, ctx.weights
        self.teacher_steps, self.method = teacher_steps_of(cfg), str(cfg.distill.teacher_method)
        self.m = substeps(self.teacher_steps, int(cfg.rl.steps))
        self.sigmas = sigma_schedule(int(cfg.rl.steps), shift=float(cfg.rl.shift))
        # the teacher and the policy stay in latent space; the decoder serves the evaluation
        self.model, self.teacher = weights.model, weights.velocity(weights.frozen_copy())

    def meta(self, ctx: RunContext) -> dict:
        return {"rl": "distill", "teacher_steps": self.teacher_steps, "teacher_substeps": self.m,
                "teacher_method": self.method}

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss_distill']:.4g}"}

    def iteration(self, ctx: RunContext, it: int) -> dict:
        t0 = time.perf_counter()
        # 1. GRPO's labels and starting noises, 2. the teacher's states on the served grid
        labels, groups = ctx.draw_labels(it)
        noise = start_noise(groups, ctx.image_shape, ctx.generator, bool(ctx.rl.shared_noise)).to(ctx.device)
        labels = labels.to(ctx.device)
        xs = teacher_trajectory(self.teacher, noise, labels, self.sigmas, self.m, self.method,
                                int(ctx.rl.batch_size))
        t1 = time.perf_counter()
        # 3. regression of the policy's velocities on GRPO's trained steps, AdamW, EMA
        stats = distill_update(ctx.weights.net, self.model, ctx.weights.ema, ctx.optimizer, xs, labels, self.sigmas,
                               iteration_steps(ctx.rl, ctx.generator), ctx.rl, ctx.generator)
        t2 = time.perf_counter()
        return {"iteration": it + 1, **stats, "time_teacher": t1 - t0, "time_update": t2 - t1}
