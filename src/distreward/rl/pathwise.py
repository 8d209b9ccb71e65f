"""The pathwise trainer (rl.algorithm = pathwise), in the style of DRaFT-K (Clark et al. 2023, arXiv 2309.17400):
the distribution-wise reward's gradient back-propagated through the feature network and the sampler's last K steps
(docs/rl.md "The pathwise trainer"). With the sample-wise baseline's reward (reward.name = classifier) the same
trainer back-propagates -log p(label | image) instead: DRaFT-K with a sample-wise reward.

One iteration, top to bottom:
  1. samples: P labels x G samples of the policy's ODE (pathwise.method, pathwise.steps), each from its own noise;
     the first T - K steps run without gradients, the state x_{T-K} is kept;
  2. reward r of the decoded samples against the reference set (logged, as the other trainers'), and each
     sample's first variation d_i = dFD/df_i of the reference set's FD against the real statistics, at its
     features f_i (metrics.variation.fd_first_variation; under the null control the d_i go to other samples, with
     random signs);
  3. update: per minibatch the last K steps are re-run from x_{T-K} with gradients, decoded / clamped, passed
     through the reward's feature network, and the loss sum_i <stopgrad(d_i), f_i(theta)> (the first-order change
     of the FD; lower is better) is back-propagated; AdamW, grad-norm clip, EMA (rl.step.minibatch_steps); with
     the classifier reward the loss is sum_i -log p(y_i | x_i(theta));
  4. push: the samples' features enter the reference set.
Each record also holds the batch's FD on the reward's network and on the held-out one (`watch_fd_reward`,
`watch_fd_eval`): a pathwise gradient can exploit the reward's network, and the held-out FD rising while the
reward's falls is the sign. One process, pixel-space models (the VAE decoder runs without gradients).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..metrics.variation import fd_first_variation
from ..reward.rewards import ClassDistributionReward, ClassifierLogProbReward, DistributionReward
from ..sampling import check_sigmas, ode_sample, ode_step, sigma_schedule
from ..schema import ConfigError
from .context import Algorithm, RunContext, reward_record
from .rollout import start_noise
from .settings import ode_grid
from .step import minibatch_steps, stat_sums

__all__ = ["Pathwise", "pathwise_grid", "pathwise_loss", "classifier_loss", "null_directions", "first_variations",
           "first_steps", "last_steps", "pathwise_update"]


# --------------------------------------------------------------------------------------------- the equations

# Per-sample loss <stopgrad(d_i), f_i(theta)>: its gradient is the first-order change of FD when f_i moves.
def pathwise_loss(features: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    return (features * directions.detach()).sum(1)


# Per-sample loss of the sample-wise reward: -log p(y_i | x_i), the classifier reward's score with its sign flipped.
def classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits.float(), 1).gather(1, labels[:, None].long())[:, 0]


# The null control's directions: each sample gets another sample's d_i with a random sign, so the update keeps
# the directions' sizes but carries no information on which way lowers the FD (the common mean term cancels too).
def null_directions(directions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    B = directions.shape[0]
    signs = torch.randint(0, 2, (B, 1), generator=generator).to(directions) * 2 - 1
    return directions[torch.randperm(B, generator=generator)] * signs


def first_variations(reward, features: np.ndarray, labels: torch.Tensor) -> np.ndarray:
    """d_i = dFD/df_i (B, d) float64 of each sample as a member of its reference set (the class's set under
    reward.per_class) against the real statistics."""
    if isinstance(reward, DistributionReward):
        sets = {None: (reward.ref, np.arange(features.shape[0]))}
    else:
        sets = {c: (reward.sets[c], rows) for c, rows in reward.by_class(labels).items()}
    out = np.zeros_like(features, dtype=np.float64)
    for ref, rows in sets.values():
        out[rows] = fd_first_variation(features[rows], ref.mu, ref.sigma, ref.real_mu, ref.real_sigma_half, ref.n)
    return out


# --------------------------------------------------------------------------------------------- sampling

def pathwise_grid(cfg) -> tuple[str, torch.Tensor, int]:
    """(method, sigmas, K): the ODE of the samples (pathwise.method, pathwise.steps; `settings.ode_grid`) and the
    number of its last steps that keep gradients."""
    method, steps = ode_grid(cfg.pathwise, cfg)
    k = int(cfg.pathwise.k)
    if k > steps:
        raise ConfigError(f"pathwise.k = {k} exceeds the sampler's {steps} steps; use pathwise.k <= {steps}")
    return method, sigma_schedule(steps, shift=float(cfg.rl.shift)), k


def last_steps(model, x: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor, method: str) -> torch.Tensor:
    """The ODE from sigmas[0] to sigmas[-1] with gradients (the last K steps of the sampler; `x` carries none)."""
    sig = check_sigmas(sigmas).tolist()
    for s, s_next in zip(sig[:-1], sig[1:]):
        x = ode_step(model, x, labels, s, s_next, method)
    return x


@torch.no_grad()
def first_steps(model, noise: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor, method: str) -> torch.Tensor:
    """x_{T-K}: the sampler's first T - K steps from sigma = 1 without gradients (the noise itself when K = T)."""
    return noise.float() if sigmas.numel() < 2 else ode_sample(model, noise, labels, sigmas, method)


# --------------------------------------------------------------------------------------------- the update

