"""GRPO fine-tuning of a flow generator with a distribution-wise (or sample-wise) reward (METHOD.md §4).

One iteration, top to bottom:
  1. rollout: P labels x G samples from the old policy with T stochastic steps (x_t, x_next, log p_old);
  2. reward r (distribution-wise: subset-replace FD improvement per group; or a sample-wise baseline);
  3. advantages A, group-relative, clipped;
  4. PPO-clip update on the trained steps + beta * KL to the frozen base policy, AdamW, grad-norm clip, EMA;
  5. the new samples enter the reward's reference set (`reward.after_step`).
Logged names follow the method's symbols (r, A, rho, KL, beta); see docs/rl.md for every quantity.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..utils import dist as D
from . import parallel
from .losses import (approx_kl, clip_fractions, ema_update, gaussian_kl, group_advantages, ppo_clip_loss,
                     trained_steps)
from .state import load_checkpoint, rng_state, save_checkpoint, set_rng_state

# Defaults under every preset (configs/fmnist_grpo*.yaml override them); docs/rl.md explains each key.
DEFAULTS: dict[str, Any] = {
    "name": "grpo",
    "seed": 0,
    "device": "cpu",
    "model": {"path": "weights/fmnist-base.safetensors", "num_classes": 10, "image_shape": [1, 32, 32]},
    "rl": {
        "iterations": 30,
        "labels_per_iter": 16,      # P
        "labels": "balanced",       # balanced: every class equally often over iterations (draw_labels) | random
        "shared_noise": False,      # one starting noise per group (start_noise)
        "push": "all",              # all | one_per_group: the samples that enter the reference set after a step
        "reference": "rollout",     # rollout: the reference set holds the rollouts | ode: Euler-ODE samples (a = 0)
        "group_size": 8,            # G
        "steps": 10,                # T
        "shift": 1.0,
        "noise_level": 0.7,         # a
        "clean_last_step": True,    # a = 0 on the last (never trained) step: rewards score noise-free samples
        "noise_steps": "all",       # all: a on every step | window: a only on the trained window, ODE elsewhere
        "train_steps": {"mode": "window", "window": 6, "fraction": 0.5, "count": None},
        "inner_epochs": 1,
        "minibatches": 2,
        "clip_eps": 0.2,            # eps
        "beta": 0.01,               # KL weight
        "adv_std": "group",         # group | global
        "adv_clip": 5.0,
        "lr": 1e-4,
        "weight_decay": 0.0,
        "adam_betas": [0.9, 0.999],
        "grad_clip": 1.0,
        "ema_decay": 0.9,
        "batch_size": 256,          # rollout / reference-set generation batch
    },
    # passed to distreward.reward.build_reward (its keys: docs/reward.md), except reference_size (N, used here)
    "reward": {"name": "distribution", "features": "fmnist-reward", "reference_size": 1000},
    "eval": {"every": 10, "n": 2000, "steps": 20, "method": "euler", "seed": 1234, "grid": 64, "batch_size": 500},
    "checkpoint": {"every": 5},
}


@dataclass
class Rollouts:
    """What one iteration collects: labels, group ids, the trajectory and the rewards/advantages."""
    labels: torch.Tensor       # (B,)
    groups: torch.Tensor       # (B,)
    xs: torch.Tensor           # (T+1, B, C, H, W)
    log_probs: torch.Tensor    # (T, B)  log p_old per step
    sigmas: torch.Tensor       # (T+1,)
    rewards: torch.Tensor | None = None
    adv: torch.Tensor | None = None

    @property
    def images(self) -> torch.Tensor:
        return self.xs[-1].clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------
# Pieces of one iteration

def draw_labels(P: int, G: int, num_classes: int, generator: torch.Generator, *, balanced: bool = False,
                start: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """P class labels, each repeated G times; group g holds the G samples of label g.

    balanced: the labels are positions [start, start + P) of a stream of shuffled blocks of all classes (block k
    shuffled by seed and k alone, so it needs no state to resume), so every class gets the same number of groups
    up to one block. The reference set then keeps the class balance of the real data; with independent draws an
    iteration that over-represents a class raises its FD by itself and rewards atypical samples of that class.
    """
    if not balanced:
        labels = torch.randint(0, num_classes, (P,), generator=generator)
    else:
        first, last = start // num_classes, (start + P - 1) // num_classes
        blocks = [torch.randperm(num_classes, generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + k))
                  for k in range(first, last + 1)]
        offset = start - first * num_classes
        labels = torch.cat(blocks)[offset:offset + P]
    return labels.repeat_interleave(G), torch.arange(P).repeat_interleave(G)


def rollout_noise_levels(rl) -> list[float]:
    """The noise level a of each of the T rollout steps. The last step is never trained, so with
    clean_last_step it is the plain Euler step (a = 0): the sample the reward scores carries no leftover noise.
    With noise_steps 'window' only the trained window is stochastic and every other step is the ODE's Euler step,
    so the rollouts stay close to what the inference ODE sampler draws (as MixGRPO / Flow-GRPO-Fast)."""
    T, a = int(rl["steps"]), float(rl["noise_level"])
    levels = [a] * (T - 1) + [0.0 if rl.get("clean_last_step", True) else a]
    where = str(rl.get("noise_steps", "all"))
    if where == "window":
        ts = rl["train_steps"]
        if ts["mode"] != "window":
            raise ValueError("rl.noise_steps=window needs rl.train_steps.mode=window (the stochastic steps must be "
                             "known before the rollout); use noise_steps=all with mode=fraction")
        keep = set(trained_steps(T, "window", window=_window(ts["window"])))
        levels = [x if j in keep else 0.0 for j, x in enumerate(levels)]
    elif where != "all":
        raise ValueError(f"rl.noise_steps must be 'all' or 'window', got {where!r}")
    return levels


def reference_noise_levels(rl):
    """The sampler of the reference set's rows: the rollouts' (rl.reference = rollout), or the Euler ODE on the
    rollout grid (ode, a = 0 on every step): then the set holds what the inference sampler serves, and a candidate
    is rewarded for what it would fix in the ODE's distribution rather than the SDE's."""
    return 0.0 if str(rl.get("reference", "rollout")) == "ode" else rollout_noise_levels(rl)


@torch.no_grad()
def ode_rows(model, labels: torch.Tensor, image_shape, sigmas: torch.Tensor, generator: torch.Generator, device,
             decode=None, batch_size: int = 256) -> torch.Tensor:
    """Step 5 with rl.reference = ode: one Euler-ODE sample of the current policy per label, from fresh noise
    (the same draws on every rank, so every replica of the reference set takes the same rows); decoded, clamped."""
    from ..sampling import ode_sample

    noise = torch.randn((labels.shape[0], *image_shape), generator=generator)
    out = []
    for i in range(0, labels.shape[0], batch_size):
        x = ode_sample(model, noise[i:i + batch_size].to(device), labels[i:i + batch_size].to(device),
                       sigmas.to(device), method="euler")
        out.append((x if decode is None else decode(x)).clamp(-1, 1))
    return torch.cat(out)


def start_noise(groups: torch.Tensor, image_shape, generator: torch.Generator, shared: bool = False) -> torch.Tensor:
    """The rollouts' starting noise x_1: independent per sample, or one draw per group shared by its G members.

    Shared (as DanceGRPO does): the samples of a group then differ only by the noise the SDE steps inject, which
    are the actions the log-probs score, so the group-relative advantage credits them and not the luck of x_1.
    """
    if not shared:
        return torch.randn((groups.shape[0], *image_shape), generator=generator)
    return torch.randn((int(groups.max()) + 1, *image_shape), generator=generator)[groups]


def collect(model, labels: torch.Tensor, groups: torch.Tensor, sigmas: torch.Tensor, a,
            image_shape, generator: torch.Generator, device="cpu", shared_noise: bool = False) -> Rollouts:
    """Step 1: stochastic rollouts of the old policy, keeping every x_t and log p_old."""
    from ..sampling import rollout

    noise = start_noise(groups, image_shape, generator, shared_noise).to(device)
    traj = rollout(model, noise, labels.to(device), sigmas.to(device), a, generator=generator)
    return Rollouts(labels=labels, groups=groups, xs=traj.xs.detach(), log_probs=traj.log_probs.detach(),
                    sigmas=traj.sigmas.detach())


def step_terms(model, ref_model, ro: Rollouts, j: int, idx: torch.Tensor, a: float, clip_eps: float):
    """Loss terms of sampler step j on samples idx: per-sample PPO-clip loss, KL to the reference, log rho."""
    from ..sampling import step_log_prob

    x, x_next, labels = ro.xs[j, idx], ro.xs[j + 1, idx], ro.labels[idx].to(ro.xs.device)
    sigma, sigma_next = ro.sigmas[j], ro.sigmas[j + 1]
    log_prob, mean, std = step_log_prob(model, x, x_next, sigma, sigma_next, a, labels)
    with torch.no_grad():
        _, mean_ref, _ = step_log_prob(ref_model, x, x_next, sigma, sigma_next, a, labels)
    loss_pg, rho = ppo_clip_loss(ro.adv[idx].to(log_prob.device), log_prob, ro.log_probs[j, idx], clip_eps)
    kl = gaussian_kl(mean, mean_ref, std.detach() if torch.is_tensor(std) else std)
    return loss_pg, kl, rho, log_prob - ro.log_probs[j, idx]


def update(net, model, ref_model, ema, optimizer, ro: Rollouts, steps: list[int], rl, generator: torch.Generator,
           first_rho: list | None = None) -> dict:
    """Step 4: inner epochs x minibatches of PPO-clip + beta KL, grads accumulated over the trained steps."""
    B = ro.labels.shape[0]
    n_mb = max(1, min(int(rl.minibatches), B))
    sums: dict[str, float] = {"loss_pg": 0.0, "loss_kl": 0.0, "kl_approx": 0.0, "clip_hi": 0.0, "clip_lo": 0.0,
                              "grad_norm": 0.0}
    rho_per_step = {j: 0.0 for j in steps}
    n_updates = 0
    for _ in range(int(rl.inner_epochs)):
        perm = torch.randperm(B, generator=generator)
        for idx in perm.chunk(n_mb):
            optimizer.zero_grad(set_to_none=True)
            for j in steps:
                loss_pg, kl, rho, log_rho = step_terms(model, ref_model, ro, j, idx, rl.noise_level, rl.clip_eps)
                loss = (loss_pg.mean() + rl.beta * kl.mean()) / len(steps)
                loss.backward()
                if first_rho is not None and n_updates == 0:
                    first_rho.append(rho.detach())
                hi, lo = clip_fractions(rho.detach(), rl.clip_eps)
                sums["loss_pg"] += loss_pg.mean().item() / len(steps)
                sums["loss_kl"] += kl.mean().item() / len(steps)
                sums["kl_approx"] += approx_kl(log_rho.detach()).item() / len(steps)
                sums["clip_hi"] += hi / len(steps)
                sums["clip_lo"] += lo / len(steps)
                rho_per_step[j] += rho.detach().mean().item()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), rl.grad_clip)
            sums["grad_norm"] += float(grad_norm)
            optimizer.step()
            ema_update(ema, net, rl.ema_decay)
            n_updates += 1
    out = {k: v / n_updates for k, v in sums.items()}
    out.update({f"rho_mean/t{j}": v / n_updates for j, v in rho_per_step.items()})
    return out


@torch.no_grad()
def collect_rows(model, labels: torch.Tensor, groups: torch.Tensor, sigmas: torch.Tensor, a, image_shape,
                 generator: torch.Generator, device, rows: range, shared_noise: bool = False) -> Rollouts:
    """Step 1 on one rank: the global batch's noise is drawn as `collect` draws it, this rank's rows are rolled out
    (parallel.rollout_rows), so the ranks' rollouts together are the single-process batch."""
    noise = start_noise(groups, image_shape, generator, shared_noise)
    traj = parallel.rollout_rows(model, noise, labels, sigmas, a, generator, rows, device)
    sl = slice(rows.start, rows.stop)
    return Rollouts(labels=labels[sl], groups=groups[sl], xs=traj.xs, log_probs=traj.log_probs, sigmas=traj.sigmas)


