"""RL fine-tuning: GRPO on a stochastic flow sampler with distribution-wise or sample-wise rewards (METHOD.md §4).

`finetune(cfg, run_dir, ...)` is the loop (grpo.py): rollout.py (labels, noise, rollouts), the reward and its
reference set (setup.py), update.py (the clipped update, KL, EMA), losses.py (the equations), parallel.py (what
each rank does under torchrun), settings.py (defaults and checks).
"""

from .distill import distill
from .grpo import DEFAULTS, finetune
from .losses import approx_kl, clip_fractions, gaussian_kl, group_advantages, ppo_clip_loss, trained_steps
from .update import ema_update

__all__ = ["finetune", "distill", "DEFAULTS", "group_advantages", "ppo_clip_loss", "gaussian_kl", "approx_kl",
           "clip_fractions", "trained_steps", "ema_update"]
