"""GRPO fine-tuning of a flow generator with a distribution-wise (or sample-wise) reward (METHOD.md §4).

One iteration, top to bottom:
  1. rollout: P labels x G samples from the old policy with T stochastic steps (x_t, x_next, log p_old);
  2. reward r (distribution-wise: subset-replace FD improvement per group; or a sample-wise baseline);
  3. advantages A, group-relative, clipped;
  4. PPO-clip update on the trained steps + beta * KL to the frozen base policy, AdamW, grad-norm clip, EMA;
  5. push: the new samples (or ODE samples of the policy) enter the reward's reference set;
the frame (rl/run.py) then logs, evaluates the EMA weights and checkpoints. Logged names follow the method's
symbols (r, A, rho, KL, beta); docs/rl.md explains every quantity.

Under torchrun (WORLD_SIZE > 1) every rank runs this with the same cfg: the P groups are split over the ranks,
the reference set is replicated, gradients are summed, evaluation is sharded, and only rank 0 writes files
(rl/parallel.py, docs/scale.md). One process is the world-size-1 case of the same code.
"""

from __future__ import annotations

import time

import torch

from ..pg import clip_binds, clip_masks, gaussian_kl, kl_estimate, ppo_clip_loss
from ..sampling import sigma_schedule, step_log_prob
from .context import Algorithm, RunContext, reward_record
from .rollout import Rollouts, collect, iteration_steps, ode_rows, rollout_noise_levels
from .step import minibatch_steps, stat_sums

__all__ = ["GRPO", "LOGGED", "grpo_update", "step_terms"]

# Per-iteration means (over samples, trained steps and updates). clip_hi / clip_lo: shares of ratios beyond 1 + eps /
# 1 - eps; clip_bind: the share where the clip binds (beyond the bound on A's side: zero policy gradient).
LOGGED = ("loss_pg", "loss_kl", "kl_approx", "clip_hi", "clip_lo", "clip_bind")


def step_terms(model, ref_model, ro: Rollouts, j: int, idx: torch.Tensor, a: float, clip_eps: float):
    """Loss terms of sampler step j on samples idx: per-sample PPO-clip loss, KL to the reference, rho, log rho."""
    x, x_next, labels = ro.xs[j, idx], ro.xs[j + 1, idx], ro.labels[idx].to(ro.xs.device)
    sigma, sigma_next = ro.sigmas[j], ro.sigmas[j + 1]
    log_prob, mean, std = step_log_prob(model, x, x_next, sigma, sigma_next, a, labels)
    with torch.no_grad():
        _, mean_ref, _ = step_log_prob(ref_model, x, x_next, sigma, sigma_next, a, labels)
    loss_pg, rho = ppo_clip_loss(ro.adv[idx].to(log_prob.device), log_prob, ro.log_probs[j, idx], clip_eps)
    kl = gaussian_kl(mean, mean_ref, std.detach() if torch.is_tensor(std) else std)
    return loss_pg, kl, rho, log_prob - ro.log_probs[j, idx]


def grpo_update(net, model, ref_model, ema, optimizer, ro: Rollouts, steps: list[int], rl,
                generator: torch.Generator, rows: range | None = None, batch: int | None = None) -> dict:
    """Step 4: inner epochs x minibatches of PPO-clip + beta KL, gradients accumulated over the trained steps
    (`step.minibatch_steps`). `rows`: this rank's rows of the global batch of `batch` samples (default: all of
    `ro`). Returns the logged means (over samples, steps and updates) and rho per trained step."""
    batch = ro.labels.shape[0] if batch is None else int(batch)
    rows = range(batch) if rows is None else rows
    n_steps, beta, eps = len(steps), float(rl.beta), float(rl.clip_eps)

    def backward(mb, _):
        acc = torch.zeros(len(LOGGED) + n_steps, dtype=torch.float64, device=ro.xs.device)
        if mb.mine.numel() == 0:
            return acc
        for k, j in enumerate(steps):
            loss_pg, kl, rho, log_rho = step_terms(model, ref_model, ro, j, mb.local, rl.noise_level, eps)
            ((loss_pg.mean() + beta * kl.mean()) * mb.share / n_steps).backward()
            r, lr_ = rho.detach(), log_rho.detach()
            hi, lo = clip_masks(r, eps)
            acc[:len(LOGGED)] += stat_sums(loss_pg.sum(), kl.sum(), kl_estimate(lr_).sum(), hi.sum(), lo.sum(),
                                           clip_binds(r, ro.adv[mb.local].to(r.device), eps).sum())
            acc[len(LOGGED) + k] += r.sum().double()
        return acc

    rho_names = [f"rho_mean/t{j}" for j in steps]
    stats = minibatch_steps(net, ema, optimizer, rl, generator, batch=batch, rows=rows, names=(*LOGGED, *rho_names),
                            divisors=[n_steps] * len(LOGGED) + [1] * n_steps, backward=backward)
    return {k: stats[k] for k in (*LOGGED, "grad_norm", *rho_names)}


class GRPO(Algorithm):
    """rl.algorithm = grpo: the policy p_theta, the frozen base policy p_ref of the KL term, the rollout grid."""

    name = "grpo"

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        rl, weights = ctx.rl, ctx.weights
        self.a = rollout_noise_levels(rl)                             # noise level of each of the T steps
        self.sigmas = sigma_schedule(int(rl.steps), shift=float(rl.shift))
        self.model = weights.model
        self.ref_model = weights.velocity(weights.frozen_copy())
        self.ode_reference = rl.reference == "ode" and ctx.reward.keeps_state

    def iteration(self, ctx: RunContext, it: int) -> dict:
        rl, gen, device, weights = ctx.rl, ctx.generator, ctx.device, ctx.weights
        # 1. rollouts of the old policy (this rank's groups of the global batch)
        t0 = time.perf_counter()
        labels, groups = ctx.draw_labels(it)
        ro = collect(self.model, labels, groups, self.sigmas, self.a, ctx.image_shape, gen, device,
                     bool(rl.shared_noise), ctx.rows)
        images = weights.decode(ro.xs[-1])                  # clamped after decoding, never the latents
        t1 = time.perf_counter()
        # 2. rewards r and 3. advantages A, of the whole batch on every rank
        r, gathered = ctx.score(images, ro.labels.to(device), ro.groups.to(device))
        A, zero_std = ctx.advantages(r, groups)
        ro.adv = ctx.mine(A)
        t2 = time.perf_counter()
        # 4. clipped policy update on the trained steps, KL to the base, EMA
        steps = iteration_steps(rl, gen)
        stats = grpo_update(weights.net, self.model, self.ref_model, weights.ema, ctx.optimizer, ro, steps, rl, gen,
                            rows=ctx.rows, batch=ctx.batch)
        t3 = time.perf_counter()
        # 5. push: the new samples (or fresh ODE samples of the policy) enter the reference set, alike on every rank
        if self.ode_reference:
            pushed = labels[::ctx.push_every]
            ctx.reward.after_step(ode_rows(self.model, pushed, ctx.image_shape, self.sigmas, gen, device,
                                           weights.decode, int(rl.batch_size)), pushed.to(device))
            fd_ref = ctx.reward_fd()
        else:
            fd_ref = ctx.push(gathered, labels)
        t4 = time.perf_counter()
        return {"iteration": it + 1, **reward_record(r, zero_std, fd_ref), **stats, "time_rollout": t1 - t0,
                "time_reward": t2 - t1, "time_update": t3 - t2, "time_push": t4 - t3}