def update_sharded(net, model, ref_model, ema, optimizer, ro: Rollouts, steps: list[int], rl,
                   generator: torch.Generator, rows: range, batch: int) -> dict:
    """`update` across ranks: the same global minibatches (one permutation of the whole batch, drawn on every rank);
    each rank back-propagates its members' share of the minibatch mean, the gradients are summed over ranks, and
    every rank takes the same clipped AdamW step (the weights stay identical, as in one process)."""
    n_mb = max(1, min(int(rl.minibatches), batch))
    eps, n_steps = float(rl.clip_eps), len(steps)
    keys = ("loss_pg", "loss_kl", "kl_approx", "clip_hi", "clip_lo")
    sums = {k: 0.0 for k in (*keys, "grad_norm")}
    rho_per_step = {j: 0.0 for j in steps}
    params = [p for p in net.parameters() if p.requires_grad]
    n_updates = 0
    for _ in range(int(rl.inner_epochs)):
        perm = torch.randperm(batch, generator=generator)
        for idx in perm.chunk(n_mb):
            n_tot = idx.numel()
            mine = idx[(idx >= rows.start) & (idx < rows.stop)] - rows.start
            optimizer.zero_grad(set_to_none=True)
            local = [0.0] * (len(keys) + n_steps)
            for k, j in enumerate(steps):
                if mine.numel() == 0:
                    continue
                loss_pg, kl, rho, log_rho = step_terms(model, ref_model, ro, j, mine, rl.noise_level, eps)
                ((loss_pg.sum() + rl.beta * kl.sum()) / (n_tot * n_steps)).backward()
                r, lr_ = rho.detach(), log_rho.detach()
                local[0] += float(loss_pg.detach().sum())
                local[1] += float(kl.detach().sum())
                local[2] += float((torch.expm1(lr_) - lr_).sum())
                local[3] += float((r > 1 + eps).sum())
                local[4] += float((r < 1 - eps).sum())
                local[len(keys) + k] += float(r.sum())
            parallel.all_reduce_grads_(params)
            total = parallel.all_reduce_floats(local)
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), rl.grad_clip)
            sums["grad_norm"] += float(grad_norm)
            optimizer.step()
            ema_update(ema, net, rl.ema_decay)
            for i, key in enumerate(keys):
                sums[key] += total[i] / n_tot / n_steps
            for k, j in enumerate(steps):
                rho_per_step[j] += total[len(keys) + k] / n_tot
            n_updates += 1
    out = {k: v / n_updates for k, v in sums.items()}
    out.update({f"rho_mean/t{j}": v / n_updates for j, v in rho_per_step.items()})
    return out


