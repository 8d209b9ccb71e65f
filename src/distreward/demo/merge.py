"""The merging stages of the demo: `merge_ema` and `merge_rl` (RL over merging coefficients, docs/merge.md).

- merge_ema: the base model's power-EMA snapshots; RL-merged vs the best post-hoc EMA length of the grid, with
  per-block coefficients searched at the converged Heun solver from the best baseline (EMA_SEARCH): the setting
  measured to beat the best post-hoc EMA, the last snapshot and the uniform soup (docs/merge.md).
- merge_rl: the fine-tuning run's checkpoints plus the base; RL-merged vs its last checkpoint (its EMA weights),
  both sampled with the inference ODE sampler.
Each stage's result (a row of the report's table: the merged model's metrics) carries `baseline`,
`baseline_fd_eval` and `merged_fd_eval`, so metrics.json holds both figures. Sizes are the presets' `demo`
sections (small).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from ..config import find_file, load_config
from ..evaluation.protocol import relative_gain
from ..merge import resolve, run_merge
from ..merge.inputs import distinct_inputs
from ..runreport import coefficient_lines
from ..utils.configdiff import plain_config
from ..utils.hashing import hash_inputs
from .report import verdict
from .stages import DemoContext, metrics_only

EMA_PRESET = "fmnist_merge_ema"
GRPO_PRESET = "fmnist_merge_grpo"
# merge_ema's search, over the preset's demo section: one coefficient row per block group, started from the best
# baseline, searched and selected at the converged solver (evidence.converged_steps Heun steps). The demo's budget
# (4 x 4 x 100 images) with a smaller reference set, validation evaluation and EMA grid than the study's
# (1,000 / 500 / three lengths), so that the stage costs about what the served-sampler search did in NFE x images.
# The EMA grid holds the shipped base's own length (0.03), so the search starts from the base when it is the best.
EMA_SEARCH = {"merge": {"space": "blocks", "init": "best"}, "sampler": {"method": "heun"},
              "reward": {"reference_size": 500}, "eval": {"n": 250}, "baselines": {"ema_grid": [0.03, 0.1]}}
CONVERGED_STEPS = 16     # the converged Heun solver when the fine-tuning preset leaves evidence.converged_steps to a search


def merge_config(preset: str, ctx: DemoContext, overrides=()):
    """A merge preset at the demo's evaluation settings (device, eval.n, eval.seed, the served ODE sampler), then
    the preset's own `demo` section (any section: rl, eval, baselines) over them."""
    cfg = resolve(load_config(preset, list(overrides)))
    cfg.device = ctx.cfg.device
    cfg.eval.n, cfg.eval.seed = int(ctx.cfg.eval.n), int(ctx.cfg.eval.seed)
    ev = ctx.cfg.eval     # the demo's evaluation sampler, so the merge rows compare with the table's other rows
    cfg.sampler.steps, cfg.sampler.method, cfg.sampler.shift = int(ev.steps), str(ev.method), float(ctx.cfg.rl.shift)
    demo = cfg.get("demo")
    if demo:
        cfg = OmegaConf.merge(cfg, demo)
    return cfg


def converged_steps(ctx: DemoContext) -> int:
    """Heun steps of the demo's converged solver (the fine-tuning preset's evidence.converged_steps)."""
    return int((ctx.cfg.get("evidence") or {}).get("converged_steps") or CONVERGED_STEPS)


def merge_ema_config(ctx: DemoContext):
    """The merge_ema stage's config: the EMA preset at the demo's settings, then EMA_SEARCH at the converged solver."""
    search = OmegaConf.merge(OmegaConf.create(EMA_SEARCH), {"sampler": {"steps": converged_steps(ctx)}})
    return resolve(OmegaConf.merge(merge_config(EMA_PRESET, ctx), search))


def check_merge_configs(ctx: DemoContext) -> None:
    """The merge stages' configs (presets, demo blocks, the demo's evaluation settings), checked in full before any
    stage runs (`merge.resolve`: the merge schema)."""
    merge_ema_config(ctx)
    resolve(merge_config(GRPO_PRESET, ctx))