def pathwise_update(net, model, ema, optimizer, decode, x_start: torch.Tensor, labels: torch.Tensor, loss_of,
                    sigmas: torch.Tensor, method: str, rl, generator: torch.Generator) -> dict:
    """Step 3: inner epochs x minibatches; per minibatch the last steps from `x_start` with gradients, decoded,
    the per-sample losses `loss_of(images, rows) -> (b,)` (`Pathwise.losses`), B x their mean (the batch's sum,
    estimated by the minibatch) back-propagated in chunks of rl.batch_size samples (memory). Returns the logged
    means over the updates: loss_pathwise (the mean per-sample loss) and grad_norm."""
    batch, chunk = labels.shape[0], int(rl.batch_size)

    def backward(mb, _):
        acc = torch.zeros(1, dtype=torch.float64, device=x_start.device)
        for rows in mb.idx.to(x_start.device).split(chunk):
            x = last_steps(model, x_start[rows], labels[rows], sigmas, method)
            loss = loss_of(decode(x), rows)
            (loss.sum() * batch / mb.idx.numel()).backward()
            acc += stat_sums(loss.sum())
        return acc

    return minibatch_steps(net, ema, optimizer, rl, generator, batch=batch, rows=range(batch),
                           names=("loss_pathwise",), divisors=(1,), backward=backward)


# --------------------------------------------------------------------------------------------- the trainer

class Pathwise(Algorithm):
    """rl.algorithm = pathwise: the FD's first variation back-propagated through the reward's feature network and
    the sampler's last pathwise.k steps (or, with the classifier reward, -log p(label | image)). One process; a
    pixel-space model."""

    name = "pathwise"
    one_process = True

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.sample_wise = isinstance(ctx.reward, ClassifierLogProbReward)
        if not (self.sample_wise or isinstance(ctx.reward, (DistributionReward, ClassDistributionReward))):
            raise ConfigError(f"the pathwise trainer differentiates the distribution-wise reward (its FD's first "
                             f"variation) or the classifier's log p(label | image), got {type(ctx.reward).__name__}; "
                             f"use reward.name=distribution or reward.name=classifier")
        if self.sample_wise and ctx.rl.null_control == "permute":
            raise ConfigError("the pathwise trainer's null control permutes the FD's first variations, which the "
                             "classifier reward has none of; use reward.name=distribution for the null control")
        if ctx.weights.codec is not None:
            raise ConfigError("the pathwise trainer back-propagates through the decoder, but the latent model's VAE "
                             "decodes without gradients; use a pixel-space model")
        self.method, sigmas, self.k = pathwise_grid(ctx.cfg)
        T = sigmas.numel() - 1
        self.head, self.tail = sigmas[:T - self.k + 1], sigmas[T - self.k:]

    def meta(self, ctx: RunContext) -> dict:
        return {**super().meta(ctx), "pathwise_k": self.k, "pathwise_method": self.method}

    def postfix(self, record: dict) -> dict:
        return {**super().postfix(record), "fd_eval": f"{record['watch_fd_eval']:.3g}"
                if record.get("watch_fd_eval") is not None else "-"}

    def iteration(self, ctx: RunContext, it: int) -> dict:
        rl, gen, device, weights = ctx.rl, ctx.generator, ctx.device, ctx.weights
        # 1. the policy's ODE: the first T - K steps without gradients, then the rest (for the rewards)
        t0 = time.perf_counter()
        labels, groups = ctx.draw_labels(it)
        noise = start_noise(groups, ctx.image_shape, gen, shared=False).to(device)
        labels, groups = labels.to(device), groups.to(device)
        x_start = first_steps(weights.model, noise, labels, self.head, self.method)
        with torch.no_grad():
            images = weights.decode(last_steps(weights.model, x_start, labels, self.tail, self.method))
        t1 = time.perf_counter()
        # 2. rewards (logged) and each sample's loss: the first variation of the reference set's FD, or -log p
        r, gathered = ctx.score(images, labels, groups)
        _, zero_std = ctx.advantages(r, groups)
        loss_of, logged = self.losses(ctx, gathered, labels)
        watch = watch_fds(ctx.evaluator, images)
        t2 = time.perf_counter()
        # 3. the last K steps with gradients, through the decoder and the reward's network
        stats = pathwise_update(weights.net, weights.model, weights.ema, ctx.optimizer, weights.decode, x_start,
                                labels, loss_of, self.tail, self.method, rl, gen)
        t3 = time.perf_counter()
        # 4. the samples enter the reference set
        fd_ref = ctx.push(gathered, labels.cpu())
        t4 = time.perf_counter()
        return {"iteration": it + 1, **reward_record(r, zero_std, fd_ref), **watch, **logged, **stats,
                "time_rollout": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2, "time_push": t4 - t3}

    def losses(self, ctx: RunContext, gathered, labels: torch.Tensor):
        """(loss_of(images, rows) -> (b,), logged): each sample's differentiable loss for step 3. The distribution
        reward: <d_i, f_i> with d_i its first variation (another sample's, sign flipped at random, under the null
        control), logging direction_norm (mean |d_i|); the classifier reward: -log p(y_i | x_i)."""
        net = ctx.reward.net
        if self.sample_wise:
            return (lambda images, rows: classifier_loss(net.logits(images), labels[rows])), {}
        directions = torch.from_numpy(first_variations(ctx.reward, np.asarray(gathered), labels.cpu())).float()
        if ctx.rl.null_control == "permute":
            directions = null_directions(directions, ctx.generator)
        directions = directions.to(labels.device)
        return ((lambda images, rows: pathwise_loss(net(images).float(), directions[rows])),
                {"direction_norm": float(directions.norm(dim=1).mean())})


def watch_fds(evaluator, images: torch.Tensor) -> dict:
    """The batch's FD on the reward's network and on the held-out one (biased by the batch's size; compare them
    across iterations): the held-out one rising while the reward's falls is adversarial drift."""
    if evaluator is None:
        return {"watch_fd_reward": None, "watch_fd_eval": None}
    m = evaluator.evaluate(images)
    return {"watch_fd_reward": m.get("fd_reward"), "watch_fd_eval": m.get("fd_eval")}
