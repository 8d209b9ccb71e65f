"""The fine-tuning stages of the demo: the base model, the preset's trainer (`rl.algorithm`) with the
distribution-wise reward (`distribution`) and with the sample-wise baseline (`sample`), and the cross-check at
another step count of the ODE sampler (`crosscheck`).

Every model is evaluated with the inference ODE sampler on cfg.eval.n class-balanced samples from one draw of
eval.seed: the same starting points and labels for every model.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from ..build import eval_plan
from ..evaluation import ImageFigures, code_digest, evaluate_generator, evaluator_network, network_hash
from ..models import load_generator
from ..report import metrics_table, relative_change, save_image_grid
from ..reward import ClassifierLogProbReward
from ..rl import finetune
from ..sampling.generate import balanced_labels, ode_images
from ..utils.configdiff import plain_config
from ..utils.hashing import hash_inputs
from .stages import DemoContext, metrics_only


def classifier_logp(ctx: DemoContext, images) -> float | None:
    """The sample-wise baseline's reward on the evaluation samples: mean log p(intended class | image) under its
    classifier. Fixed samples (the evaluation's seeds), so base and fine-tuned models compare without the rollouts'
    noise; None when the reward network has no classifier head."""
    net = classifier_network(ctx)
    if net is None:
        return None
    labels = balanced_labels(images.shape[0], int(ctx.cfg.model.num_classes))
    return float(ClassifierLogProbReward(net)(images, labels).double().mean())


def classifier_network(ctx: DemoContext):
    """The evaluator's network of the sample-wise reward, if it has a classifier head (else None)."""
    net, _, _ = evaluator_network(ctx.evaluator, str(ctx.sample_cfg.reward.get("features", "fmnist-reward")))
    return net if net is not None and callable(getattr(net, "logits", None)) else None


def classifier_figures(ctx: DemoContext) -> ImageFigures:
    """`classifier_logp` as a figure of an evaluation's n images, cached with its metrics (keyed by the
    classifier's weights and the code of the reward that computes it)."""
    net = classifier_network(ctx)
    key = {"classifier_logp": None if net is None else network_hash(net), "code": code_digest("reward/rewards.py"),
           "num_classes": int(ctx.cfg.model.num_classes)}
    return ImageFigures(key, lambda images: {"classifier_logp": classifier_logp(ctx, images)})


def evaluate_model(ctx: DemoContext, net, steps: int | None = None, desc: str = "evaluate") -> tuple[dict, Any]:
    """Metrics of cfg.eval.n ODE samples of `net` (the evaluation's seeds; eval.steps, or `steps`) plus the
    classifier log-prob of those samples; and the first eval.grid images. Through the demo's evaluation cache
    (`ctx.eval_cache`): a model evaluated before with the same settings is not sampled again."""
    plan = eval_plan(ctx.cfg, noise="seed", steps=steps)
    metrics, images = evaluate_generator(net, ctx.evaluator, plan, arch="unet", device=ctx.cfg.device,
                                         progress=ctx.progress, desc=desc, cache=ctx.eval_cache,
                                         figures=classifier_figures(ctx))
    return {**metrics_only(metrics), "classifier_logp": metrics["classifier_logp"]}, images


def stage_base(ctx: DemoContext) -> dict:
    """Evaluate the base model with the inference ODE sampler; sample grid 'before'."""
    metrics, images = evaluate_model(ctx, ctx.base_net, desc="evaluate base")
    save_image_grid(images[: int(ctx.cfg.eval.grid)], ctx.run_dir / "samples_base.png")
    return {**metrics, "iteration": 0}


def finetune_stage(name: str, cfg_attr: str) -> Callable[[DemoContext], dict]:
    """A stage fine-tuning a copy of the base model (`rl.finetune`: the config's trainer) on the context's config
    `cfg_attr` (cfg or sample_cfg); its result: the final EMA model's metrics, reward means, the FD curves."""
    def run(ctx: DemoContext) -> dict:
        cfg = getattr(ctx, cfg_attr)
        base_eval = ctx.results.get("base")
        res = finetune(cfg, ctx.stage_dir(name), **ctx.trainer_args(), net=copy.deepcopy(ctx.base_net),
                       evaluator=ctx.evaluator, progress=ctx.progress, initial_eval=base_eval)
        images = res["final_images"]
        if images is None or images.shape[0] != int(cfg.eval.n):     # a resumed, finished run: draw them again
            images, _ = ode_images(res["ema"], int(cfg.eval.n), num_classes=int(cfg.model.num_classes),
                                   image_shape=tuple(cfg.model.image_shape), steps=int(cfg.eval.steps),
                                   method=cfg.eval.method, shift=float(cfg.rl.shift), seed=int(cfg.eval.seed),
                                   batch_size=int(cfg.eval.batch_size), device=cfg.device)
        save_image_grid(images[: int(cfg.eval.grid)], ctx.run_dir / f"samples_{name}.png")
        return {**metrics_only(res["final"]), "classifier_logp": classifier_logp(ctx, images), "reward": cfg.reward.name,
                "reward_mean": res["reward_mean"], "reward_mean_first": res["reward_mean_first"],
                "iterations": int(cfg.rl.iterations), "curve": [metrics_only(e) | {"iteration": e["iteration"]}
                                                                for e in res["evals"]],
                "fd_ref_curve": [{"iteration": h["iteration"], "fd_ref": h["fd_ref"]} for h in res["history"]
                                 if h.get("fd_ref") is not None]}
    return run


stage_distribution = finetune_stage("distribution", "cfg")
stage_sample = finetune_stage("sample", "sample_cfg")


# The stages' keys (demo.stages.run_stages): what each result depends on.

def evaluation_key(ctx: DemoContext) -> dict:
    """What an evaluation of a model with the demo's sampler depends on (besides the model)."""
    cfg = ctx.cfg
    return {"model": plain_config(cfg.model), "eval": plain_config(cfg.eval), "shift": float(cfg.rl.shift),
            "device": str(cfg.device), "classifier": str(ctx.sample_cfg.reward.get("features", "fmnist-reward")),
            "base": ctx.base_sha256(), "evaluator": ctx.evaluator_key}


def base_key(ctx: DemoContext) -> dict:
    return evaluation_key(ctx)


def finetune_key(cfg_attr: str) -> Callable[[DemoContext], dict]:
    """A fine-tuning stage's key: its whole config, the base model, the evaluator, the base stage (its initial eval)."""
    def key(ctx: DemoContext) -> dict:
        return {**evaluation_key(ctx), "cfg": plain_config(getattr(ctx, cfg_attr)), "base_stage": ctx.digests.get("base")}
    return key


def crosscheck_key(ctx: DemoContext) -> dict:
    """The cross-check's key: the evaluation settings, its step count and the fine-tuned models it reads."""
    files = [ctx.run_dir / n / "model_ema.safetensors" for n in ("distribution", "sample") if n in ctx.results]
    return {**evaluation_key(ctx), "steps": crosscheck_steps(ctx), "models": hash_inputs(f for f in files if f.is_file())}


def crosscheck_steps(ctx: DemoContext) -> int | None:
    """demo.crosscheck_steps of the preset: another step count of the Euler ODE sampler at which every model is
    evaluated again (None, or the served sampler's own count: no cross-check)."""
    steps = (ctx.cfg.get("demo") or {}).get("crosscheck_steps")
    return int(steps) if steps and int(steps) != int(ctx.cfg.eval.steps) else None


def stage_crosscheck(ctx: DemoContext) -> dict:
    """The base and fine-tuned (EMA) models again, with the cross-check sampler: does what RL gained at the served
    sampler hold at another one?"""
    steps = crosscheck_steps(ctx)
    models = {}
    for name in ("base", "distribution", "sample"):
        path = ctx.run_dir / name / "model_ema.safetensors"
        if name != "base" and not (name in ctx.results and path.is_file()):
            continue
        net = ctx.base_net if name == "base" else load_generator(path).eval()
        models[name], _ = evaluate_model(ctx, net, steps, desc=f"{name} @ {steps} steps")
    return {"steps": int(steps), "models": models}


def change_summary(name: str, r: dict, base: dict) -> str:
    """A report line: how a model's FD (both networks) and recall changed from the base model's."""
    return (f"- {name}: FD (reward features) {relative_change(r['fd_reward'], base['fd_reward']):+.1%}, "
            f"FD (held-out) {relative_change(r['fd_eval'], base['fd_eval']):+.1%}, "
            f"recall {r['recall'] - base['recall']:+.3f}")


def crosscheck_section(result: dict, ctx: DemoContext) -> str:
    steps, rows = result["steps"], result["models"]
    lines = [f"## Cross-check: the same models with the {steps}-step Euler sampler", "",
             f"RL trained and the table above evaluated the served {ctx.cfg.eval.steps}-step sampler; here every "
             f"model is sampled again with {steps} steps (same seeds, same n).", "", metrics_table(rows), ""]
    base = rows.get("base")
    for name, r in rows.items():
        if name != "base" and base:
            lines.append(change_summary(name, r, base))
    return "\n".join(lines)
