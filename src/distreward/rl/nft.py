"""The forward-process trainer (rl.algorithm = nft), in the style of DiffusionNFT (Zheng et al. 2025, arXiv
2509.16117), with the same rewards as GRPO (docs/rl.md "The forward-process trainer").

One iteration, top to bottom:
  1. rollout: P labels x G samples x_0 of the old policy v_old with its ODE (nft.method, nft.steps), each from its
     own noise: no SDE and no log-probs;
  2. reward r of the decoded samples (the distribution-wise reward against the same reference set as GRPO's);
  3. optimality weights w = 0.5 + 0.5 clip(A, -1, 1) in [0, 1], A the group-relative advantages of r;
  4. update on the forward (noising) process: sigma ~ U(0, 1) (iid or stratified, eps in antithetic pairs or not:
     `loss_draws`), x_sigma = (1 - sigma) x_0 + sigma eps, target v = eps - x_0, implicit policies
     v+ = (1 - beta) v_old + beta v_theta and v- = (1 + beta) v_old - beta v_theta, loss
     w |v+ - v|^2 + (1 - w) |v- - v|^2; AdamW, grad-norm clip, EMA;
  5. push: the samples enter the reference set (they are the policy's own ODE samples); v_old <- the policy
     (nft.old_decay: eta v_old + (1 - eta) v_theta);
the frame (rl/run.py) then logs, evaluates the EMA weights and checkpoints, as for GRPO. On policy
(v_theta = v_old) the loss's gradient is beta (2 w - 1) times the flow-matching gradient on x_0: samples better
than their group's mean are fitted, worse ones pushed away, and every noise level of the velocity field moves,
not only the sampler's grid.

Under torchrun the P groups are split over the ranks as in GRPO (rl/parallel.py): every rank draws the global
batch's noise, samples its rows, the rewards and the reference set are gathered, the gradients summed.
"""

from __future__ import annotations

import copy
import time

import torch

from ..sampling import ode_sample, sigma_schedule
from ..schema import ConfigError
from ..train.flow import flow_interpolate, flow_loss, flow_target
from .context import Algorithm, RunContext, reward_record
from .rollout import start_noise
from .settings import ode_grid
from .step import ema_update, minibatch_steps, stat_sums

__all__ = ["NFT", "optimality_weights", "implicit_velocities", "nft_loss", "nft_update", "ode_rollouts",
           "stratified_levels", "antithetic_pairs", "loss_draws"]


# --------------------------------------------------------------------------------------------- the equations

# Optimality weight of each sample: w = 0.5 + 0.5 clip(A, -1, 1), in [0, 1]; A = 0 (the group's mean) gives 1/2.
def optimality_weights(adv: torch.Tensor) -> torch.Tensor:
    return 0.5 + 0.5 * adv.clamp(-1.0, 1.0)


# Implicit policies around the old one: v+ = (1 - beta) v_old + beta v_theta, v- = (1 + beta) v_old - beta v_theta.
def implicit_velocities(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (1.0 - beta) * v_old + beta * v_theta, (1.0 + beta) * v_old - beta * v_theta


# Per-sample loss: w |v+ - v|^2 + (1 - w) |v- - v|^2 (means over dimensions); minimised at
# v_theta = v_old + (2 w - 1) (v - v_old) / beta.
def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, w: torch.Tensor,
             beta: float) -> torch.Tensor:
    v_pos, v_neg = implicit_velocities(v_theta, v_old, beta)
    return w * flow_loss(v_pos, target) + (1.0 - w) * flow_loss(v_neg, target)


# --------------------------------------------------------------------------------------------- the loss's draws

# Stratified noise levels: sigma_k = (k + u_k) / K for u (..., K) ~ U(0, 1), one level in each of the K strata
# [k/K, (k+1)/K); a level drawn from a uniformly chosen stratum is U(0, 1), so the loss stays unbiased.
def stratified_levels(u: torch.Tensor) -> torch.Tensor:
    return (torch.arange(u.shape[-1], dtype=u.dtype, device=u.device) + u) / u.shape[-1]


