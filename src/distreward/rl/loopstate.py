"""What GRPO (`finetune`) and the distillation control (`distill`) share around their loops: restoring a
checkpoint into the trained objects, evaluating the EMA weights with the served sampler, and writing weights as
merge inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from ..evaluation import EvalPlan, evaluate_generator
from ..models import save_generator
from ..report import save_image_grid
from ..utils.checkpoint import checkpoint_exists, load_checkpoint, set_rng_state
from ..utils.runlog import RunLog


def restore_checkpoint(path: Path, net, ema, optimizer, generator: torch.Generator) -> dict | None:
    """Load `path` (or its .prev when damaged) into the policy, its EMA, the optimizer and the generator; returns
    the checkpoint (the caller reads its own entries: iteration, history, evals, reward), None when there is none."""
    if not checkpoint_exists(path):
        return None
    st = load_checkpoint(path)
    net.load_state_dict(st["net"])
    ema.load_state_dict(st["ema"])
    optimizer.load_state_dict(st["optimizer"])
    set_rng_state(generator, st["rng"])
    return st


class EmaEvaluation:
    """evaluate(it): the EMA weights' metrics with the plan's sampler appended to `evals`, logged (eval/<key>) and
    their sample grid saved (samples/ema_<it>.png); `final_images` keeps the images of iteration `iterations`."""

    def __init__(self, ema, evaluator, plan: EvalPlan, evals: list, log: RunLog, *, arch: str, decode, device,
                 samples: Path, grid: int, iterations: int, progress: bool, main: bool = True):
        self.ema, self.evaluator, self.plan, self.evals, self.log = ema, evaluator, plan, evals, log
        self.arch, self.decode, self.device = arch, decode, device
        self.samples, self.grid, self.iterations, self.progress, self.main = samples, grid, iterations, progress, main
        self.final_images = None

    def first(self, start: int, initial_eval: dict | None, every: int) -> None:
        """Iteration 0 of a run that starts now: the caller's evaluation of the base (`initial_eval`, it is the EMA
        model's) or a new one (when there is an evaluator and every > 0); nothing on resume."""
        if start == 0 and initial_eval is not None:
            self.evals.append({**initial_eval, "iteration": 0})
        elif start == 0 and self.evaluator is not None and every > 0:
            self(0)

    def __call__(self, it: int) -> None:
        metrics, images = evaluate_generator(self.ema, self.evaluator, self.plan, arch=self.arch, decode=self.decode,
                                             device=self.device, keep_images=self.plan.noise == "seed",
                                             progress=self.progress and self.main, desc=f"eval @ {it}")
        self.evals.append({**metrics, "iteration": it})
        if it == self.iterations:
            self.final_images = images
        if self.main:
            save_image_grid(images[:self.grid], self.samples / f"ema_{it:04d}.png")
            self.log.log({"iteration": it, **{f"eval/{k}": v for k, v in metrics.items()}})


def save_merge_input(weights: torch.nn.Module, path: Path, extra: dict) -> None:
    """A generator file of `weights` (an input for RL merging, METHOD.md §5), when the network knows its
    architecture (`generator_meta`; the EMA copy has the trained network's)."""
    meta = getattr(weights, "generator_meta", None)
    if meta is not None:
        save_generator(path, weights, meta["arch"], meta["kwargs"], extra=extra)
