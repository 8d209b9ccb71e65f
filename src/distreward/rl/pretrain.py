"""Continued training and guidance distillation (docs/rl.md "Continued training and guidance"): two trainers that
see real training images instead of samples and rewards, run in the RL frame at the fine-tune's grad-norm clip, with an
EMA of their own length (every step sees fresh images, as in the base's training).

One iteration, top to bottom:
  1. pretrain.steps x pretrain.batch training images (pretrain.images) drawn with replacement, noises eps, noise
     levels sigma and label dropout as the base training draws them (train/flow.py with train-base's defaults of
     train.sigma_sampling, logit_mean, logit_std, label_dropout), all from the run's generator; x_sigma =
     (1 - sigma) x0 + sigma eps;
  2. the target velocity: eps - x0 (`pretrain`, the base's flow-matching objective), or the frozen base's guided
     velocity at x_sigma at scale guidance.scale (`guidance-distill`; a dropped label's target is the base's
     unguided velocity, since guidance of the null label by itself is the identity);
  3. pretrain.steps optimizer steps of pretrain.batch images each (`step.minibatch_steps`), loss
     |v_theta(x_sigma, sigma, y) - v|^2 averaged over dimensions (train/flow.py's `flow_loss`), AdamW at
     pretrain.lr, grad-norm clip rl.grad_clip, EMA pretrain.ema_decay (null: rl.ema_decay) after every step.
The policy is the unguided network (model.cfg_scale is not applied to it). One process, pixel models only.
"""

from __future__ import annotations

import functools
import time

import torch

from ..data import load_images
from ..sampling import velocity_model
from ..schema import defaults
from ..train.flow import drop_labels, flow_interpolate, flow_loss, flow_target, sample_sigma
from ..utils.errors import InputError
from .context import Algorithm, RunContext
from .step import minibatch_steps, stat_sums, step_settings

__all__ = ["GuidanceDistill", "Pretrain", "draw_batch", "noise_settings", "training_images"]


def noise_settings() -> dict:
    """How the base training noises its images: train-base's defaults of the noise-level distribution and the
    label dropout (schema `train-base`)."""
    train = defaults("train-base")["train"]
    return {k: train[k] for k in ("sigma_sampling", "logit_mean", "logit_std", "label_dropout")}


@functools.lru_cache(maxsize=1)
def training_images(spec: str, image_shape: tuple, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of `spec` (distreward.data.load_images), checked against the policy's image shape and
    class count; the last set loaded is kept (a study's seeds share it)."""
    images, labels = load_images(spec)
    if labels is None:
        raise InputError(f"pretrain.images={spec}: the images have no labels; the policy is class-conditional, give "
                         "labelled images (fmnist-train, or an .npz with 'labels')")
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise InputError(f"pretrain.images={spec}: images of shape {tuple(images.shape[1:])}, but the policy makes "
                         f"{tuple(image_shape)} (model.image_shape); give images of the policy's shape")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise InputError(f"pretrain.images={spec}: labels {int(labels.min())}..{int(labels.max())} are outside "
                         f"0..{num_classes - 1} (model.num_classes); give labels of the policy's classes")
    return images, labels


def draw_batch(images: torch.Tensor, labels: torch.Tensor, n: int, null_label: int, noise: dict,
               generator: torch.Generator) -> dict:
    """n training rows noised as the base training noises them, drawn in this order from `generator`: row indices
    (with replacement), eps, sigma, label dropout. Returns x0, eps, sigma, x_sigma and the labels y."""
    idx = torch.randint(images.shape[0], (n,), generator=generator)
    x0 = images[idx]
    eps = torch.randn(x0.shape, generator=generator)
    sigma = sample_sigma(n, noise["sigma_sampling"], float(noise["logit_mean"]), float(noise["logit_std"]), generator)
    y = drop_labels(labels[idx], float(noise["label_dropout"]), null_label, generator)
    return {"x0": x0, "eps": eps, "sigma": sigma, "x_sigma": flow_interpolate(x0, eps, sigma), "y": y}


class Pretrain(Algorithm):
    """The continued-training control: the base's own flow-matching objective on real images, no reward."""

    name = "pretrain"
    command = "pretrain"
    uses_reward = False
    one_process = True

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        cfg, weights = ctx.cfg, ctx.weights
        if weights.codec is not None:
            raise InputError(f"{self.name} trains on pixel images, but the policy is a latent model (model.vae); use a "
                             "pixel generator")
        self.images, self.labels = training_images(str(cfg.pretrain.images), ctx.image_shape,
                                                   int(cfg.model.num_classes))
        self.noise, self.null_label = noise_settings(), int(cfg.model.num_classes)
        self.model = velocity_model(weights.net, weights.arch)
        self.update = step_settings(cfg.rl, inner_epochs=1, minibatches=int(cfg.pretrain.steps),
                                    ema_decay=cfg.pretrain.get("ema_decay"))
        for group in ctx.optimizer.param_groups:
            group["lr"] = float(cfg.pretrain.lr)

    @torch.no_grad()
    def target(self, rows: dict) -> torch.Tensor:
        """The velocity the policy regresses onto: the flow-matching target eps - x0."""
        return flow_target(rows["x0"], rows["eps"])

    def meta(self, ctx: RunContext) -> dict:
        return {"rl": self.name, "images": str(ctx.cfg.pretrain.images)}

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss']:.4g}"}

    def iteration(self, ctx: RunContext, it: int) -> dict:
        t0 = time.perf_counter()
        n = int(ctx.cfg.pretrain.batch) * int(ctx.cfg.pretrain.steps)
        batch = {k: v.to(ctx.device) for k, v in draw_batch(self.images, self.labels, n, self.null_label, self.noise,
                                                            ctx.generator).items()}
        t1 = time.perf_counter()

        def backward(mb, _):
            rows = {k: v[mb.local.to(ctx.device)] for k, v in batch.items()}
            loss = flow_loss(self.model(rows["x_sigma"], rows["sigma"], rows["y"]), self.target(rows))
            (loss.mean() * mb.share).backward()
            return stat_sums(loss.sum())

        stats = minibatch_steps(ctx.weights.net, ctx.weights.ema, ctx.optimizer, self.update, ctx.generator, batch=n,
                                rows=range(n), names=("loss",), divisors=(1,), backward=backward)
        return {"iteration": it + 1, **stats, "time_data": t1 - t0, "time_update": time.perf_counter() - t1}


class GuidanceDistill(Pretrain):
    """Guidance distillation: the unguided policy regressed onto the frozen base's classifier-free-guided velocity
    on noised training images (a reference row: it knows about guidance, the reward does not)."""

    name = "guidance-distill"
    command = "guidance-distill"

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.scale = float(ctx.cfg.guidance.scale)
        self.teacher = velocity_model(ctx.weights.frozen_copy(), ctx.weights.arch, cfg_scale=self.scale,
                                      null_label=self.null_label)

    @torch.no_grad()
    def target(self, rows: dict) -> torch.Tensor:
        """The frozen base's guided velocity at (x_sigma, sigma, y)."""
        return self.teacher(rows["x_sigma"], rows["sigma"], rows["y"])

    def meta(self, ctx: RunContext) -> dict:
        return {**super().meta(ctx), "guidance": self.scale}
