"""RL fine-tuning of a flow generator with distribution-wise or sample-wise rewards (METHOD.md §4).

One frame for every trainer: run.py (the registry ALGORITHMS, `finetune`, `distill`, `train`, the loop),
context.py (`RunContext`: what a run shares; `Algorithm`: a trainer's base), step.py (the minibatch / clip / AdamW /
EMA update). The trainers: grpo.py (GRPO on SDE rollouts), nft.py (the forward-process trainer), pool.py (pool
rounds), pathwise.py (the pathwise trainer), distill.py (the distillation control), pretrain.py (continued training
and guidance distillation). Around them: rollout.py (labels, noise, rollouts, trained steps), setup.py (the reward
and its reference set), loopstate.py (policy weights, checkpoints, EMA evaluation), parallel.py (what each rank does
under torchrun), settings.py (defaults and checks), diagnostics.py (the gradient's signal share). The
policy-gradient equations are `distreward.pg`.
"""

from .run import ALGORITHMS, distill, finetune, guidance_distill, pretrain, train
from .settings import DEFAULTS

__all__ = ["ALGORITHMS", "DEFAULTS", "distill", "finetune", "guidance_distill", "pretrain", "train"]
