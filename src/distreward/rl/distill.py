"""The distillation control of a GRPO run (docs/rl.md "The distillation control"): the same budget spent on plain
distillation instead of a reward.

One iteration, top to bottom:
  1. the same P x G labels and starting noises as a GRPO iteration (the same label stream and generator);
  2. teacher: the frozen base model's ODE (distill.teacher_method, m = ceil(teacher_steps / T) equal sub-steps in
     sigma per served interval) from each noise, keeping its states x_k at the served grid points s_0..s_T;
  3. update on GRPO's trained steps: regress the policy's velocity v_theta(x_k, s_k) onto the target
     v*_k = (x_{k+1} - x_k) / (s_{k+1} - s_k) (one Euler step of the policy on the served grid lands on the
     teacher's x_{k+1}); inner_epochs x minibatches, AdamW, grad-norm clip, EMA after every optimizer step;
then log, evaluate the EMA weights, checkpoint, exactly as `rl.grpo.finetune` does. One process only.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from ..config import find_file
from ..sampling import check_sigmas, ode_step, sigma_schedule, sigma_vector
from ..sampling.steps import as_column
from ..utils import dist as D
from ..utils.io import RunDir, atomic_save_json
from ..utils.progress import progress as tqdm
from ..utils.configdiff import only_raise
from ..utils.hashing import input_files, weight_files
from ..utils.rundir import add_inputs, prepare_run
from ..utils.runlog import RunLog
from .loopstate import EmaEvaluation, Policy, due, restore_checkpoint, run_evaluator, save_merge_input, save_state
from .losses import trained_steps
from .rollout import draw_labels, start_noise
from .settings import DEFAULTS, resolve, window
from .update import ema_update

__all__ = ["CHANGEABLE", "distill", "distill_loss", "target_velocity", "teacher_grid", "teacher_trajectory",
           "teacher_steps_of", "substeps", "check_single_process", "distill_update"]

# Settings a resumed run can take new values of (with allow_changes / --allow-change KEY), as finetune's.
CHANGEABLE = {"rl.iterations": only_raise, "eval.every": None, "eval.grid": None, "checkpoint.every": None,
              "name": None}
DEFAULT_TEACHER_STEPS = 32      # without distill.teacher_steps and evidence.converged_steps


# --------------------------------------------------------------------------------------------- the equations

# Target velocity of served step k: v*_k = (x_{k+1} - x_k) / (s_{k+1} - s_k), so the policy's Euler step
# x_k + (s_{k+1} - s_k) v*_k lands on the teacher's x_{k+1} (the step difference in float32, as euler_step's).
def target_velocity(x: torch.Tensor, x_next: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    return (x_next.float() - x.float()) / (as_column(sigma_next, x) - as_column(sigma, x))


# Distillation loss per sample: mean over dimensions of (v_theta(x_k, s_k, y) - v*_k)^2; the trainer averages it
# over the samples and the trained steps.
def distill_loss(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (v - target).pow(2).flatten(1).mean(1)


# --------------------------------------------------------------------------------------------- the teacher

def teacher_steps_of(cfg) -> int:
    """The teacher's step count: distill.teacher_steps, else evidence.converged_steps, else 32."""
    n = cfg.distill.get("teacher_steps")
    if n is None:
        n = (cfg.get("evidence") or {}).get("converged_steps")
    return int(n) if n is not None else DEFAULT_TEACHER_STEPS


def substeps(teacher_steps: int, T: int) -> int:
    """m = ceil(teacher_steps / T): teacher sub-steps per served interval (at least teacher_steps in all)."""
    return max(1, math.ceil(int(teacher_steps) / int(T)))


def teacher_grid(sigmas: torch.Tensor, m: int) -> torch.Tensor:
    """The teacher's sigmas (T m + 1,) float32: every served interval [s_k, s_{k+1}] cut into m equal sub-steps in
    sigma; the served points are kept exactly (grid[k m] == s_k)."""
    s = check_sigmas(sigmas).double()
    parts = [torch.linspace(float(a), float(b), int(m) + 1, dtype=torch.float64)[:-1] for a, b in zip(s[:-1], s[1:])]
    return check_sigmas(torch.cat([*parts, s[-1:]]).float())