# ----------------------------------------------------------------------------------------------------------
# Sampling with the inference ODE sampler, evaluation

def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


@torch.no_grad()
def ode_images(net, n: int, *, num_classes: int, image_shape, steps: int, method: str = "euler", shift: float = 1.0,
               seed: int = 0, batch_size: int = 500, device="cpu", progress: bool = False,
               desc: str = "ODE samples") -> tuple[torch.Tensor, torch.Tensor]:
    """n class-balanced samples from fixed noise seeds with the deterministic inference sampler."""
    from tqdm.auto import tqdm

    from ..sampling import FlowVelocity, ode_sample, sigma_schedule

    model = FlowVelocity(net)
    sigmas = sigma_schedule(steps, shift=shift).to(device)
    gen = torch.Generator().manual_seed(int(seed))
    labels = balanced_labels(n, num_classes)
    noise = torch.randn((n, *image_shape), generator=gen)
    out = []
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        out.append(ode_sample(model, noise[i:i + batch_size].to(device), labels[i:i + batch_size].to(device),
                              sigmas, method=method).clamp(-1, 1).cpu())
    return torch.cat(out), labels


@torch.no_grad()
def sde_images(net, n: int, *, num_classes: int, image_shape, steps: int, a, shift: float = 1.0,
               seed: int = 0, batch_size: int = 256, device="cpu", progress: bool = False,
               desc: str = "SDE samples") -> tuple[torch.Tensor, torch.Tensor]:
    """n class-balanced samples from the RL sampler (the policy's own distribution, as the reference set holds)."""
    from tqdm.auto import tqdm

    from ..sampling import FlowVelocity, rollout, sigma_schedule

    model = FlowVelocity(net)
    sigmas = sigma_schedule(steps, shift=shift).to(device)
    gen = torch.Generator().manual_seed(int(seed))
    labels = balanced_labels(n, num_classes)
    out = []
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        lab = labels[i:i + batch_size]
        noise = torch.randn((lab.shape[0], *image_shape), generator=gen).to(device)
        out.append(rollout(model, noise, lab.to(device), sigmas, a, generator=gen).xs[-1].clamp(-1, 1).cpu())
    return torch.cat(out), labels


