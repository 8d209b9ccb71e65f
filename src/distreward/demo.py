"""The main job (`make demo`): base model -> distribution-wise GRPO (-> sample-wise baseline) -> report.

`run_demo` runs a list of stages. Each stage writes its result to <run_dir>/<stage>/stage.json when it finishes,
so re-running the demo skips finished stages (and a killed GRPO stage resumes from its checkpoint).
The report (report.md, metrics.json) is rebuilt from the stage results every time.

Hook for later stages (e.g. issue 6, RL over merging coefficients): `register_stage(Stage("merge_ema", fn))`
adds a stage that runs after the built-in ones; its result dict becomes a row of the table and a key of
metrics.json, and an optional `section(result, ctx) -> markdown` adds its own part of the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DISTRIBUTION_PRESET = "fmnist_grpo"
SAMPLE_PRESET = "fmnist_grpo_sample"
METRIC_KEYS = ("fd_reward", "fd_eval", "precision", "recall", "kid", "n")


@dataclass
class Stage:
    """A named step of the demo: fn(ctx) -> result dict (JSON-able). `row`: the result is a table row."""
    name: str
    fn: Callable[["DemoContext"], dict]
    enabled: Callable[["DemoContext"], bool] = lambda ctx: True
    section: Callable[[dict, "DemoContext"], str] | None = None
    row: bool = True


@dataclass
class DemoContext:
    """What stages share: the run directory, configs, the evaluator, the base model and earlier results."""
    run_dir: Path
    cfg: Any                      # resolved config of the distribution-wise run (model, eval settings)
    sample_cfg: Any               # resolved config of the sample-wise baseline
    compare: bool
    progress: bool
    fresh: bool = False
    results: dict = field(default_factory=dict)
    _evaluator: Any = None
    _base: Any = None

    @property
    def evaluator(self):
        if self._evaluator is None:
            from .evaluation import Evaluator

            self._evaluator = Evaluator.for_fmnist(device=self.cfg.device)
        return self._evaluator

    @property
    def base_net(self):
        if self._base is None:
            from .rl.grpo import load_base

            self._base = load_base(self.cfg)
        return self._base

    def stage_dir(self, name: str) -> Path:
        p = self.run_dir / name
        p.mkdir(parents=True, exist_ok=True)
        return p


# ---------------------------------------------------------------------------------------------------------
# Built-in stages

def _metrics_only(m: dict) -> dict:
    return {k: m[k] for k in METRIC_KEYS if k in m}


def classifier_logp(ctx: DemoContext, images) -> float | None:
    """The sample-wise baseline's reward on the evaluation samples: mean log p(intended class | image) under its
    classifier. Fixed samples (the evaluation's seeds), so base and fine-tuned models compare without the rollouts'
    noise; None when the reward network has no classifier head."""
    from .reward.rewards import ClassifierLogProbReward
    from .rl.grpo import _evaluator_net, balanced_labels

    net, _, _ = _evaluator_net(ctx.evaluator, str(ctx.sample_cfg.reward.get("features", "fmnist-reward")))
    if net is None or not callable(getattr(net, "logits", None)):
        return None
    labels = balanced_labels(images.shape[0], int(ctx.cfg.model.num_classes))
    return float(ClassifierLogProbReward(net)(images, labels).double().mean())


def evaluate_model(ctx: DemoContext, net, cfg=None, desc: str = "evaluate") -> tuple[dict, Any]:
    """Metrics of cfg.eval.n ODE samples of `net` (the evaluation's seeds) plus the classifier log-prob; and the images."""
    from .rl.grpo import evaluate_generator

    metrics, images = evaluate_generator(net, ctx.evaluator, cfg or ctx.cfg, progress=ctx.progress, desc=desc)
    return {**_metrics_only(metrics), "classifier_logp": classifier_logp(ctx, images)}, images


def stage_base(ctx: DemoContext) -> dict:
    """Evaluate the base model with the inference ODE sampler; sample grid 'before'."""
    from .report import save_image_grid

    metrics, images = evaluate_model(ctx, ctx.base_net, desc="evaluate base")
    save_image_grid(images[: int(ctx.cfg.eval.grid)], ctx.run_dir / "samples_base.png")
    return {**metrics, "iteration": 0}


def _grpo_stage(name: str, cfg_attr: str) -> Callable[[DemoContext], dict]:
    def run(ctx: DemoContext) -> dict:
        import copy

        from .report import save_image_grid
        from .rl.grpo import finetune, ode_images

        cfg = getattr(ctx, cfg_attr)
        base_eval = ctx.results.get("base")
        res = finetune(cfg, ctx.stage_dir(name), resume=not ctx.fresh, net=copy.deepcopy(ctx.base_net),
                       evaluator=ctx.evaluator, progress=ctx.progress, initial_eval=base_eval)
        images = res["final_images"]
        if images is None or images.shape[0] != int(cfg.eval.n):     # a resumed, finished run: draw them again
            images, _ = ode_images(res["ema"], int(cfg.eval.n), num_classes=int(cfg.model.num_classes),
                                   image_shape=tuple(cfg.model.image_shape), steps=int(cfg.eval.steps),
                                   method=cfg.eval.method, shift=float(cfg.rl.shift), seed=int(cfg.eval.seed),
                                   batch_size=int(cfg.eval.batch_size), device=cfg.device)
        save_image_grid(images[: int(cfg.eval.grid)], ctx.run_dir / f"samples_{name}.png")
        return {**_metrics_only(res["final"]), "classifier_logp": classifier_logp(ctx, images), "reward": cfg.reward.name,
                "reward_mean": res["reward_mean"], "reward_mean_first": res["reward_mean_first"],
                "iterations": int(cfg.rl.iterations), "curve": [_metrics_only(e) | {"iteration": e["iteration"]}
                                                                for e in res["evals"]],
                "fd_ref_curve": [{"iteration": h["iteration"], "fd_ref": h["fd_ref"]} for h in res["history"]
                                 if h.get("fd_ref") is not None]}
    return run


def crosscheck_steps(ctx: DemoContext) -> int | None:
    """demo.crosscheck_steps of the preset: another step count of the Euler ODE sampler at which every model is
    evaluated again (None, or the served sampler's own count: no cross-check)."""
    steps = (ctx.cfg.get("demo") or {}).get("crosscheck_steps")
    return int(steps) if steps and int(steps) != int(ctx.cfg.eval.steps) else None


def stage_crosscheck(ctx: DemoContext) -> dict:
    """The base and fine-tuned (EMA) models again, with the cross-check sampler: does what RL gained at the served
    sampler hold at another one?"""
    import copy

    from .models import load_generator

    cfg = copy.deepcopy(ctx.cfg)
    cfg.eval.steps = crosscheck_steps(ctx)
    models = {}
    for name in ("base", "distribution", "sample"):
        path = ctx.run_dir / name / "model_ema.safetensors"
        if name != "base" and not (name in ctx.results and path.is_file()):
            continue
        net = ctx.base_net if name == "base" else load_generator(path).eval()
        models[name], _ = evaluate_model(ctx, net, cfg, desc=f"{name} @ {cfg.eval.steps} steps")
    return {"steps": int(cfg.eval.steps), "models": models}


def crosscheck_section(result: dict, ctx: DemoContext) -> str:
    from .report import metrics_table, relative_change

    steps, rows = result["steps"], result["models"]
    lines = [f"## Cross-check: the same models with the {steps}-step Euler sampler", "",
             f"RL trained and the table above evaluated the served {ctx.cfg.eval.steps}-step sampler; here every "
             f"model is sampled again with {steps} steps (same seeds, same n).", "", metrics_table(rows), ""]
    base = rows.get("base")
    for name, r in rows.items():
        if name != "base" and base:
            lines.append(f"- {name}: FD (reward features) {relative_change(r['fd_reward'], base['fd_reward']):+.1%}, "
                         f"FD (held-out) {relative_change(r['fd_eval'], base['fd_eval']):+.1%}, "
                         f"recall {r['recall'] - base['recall']:+.3f}")
    return "\n".join(lines)


BUILTIN_STAGES = [
    Stage("base", stage_base),
    Stage("distribution", _grpo_stage("distribution", "cfg")),
    Stage("sample", _grpo_stage("sample", "sample_cfg"), enabled=lambda ctx: ctx.compare),
    Stage("crosscheck", stage_crosscheck, enabled=lambda ctx: crosscheck_steps(ctx) is not None,
          section=crosscheck_section, row=False),
]
EXTRA_STAGES: list[Stage] = []   # filled by register_stage (merge: "merge_ema", "merge_rl")


def register_stage(stage: Stage) -> None:
    """Add a stage after the built-in ones (replacing one of the same name)."""
    EXTRA_STAGES[:] = [s for s in EXTRA_STAGES if s.name != stage.name] + [stage]


# ---------------------------------------------------------------------------------------------------------
# Report

def write_report(ctx: DemoContext, stages: list[Stage], elapsed: float) -> Path:
    """runs/demo/report.md and metrics.json from the finished stages' results."""
    from .report import metrics_table, plot_fd_curves, relative_change
    from .utils.io import atomic_save_json, atomic_write_bytes

    rows = {s.name: ctx.results[s.name] for s in stages if s.row and s.name in ctx.results}
    others = {s.name: ctx.results[s.name] for s in stages if not s.row and s.name in ctx.results}
    atomic_save_json(ctx.run_dir / "metrics.json", {**{k: {kk: vv for kk, vv in v.items() if kk not in ("curve", "fd_ref_curve")}
                                                       for k, v in rows.items()}, **others})
    base = rows.get("base")
    curves = {k: v["curve"] for k, v in rows.items() if "curve" in v}
    ref_curves = {k: v["fd_ref_curve"] for k, v in rows.items() if v.get("fd_ref_curve")}
    if curves:
        plot_fd_curves(curves, ctx.run_dir / "fd_curve.png", base=base, reference=ref_curves)
    cfg = ctx.cfg
    rl = cfg.rl
    lines = ["# distreward demo: GRPO with a distribution-wise reward on Fashion-MNIST", "",
             f"Base model `{cfg.model.path}`; every model evaluated with the inference ODE sampler "
             f"({cfg.eval.method}, {cfg.eval.steps} steps) on {cfg.eval.n} class-balanced samples from fixed seeds, "
             "the EMA weights for the fine-tuned runs. FD on the reward's feature network (`fmnist-reward`) and on a "
             "held-out one (`fmnist-eval`, never seen by the reward).", "",
             f"GRPO: {rl.iterations} iterations of {rl.labels_per_iter} labels x {rl.group_size} samples, "
             f"T = {rl.steps} SDE steps, a = {rl.noise_level}, beta = {rl.beta}, lr = {rl.lr}; "
             f"reward `{cfg.reward.name}`" + (f" vs the sample-wise `{ctx.sample_cfg.reward.name}` baseline on the same "
                                               "budget." if "sample" in rows else "."), "",
             metrics_table(rows), ""]
    if base:
        for name in ("distribution", "sample"):
            if name in rows:
                r = rows[name]
                lines.append(f"- {name}: FD (reward features) {relative_change(r['fd_reward'], base['fd_reward']):+.1%}, "
                             f"FD (held-out) {relative_change(r['fd_eval'], base['fd_eval']):+.1%}, "
                             f"recall {r['recall'] - base['recall']:+.3f}, "
                             f"reward mean {r['reward_mean_first']:.4g} -> {r['reward_mean']:.4g} (first -> last iteration)"
                             + (f", classifier log p on the evaluation samples {base['classifier_logp']:.4f} -> "
                                f"{r['classifier_logp']:.4f}" if r.get("classifier_logp") is not None
                                and base.get("classifier_logp") is not None else ""))
        lines.append("")
    if curves:
        lines += ["## FD over iterations", "", "![FD over GRPO iterations](fd_curve.png)", ""]
    lines += ["## Samples", "", "Same noise seeds and labels (one class per column) in every grid.", ""]
    for s in stages:
        png = ctx.run_dir / f"samples_{s.name}.png"
        if png.is_file():
            lines += [f"**{s.name}**", "", f"![{s.name}](samples_{s.name}.png)", ""]
    for s in stages:   # extra sections (hook): e.g. the merging stages of issue 6
        if s.section is not None and s.name in ctx.results:
            lines += [s.section(ctx.results[s.name], ctx), ""]
    lines += [f"Total time of this invocation: {elapsed / 60:.1f} min (finished stages are reused on re-runs).", ""]
    return atomic_write_bytes(ctx.run_dir / "report.md", "\n".join(lines).encode())


# ---------------------------------------------------------------------------------------------------------

def make_context(run_dir, *, compare: bool = False, overrides=(), sample_overrides=(), progress: bool = True,
                 evaluator=None) -> DemoContext:
    from .config import load_config
    from .rl.grpo import _as_cfg

    cfg = _as_cfg(load_config(DISTRIBUTION_PRESET, overrides))
    sample_cfg = _as_cfg(load_config(SAMPLE_PRESET, list(overrides) + list(sample_overrides)))
    return DemoContext(run_dir=Path(run_dir), cfg=cfg, sample_cfg=sample_cfg, compare=compare, progress=progress,
                       _evaluator=evaluator)


def run_demo(run_dir="runs/demo", *, compare: bool = False, threads: int | None = None, overrides=(),
             fresh: bool = False, progress: bool = True, evaluator=None) -> dict:
    """Run (or finish) the demo; returns metrics.json's content. `overrides`: key=value for both GRPO presets."""
    from .utils.io import atomic_save_json
    from .utils.threads import set_threads

    if threads is not None:
        set_threads(threads)
    t0 = time.perf_counter()
    ctx = make_context(run_dir, compare=compare, overrides=overrides, progress=progress, evaluator=evaluator)
    ctx.fresh = fresh
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    from .merge.demo import register as register_merge_stages   # issue 6: the merge_ema / merge_rl stages

    register_merge_stages()
    stages = [s for s in BUILTIN_STAGES + EXTRA_STAGES if s.enabled(ctx)]
    for s in stages:
        done = ctx.run_dir / s.name / "stage.json"
        if done.is_file() and not fresh:
            ctx.results[s.name] = json.loads(done.read_text())
            print(f"[demo] {s.name}: done before, reusing {done}")
            continue
        print(f"[demo] stage {s.name} ...")
        ts = time.perf_counter()
        result = s.fn(ctx)
        result["seconds"] = round(time.perf_counter() - ts, 1)
        ctx.results[s.name] = result
        atomic_save_json(ctx.stage_dir(s.name) / "stage.json", result)
    write_report(ctx, stages, time.perf_counter() - t0)
    print(f"[demo] report: {ctx.run_dir / 'report.md'}")
    return json.loads((ctx.run_dir / "metrics.json").read_text())