def summary(res: dict, baseline: str) -> dict:
    """A stage result from run_merge's: the merged model's metrics, the baseline's and every baseline's FD."""
    merged, base = res["merged"], res["baselines"][baseline]
    return {**metrics_only(merged), "baseline": baseline,
            "baseline_fd_eval": base["fd_eval"], "merged_fd_eval": merged["fd_eval"],
            "baseline_fd_reward": base.get("fd_reward"), "weights": merged["w"], "checkpoints": res["checkpoints"],
            "all_baselines": {k: {m: v[m] for m in ("fd_eval", "fd_reward") if m in v} for k, v in res["baselines"].items()}}


def snapshot_folder(ctx: DemoContext) -> Path | None:
    """The merge_ema preset's snapshot folder (the base model's power-EMA snapshots), None when it is missing."""
    folder = find_file(load_config(EMA_PRESET).merge.snapshots)
    return folder if folder.is_dir() else None


def has_snapshots(ctx: DemoContext) -> bool:
    return snapshot_folder(ctx) is not None


def reward_real_stats(ctx: DemoContext, cfg) -> tuple | None:
    """(mu, Sigma) of the merge reward's network on Fashion-MNIST train, taken from the demo's Fashion-MNIST evaluator
    (the statistics the merge would compute itself, over the same 60,000 images); None for any other evaluator or a
    reward with its own statistics file."""
    ev = ctx.evaluator
    if getattr(ev, "split", None) != "train" or cfg.reward.get("real_stats"):
        return None
    _, st, _ = ev.network(str(cfg.reward.features))
    return None if st is None else (st.mu, st.sigma)


def stage_merge_ema(ctx: DemoContext) -> dict:
    cfg = merge_ema_config(ctx)
    res = run_merge(cfg, ctx.stage_dir("merge_ema"), **ctx.trainer_args(), evaluator=ctx.evaluator,
                    progress=ctx.progress, eval_cache=ctx.eval_cache, real_stats=reward_real_stats(ctx, cfg))
    return summary(res, res["best_ema"] or "last")


def merge_key(cfg, inputs: list[Path], ctx: DemoContext) -> dict:
    """A merging stage's key: its resolved config, the content of its input files and the evaluator."""
    return {"cfg": plain_config(cfg), "inputs": hash_inputs(inputs), "evaluator": ctx.evaluator_key}


def merge_ema_key(ctx: DemoContext) -> dict:
    return merge_key(merge_ema_config(ctx), [snapshot_folder(ctx)], ctx)


def merge_rl_key(ctx: DemoContext) -> dict:
    cfg = merge_rl_config(ctx)
    return merge_key(cfg, [Path(p) for p in cfg.merge.checkpoints], ctx)


def finetune_inputs(ctx: DemoContext) -> list[Path]:
    """The distribution stage's weight files in training order: its periodic .safetensors checkpoints, then the final raw
    and EMA weights (the EMA, what the run reports, is last: the `last` baseline). The last periodic checkpoint is the
    final EMA itself (checkpoints/ema_<iterations>): files of the same weights are listed once, at their last
    place, so the uniform soup does not count the final EMA twice."""
    d = ctx.run_dir / "distribution"
    files = sorted((d / "checkpoints").glob("*.safetensors")) if (d / "checkpoints").is_dir() else []
    files += [p for p in (d / "model.safetensors", d / "model_ema.safetensors") if p.is_file()]
    return distinct_inputs(files, note=False)


def merge_rl_config(ctx: DemoContext):
    """The merge_rl stage's config: the fine-tuned-checkpoint merge preset over the base model and the distribution stage's files."""
    cfg = merge_config(GRPO_PRESET, ctx)
    cfg.merge.checkpoints = [str(find_file(ctx.cfg.model.path))] + [str(p) for p in finetune_inputs(ctx)]
    return cfg


