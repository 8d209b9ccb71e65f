"""The pool-round trainer (rl.algorithm = pool, docs/rl.md "Pool rounds"): each iteration is one round whose
signal is a whole pool of the policy's samples instead of one small batch.

One round, top to bottom:
  1. pool: M = rl.pool.size class-balanced samples of the policy at the round's start (v_old: its weights, not its
     EMA, so that the forward-process loss is centred on the policy that drew the samples) with a near-converged
     ODE (rl.pool.method, rl.pool.steps), in shards of rl.pool.shard samples written to the run directory
     (pool/round_<r>/, atomic, each under the key of what it was drawn from: a resumed round keeps its finished
     shards). Each shard's noise comes from its own seed (run seed, round, shard), not from the run's generator;
  2. rewards: the pool's features (computed once) become the reward's reference set (reward.reference_size = M),
     then every sample is scored by the subset-replace reward against it: the pool is the reference set
     (rl.pool.credit = pool), or each class's part of the pool against that class's real statistics
     (rl.pool.credit = class, reward.per_class); the advantages are relative within the pool, or within the class;
  3. update: rl.pool.epochs passes of the forward-process trainer's loss (rl/nft.py: optimality weights, implicit
     policies around v_old, nft.beta, nft.timesteps) over the pool in minibatches of rl.pool.minibatch samples
     (rl.step.minibatch_steps), v_old frozen for the round;
  4. rho: the share of the round's update that is signal, from the first epoch's minibatch gradients
     (`gradient_pair_share`, `pool_signal_share`).
A kill during generation or an epoch resumes from the round's start (the checkpoint) with the finished shards kept,
and ends bit for bit where an uninterrupted run does. One process.
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..evaluation import network_hash
from ..sampling import sigma_schedule
from ..sampling.generate import balanced_labels
from ..utils.cache import cache_valid, save_cache_key
from ..utils.io import atomic_save_safetensors
from ..utils.progress import phase
from ..utils.progress import progress as tqdm
from .context import Algorithm, RunContext, reward_record
from .nft import nft_update, ode_rollouts, optimality_weights
from .step import step_settings

__all__ = ["GradientPairs", "Pool", "PoolShards", "gradient_pair_share", "pool_groups", "pool_signal_share",
           "round_settings", "score_against_pool", "shard_seed"]

POOL_DIR = "pool"


# --------------------------------------------------------------------------------------------- the equations

# Signal share of one batch's gradient from K independent batches: rho_b = mean_{k<l} g_k.g_l / mean_k |g_k|^2,
# the pairs' mean dot product from the running sums: (|sum g|^2 - sum |g|^2) / (K (K - 1)).
def gradient_pair_share(sum_g: torch.Tensor, sum_sq: float, k: int) -> float | None:
    if k < 2 or sum_sq <= 0:
        return None
    pair_mean = (float(sum_g @ sum_g) - sum_sq) / (k * (k - 1))
    return pair_mean / (sum_sq / k)


# The share at batch M from the share at batch b: with g = mu + noise of trace tr(Sigma) / b,
# rho_M = rho_b / (rho_b + (b / M)(1 - rho_b)); None where rho_b <= 0 (no measurable signal).
def pool_signal_share(rho_b: float | None, b: float, m: float) -> float | None:
    if rho_b is None or rho_b <= 0:
        return None
    return rho_b / (rho_b + (b / m) * (1.0 - rho_b))


def pool_groups(labels: torch.Tensor, credit: str) -> torch.Tensor:
    """The advantage groups: the whole pool (credit pool) or each class (credit class)."""
    return labels.clone() if credit == "class" else torch.zeros_like(labels)


def round_settings(rl):
    """What rl.step.minibatch_steps reads, for a round: rl.pool.epochs passes in minibatches of rl.pool.minibatch."""
    pool = rl.pool
    n_mb = max(1, math.ceil(int(pool.size) / int(pool.minibatch)))
    return step_settings(rl, inner_epochs=int(pool.epochs), minibatches=n_mb)


def score_against_pool(reward, images: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The pool's features (computed once) become the reward's state (its reference set, reward.reference_size =
    M; per class with reward.per_class), then every sample is scored against it: CPU float32 (M,)."""
    f = reward.features(images)
    reward.push_features(f, labels)
    return reward.score_features(f, labels, groups).detach().float().cpu()


