"""GRPO across processes (torchrun; NCCL on GPUs, gloo on CPU): what each rank does with its share of a batch.

One process is the world-size-1 case of every helper here. The rules (docs/scale.md):
- every rank draws the *global* labels, noise and SDE step noise from the same generator and keeps its own rows,
  so the union of the ranks' samples is the single-process batch of the same size and seed, and the generators
  of all ranks stay in step;
- the groups are sharded whole (rank r holds groups [r P / W, (r+1) P / W)), so group statistics are local;
- features of the new samples are gathered in rank order and every rank pushes the same rows, so the reference
  set (and its sums) is a replica on every rank; each rank scores only its own candidates against it;
- gradients of a minibatch are summed over ranks (the loss of each rank is its share of the global minibatch
  mean), so the update equals the single-process one; only rank 0 writes files.
"""

from __future__ import annotations

import torch

from ..reward import Reward
from ..sampling import Trajectory, check_sigmas, noise_levels, sde_step, sigma_vector
from ..utils import dist as D


def group_rows(P: int, G: int) -> range:
    """This rank's rows of a batch of P groups of G samples: whole groups, contiguous, in rank order."""
    g = D.shard_indices(P)
    return range(g.start * G, g.stop * G)


def draw_step_noise(shape, generator: torch.Generator, rows: range, device) -> torch.Tensor:
    """The global batch's noise for one SDE step (drawn exactly as `sampling.randn_like` does), this rank's rows."""
    noise = torch.randn(tuple(shape), dtype=torch.float32, device=generator.device, generator=generator)
    return noise[rows.start:rows.stop].to(device)


@torch.no_grad()
def rollout_rows(model, noise: torch.Tensor, labels: torch.Tensor | None, sigmas: torch.Tensor, a,
                 generator: torch.Generator, rows: range, device=None):
    """`sampling.rollout` of the global batch `noise` restricted to `rows`: the same draws, only these samples.

    Every rank consumes the generator as the single-process rollout does (the start noise is given; one
    global-shape draw per step), so all ranks' generators stay identical. Returns a `Trajectory`.
    """
    sig_t = check_sigmas(sigmas.cpu())
    sig = sig_t.tolist()
    levels = noise_levels(a, len(sig) - 1)
    device = noise.device if device is None else torch.device(device)
    x = noise[rows.start:rows.stop].to(device).float()
    x = x if sig[0] == 1.0 else x * sig[0]
    lab = None if labels is None else labels[rows.start:rows.stop].to(device)
    xs, log_probs = [x], []
    for s, s_next, a_i in zip(sig[:-1], sig[1:], levels):
        eps = draw_step_noise(noise.shape, generator, rows, device)
        if x.shape[0] == 0:
            out_x, out_lp = x, torch.zeros(0, device=device)
        else:
            v = model(x, sigma_vector(s, x), lab)
            out = sde_step(x, v, s, s_next, a_i, noise=eps)
            out_x, out_lp = out.x_next, out.log_prob
        x = out_x
        xs.append(x)
        log_probs.append(out_lp)
    return Trajectory(torch.stack(xs), torch.stack(log_probs), sig_t)


# ----------------------------------------------------------------------------------------------------------
# Rewards: local candidates scored against the replicated reference set, through the Reward interface only

def score(reward: Reward, images: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor):
    """Rewards of the whole batch (every rank gets all of them, in row order) and, for a reward that keeps state,
    the gathered features of the new samples (the rows every rank will push). `images`, `labels`, `groups` are
    this rank's."""
    f_local = reward.features(images)
    r_local = reward.score_features(f_local, labels, groups).detach().float().cpu()
    gathered = D.all_gather_rows(detached(f_local)) if reward.keeps_state else None
    return D.all_gather_rows(r_local), gathered


def detached(f):
    """Features as rows to gather: numpy arrays as they are, tensors detached on the CPU."""
    return f.detach().cpu() if torch.is_tensor(f) else f


def push(reward: Reward, gathered_features, labels: torch.Tensor, every: int = 1) -> None:
    """Step 5 on every rank with the same rows: the gathered features of the whole batch and its (global) labels;
    nothing for a reward without state. every = G keeps the first sample of each group (ranks hold whole groups,
    so the global stride is the local one)."""
    if gathered_features is not None:
        reward.push_features(gathered_features[::every], labels[::every])


# ----------------------------------------------------------------------------------------------------------
# Gradients

def all_reduce_grads_(params, bucket_elems: int = 1 << 24) -> None:
    """Sum the gradients of `params` over ranks, in place, in flat buckets (missing gradients count as zeros)."""
    if not D.is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params + [None]:
        if p is not None:
            bucket.append(p.grad)
            size += p.grad.numel()
        if bucket and (p is None or size >= bucket_elems):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            D.all_reduce_sum_(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0
