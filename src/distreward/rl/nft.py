"""The forward-process trainer (rl.algorithm = nft), in the style of DiffusionNFT (Zheng et al. 2025, arXiv
2509.16117), with the same rewards as GRPO (docs/rl.md "The forward-process trainer").

One iteration, top to bottom:
  1. rollout: P labels x G samples x_0 of the old policy v_old with its ODE (nft.method, nft.steps), each from its
     own noise: no SDE and no log-probs;
  2. reward r of the decoded samples (the distribution-wise reward against the same reference set as GRPO's);
  3. optimality weights w = 0.5 + 0.5 clip(A, -1, 1) in [0, 1], A the group-relative advantages of r;
  4. update on the forward (noising) process: sigma ~ U(0, 1), x_sigma = (1 - sigma) x_0 + sigma eps, target
     v = eps - x_0, implicit policies v+ = (1 - beta) v_old + beta v_theta and v- = (1 + beta) v_old - beta v_theta,
     loss w |v+ - v|^2 + (1 - w) |v- - v|^2; AdamW, grad-norm clip, EMA;
  5. push: the samples enter the reference set (they are the policy's own ODE samples); v_old <- the policy
     (nft.old_decay: eta v_old + (1 - eta) v_theta);
then log, evaluate the EMA weights, checkpoint, as GRPO does. On policy (v_theta = v_old) the loss's gradient is
beta (2 w - 1) times the flow-matching gradient on x_0: samples better than their group's mean are fitted, worse
ones pushed away, and every noise level of the velocity field moves, not only the sampler's grid.

Under torchrun the P groups are split over the ranks as in GRPO (rl/parallel.py): every rank draws the global
batch's noise, samples its rows, the rewards and the reference set are gathered, the gradients summed.
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch

from ..sampling import ode_sample, sigma_schedule
from ..train.flow import flow_interpolate, flow_loss, flow_target
from ..utils import dist as D
from ..utils.io import RunDir
from ..utils.progress import progress as tqdm
from ..utils.rundir import add_inputs, weight_files
from ..utils.runlog import RunLog
from . import parallel
from .loopstate import EmaEvaluation, Policy, due, finish_run, restore_checkpoint, run_evaluator, run_reward, save_state
from .losses import group_advantages
from .parallel import all_reduce_floats, all_reduce_grads_
from .rollout import draw_labels, start_noise
from .settings import nft_rollout_grid
from .update import ema_update

__all__ = ["nft_run", "optimality_weights", "implicit_velocities", "nft_loss", "nft_update",
           "ode_rollouts"]

LOGGED = ("loss_nft", "w_mean", "grad_norm")


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


# --------------------------------------------------------------------------------------------- rollouts

@torch.no_grad()
def ode_rollouts(model, noise: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor, method: str, rows: range,
                 device, batch_size: int) -> torch.Tensor:
    """ODE samples x_0 of this rank's `rows` of the global batch (noise and labels are the whole batch's)."""
    x, lab = noise[rows.start:rows.stop].to(device), labels[rows.start:rows.stop].to(device)
    out = [ode_sample(model, x[i:i + batch_size], lab[i:i + batch_size], sigmas.to(device), method)
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else x.float()


# --------------------------------------------------------------------------------------------- the update

def nft_update(net, model, old_model, ema, optimizer, x0: torch.Tensor, labels: torch.Tensor, w: torch.Tensor,
               rl, nft, generator: torch.Generator, *, rows: range, batch: int) -> dict:
    """Inner epochs x minibatches of the NFT loss at nft.timesteps forward-process noise levels per sample
    (gradients accumulated over them), AdamW, grad-norm clip, EMA after every optimizer step.

    Every rank draws the global batch's permutation, noise levels and noise from `generator` and back-propagates its
    `rows`' share of each minibatch mean (gradients summed over ranks), so the update does not depend on the split.
    Returns the logged means over the updates: loss_nft, w_mean (the minibatches' mean weight), grad_norm."""
    K, beta = int(nft.timesteps), float(nft.beta)
    n_mb = max(1, min(int(rl.minibatches), batch))
    params = [p for p in net.parameters() if p.requires_grad]
    sums, n_updates = dict.fromkeys(LOGGED, 0.0), 0
    for _ in range(int(rl.inner_epochs)):
        perm = torch.randperm(batch, generator=generator)
        sigma = torch.rand((batch, K), generator=generator)
        eps = torch.randn((batch, K, *x0.shape[1:]), generator=generator)
        for idx in perm.chunk(n_mb):
            mine = idx[(idx >= rows.start) & (idx < rows.stop)]
            local_idx = (mine - rows.start).to(x0.device)
            share = mine.numel() / idx.numel()
            optimizer.zero_grad(set_to_none=True)
            local = [0.0, 0.0]
            for k in range(K):
                if mine.numel() == 0:
                    continue
                x, lab, wk = x0[local_idx], labels[local_idx], w[local_idx].to(x0.device)
                s, e = sigma[mine, k].to(x0.device), eps[mine, k].to(x0.device)
                xt, target = flow_interpolate(x, e, s), flow_target(x, e)
                with torch.no_grad():
                    v_old = old_model(xt, s, lab)
                loss = nft_loss(model(xt, s, lab), v_old, target, wk, beta)
                (loss.mean() * share / K).backward()
                local[0] += float(loss.detach().sum())
                local[1] += float(wk.sum())
            all_reduce_grads_(params)
            total = all_reduce_floats(local)
            sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(net.parameters(), rl.grad_clip))
            optimizer.step()
            ema_update(ema, net, rl.ema_decay)
            sums["loss_nft"] += total[0] / idx.numel() / K
            sums["w_mean"] += total[1] / idx.numel() / K
            n_updates += 1
    return {k: v / n_updates for k, v in sums.items()}