def shard_seed(seed: int, round_: int, shard: int) -> int:
    """The seed of one shard's noise: a digest of (run seed, round, shard), so that any shard is redrawn alone."""
    digest = hashlib.blake2b(f"pool/{int(seed)}/{int(round_)}/{int(shard)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --------------------------------------------------------------------------------------------- the pool

class PoolShards:
    """One round's pool on disk: shard s holds rows [s S, (s+1) S) of the class-balanced labels, drawn from
    `shard_seed`; a shard file is reused only under the key of what it was drawn from (the policy's weights
    among it)."""

    def __init__(self, root: Path, round_: int, *, size: int, shard: int, num_classes: int, image_shape,
                 seed: int, key: dict):
        self.dir = Path(root) / POOL_DIR / f"round_{round_:05d}"
        self.round, self.size, self.shard, self.seed = int(round_), int(size), int(shard), int(seed)
        self.image_shape, self.key = tuple(image_shape), key
        self.labels = balanced_labels(self.size, int(num_classes))

    def rows(self, s: int) -> range:
        return range(s * self.shard, min(self.size, (s + 1) * self.shard))

    def path(self, s: int) -> Path:
        return self.dir / f"shard_{s:04d}.safetensors"

    def shard_key(self, s: int) -> dict:
        r = self.rows(s)
        return {**self.key, "round": self.round, "shard": s, "rows": [r.start, r.stop], "size": self.size}

    def noise(self, s: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(shard_seed(self.seed, self.round, s))
        return torch.randn((len(self.rows(s)), *self.image_shape), generator=gen)

    def finished(self, s: int) -> torch.Tensor | None:
        """Shard s's samples when its file holds them under the current key (an unreadable file is drawn again)."""
        if not cache_valid(self.path(s), self.shard_key(s)):
            return None
        try:
            x = load_file(str(self.path(s)))["x0"]
        except Exception:       # damaged or foreign: the shard is drawn again
            return None
        return x if x.shape == (len(self.rows(s)), *self.image_shape) else None

    def draw(self, sample, *, progress: bool = False) -> tuple[torch.Tensor, int]:
        """All shards (the finished ones read back, the others drawn by `sample(noise, labels)` and written);
        returns the pool (M, C, H, W) on the CPU and how many shards were kept."""
        n = math.ceil(self.size / self.shard)
        self.dir.mkdir(parents=True, exist_ok=True)
        out, kept = [], 0
        for s in tqdm(range(n), desc=f"pool round {self.round + 1}", unit="shard", disable=not progress, leave=False):
            x = self.finished(s)
            if x is not None:
                out.append(x)
                kept += 1
                continue
            r = self.rows(s)
            x = sample(self.noise(s), self.labels[r.start:r.stop]).cpu().contiguous()
            atomic_save_safetensors(self.path(s), {"x0": x})
            save_cache_key(self.path(s), self.shard_key(s))
            out.append(x)
        return torch.cat(out), kept

    def remove_earlier(self) -> None:
        """The pools of earlier rounds (their rounds are in the checkpoint)."""
        for d in self.dir.parent.glob("round_*"):
            if d.is_dir() and d.name < self.dir.name:
                shutil.rmtree(d, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------- rho

class GradientPairs:
    """Running sums of the first `count` gradients AdamW receives (an optimizer step pre-hook): the first epoch's
    minibatches, disjoint parts of the pool, hence independent batches. Measured after the grad-norm clip: the
    directions the update takes."""

    def __init__(self, optimizer: torch.optim.Optimizer, params, count: int):
        self.params, self.count, self.k = [p for p in params if p.requires_grad], int(count), 0
        self.sum_g, self.sum_sq = None, 0.0
        self.handle = optimizer.register_step_pre_hook(self.observe)

    @torch.no_grad()
    def observe(self, optimizer, args, kwargs) -> None:
        if self.k >= self.count:
            return
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        g = g.double().cpu()
        self.sum_g = g if self.sum_g is None else self.sum_g + g
        self.sum_sq += float(g @ g)
        self.k += 1

    def close(self) -> float | None:
        """Stop observing; rho of one minibatch's gradient."""
        self.handle.remove()
        return None if self.sum_g is None else gradient_pair_share(self.sum_g, self.sum_sq, self.k)


# --------------------------------------------------------------------------------------------- the trainer

class Pool(Algorithm):
    """rl.algorithm = pool: rounds of a pool of M samples, scored against the pool itself, K epochs of the
    forward-process loss around the round's starting policy."""

    name = "pool"
    one_process = True

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        pool = ctx.rl.pool
        self.sigmas = sigma_schedule(int(pool.steps), shift=float(ctx.rl.shift))
        self.old = copy.deepcopy(ctx.weights.net).requires_grad_(False)
        self.old_model = ctx.weights.velocity(self.old)

    def meta(self, ctx: RunContext) -> dict:
        return {**super().meta(ctx), "pool_size": int(ctx.rl.pool.size), "pool_credit": str(ctx.rl.pool.credit)}

    def postfix(self, record: dict) -> dict:
        rho = record.get("rho_pool")
        return {**super().postfix(record), "rho": f"{rho:.2g}" if rho is not None else "-"}

    def shards(self, ctx: RunContext, it: int) -> PoolShards:
        cfg, pool = ctx.cfg, ctx.rl.pool
        key = {"seed": int(cfg.seed), "method": str(pool.method), "steps": int(pool.steps),
               "shift": float(ctx.rl.shift), "shard_size": int(pool.shard), "batch_size": int(ctx.rl.batch_size),
               "arch": ctx.weights.arch, "cfg_scale": ctx.weights.cfg_scale, "policy": network_hash(self.old)}
        return PoolShards(ctx.run.root, it, size=int(pool.size), shard=int(pool.shard),
                          num_classes=int(cfg.model.num_classes), image_shape=ctx.image_shape, seed=int(cfg.seed),
                          key=key)

    @torch.no_grad()
    def sample(self, ctx: RunContext, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ODE samples x_0 of v_old (latents for a latent model) from `noise`, in batches of rl.batch_size."""
        return ode_rollouts(self.old_model, noise, labels, self.sigmas, str(ctx.rl.pool.method),
                            range(noise.shape[0]), ctx.device, int(ctx.rl.batch_size), to_cpu=True)

    @torch.no_grad()
    def images(self, ctx: RunContext, x0: torch.Tensor) -> torch.Tensor:
        """The pool decoded (and clamped) in batches of rl.batch_size, on the CPU: a latent pool's images are never
        all on the device at once."""
        bs = int(ctx.rl.batch_size)
        return torch.cat([ctx.weights.decode(x0[i:i + bs].to(ctx.device)).cpu() for i in range(0, x0.shape[0], bs)])

    def iteration(self, ctx: RunContext, it: int) -> dict:
        rl, weights, device = ctx.rl, ctx.weights, ctx.device
        # 1. the pool: v_old is the policy at the round's start
        t0 = time.perf_counter()
        self.old.load_state_dict(weights.net.state_dict())
        shards = self.shards(ctx, it)
        shards.remove_earlier()
        x0, kept = shards.draw(lambda noise, lab: self.sample(ctx, noise, lab), progress=ctx.progress)
        if kept:
            phase(f"pool round {it + 1}: {kept} finished shard(s) kept from an interrupted run")
        labels = shards.labels
        t1 = time.perf_counter()
        # 2. rewards against the pool itself, advantages within the pool (or class), optimality weights
        groups = pool_groups(labels, str(rl.pool.credit))
        r = ctx.null_control(score_against_pool(ctx.reward, self.images(ctx, x0), labels, groups))
        fd_ref = ctx.reward_fd()
        A, zero_std = ctx.advantages(r, groups)
        w = optimality_weights(A)
        t2 = time.perf_counter()
        # 3. K epochs of the forward-process loss around v_old; 4. rho from the first epoch's gradients
        settings = round_settings(rl)
        pairs = GradientPairs(ctx.optimizer, weights.net.parameters(), settings.minibatches)
        try:
            stats = nft_update(weights.net, weights.model, self.old_model, weights.ema, ctx.optimizer,
                               x0.to(device), labels.to(device), w, settings, ctx.cfg.nft, ctx.generator,
                               rows=range(x0.shape[0]), batch=x0.shape[0])
        finally:
            rho_b = pairs.close()
        t3 = time.perf_counter()
        if it + 1 == int(rl.iterations):
            shards.remove()
        b = x0.shape[0] / settings.minibatches
        return {"iteration": it + 1, **reward_record(r, zero_std, fd_ref),
                "w_frac_clipped": float((A.abs() >= 1).float().mean()), **stats, "rho_minibatch": rho_b,
                "rho_pool": pool_signal_share(rho_b, b, x0.shape[0]), "time_pool": t1 - t0, "time_reward": t2 - t1,
                "time_update": t3 - t2}
