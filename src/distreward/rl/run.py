"""The frame of every RL trainer: the registry of algorithms, the run (prepared directory, context, resume), and
the loop, the same for all of them:

    for it in range(start, iterations): record = algorithm.iteration(ctx, it); log; evaluate / checkpoint when due

`finetune(cfg, run_dir, ...)` runs the config's trainer (rl.algorithm: grpo, nft); `distill(cfg, run_dir, ...)`
the distillation control; `train(name, cfg, run_dir, ...)` any registered one. A new trainer is one file (an
`Algorithm` subclass, rl/context.py) plus one line in ALGORITHMS (docs/DEVELOPING.md "Adding a trainer").
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..build import generator_file
from ..config import find_file
from ..schema import ConfigError
from ..utils import dist as D
from ..utils.io import RunDir, atomic_save_json
from ..utils.progress import progress as tqdm
from ..utils.configdiff import only_raise, plain_config
from ..utils.hashing import file_sha256, input_files
from ..utils.provenance import first_command
from ..utils.rundir import prepare_run
from ..utils.runlog import RunLog
from .context import Algorithm, RunContext, check_reward
from .distill import Distill
from .grpo import GRPO
from .loopstate import EmaEvaluation, due, restore_checkpoint, save_merge_input, save_state
from .nft import NFT
from .pool import Pool
from .pathwise import Pathwise
from .pretrain import GuidanceDistill, Pretrain
from .settings import DEFAULTS, check_world, resolve

__all__ = ["ALGORITHMS", "CHANGEABLE", "distill", "finetune", "guidance_distill", "pretrain", "train"]

# The trainers, by name (rl.algorithm for finetune's; the controls and references of `distreward study` by theirs).
ALGORITHMS: dict[str, type[Algorithm]] = {"grpo": GRPO, "nft": NFT, "distill": Distill, "pathwise": Pathwise,
                                          "pretrain": Pretrain, "guidance-distill": GuidanceDistill,
                                          "pool": Pool}

# Settings a resumed run can take new values of (with allow_changes / --allow-change KEY); docs/runs.md.
CHANGEABLE = {"rl.iterations": only_raise, "eval.every": None, "eval.grid": None, "checkpoint.every": None,
              "name": None}


def finetune(cfg, run_dir, *, resume: bool = False, overwrite: bool = False, allow_changes: Sequence[str] = (),
             net: torch.nn.Module | None = None, reward=None, evaluator=None, progress: bool = True,
             initial_eval: dict | None = None) -> dict:
    """Run the config's trainer (rl.algorithm: GRPO, or the forward-process trainer of rl/nft.py) for
    cfg.rl.iterations; returns {"final": eval metrics of the EMA model, "evals", "history", "reward_mean_first",
    "reward_mean", "net", "ema", "reward", "final_images"}. "final_images": the final evaluation's images when this
    call ran it (all eval.n in one process with a pixel UNet, rank 0's first eval.grid otherwise), else None.

    `net`, `reward` and `evaluator` may be given directly (tests, the demo); otherwise they are built from cfg
    (cfg.model: model.path, or the preset keys arch/checkpoint/kwargs/vae; cfg.reward; cfg.eval.features, else the
    Fashion-MNIST evaluator). With resume=True the run continues from run_dir/checkpoints/last.pt (or its .prev
    when last.pt is damaged) and ends where an uninterrupted run would; a setting that differs from the saved
    config.yaml is refused unless named in `allow_changes` and in CHANGEABLE. Without resume, a run_dir holding a
    previous run is refused unless `overwrite` (then emptied). The directory is locked while the run lives
    (`utils.rundir.prepare_run`, docs/runs.md). `initial_eval`: the base model's evaluation when the caller
    already has it (it is the EMA model's at iteration 0).
    """
    cfg = resolve(cfg, own_reward=reward is not None)
    return run_checked(ALGORITHMS[str(cfg.rl.algorithm)], cfg, run_dir, resume=resume, overwrite=overwrite,
                       allow_changes=allow_changes, net=net, reward=reward, evaluator=evaluator, progress=progress,
                       initial_eval=initial_eval)


def distill(cfg, run_dir, *, resume: bool = False, overwrite: bool = False, allow_changes: Sequence[str] = (),
            net: torch.nn.Module | None = None, evaluator=None, progress: bool = True,
            initial_eval: dict | None = None) -> dict:
    """Run the distillation control (rl/distill.py) for cfg.rl.iterations at GRPO's budget; returns what
    `finetune` returns less the reward's entries. `cfg` is a finetune config (its reward section is not used, so
    any reward name passes); the other arguments behave as finetune's."""
    return train("distill", cfg, run_dir, resume=resume, overwrite=overwrite, allow_changes=allow_changes, net=net,
                 evaluator=evaluator, progress=progress, initial_eval=initial_eval)


def pretrain(cfg, run_dir, **kw) -> dict:
    """Run the continued-training control (rl/pretrain.py) for cfg.rl.iterations; arguments and result as `distill`."""
    return train("pretrain", cfg, run_dir, **kw)


def guidance_distill(cfg, run_dir, **kw) -> dict:
    """Run guidance distillation (rl/pretrain.py, guidance.scale) for cfg.rl.iterations; arguments and result as
    `distill`."""
    return train("guidance-distill", cfg, run_dir, **kw)


def check_single_process(world: int) -> None:
    """A trainer without a multi-process split: refuse a torchrun launch before any work."""
    if int(world) > 1:
        raise ConfigError(f"this trainer runs in one process, but it was launched among {world} processes "
                         "(torchrun, WORLD_SIZE > 1); run it without torchrun")


def train(name: str, cfg, run_dir, *, resume: bool = False, overwrite: bool = False,
          allow_changes: Sequence[str] = (), net: torch.nn.Module | None = None, reward=None, evaluator=None,
          progress: bool = True, initial_eval: dict | None = None) -> dict:
    """Run the registered trainer `name` in `run_dir`: the config checked in full before any work, the run
    directory prepared (locked, resume checks), the loop, the final files; see `finetune`."""
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown trainer {name!r}; use one of {', '.join(ALGORITHMS)}")
    algorithm = ALGORITHMS[name]
    cfg = resolve(cfg, own_reward=reward is not None or not algorithm.uses_reward)
    return run_checked(algorithm, cfg, run_dir, resume=resume, overwrite=overwrite, allow_changes=allow_changes,
                       net=net, reward=reward, evaluator=evaluator, progress=progress, initial_eval=initial_eval)


def run_checked(algorithm: type[Algorithm], cfg, run_dir, *, resume: bool, overwrite: bool,
                allow_changes: Sequence[str], net: torch.nn.Module | None, reward, evaluator, progress: bool,
                initial_eval: dict | None) -> dict:
    """Run `algorithm` with `cfg` as `resolve` returned it (checked once, by the caller): the processes, the run
    directory prepared (locked, resume checks), the loop, the final files."""
    check_reward(reward)
    if algorithm.one_process:
        check_single_process(D.launched_world_size())
        device = torch.device(str(cfg.device))
    else:
        device = D.init_distributed(cfg.device)
        cfg.device = str(device)
        check_world(cfg, D.world_size())
    run = prepare_run(run_dir, cfg, command=algorithm.command, resume=resume, overwrite=overwrite,
                      defaults=DEFAULTS, allow_changes=allow_changes, changeable=CHANGEABLE,
                      main=D.is_main(), inputs=input_files(cfg, find_file))
    try:
        ctx = RunContext.build(cfg, run, device, uses_reward=algorithm.uses_reward, net=net, reward=reward,
                               evaluator=evaluator, progress=progress)
        return loop(algorithm(ctx), ctx, resume=resume, initial_eval=initial_eval)
    finally:
        run.close()


def loop(algorithm: Algorithm, ctx: RunContext, *, resume: bool, initial_eval: dict | None) -> dict:
    """Resume from the checkpoint, run the iterations (log, evaluate and checkpoint when due), write the results."""
    cfg, weights = ctx.cfg, ctx.weights
    iterations, eval_every, checkpoint_every = int(cfg.rl.iterations), int(cfg.eval.every), int(cfg.checkpoint.every)
    ckpt_path = ctx.run.checkpoints / "last.pt"
    st = restore_checkpoint(ckpt_path, weights.net, weights.ema, ctx.optimizer, ctx.generator,
                            reward=ctx.reward) if resume else None
    if st is not None:
        algorithm.load_state_dict(st)
        ctx.start, ctx.history, ctx.evals = int(st["iteration"]), list(st["history"]), list(st["evals"])
    log = RunLog(ctx.run.root, start=ctx.start, enabled=ctx.main)
    evaluate = EmaEvaluation(weights.ema, ctx.evaluator, weights.eval_plan(cfg, ctx.world), ctx.evals, log,
                             arch=weights.arch, decode=weights.decode, device=ctx.device, samples=ctx.run.samples,
                             grid=int(cfg.eval.grid), iterations=iterations, progress=ctx.progress, main=ctx.main)
    evaluate.first(ctx.start, initial_eval, eval_every)

    desc = algorithm.name if ctx.reward is None else f"{algorithm.name} {cfg.reward.name}"
    bar = tqdm(range(ctx.start, iterations), desc=desc, unit="it", disable=not (ctx.progress and ctx.main),
               initial=ctx.start, total=iterations)
    for it in bar:
        record = algorithm.iteration(ctx, it)
        ctx.history.append({k: v for k, v in record.items() if "/" not in k})    # per-step breakdowns: log only
        log.log(record)
        bar.set_postfix(**algorithm.postfix(record))
        if ctx.evaluator is not None and due(it + 1, eval_every, iterations):
            evaluate(it + 1)
        if due(it + 1, checkpoint_every, iterations):
            save_state(ckpt_path, weights, ctx.optimizer, ctx.reward,
                       {**algorithm.state_dict(), "iteration": it + 1, "history": ctx.history, "evals": ctx.evals},
                       merge_extra={**algorithm.meta(ctx), "iteration": it + 1}, main=ctx.main)
    bar.close()
    log.close()
    return finish(ctx, evaluate, {**algorithm.meta(ctx), "iterations": iterations})


def finish(ctx: RunContext, evaluate: EmaEvaluation, extra: dict) -> dict:
    """The end of a run: the EMA and raw weights as merge inputs (model_ema / model.safetensors, with `extra`, the
    resolved config, the command that started the run and the sha256 of the base's file in their metadata), result.json ({final, evals, history},
    and for a reward-driven run reward_mean_first and reward_mean) written by rank 0; returns that result with the
    live objects (net, ema, [reward,] final_images)."""
    net, ema, history = ctx.weights.net, ctx.weights.ema, ctx.history
    base = generator_file(ctx.cfg.model)
    extra = {**extra, "config": plain_config(ctx.cfg), "command": first_command(ctx.run.root),
             "base_sha256": file_sha256(base) if base is not None and base.is_file() else None}
    if ctx.main:
        save_merge_input(ema, ctx.run.path("model_ema.safetensors"), extra)
        save_merge_input(net, ctx.run.path("model.safetensors"), extra)
    result = {"final": ctx.evals[-1] if ctx.evals else None, "evals": ctx.evals, "history": history}
    if ctx.reward is not None:
        result.update({"reward_mean_first": history[0]["r_mean"] if history else None,
                       "reward_mean": history[-1]["r_mean"] if history else None})
    if ctx.main:
        atomic_save_json(ctx.run.path("result.json"), result)
    D.barrier()
    live = {"reward": ctx.reward} if ctx.reward is not None else {}
    return {**result, "net": net, "ema": ema, **live, "final_images": evaluate.final_images}