# --------------------------------------------------------------------------------------------- the run

def nft_run(cfg, run: RunDir, device, *, resume: bool, net, reward, evaluator, progress: bool,
            on_iteration: Callable[[int, dict], None] | None, initial_eval: dict | None) -> dict:
    """The forward-process trainer of `rl.finetune` (rl.algorithm = nft) in its prepared run directory; returns
    what finetune's GRPO loop returns."""
    world, main = D.world_size(), D.is_main()
    rl, nft = cfg.rl, cfg.nft
    seed, iterations = int(cfg.seed), int(rl.iterations)
    P, G = int(rl.labels_per_iter), int(rl.group_size)
    method, steps = nft_rollout_grid(cfg)
    num_classes, image_shape = int(cfg.model.num_classes), tuple(cfg.model.image_shape)
    balanced, push_every = rl.labels == "balanced", G if rl.push == "one_per_group" else 1
    adv_std, adv_clip = str(rl.adv_std), float(rl.adv_clip)
    null_permute = rl.get("null_control", "none") == "permute"
    eval_every, checkpoint_every = int(cfg.eval.every), int(cfg.checkpoint.every)

    # Policy v_theta (trained), the old policy v_old (samples; the implicit policies' centre), EMA (evaluated).
    pol = Policy.build(cfg, device, net, seed)
    gen = pol.generator
    old = copy.deepcopy(pol.net).requires_grad_(False)
    old_model = pol.velocity(old)
    optimizer = pol.optimizer(rl)

    evaluator = run_evaluator(cfg, device, evaluator, needed=eval_every > 0 or reward is None)
    plan = pol.eval_plan(cfg, world)
    reward = run_reward(cfg, run, reward, pol, evaluator, progress=progress)
    sigmas = sigma_schedule(steps, shift=float(rl.shift))
    rows = parallel.group_rows(P, G)
    add_inputs(run, weight_files(evaluator, reward), main=main)

    ckpt_path = run.checkpoints / "last.pt"
    start, history, evals = 0, [], []
    st = restore_checkpoint(ckpt_path, pol.net, pol.ema, optimizer, gen, reward=reward) if resume else None
    if st is not None:
        old.load_state_dict(st["old"])
        start, history, evals = int(st["iteration"]), list(st["history"]), list(st["evals"])
    log = RunLog(run.root, start=start, enabled=main)
    evaluate = EmaEvaluation(pol.ema, evaluator, plan, evals, log, arch=pol.arch, decode=pol.decode, device=device,
                             samples=run.samples, grid=int(cfg.eval.grid), iterations=iterations, progress=progress,
                             main=main)
    evaluate.first(start, initial_eval, eval_every)

    bar = tqdm(range(start, iterations), desc=f"NFT {cfg.reward.name}", unit="it", disable=not (progress and main),
               initial=start, total=iterations)
    for it in bar:
        # 1. ODE samples of the old policy, each from its own noise (this rank's groups of the global batch)
        t0 = time.perf_counter()
        labels, groups = draw_labels(P, G, num_classes, gen, balanced=balanced, start=it * P, seed=seed)
        noise = start_noise(groups, image_shape, gen, shared=False)
        x0 = ode_rollouts(old_model, noise, labels, sigmas, method, rows, device, int(rl.batch_size))
        images = pol.decode(x0)
        my_labels, my_groups = labels[rows.start:rows.stop].to(device), groups[rows.start:rows.stop].to(device)
        t1 = time.perf_counter()
        # 2. rewards r and 3. optimality weights w, of the whole batch on every rank
        r, gathered = parallel.score(reward, images, my_labels, my_groups)
        if null_permute:
            r = r[torch.randperm(r.numel(), generator=gen).to(r.device)]
        A, zero_std = group_advantages(r, groups, std=adv_std, clip=adv_clip)
        w = optimality_weights(A)
        t2 = time.perf_counter()
        # 4. forward-process update around v_old, EMA
        stats = nft_update(pol.net, pol.model, old_model, pol.ema, optimizer, x0, my_labels,
                           w[rows.start:rows.stop], rl, nft, gen, rows=rows, batch=P * G)
        t3 = time.perf_counter()
        # 5. push the samples into the reference set; v_old moves to the policy
        parallel.push(reward, images, my_labels, gathered, every=push_every)
        ema_update(old, pol.net, float(nft.old_decay))
        fd_ref = float(reward.fd()) if hasattr(reward, "fd") else None
        t4 = time.perf_counter()

        record = {"iteration": it + 1, "r_mean": float(r.mean()), "r_std": float(r.std()), "fd_ref": fd_ref,
                  "zero_std_frac": float(zero_std.float().mean()), "w_frac_clipped": float((A.abs() >= 1).float().mean()),
                  **stats, "time_rollout": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2,
                  "time_push": t4 - t3}
        history.append(record)
        log.log(record)
        bar.set_postfix(r=f"{record['r_mean']:.3g}", fd_ref=f"{fd_ref:.3g}" if fd_ref is not None else "-")
        if evaluator is not None and due(it + 1, eval_every, iterations):
            evaluate(it + 1)
        if due(it + 1, checkpoint_every, iterations):
            save_state(ckpt_path, pol, optimizer, reward, {"old": old.state_dict(), "iteration": it + 1,
                                                           "history": history, "evals": evals},
                       merge_extra={"rl": "nft", "reward": cfg.reward.name, "iteration": it + 1}, main=main)
        if on_iteration is not None:
            on_iteration(it + 1, record)
    bar.close()
    log.close()

    return finish_run(run, pol, reward, evaluate, history, evals,
                      {"rl": "nft", "reward": cfg.reward.name, "iterations": iterations}, main=main)