@torch.no_grad()
def teacher_trajectory(model, noise: torch.Tensor, labels: torch.Tensor | None, sigmas: torch.Tensor, m: int,
                       method: str = "heun", batch_size: int | None = None) -> torch.Tensor:
    """(T+1, B, C, H, W): the teacher's ODE from `noise` (m sub-steps of `method` per interval of the served grid
    `sigmas`, which starts at sigma = 1) at the served grid points: [0] the noise, [-1] the converged sample.
    The batch is integrated in chunks of `batch_size`."""
    if method not in ("euler", "heun"):
        raise ValueError(f"distill.teacher_method must be 'euler' or 'heun', got {method!r}")
    fine = teacher_grid(sigmas, m).tolist()
    if fine[0] != 1.0:
        raise ValueError(f"the served grid must start at sigma = 1 (the noise), got {fine[0]}; use sigma_schedule")
    T, bs = (len(fine) - 1) // m, noise.shape[0] if batch_size is None else max(1, int(batch_size))
    chunks = []
    for i in range(0, noise.shape[0], bs):
        x, lab = noise[i:i + bs].float(), None if labels is None else labels[i:i + bs]
        xs = [x]
        for k in range(T):
            for s, s_next in zip(fine[k * m:(k + 1) * m], fine[k * m + 1:(k + 1) * m + 1]):
                x = ode_step(model, x, lab, s, s_next, method)
            xs.append(x)
        chunks.append(torch.stack(xs))
    return torch.cat(chunks, 1)


# --------------------------------------------------------------------------------------------- the update

def distill_update(net, model, ema, optimizer, xs: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor,
                   steps: list[int], rl, generator: torch.Generator) -> dict:
    """Inner epochs x minibatches of the distillation loss on the trained steps (gradients accumulated over the
    steps, as GRPO's update), AdamW, grad-norm clip, EMA after every optimizer step. Returns the logged means
    over the updates: loss_distill (over samples and steps before each step) and grad_norm."""
    batch = labels.shape[0]
    n_mb, n_steps = max(1, min(int(rl.minibatches), batch)), len(steps)
    sig = check_sigmas(sigmas).tolist()
    sums, n_updates = {"loss_distill": 0.0, "grad_norm": 0.0}, 0
    for _ in range(int(rl.inner_epochs)):
        perm = torch.randperm(batch, generator=generator)
        for idx in perm.chunk(n_mb):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            rows = idx.to(xs.device)
            for j in steps:
                x, lab = xs[j, rows], labels[rows]
                target = target_velocity(x, xs[j + 1, rows], sig[j], sig[j + 1])
                loss = distill_loss(model(x, sigma_vector(sig[j], x), lab), target)
                (loss.mean() / n_steps).backward()
                total += float(loss.detach().sum())
            sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(net.parameters(), rl.grad_clip))
            optimizer.step()
            ema_update(ema, net, rl.ema_decay)
            sums["loss_distill"] += total / idx.numel() / n_steps
            n_updates += 1
    return {k: v / n_updates for k, v in sums.items()}


# --------------------------------------------------------------------------------------------- the run

def check_single_process(world: int) -> None:
    """The distillation control has no multi-process split: refuse a torchrun launch before any work."""
    if int(world) > 1:
        raise ValueError(f"the distillation control runs in one process, but it was launched among {world} "
                         "processes (torchrun, WORLD_SIZE > 1); run it without torchrun")


def distill(cfg, run_dir, *, resume: bool = False, overwrite: bool = False, allow_changes: Sequence[str] = (),
            net: torch.nn.Module | None = None, evaluator=None, progress: bool = True,
            initial_eval: dict | None = None) -> dict:
    """Run the distillation control for cfg.rl.iterations at GRPO's budget; returns {"final": eval metrics of the
    EMA model, "evals", "history", "net", "ema", "final_images"} (as `finetune`).

    `cfg` is a finetune config (its reward section is not used, so any reward name passes); `net` and `evaluator`
    may be given directly, else they are built from cfg.model and cfg.eval. Resume, overwrite and allow_changes
    behave as finetune's (docs/runs.md); `initial_eval`: the base model's evaluation when the caller has it.
    """
    cfg = resolve(cfg, own_reward=True)      # checked in full before any work; no reward is built
    check_single_process(D.launched_world_size())
    device = torch.device(str(cfg.device))
    run = prepare_run(run_dir, cfg, command="distill", resume=resume, overwrite=overwrite, defaults=DEFAULTS,
                      allow_changes=allow_changes, changeable=CHANGEABLE, inputs=input_files(cfg, find_file))
    try:
        return distill_run(cfg, run, device, resume=resume, net=net, evaluator=evaluator, progress=progress,
                           initial_eval=initial_eval)
    finally:
        run.close()