def stage_merge_rl(ctx: DemoContext) -> dict:
    cfg = merge_rl_config(ctx)
    res = run_merge(cfg, ctx.stage_dir("merge_rl"), **ctx.trainer_args(), evaluator=ctx.evaluator,
                    progress=ctx.progress, eval_cache=ctx.eval_cache, real_stats=reward_real_stats(ctx, cfg))
    return summary(res, "last")


def search_text(cfg) -> str:
    """How a merging stage's config searches: the coefficient space, the starting point, the sampler, the images."""
    space = ("one row of coefficients per block group" if cfg.merge.get("space") == "blocks"
             else "one coefficient per input")
    images = int(cfg.rl.iterations) * int(cfg.rl.candidates) * int(cfg.rl.samples)
    return (f"Search: {space}, from `{cfg.merge.init}`, {images:,} generated images and a reference set of "
            f"{int(cfg.reward.reference_size):,}, all sampled with {cfg.sampler.method} {int(cfg.sampler.steps)} "
            f"steps, as are the baselines and the merged model below ({int(cfg.eval.n)} samples each).")


def evidence_gain(name: str, ctx: DemoContext) -> str:
    """What the evidence stage measured for the merged model against the base on the report seed (paired), at the
    served and the converged solver; empty before the evidence stage has run."""
    ev = ctx.results.get("evidence") or {}
    parts = []
    for sname in ("converged", "served"):
        rows = (ev.get(sname) or {}).get("models", {})
        if name in rows and "base" in rows:
            r, b = rows[name], rows["base"]
            parts.append(f"{ev[sname]['method']} {ev[sname]['steps']}: held-out {b['fd_eval']:.4f} -> "
                         f"{r['fd_eval']:.4f}, {verdict(relative_gain(r, b, 'fd_eval'))}; reward features "
                         f"{b['fd_reward']:.3f} -> {r['fd_reward']:.3f}, {verdict(relative_gain(r, b, 'fd_reward'))}")
    if not parts:
        return ""
    return (f"On the report seed {ev['report_seed']} (n = {ev['n']}, paired with the base on the same noise): "
            + "; ".join(parts) + ".")


def section(name: str, title: str, what: str,
            config: Callable[[DemoContext], object]) -> Callable[[dict, DemoContext], str]:
    """A merging stage's report section: how it searched, every baseline's FD, the merged model's, the verdict, the
    coefficients, and the evidence stage's figures for it."""
    def render(result: dict, ctx: DemoContext) -> str:
        b, m = result["baseline_fd_eval"], result["merged_fd_eval"]
        word = "beats" if m < b else "does not beat"
        lines = [f"## {title}", "", what + " " + search_text(config(ctx)), "",
                 "| model (validation seed) | fd_eval (held out) | fd_reward |", "|---|---|---|"]
        for bname, v in result["all_baselines"].items():
            lines.append(f"| {bname} | {v.get('fd_eval', float('nan')):.4g} | {v.get('fd_reward', float('nan')):.4g} |")
        lines.append(f"| **RL-merged** | **{m:.4g}** | {result.get('fd_reward', float('nan')):.4g} |")
        lines += ["", f"RL merging {word} the baseline `{result['baseline']}` on held-out FD "
                      f"({m:.4g} vs {b:.4g}, {100 * (m - b) / b:+.1f}%). "
                      f"Coefficients: {'; '.join(coefficient_lines(result['weights']))}."]
        gain = evidence_gain(name, ctx)
        return "\n".join(lines + (["", gain] if gain else []))
    return render


merge_ema_section = section("merge_ema", "RL merging of the base model's EMA snapshots (merge_ema)",
                            "RL over the coefficients of the power-EMA snapshots vs the best post-hoc EMA length "
                            "(grid, chosen by FD on the reward's features), on the validation seed (the evidence "
                            "section reports the merged model on the report seed).", merge_ema_config)
merge_rl_section = section("merge_rl", "RL merging of the fine-tuning checkpoints plus the base (merge_rl)",
                           "RL over the coefficients of base + fine-tuned weights vs the last checkpoint (its EMA), "
                           "all sampled with the deterministic inference ODE sampler on the validation seed (the "
                           "evidence section reports the merged model on the report seed).", merge_rl_config)