def evaluate_generator(net, evaluator, cfg, *, progress: bool = False, desc: str = "eval") -> tuple[dict, torch.Tensor]:
    """FD on both feature networks, precision, recall of cfg.eval.n ODE samples; returns (metrics, images)."""
    ev = cfg["eval"]
    images, _ = ode_images(net, int(ev["n"]), num_classes=int(cfg["model"]["num_classes"]),
                           image_shape=tuple(cfg["model"]["image_shape"]), steps=int(ev["steps"]),
                           method=ev["method"], shift=float(cfg["rl"]["shift"]), seed=int(ev["seed"]),
                           batch_size=int(ev["batch_size"]), device=cfg["device"], progress=progress, desc=desc)
    metrics = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
               for k, v in evaluator.evaluate(images).items()}
    return metrics, images


def _eval_batch_generator(seed: int, b: int) -> torch.Generator:
    """Evaluation batch b's own noise stream: samples do not depend on how batches are spread over ranks."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(b))


@torch.no_grad()
def eval_samples(net, labels: torch.Tensor, noise: torch.Tensor, cfg, *, arch: str, generator: torch.Generator,
                 decode) -> torch.Tensor:
    """One batch of evaluation images: eval.sampler `ode` (eval.method euler/heun on the flow schedule) or `sit-sde`
    (SiT's SDE sampler, the SiT-XL/2 baseline protocol), then decoded and clamped."""
    from ..sampling import ode_sample, sigma_schedule, sit_sde_sample
    from .scale import velocity_model

    ev, device = cfg["eval"], cfg["device"]
    sampler = str(ev.get("sampler") or "ode")
    noise, labels = noise.to(device), labels.to(device)
    if sampler == "sit-sde":
        if arch != "sit":
            raise ValueError(f"eval.sampler sit-sde needs a SiT generator (model.arch sit), got {arch!r}")
        sde = dict(ev.get("sde") or {})
        x = sit_sde_sample(net, noise, labels, steps=int(ev["steps"]), diffusion_norm=float(sde.get("diffusion_norm", 1.0)),
                           last_step=sde.get("last_step", "mean"), last_step_size=float(sde.get("last_step_size", 0.04)),
                           generator=generator)
    elif sampler == "ode":
        model = velocity_model(net, arch, float(cfg["model"].get("cfg_scale") or 1.0), cfg["model"].get("num_classes"))
        x = ode_sample(model, noise, labels, sigma_schedule(int(ev["steps"]), shift=float(cfg["rl"]["shift"])).to(device),
                       method=ev["method"])
    else:
        raise ValueError(f"eval.sampler must be 'ode' or 'sit-sde', got {sampler!r}")
    return decode(x)


def fd_from_stats(evaluator, stats: list) -> dict:
    """The evaluator's FD metrics from generated-side statistics (one GaussianStats per feature network)."""
    from ..metrics import frechet_distance

    fds = {}
    for label, g, st, half in zip(evaluator.labels, stats, evaluator.real_stats, evaluator._sigma_half):
        fds[label] = None if st is None or g.n < 2 else frechet_distance(g.mu, g.sigma, st.mu, st.sigma, sigma2_half=half)
    values = list(fds.values())
    return {"fd_reward": values[0], "fd_eval": values[1] if len(values) > 1 else None, "fd": fds, "kid": None,
            "kid_std": None, "precision": None, "recall": None, "n": int(stats[0].n)}


def sharded_metrics(evaluator, batches, empty_shape) -> dict:
    """The evaluator's metrics of every rank's image batches together: this rank's `batches` (an iterable of image
    tensors) are reduced to features; FD comes from the merged float64 sums (utils.dist.merge_gaussian_stats), KID
    and precision/recall, where the evaluator has real features, from the gathered features. A stand-in evaluator
    without networks scores the gathered images (`empty_shape`: the trailing shape a rank without batches sends)."""
    from ..features import compute_features
    from ..metrics import GaussianStats

    nets = getattr(evaluator, "nets", None)
    if nets is None:
        local = list(batches)
        return dict(evaluator.evaluate(D.all_gather_rows(torch.cat(local) if local else torch.zeros((0, *empty_shape)))))
    stats = [GaussianStats(int(f.dim)) for f in nets]
    keep = evaluator.has_real_features
    feats: list[list] = [[] for _ in nets]
    for images in batches:
        for i, fnet in enumerate(nets):
            f = compute_features(fnet, images, batch_size=getattr(evaluator, "batch_size", 500))
            stats[i].update(f)
            if keep:
                feats[i].append(f)
    if keep:
        return evaluator.evaluate_features([D.all_gather_rows(np.concatenate(f) if f else np.zeros((0, st.dim)))
                                            for f, st in zip(feats, stats)])
    return fd_from_stats(evaluator, [D.merge_gaussian_stats(st) for st in stats])


def evaluate_sharded(net, evaluator, cfg, *, arch: str, decode, progress: bool = False,
                     desc: str = "eval") -> tuple[dict, torch.Tensor]:
    """Evaluation for latent models and for several processes: cfg.eval.n class-balanced samples in batches of
    eval.batch_size, batch b from its own seed; each rank samples a contiguous block of batches and keeps only
    features (never all images), merged by `sharded_metrics`. Returns (metrics, the first eval.grid images of
    rank 0)."""
    from tqdm.auto import tqdm

    ev = cfg["eval"]
    n, bs, grid = int(ev["n"]), int(ev["batch_size"]), int(ev.get("grid", 0))
    shape, num_classes = tuple(cfg["model"]["image_shape"]), int(cfg["model"]["num_classes"])
    labels_all = balanced_labels(n, num_classes)
    shown = []

    def batches():
        for b in tqdm(D.shard_indices((n + bs - 1) // bs), desc=desc, disable=not progress, unit="batch", leave=False):
            lo, hi = b * bs, min(n, (b + 1) * bs)
            g = _eval_batch_generator(int(ev["seed"]), b)
            noise = torch.randn((hi - lo, *shape), generator=g)
            images = eval_samples(net, labels_all[lo:hi], noise, cfg, arch=arch, generator=g, decode=decode).cpu()
            if sum(x.shape[0] for x in shown) < grid:
                shown.append(images[:grid])
            yield images

    metrics = sharded_metrics(evaluator, batches(), shape)
    return metrics, (torch.cat(shown)[:grid] if shown else torch.zeros((0, *shape)))


@torch.no_grad()
def reference_features(model, decode, feature_net, n: int, cfg, *, progress: bool = False) -> np.ndarray:
    """Features of n samples of the base policy with the RL sampler (the reference set's initial rows), batch by
    batch (images are never all held); the batches' rows are spread over the ranks and gathered back in order."""
    from tqdm.auto import tqdm

    from ..features import compute_features
    from ..sampling import sigma_schedule

    rl, device = cfg["rl"], cfg["device"]
    shape, bs = tuple(cfg["model"]["image_shape"]), int(rl["batch_size"])
    sigmas = sigma_schedule(int(rl["steps"]), shift=float(rl["shift"]))
    gen = torch.Generator().manual_seed(int(cfg["seed"]) + 7919)
    labels = balanced_labels(n, int(cfg["model"]["num_classes"]))
    out, index = [], []
    for i in tqdm(range(0, n, bs), desc="reference set: base samples", disable=not progress, unit="batch", leave=False):
        lab = labels[i:i + bs]
        noise = torch.randn((lab.shape[0], *shape), generator=gen)
        rows = D.shard_indices(lab.shape[0])
        traj = parallel.rollout_rows(model, noise, lab, sigmas, reference_noise_levels(rl), gen, rows, device)
        if len(rows):
            out.append(compute_features(feature_net, decode(traj.xs[-1]).cpu(), batch_size=bs))
            index.append(np.arange(i + rows.start, i + rows.stop))
    dim = int(feature_net.dim)
    feats = D.all_gather_rows(np.concatenate(out) if out else np.zeros((0, dim)))
    order = np.argsort(D.all_gather_rows(np.concatenate(index) if index else np.zeros(0, np.int64)), kind="stable")
    return feats[order]


# ----------------------------------------------------------------------------------------------------------
# Reward set-up

def reward_state(reward) -> dict | None:
    """The reward's resumable state (the reference set of a distribution-wise reward; empty for sample-wise)."""
    return reward.state_dict() if hasattr(reward, "state_dict") else None


def load_reward_state(reward, state: dict | None) -> None:
    if state is not None and hasattr(reward, "load_state_dict"):
        reward.load_state_dict(state)


def _evaluator_net(evaluator, name: str):
    """The evaluator's feature network of that name and its real data (stats, features), if it has one."""
    labels = list(getattr(evaluator, "labels", []) or [])
    if name not in labels:
        return None, None, None
    i = labels.index(name)
    feats = getattr(evaluator, "real_feats", None)
    return evaluator.nets[i], evaluator.real_stats[i], (feats[i] if feats is not None else None)


def build_reward_for_run(cfg, net, run_dir: Path, evaluator=None, *, progress: bool = False, model=None, decode=None):
    """The reward named by cfg.reward. Real statistics (and features, for k-NN) come from cfg.reward.real_stats
    (.npz, or an EDM2 .pkl) or from the evaluator's cache of the same feature network; a distribution-wise reward
    gets its reference set from N = cfg.reward.reference_size samples of the base policy with the RL sampler (the
    distribution it will hold), whose features are cached in the run directory. `model` (the velocity adapter) and
    `decode` (latents -> images) are given for the presets and for several processes; then the samples are drawn
    batch by batch, spread over the ranks (`reference_features`)."""
    from ..features import compute_features
    from ..reward import build_reward
    from .scale import feature_network, real_stats_for

    rcfg = dict(cfg["reward"])
    n = int(rcfg.pop("reference_size", 1000))
    name = rcfg.get("name", "distribution")
    feature_net, real_stats, real_feats = _evaluator_net(evaluator, rcfg.get("features", "fmnist-reward"))
    if rcfg.get("weights") is not None:
        feature_net = real_stats = real_feats = None    # another network than the evaluator's
    if name == "classifier":
        return build_reward(rcfg, device=cfg["device"], feature_net=feature_net)
    if name == "knn":
        return build_reward(rcfg, device=cfg["device"], feature_net=feature_net,
                            real_features=None if rcfg.get("real_features") else real_feats)
    if feature_net is None:
        feature_net = feature_network(rcfg.get("features", "fmnist-reward"), weights=rcfg.get("weights"),
                                      device=cfg["device"])
    features_name = str(rcfg.get("features", "fmnist-reward"))
    if rcfg.get("real_stats") is not None:
        real_stats = None if model is None else real_stats_for(features_name, rcfg["real_stats"], int(feature_net.dim))
    elif real_stats is None and features_name == "random":
        real_stats = real_stats_for("random", None, int(feature_net.dim))
    cache = run_dir / "base_reference_features.npy"
    if D.broadcast_object(cache.is_file()):
        feats = np.load(cache, allow_pickle=False)
    elif model is None:
        rl = cfg["rl"]
        images, _ = sde_images(net, n, num_classes=int(cfg["model"]["num_classes"]),
                               image_shape=tuple(cfg["model"]["image_shape"]), steps=int(rl["steps"]),
                               a=reference_noise_levels(rl), shift=float(rl["shift"]), seed=int(cfg["seed"]) + 7919,
                               batch_size=int(rl["batch_size"]), device=cfg["device"], progress=progress,
                               desc="reference set: base samples")
        feats = compute_features(feature_net, images)
        _save_npy(cache, feats)
    else:
        feats = reference_features(model, decode, feature_net, n, cfg, progress=progress and D.is_main())
        if D.is_main():
            _save_npy(cache, feats)
    return build_reward(rcfg, device=cfg["device"], feature_net=feature_net, real_stats=real_stats,
                        init_features=feats)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    import io

    from ..utils.io import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr, dtype=np.float64))
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------
# The loop

def _as_cfg(cfg) -> Any:
    from omegaconf import DictConfig, OmegaConf

    base = OmegaConf.create(DEFAULTS)
    merged = OmegaConf.merge(base, cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg or {}))
    OmegaConf.set_struct(merged, False)
    return merged


