"""Step 4 of a GRPO iteration: the clipped policy update on the trained steps, + beta KL to the base, AdamW, EMA.

Across ranks the minibatches are global (one permutation of the whole batch, drawn on every rank); each rank
back-propagates its members' share of the minibatch mean, the gradients are summed over ranks and every rank takes
the same clipped AdamW step. One process is the world-size-1 case: its share is 1 and its loss the plain mean.
"""

from __future__ import annotations

import torch

from ..sampling import step_log_prob
from .losses import clip_binds, gaussian_kl, ppo_clip_loss
from .parallel import all_reduce_floats, all_reduce_grads_
from .rollout import Rollouts

# Per-iteration means (over samples, trained steps and updates). clip_hi / clip_lo: shares of ratios beyond 1 + eps /
# 1 - eps; clip_bind: the share where the clip binds (beyond the bound on A's side: zero policy gradient).
LOGGED = ("loss_pg", "loss_kl", "kl_approx", "clip_hi", "clip_lo", "clip_bind")


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """theta_ema <- decay theta_ema + (1 - decay) theta (buffers copied)."""
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


def step_terms(model, ref_model, ro: Rollouts, j: int, idx: torch.Tensor, a: float, clip_eps: float):
    """Loss terms of sampler step j on samples idx: per-sample PPO-clip loss, KL to the reference, log rho."""
    x, x_next, labels = ro.xs[j, idx], ro.xs[j + 1, idx], ro.labels[idx].to(ro.xs.device)
    sigma, sigma_next = ro.sigmas[j], ro.sigmas[j + 1]
    log_prob, mean, std = step_log_prob(model, x, x_next, sigma, sigma_next, a, labels)
    with torch.no_grad():
        _, mean_ref, _ = step_log_prob(ref_model, x, x_next, sigma, sigma_next, a, labels)
    loss_pg, rho = ppo_clip_loss(ro.adv[idx].to(log_prob.device), log_prob, ro.log_probs[j, idx], clip_eps)
    kl = gaussian_kl(mean, mean_ref, std.detach() if torch.is_tensor(std) else std)
    return loss_pg, kl, rho, log_prob - ro.log_probs[j, idx]


def update(net, model, ref_model, ema, optimizer, ro: Rollouts, steps: list[int], rl, generator: torch.Generator,
           rows: range | None = None, batch: int | None = None, first_rho: list | None = None) -> dict:
    """Inner epochs x minibatches of PPO-clip + beta KL, gradients accumulated over the trained steps.

    `rows`: this rank's rows of the global batch of `batch` samples (default: all of `ro`). `first_rho` collects
    the ratios rho of the first minibatch (they are 1: on-policy). Returns the logged means (over samples, steps
    and updates) and rho per trained step."""
    batch = ro.labels.shape[0] if batch is None else int(batch)
    rows = range(batch) if rows is None else rows
    n_mb, n_steps = max(1, min(int(rl.minibatches), batch)), len(steps)
    beta, eps = float(rl.beta), float(rl.clip_eps)
    params = [p for p in net.parameters() if p.requires_grad]
    sums = {k: 0.0 for k in (*LOGGED, "grad_norm")}
    rho_per_step = {j: 0.0 for j in steps}
    n_updates = 0
    for _ in range(int(rl.inner_epochs)):
        perm = torch.randperm(batch, generator=generator)
        for idx in perm.chunk(n_mb):
            mine = idx[(idx >= rows.start) & (idx < rows.stop)] - rows.start
            share = mine.numel() / idx.numel()          # this rank's part of the minibatch mean
            optimizer.zero_grad(set_to_none=True)
            local = [0.0] * (len(LOGGED) + n_steps)     # sums over this rank's samples
            for k, j in enumerate(steps):
                if mine.numel() == 0:
                    continue
                loss_pg, kl, rho, log_rho = step_terms(model, ref_model, ro, j, mine, rl.noise_level, eps)
                ((loss_pg.mean() + beta * kl.mean()) * share / n_steps).backward()
                r, lr_ = rho.detach(), log_rho.detach()
                if first_rho is not None and n_updates == 0:
                    first_rho.append(r)
                local[0] += float(loss_pg.detach().sum())
                local[1] += float(kl.detach().sum())
                local[2] += float((torch.expm1(lr_) - lr_).sum())          # approx KL(p_old || p_theta)
                local[3] += float((r > 1 + eps).sum())                      # clipped above
                local[4] += float((r < 1 - eps).sum())                      # clipped below
                local[5] += float(clip_binds(r, ro.adv[mine].to(r.device), eps).sum())
                local[len(LOGGED) + k] += float(r.sum())
            all_reduce_grads_(params)
            total = all_reduce_floats(local)
            sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(net.parameters(), rl.grad_clip))
            optimizer.step()
            ema_update(ema, net, rl.ema_decay)
            for i, key in enumerate(LOGGED):
                sums[key] += total[i] / idx.numel() / n_steps
            for k, j in enumerate(steps):
                rho_per_step[j] += total[len(LOGGED) + k] / idx.numel()
            n_updates += 1
    out = {k: v / n_updates for k, v in sums.items()}
    out.update({f"rho_mean/t{j}": v / n_updates for j, v in rho_per_step.items()})
    return out