def distill_run(cfg, run: RunDir, device, *, resume: bool, net, evaluator, progress: bool,
                initial_eval: dict | None) -> dict:
    """The loop of `distill` in its prepared (locked, checked) run directory."""
    rl = cfg.rl
    seed, iterations = int(cfg.seed), int(rl.iterations)
    P, G, T = int(rl.labels_per_iter), int(rl.group_size), int(rl.steps)
    num_classes, image_shape = int(cfg.model.num_classes), tuple(cfg.model.image_shape)
    balanced, shared_noise = rl.labels == "balanced", bool(rl.shared_noise)
    train_mode, train_fraction = str(rl.train_steps.mode), float(rl.train_steps.fraction)
    train_window, train_count = window(rl.train_steps.window), rl.train_steps.get("count")
    eval_every, checkpoint_every, grid = int(cfg.eval.every), int(cfg.checkpoint.every), int(cfg.eval.grid)
    teacher_steps, method = teacher_steps_of(cfg), str(cfg.distill.teacher_method)
    m = substeps(teacher_steps, T)

    # Policy (trained), the frozen teacher (the base) and EMA weights (evaluated, saved). The teacher and the policy
    # stay in latent space; the decoder serves the evaluation.
    pol = Policy.build(cfg, device, net, seed)
    net, ema, gen = pol.net, pol.ema, pol.generator
    model, teacher_model = pol.model, pol.velocity(pol.frozen_copy())
    optimizer = pol.optimizer(rl)

    evaluator = run_evaluator(cfg, device, evaluator, needed=eval_every > 0)
    plan = pol.eval_plan(cfg, 1)
    sigmas = sigma_schedule(T, shift=float(rl.shift))
    add_inputs(run, weight_files(evaluator))

    ckpt_path = run.checkpoints / "last.pt"
    start, history, evals = 0, [], []
    st = restore_checkpoint(ckpt_path, net, ema, optimizer, gen) if resume else None
    if st is not None:
        start, history, evals = int(st["iteration"]), list(st["history"]), list(st["evals"])
    log = RunLog(run.root, start=start)
    evaluate = EmaEvaluation(ema, evaluator, plan, evals, log, arch=pol.arch, decode=pol.decode, device=device,
                             samples=run.samples, grid=grid, iterations=iterations, progress=progress, main=True)
    evaluate.first(start, initial_eval, eval_every)

    info = {"rl": "distill", "teacher_steps": teacher_steps, "teacher_substeps": m, "teacher_method": method}
    bar = tqdm(range(start, iterations), desc="distill", unit="it", disable=not progress, initial=start,
               total=iterations)
    for it in bar:
        # 1. GRPO's labels and starting noises, 2. the teacher's states on the served grid
        t0 = time.perf_counter()
        labels, groups = draw_labels(P, G, num_classes, gen, balanced=balanced, start=it * P, seed=seed)
        noise = start_noise(groups, image_shape, gen, shared_noise).to(device)
        labels = labels.to(device)
        xs = teacher_trajectory(teacher_model, noise, labels, sigmas, m, method, int(rl.batch_size))
        t1 = time.perf_counter()
        # 3. regression of the policy's velocities on GRPO's trained steps, AdamW, EMA
        steps = trained_steps(T, train_mode, fraction=train_fraction, window=train_window, generator=gen,
                              count=train_count)
        stats = distill_update(net, model, ema, optimizer, xs, labels, sigmas, steps, rl, gen)
        t2 = time.perf_counter()

        record = {"iteration": it + 1, **stats, "time_teacher": t1 - t0, "time_update": t2 - t1}
        history.append(record)
        log.log(record)
        bar.set_postfix(loss=f"{stats['loss_distill']:.4g}")
        if evaluator is not None and due(it + 1, eval_every, iterations):
            evaluate(it + 1)
        if due(it + 1, checkpoint_every, iterations):
            save_state(ckpt_path, pol, optimizer, None, {"iteration": it + 1, "history": history, "evals": evals},
                       merge_extra={**info, "iteration": it + 1})
    bar.close()
    log.close()

    extra = {**info, "iterations": iterations}
    save_merge_input(ema, run.path("model_ema.safetensors"), extra)
    save_merge_input(net, run.path("model.safetensors"), extra)
    result = {"final": evals[-1] if evals else None, "evals": evals, "history": history}
    atomic_save_json(run.path("result.json"), result)
    result.update({"net": net, "ema": ema, "final_images": evaluate.final_images})
    return result