# Antithetic pairs: levels 2j and 2j + 1 share sigma_j, with noises eps_j and -eps_j (the gradient's part that is
# odd in eps cancels within a pair). sigma (B, J), eps (B, J, ...) -> (B, 2J), (B, 2J, ...).
def antithetic_pairs(sigma: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return sigma.repeat_interleave(2, dim=1), torch.stack([eps, -eps], dim=2).flatten(1, 2)


def loss_draws(batch: int, K: int, shape, generator: torch.Generator, *, sigma_draw: str = "iid",
               antithetic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward-process loss's K noise levels (batch, K) and noises (batch, K, *shape) per sample
    (nft.sigma_draw, nft.antithetic). One uniform and one normal draw, in that order, of K levels (K / 2 when
    antithetic), so each setting consumes `generator` the same way every time; iid without pairs is
    torch.rand((batch, K)), torch.randn((batch, K, *shape))."""
    if antithetic and K % 2:
        raise ConfigError(f"nft.timesteps: {K} is not allowed (nft.antithetic pairs the noise levels; use an even "
                          f"nft.timesteps such as {K + 1}, or nft.antithetic=false)")
    n = K // 2 if antithetic else K
    u = torch.rand((batch, n), generator=generator)
    eps = torch.randn((batch, n, *shape), generator=generator)
    sigma = stratified_levels(u) if sigma_draw == "stratified" else u
    return antithetic_pairs(sigma, eps) if antithetic else (sigma, eps)


# --------------------------------------------------------------------------------------------- rollouts

@torch.no_grad()
def ode_rollouts(model, noise: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor, method: str, rows: range,
                 device, batch_size: int, *, to_cpu: bool = False) -> torch.Tensor:
    """ODE samples x_0 of this rank's `rows` of the global batch (noise and labels are the whole batch's), in
    batches of `batch_size` moved to `device` one at a time; `to_cpu` brings each batch's samples back to the CPU,
    so a pool larger than the device's memory is never all on it."""
    out_device = "cpu" if to_cpu else device
    x, lab = noise[rows.start:rows.stop], labels[rows.start:rows.stop]
    out = [ode_sample(model, x[i:i + batch_size].to(device), lab[i:i + batch_size].to(device), sigmas.to(device),
                      method).to(out_device) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else x.to(out_device).float()


# --------------------------------------------------------------------------------------------- the update

def nft_update(net, model, old_model, ema, optimizer, x0: torch.Tensor, labels: torch.Tensor, w: torch.Tensor,
               rl, nft, generator: torch.Generator, *, rows: range, batch: int) -> dict:
    """Step 4: inner epochs x minibatches of the NFT loss at nft.timesteps forward-process noise levels per sample
    (gradients accumulated over them; drawn by `loss_draws` once per epoch), `step.minibatch_steps`.

    Every rank draws the global batch's permutation, noise levels and noise from `generator` and back-propagates its
    `rows`' share of each minibatch mean (gradients summed over ranks), so the update does not depend on the split.
    Returns the logged means over the updates: loss_nft, w_mean (the minibatches' mean weight), grad_norm."""
    K, beta = int(nft.timesteps), float(nft.beta)

    def epoch_draws():
        return loss_draws(batch, K, x0.shape[1:], generator, sigma_draw=str(nft.sigma_draw),
                          antithetic=bool(nft.antithetic))

    def backward(mb, draws):
        sigma, eps = draws
        acc = torch.zeros(2, dtype=torch.float64, device=x0.device)
        if mb.mine.numel() == 0:
            return acc
        local_idx = mb.local.to(x0.device)
        x, lab, wk = x0[local_idx], labels[local_idx], w[local_idx].to(x0.device)
        for k in range(K):
            s, e = sigma[mb.mine, k].to(x0.device), eps[mb.mine, k].to(x0.device)
            xt, target = flow_interpolate(x, e, s), flow_target(x, e)
            with torch.no_grad():
                v_old = old_model(xt, s, lab)
            loss = nft_loss(model(xt, s, lab), v_old, target, wk, beta)
            (loss.mean() * mb.share / K).backward()
            acc += stat_sums(loss.sum(), wk.sum())
        return acc

    return minibatch_steps(net, ema, optimizer, rl, generator, batch=batch, rows=rows, names=("loss_nft", "w_mean"),
                           divisors=(K, K), backward=backward, epoch_draws=epoch_draws)


# --------------------------------------------------------------------------------------------- the trainer

class NFT(Algorithm):
    """rl.algorithm = nft: the policy v_theta, the old policy v_old (samples; the implicit policies' centre) and
    the rollout ODE's grid."""

    name = "nft"

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.method, steps = ode_grid(ctx.cfg.nft, ctx.cfg)
        self.sigmas = sigma_schedule(steps, shift=float(ctx.rl.shift))
        self.old = copy.deepcopy(ctx.weights.net).requires_grad_(False)
        self.old_model = ctx.weights.velocity(self.old)

    def state_dict(self) -> dict:
        return {"old": self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.old.load_state_dict(state["old"])

    def iteration(self, ctx: RunContext, it: int) -> dict:
        rl, nft, gen, device, weights = ctx.rl, ctx.cfg.nft, ctx.generator, ctx.device, ctx.weights
        # 1. ODE samples of the old policy, each from its own noise (this rank's groups of the global batch)
        t0 = time.perf_counter()
        labels, groups = ctx.draw_labels(it)
        noise = start_noise(groups, ctx.image_shape, gen, shared=False)
        x0 = ode_rollouts(self.old_model, noise, labels, self.sigmas, self.method, ctx.rows, device,
                          int(rl.batch_size))
        images = weights.decode(x0)
        my_labels, my_groups = ctx.mine(labels).to(device), ctx.mine(groups).to(device)
        t1 = time.perf_counter()
        # 2. rewards r and 3. optimality weights w, of the whole batch on every rank
        r, gathered = ctx.score(images, my_labels, my_groups)
        A, zero_std = ctx.advantages(r, groups)
        w = optimality_weights(A)
        t2 = time.perf_counter()
        # 4. forward-process update around v_old, EMA
        stats = nft_update(weights.net, weights.model, self.old_model, weights.ema, ctx.optimizer, x0, my_labels,
                           ctx.mine(w), rl, nft, gen, rows=ctx.rows, batch=ctx.batch)
        t3 = time.perf_counter()
        # 5. push the samples into the reference set; v_old moves to the policy
        fd_ref = ctx.push(gathered, labels)
        ema_update(self.old, weights.net, float(nft.old_decay))
        t4 = time.perf_counter()
        return {"iteration": it + 1, **reward_record(r, zero_std, fd_ref),
                "w_frac_clipped": float((A.abs() >= 1).float().mean()), **stats, "time_rollout": t1 - t0,
                "time_reward": t2 - t1, "time_update": t3 - t2, "time_push": t4 - t3}
