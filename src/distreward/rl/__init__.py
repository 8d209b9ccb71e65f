"""RL fine-tuning: GRPO on a stochastic flow sampler with distribution-wise or sample-wise rewards (METHOD.md §4).

`finetune(cfg, run_dir, ...)` is the loop (grpo.py); the equations are in losses.py, checkpoint plumbing in state.py.
"""

from .losses import (approx_kl, clip_fractions, ema_update, gaussian_kl, group_advantages, ppo_clip_loss,
                     trained_steps)

__all__ = ["finetune", "DEFAULTS", "group_advantages", "ppo_clip_loss", "gaussian_kl", "approx_kl", "clip_fractions",
           "trained_steps", "ema_update"]


def __getattr__(name):
    # grpo.py imports the samplers; load it only when the loop is asked for
    if name in ("finetune", "DEFAULTS"):
        from . import grpo

        return getattr(grpo, name)
    raise AttributeError(name)