def _check_config(cfg, world: int = 1) -> None:
    rl = cfg.rl
    for key in ("iterations", "labels_per_iter", "group_size", "steps", "inner_epochs", "minibatches"):
        if int(rl[key]) < 1:
            raise ValueError(f"rl.{key} must be >= 1, got {rl[key]}")
    if rl.labels not in ("balanced", "random"):
        raise ValueError(f"rl.labels must be 'balanced' or 'random', got {rl.labels!r}")
    if rl.push not in ("all", "one_per_group"):
        raise ValueError(f"rl.push must be 'all' or 'one_per_group', got {rl.push!r}")
    if rl.get("reference", "rollout") not in ("rollout", "ode"):
        raise ValueError(f"rl.reference must be 'rollout' or 'ode', got {rl.reference!r}")
    if int(rl.group_size) < 2:
        raise ValueError(f"rl.group_size must be >= 2 (advantages are relative within a group), got {rl.group_size}")
    if float(rl.noise_level) <= 0:
        raise ValueError(f"rl.noise_level (a) must be > 0 for GRPO (a = 0 is the deterministic ODE: no log-prob); "
                         f"got {rl.noise_level}")
    if not 0 < float(rl.clip_eps) < 1:
        raise ValueError(f"rl.clip_eps must be in (0, 1), got {rl.clip_eps}")
    if cfg.reward.get("name") == "distribution" and cfg.reward.get("credit") == "group":
        raise ValueError("reward.credit=group gives every member of a group the group's reward, so the group-relative "
                         "advantages are all zero; use reward.credit=sample (each sample replaces the same row)")
    if not 0 <= float(rl.ema_decay) < 1:
        raise ValueError(f"rl.ema_decay must be in [0, 1), got {rl.ema_decay}")
    if int(rl.labels_per_iter) < world:
        raise ValueError(f"rl.labels_per_iter (P = {rl.labels_per_iter} groups) is split over the {world} processes: "
                         f"use P >= {world} or fewer processes")


