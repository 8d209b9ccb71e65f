"""GRPO fine-tuning of a flow generator with a distribution-wise (or sample-wise) reward (METHOD.md §4).

One iteration, top to bottom:
  1. rollout: P labels x G samples from the old policy with T stochastic steps (x_t, x_next, log p_old);
  2. reward r (distribution-wise: subset-replace FD improvement per group; or a sample-wise baseline);
  3. advantages A, group-relative, clipped;
  4. PPO-clip update on the trained steps + beta * KL to the frozen base policy, AdamW, grad-norm clip, EMA;
  5. push: the new samples (or ODE samples of the policy) enter the reward's reference set;
then log, evaluate the EMA weights, checkpoint. Logged names follow the method's symbols (r, A, rho, KL, beta);
docs/rl.md explains every quantity.

Under torchrun (WORLD_SIZE > 1) every rank runs this with the same cfg: the P groups are split over the ranks,
the reference set is replicated, gradients are summed, evaluation is sharded, and only rank 0 writes files
(rl/parallel.py, docs/scale.md). One process is the world-size-1 case of the same code.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from ..config import find_file
from ..sampling import sigma_schedule
from ..utils import dist as D
from ..utils.io import RunDir
from ..utils.progress import progress as tqdm
from ..utils.rundir import add_inputs, input_files, only_raise, prepare_run, weight_files
from ..utils.runlog import RunLog
from . import parallel
from .loopstate import EmaEvaluation, Policy, due, finish_run, restore_checkpoint, run_evaluator, run_reward, save_state
from .losses import group_advantages, trained_steps
from .nft import nft_run
from .rollout import collect, draw_labels, ode_rows, rollout_noise_levels
from .settings import DEFAULTS, check_world, resolve, window
from .update import update

__all__ = ["CHANGEABLE", "DEFAULTS", "finetune"]

# Settings a resumed run can take new values of (with allow_changes / --allow-change KEY); docs/runs.md.
CHANGEABLE = {"rl.iterations": only_raise, "eval.every": None, "eval.grid": None, "checkpoint.every": None,
              "name": None}


def finetune(cfg, run_dir, *, resume: bool = False, overwrite: bool = False, allow_changes: Sequence[str] = (),
             net: torch.nn.Module | None = None, reward=None, evaluator=None,
             progress: bool = True, on_iteration: Callable[[int, dict], None] | None = None,
             initial_eval: dict | None = None) -> dict:
    """Run GRPO (or, with rl.algorithm = nft, the forward-process trainer of rl/nft.py) for cfg.rl.iterations;
    returns {"final": eval metrics of the EMA model, "evals", "history", ...,
    "net", "ema", "reward", "final_images"}. "final_images": the final evaluation's images when this call ran it
    (all eval.n in one process with a pixel UNet, rank 0's first eval.grid otherwise), else None.

    `net`, `reward` and `evaluator` may be given directly (tests, the demo); otherwise they are built from cfg
    (cfg.model: model.path, or the preset keys arch/checkpoint/kwargs/vae; cfg.reward; cfg.eval.features, else the
    Fashion-MNIST evaluator). With resume=True the run continues from run_dir/checkpoints/last.pt (or its .prev
    when last.pt is damaged) and ends where an uninterrupted run would; a setting that differs from the saved
    config.yaml is refused unless named in `allow_changes` and in CHANGEABLE. Without resume, a run_dir holding a
    previous run is refused unless `overwrite` (then emptied). The directory is locked while the run lives
    (`utils.rundir.prepare_run`, docs/runs.md). `initial_eval`: the base model's evaluation when the caller
    already has it (it is the EMA model's at iteration 0).
    """
    cfg = resolve(cfg, own_reward=reward is not None)      # checked in full before any work (schema.validate)
    device = D.init_distributed(cfg.device)
    cfg.device = str(device)
    check_world(cfg, D.world_size())
    run = prepare_run(run_dir, cfg, command="finetune", resume=resume, overwrite=overwrite, defaults=DEFAULTS,
                      allow_changes=allow_changes, changeable=CHANGEABLE, main=D.is_main(),
                      inputs=input_files(cfg, find_file))
    trainer = nft_run if cfg.rl.algorithm == "nft" else grpo_run
    try:
        return trainer(cfg, run, device, resume=resume, net=net, reward=reward, evaluator=evaluator,
                        progress=progress, on_iteration=on_iteration, initial_eval=initial_eval)
    finally:
        run.close()


def grpo_run(cfg, run: RunDir, device, *, resume: bool, net, reward, evaluator, progress: bool,
             on_iteration: Callable[[int, dict], None] | None, initial_eval: dict | None) -> dict:
    """The GRPO run of `finetune` in its prepared (locked, checked) run directory."""
    world, main = D.world_size(), D.is_main()

    # The config as plain values, named like the method's symbols.
    rl = cfg.rl
    seed, iterations = int(cfg.seed), int(rl.iterations)
    P, G, T = int(rl.labels_per_iter), int(rl.group_size), int(rl.steps)
    a = rollout_noise_levels(rl)                                  # noise level of each of the T steps
    num_classes, image_shape = int(cfg.model.num_classes), tuple(cfg.model.image_shape)
    balanced, shared_noise = rl.labels == "balanced", bool(rl.shared_noise)
    push_every = G if rl.push == "one_per_group" else 1           # 1: every new sample enters the reference set
    adv_std, adv_clip = str(rl.adv_std), float(rl.adv_clip)
    null_permute = rl.get("null_control", "none") == "permute"   # the null control: real rewards, random samples
    train_mode, train_fraction = str(rl.train_steps.mode), float(rl.train_steps.fraction)
    train_window, train_count = window(rl.train_steps.window), rl.train_steps.get("count")
    eval_every, checkpoint_every, grid = int(cfg.eval.every), int(cfg.checkpoint.every), int(cfg.eval.grid)

    # Policy (trained), frozen reference (the base policy of the KL term) and EMA weights (evaluated, saved).
    pol = Policy.build(cfg, device, net, seed)
    net, ema, gen, arch, decode = pol.net, pol.ema, pol.generator, pol.arch, pol.decode
    model = pol.model                                   # the policy p_theta
    ref_model = pol.velocity(pol.frozen_copy())         # p_ref, the KL term's base policy
    optimizer = pol.optimizer(rl)

    # Evaluation (the EMA weights with the served sampler) and the reward with its reference set.
    evaluator = run_evaluator(cfg, device, evaluator, needed=eval_every > 0 or reward is None)
    plan = pol.eval_plan(cfg, world)
    reward = run_reward(cfg, run, reward, pol, evaluator, progress=progress)
    sigmas = sigma_schedule(T, shift=float(rl.shift))
    ode_reference = rl.get("reference", "rollout") == "ode" and parallel.has_own_after_step(reward)
    rows = parallel.group_rows(P, G)             # this rank's rows of the P x G batch: whole groups
    add_inputs(run, weight_files(evaluator, reward), main=main)     # the feature networks' weight files

    ckpt_path = run.checkpoints / "last.pt"
    start, history, evals = 0, [], []
    st = restore_checkpoint(ckpt_path, net, ema, optimizer, gen, reward=reward) if resume else None
    if st is not None:
        start, history, evals = int(st["iteration"]), list(st["history"]), list(st["evals"])
    log = RunLog(run.root, start=start, enabled=main)
    evaluate = EmaEvaluation(ema, evaluator, plan, evals, log, arch=arch, decode=decode, device=device,
                             samples=run.samples, grid=grid, iterations=iterations, progress=progress, main=main)
    evaluate.first(start, initial_eval, eval_every)

    bar = tqdm(range(start, iterations), desc=f"GRPO {cfg.reward.name}", unit="it", disable=not (progress and main),
               initial=start, total=iterations)
    for it in bar:
        # 1. rollouts of the old policy (this rank's groups of the global batch)
        t0 = time.perf_counter()
        labels, groups = draw_labels(P, G, num_classes, gen, balanced=balanced, start=it * P, seed=seed)
        ro = collect(model, labels, groups, sigmas, a, image_shape, gen, device, shared_noise, rows)
        images = decode(ro.xs[-1])                          # clamped after decoding, never the latents
        t1 = time.perf_counter()
        # 2. rewards r and 3. advantages A, of the whole batch on every rank
        r, gathered = parallel.score(reward, images, ro.labels.to(device), ro.groups.to(device))
        if null_permute:            # the same rewards (scale, spread) given to random members of the batch
            r = r[torch.randperm(r.numel(), generator=gen).to(r.device)]
        A, zero_std = group_advantages(r, groups, std=adv_std, clip=adv_clip)
        ro.rewards, ro.adv = r[rows.start:rows.stop], A[rows.start:rows.stop]
        t2 = time.perf_counter()
        # 4. clipped policy update on the trained steps, KL to the base, EMA
        steps = trained_steps(T, train_mode, fraction=train_fraction, window=train_window, generator=gen,
                              count=train_count)
        stats = update(net, model, ref_model, ema, optimizer, ro, steps, rl, gen, rows=rows, batch=P * G)
        t3 = time.perf_counter()
        # 5. push: the new samples (or fresh ODE samples of the policy) enter the reference set, alike on every rank
        if ode_reference:
            pushed = labels[::push_every]
            reward.after_step(ode_rows(model, pushed, image_shape, sigmas, gen, device, decode, int(rl.batch_size)),
                              pushed.to(device))
        else:
            parallel.push(reward, images, ro.labels.to(device), gathered, every=push_every)
        fd_ref = float(reward.fd()) if hasattr(reward, "fd") else None
        t4 = time.perf_counter()

        record = {"iteration": it + 1, "r_mean": float(r.mean()), "r_std": float(r.std()), "fd_ref": fd_ref,
                  "zero_std_frac": float(zero_std.float().mean()), **stats,
                  "time_rollout": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2, "time_push": t4 - t3}
        history.append({k: v for k, v in record.items() if not k.startswith("rho_mean/")})
        log.log(record)
        bar.set_postfix(r=f"{record['r_mean']:.3g}", fd_ref=f"{fd_ref:.3g}" if fd_ref is not None else "-")
        if evaluator is not None and due(it + 1, eval_every, iterations):
            evaluate(it + 1)
        if due(it + 1, checkpoint_every, iterations):
            save_state(ckpt_path, pol, optimizer, reward, {"iteration": it + 1, "history": history, "evals": evals},
                       merge_extra={"rl": "grpo", "reward": cfg.reward.name, "iteration": it + 1}, main=main)
        if on_iteration is not None:
            on_iteration(it + 1, record)
    bar.close()
    log.close()

    return finish_run(run, pol, reward, evaluate, history, evals,
                      {"rl": "grpo", "reward": cfg.reward.name, "iterations": iterations}, main=main)