def load_base(cfg) -> torch.nn.Module:
    from ..config import repo_path
    from ..models import load_generator

    path = Path(str(cfg.model.path))
    if not path.is_file() and not path.is_absolute() and repo_path(str(path)).is_file():
        path = repo_path(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"base generator {cfg.model.path} not found; train one with 'distreward train-base' "
                                f"and pass model.path=PATH")
    return load_generator(path, device=cfg.device)


def finetune(cfg, run_dir, *, resume: bool = False, net: torch.nn.Module | None = None, reward=None, evaluator=None,
             progress: bool = True, on_iteration: Callable[[int, dict], None] | None = None,
             initial_eval: dict | None = None) -> dict:
    """Run GRPO for cfg.rl.iterations; returns {"final": eval metrics of the EMA model, "history": [...], ...}.
    "final_images": the final evaluation's images when this call ran it (all eval.n in one process with a pixel
    UNet, rank 0's first eval.grid otherwise), else None.

    `net`, `reward` and `evaluator` may be given directly (tests, the demo); otherwise they are built from cfg
    (cfg.model: model.path, or the preset keys arch/checkpoint/kwargs/vae; cfg.reward; cfg.eval.features, else the
    Fashion-MNIST evaluator). With resume=True the run continues from run_dir/checkpoints/last.pt and ends where
    an uninterrupted run would. `initial_eval`: the base model's evaluation when the caller already has it (it is
    the EMA model's at iteration 0).

    Under torchrun (WORLD_SIZE > 1) every rank runs this with the same cfg: the P groups are split over the ranks,
    the reference set is replicated, gradients are summed, evaluation is sharded, and only rank 0 writes files
    (rl/parallel.py, docs/scale.md). One process behaves exactly as before.
    """
    from tqdm.auto import tqdm

    from ..config import save_config, to_dict
    from ..sampling import sigma_schedule
    from ..utils.io import RunDir, atomic_save_json
    from .scale import build_codec, build_evaluator, build_generator, is_preset_model, make_decoder, net_arch, velocity_model

    cfg = _as_cfg(cfg)
    device = D.init_distributed(cfg.device)
    cfg.device = str(device)
    world, main = D.world_size(), D.is_main()
    _check_config(cfg, world)
    rl = cfg.rl
    preset = is_preset_model(cfg.model)
    if net is None:
        net = build_generator(cfg.model, device, seed=int(cfg.seed)) if preset else load_base(cfg)
    arch = net_arch(net, cfg.model)
    codec = build_codec(cfg.model, device, seed=int(cfg.seed))
    decode = make_decoder(codec)
    run = RunDir(run_dir)
    if main:
        save_config(cfg, run.path("config.yaml"))
    torch.manual_seed(int(cfg.seed))
    np.random.seed(int(cfg.seed))
    gen = torch.Generator().manual_seed(int(cfg.seed))

    # Policy (trained), frozen reference (the base policy of the KL term) and EMA weights (evaluated, saved).
    net = net.to(device).eval()                 # eval mode: no dropout, so log p_old and log p_theta agree
    ref_net = copy.deepcopy(net).requires_grad_(False)
    ema = copy.deepcopy(net).requires_grad_(False)
    cfg_scale, null_label = float(cfg.model.get("cfg_scale") or 1.0), cfg.model.get("num_classes")
    model, ref_model = velocity_model(net, arch, cfg_scale, null_label), velocity_model(ref_net, arch, cfg_scale, null_label)
    optimizer = torch.optim.AdamW(net.parameters(), lr=float(rl.lr), betas=tuple(rl.adam_betas),
                                  weight_decay=float(rl.weight_decay))
    if evaluator is None and cfg.eval.get("features") is not None:
        evaluator = build_evaluator(cfg, device)
    elif evaluator is None and (int(cfg.eval.every) > 0 or reward is None):
        from ..evaluation import Evaluator

        evaluator = Evaluator.for_fmnist(device=device)
    plain = world == 1 and codec is None and arch == "unet" and not cfg.eval.get("sampler")
    if reward is None:
        reward = build_reward_for_run(to_dict(cfg), net, run.root, evaluator, progress=progress,
                                      model=None if plain else model, decode=decode)
    sigmas = sigma_schedule(int(rl.steps), shift=float(rl.shift))
    P, G, T, a = int(rl.labels_per_iter), int(rl.group_size), int(rl.steps), rollout_noise_levels(rl)
    shared, push_every = bool(rl.shared_noise), (G if rl.push == "one_per_group" else 1)
    ode_reference = rl.get("reference", "rollout") == "ode" and parallel.has_own_after_step(reward)
    rows = parallel.group_rows(P, G)

    ckpt_path = run.checkpoints / "last.pt"
    start, history, evals = 0, [], []
    if resume and ckpt_path.is_file():
        st = load_checkpoint(ckpt_path)
        net.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        optimizer.load_state_dict(st["optimizer"])
        load_reward_state(reward, st["reward"])
        set_rng_state(gen, st["rng"])
        start, history, evals = int(st["iteration"]), list(st["history"]), list(st["evals"])
    if main:
        _truncate_jsonl(run.path("metrics.jsonl"), start if start else -1)
    writer = _tensorboard(run.root / "tb", start) if main else _NullWriter()
    log = run.log_jsonl if main else (lambda record: None)

    def checkpoint(it: int) -> None:
        if main:
            save_checkpoint(ckpt_path, {"net": net.state_dict(), "ema": ema.state_dict(),
                                        "optimizer": optimizer.state_dict(), "reward": reward_state(reward),
                                        "rng": rng_state(gen), "iteration": it, "history": history, "evals": evals})
            meta = getattr(net, "generator_meta", None)
            if meta is not None:   # the EMA weights of every checkpoint: inputs for RL merging (METHOD.md §5)
                from ..models import save_generator

                save_generator(run.checkpoints / f"ema_{it:05d}.safetensors", ema, meta["arch"], meta["kwargs"],
                               extra={"rl": "grpo", "reward": cfg.reward.name, "iteration": it})
        D.barrier()

    final_images = None

    def evaluate(it: int) -> None:
        nonlocal final_images
        if plain:
            metrics, images = evaluate_generator(ema, evaluator, cfg, progress=progress, desc=f"eval @ {it}")
        else:
            metrics, images = evaluate_sharded(ema, evaluator, to_dict(cfg), arch=arch, decode=decode,
                                               progress=progress and main, desc=f"eval @ {it}")
        metrics = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in metrics.items()}
        metrics["iteration"] = it
        evals.append(metrics)
        if it == int(rl.iterations):
            final_images = images
        if not main:
            return
        from ..report import save_image_grid

        save_image_grid(images[: int(cfg.eval.grid)], run.samples / f"ema_{it:04d}.png")
        for k, v in metrics.items():
            if isinstance(v, float):
                writer.add_scalar(f"eval/{k}", v, it)
        log({"iteration": it, **{f"eval/{k}": v for k, v in metrics.items() if k != "iteration"}})

    if start == 0 and initial_eval is not None:
        evals.append({**initial_eval, "iteration": 0})
    elif start == 0 and evaluator is not None and int(cfg.eval.every) > 0:
        evaluate(0)

    bar = tqdm(range(start, int(rl.iterations)), desc=f"GRPO {cfg.reward.name}", unit="it", disable=not (progress and main),
               initial=start, total=int(rl.iterations))
    for it in bar:
        # 1. rollouts of the old policy (each rank: its groups)
        t0 = time.perf_counter()
        labels, groups = draw_labels(P, G, int(cfg.model.num_classes), gen, balanced=rl.labels == "balanced",
                                     start=it * P, seed=int(cfg.seed))
        if world == 1:
            ro = collect(model, labels, groups, sigmas, a, tuple(cfg.model.image_shape), gen, device, shared)
        else:
            ro = collect_rows(model, labels, groups, sigmas, a, tuple(cfg.model.image_shape), gen, device, rows,
                              shared)
        images = ro.images if codec is None else decode(ro.xs[-1])      # clamped after decoding, never the latents
        t1 = time.perf_counter()
        # 2. rewards r and 3. advantages A (of the whole batch, on every rank)
        if world == 1:
            ro.rewards = reward(images, ro.labels.to(device), ro.groups.to(device)).detach().float().cpu()
            ro.adv, zero_std = group_advantages(ro.rewards, ro.groups, std=rl.adv_std, clip=float(rl.adv_clip))
            r_all, gathered = ro.rewards, None
        else:
            r_all, gathered = parallel.score(reward, images, ro.labels.to(device), ro.groups.to(device))
            adv, zero_std = group_advantages(r_all, groups, std=rl.adv_std, clip=float(rl.adv_clip))
            ro.rewards, ro.adv = r_all[rows.start:rows.stop], adv[rows.start:rows.stop]
        t2 = time.perf_counter()
        # 4. clipped policy update on the trained steps, KL to the base, EMA
        steps = trained_steps(T, rl.train_steps.mode, fraction=float(rl.train_steps.fraction),
                              window=_window(rl.train_steps.window), generator=gen,
                              count=rl.train_steps.get("count"))
        if world == 1:
            stats = update(net, model, ref_model, ema, optimizer, ro, steps, rl, gen)
        else:
            stats = update_sharded(net, model, ref_model, ema, optimizer, ro, steps, rl, gen, rows, P * G)
        t3 = time.perf_counter()
        # 5. the new samples enter the reference set (the same rows on every rank)
        if ode_reference:
            reward.after_step(ode_rows(model, labels[::push_every], tuple(cfg.model.image_shape), sigmas, gen, device,
                                       decode, int(rl.batch_size)), labels[::push_every].to(device))
        elif world == 1:
            reward.after_step(images[::push_every], ro.labels[::push_every].to(device))
        else:
            parallel.push(reward, images, ro.labels.to(device), gathered, every=push_every)
        fd_ref = _reference_fd(reward)
        t4 = time.perf_counter()
        record = {"iteration": it + 1, "r_mean": float(r_all.mean()), "r_std": float(r_all.std()),
                  "fd_ref": fd_ref, "zero_std_frac": float(zero_std.float().mean()), **stats,
                  "time_rollout": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2, "time_push": t4 - t3}
        history.append({k: v for k, v in record.items() if not k.startswith("rho_mean/")})
        log(record)
        for k, v in record.items():
            if k != "iteration" and v is not None:
                writer.add_scalar(k, v, it + 1)
        bar.set_postfix(r=f"{record['r_mean']:.3g}", fd_ref=f"{fd_ref:.3g}" if fd_ref is not None else "-")
        if evaluator is not None and int(cfg.eval.every) > 0 and ((it + 1) % int(cfg.eval.every) == 0
                                                                   or it + 1 == int(rl.iterations)):
            evaluate(it + 1)
        if (it + 1) % int(cfg.checkpoint.every) == 0 or it + 1 == int(rl.iterations):
            checkpoint(it + 1)
        if on_iteration is not None:
            on_iteration(it + 1, record)
    bar.close()
    writer.close()

    meta = getattr(net, "generator_meta", None)
    if meta is not None and main:
        from ..models import save_generator

        save_generator(run.path("model_ema.safetensors"), ema, meta["arch"], meta["kwargs"],
                       extra={"rl": "grpo", "reward": cfg.reward.name, "iterations": int(rl.iterations)})
        save_generator(run.path("model.safetensors"), net, meta["arch"], meta["kwargs"],
                       extra={"rl": "grpo", "reward": cfg.reward.name, "iterations": int(rl.iterations)})
    result = {"final": evals[-1] if evals else None, "evals": evals, "history": history,
              "reward_mean_first": history[0]["r_mean"] if history else None,
              "reward_mean": history[-1]["r_mean"] if history else None}
    if main:
        atomic_save_json(run.path("result.json"), result)
    D.barrier()
    result.update({"net": net, "ema": ema, "reward": reward, "final_images": final_images})
    return result


def _window(w):
    from omegaconf import ListConfig

    return list(w) if isinstance(w, (list, tuple, ListConfig)) else int(w)


def _reference_fd(reward) -> float | None:
    """FD of the reward's reference set to the real statistics (distribution-wise rewards only)."""
    return float(reward.fd()) if hasattr(reward, "fd") else None


def _truncate_jsonl(path: Path, last_iteration: int) -> None:
    """Drop records past the checkpoint a resumed run restarts from, so the log has no duplicates."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("iteration", 0) <= last_iteration]
    from ..utils.io import atomic_write_bytes

    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


class _NullWriter:
    def add_scalar(self, *a, **k):
        pass

    def close(self):
        pass


def _tensorboard(logdir: Path, start: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; keep training if a user environment lacks it
        return _NullWriter()
    return SummaryWriter(str(logdir), purge_step=start + 1 if start else None)
