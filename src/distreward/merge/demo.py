"""The merging stages of the demo (`make demo`): `merge_ema` and `merge_rl`, registered on demo.py's stage hook.

- merge_ema: the base model's power-EMA snapshots; RL-merged vs the best post-hoc EMA length of the grid.
- merge_rl: the GRPO run's checkpoints plus the base; RL-merged vs the last GRPO checkpoint (its EMA weights),
  both sampled with the inference ODE sampler.
Each stage's result (a row of the report's table: the merged model's metrics) carries `baseline`,
`baseline_fd_eval` and `merged_fd_eval`, so metrics.json holds both figures. Sizes are the demo presets' (small).
"""

from __future__ import annotations

from pathlib import Path

METRIC_KEYS = ("fd_reward", "fd_eval", "precision", "recall", "kid", "n")


def _cfg(preset: str, ctx, overrides=()):
    from ..config import load_config
    from .trainer import _with_defaults

    cfg = _with_defaults(load_config(preset, list(overrides)))
    cfg.device = ctx.cfg.device
    cfg.eval.n, cfg.eval.seed = int(ctx.cfg.eval.n), int(ctx.cfg.eval.seed)
    ev = ctx.cfg.eval     # the demo's evaluation sampler, so the merge rows compare with the table's other rows
    cfg.sampler.steps, cfg.sampler.method, cfg.sampler.shift = int(ev.steps), str(ev.method), float(ctx.cfg.rl.shift)
    demo = cfg.get("demo")
    if demo:   # the preset's demo-size settings (any section: rl, eval, baselines) win over the above
        from omegaconf import OmegaConf

        cfg = OmegaConf.merge(cfg, demo)
    return cfg


def _summary(res: dict, baseline: str) -> dict:
    merged, base = res["merged"], res["baselines"][baseline]
    return {**{k: merged[k] for k in METRIC_KEYS if k in merged}, "baseline": baseline,
            "baseline_fd_eval": base["fd_eval"], "merged_fd_eval": merged["fd_eval"],
            "baseline_fd_reward": base.get("fd_reward"), "weights": merged["w"], "checkpoints": res["checkpoints"],
            "all_baselines": {k: {m: v[m] for m in ("fd_eval", "fd_reward") if m in v} for k, v in res["baselines"].items()}}


def snapshot_folder(ctx) -> Path | None:
    from ..config import load_config
    from .trainer import _find

    folder = _find(load_config("fmnist_merge_ema").merge.snapshots)
    return folder if folder.is_dir() else None


def stage_merge_ema(ctx) -> dict:
    from .trainer import run_merge

    cfg = _cfg("fmnist_merge_ema", ctx)
    res = run_merge(cfg, ctx.stage_dir("merge_ema"), resume=not ctx.fresh, evaluator=ctx.evaluator, progress=ctx.progress)
    return _summary(res, res["best_ema"] or "last")


def grpo_inputs(ctx) -> list[Path]:
    """The GRPO stage's weight files in training order: its periodic .safetensors checkpoints, then the final raw
    and EMA weights (the EMA, what GRPO reports, is last: the `last` baseline)."""
    d = ctx.run_dir / "distribution"
    files = sorted((d / "checkpoints").glob("*.safetensors")) if (d / "checkpoints").is_dir() else []
    files += [p for p in (d / "model.safetensors", d / "model_ema.safetensors") if p.is_file()]
    return files


def stage_merge_rl(ctx) -> dict:
    from .trainer import run_merge, _find

    cfg = _cfg("fmnist_merge_grpo", ctx)
    cfg.merge.checkpoints = [str(_find(ctx.cfg.model.path))] + [str(p) for p in grpo_inputs(ctx)]
    res = run_merge(cfg, ctx.stage_dir("merge_rl"), resume=not ctx.fresh, evaluator=ctx.evaluator, progress=ctx.progress)
    return _summary(res, "last")


def section(title: str, what: str):
    def render(result: dict, ctx) -> str:
        b, m = result["baseline_fd_eval"], result["merged_fd_eval"]
        verdict = "beats" if m < b else "does not beat"
        lines = [f"## {title}", "", what, "",
                 "| model | fd_eval (held out) | fd_reward |", "|---|---|---|"]
        for name, v in result["all_baselines"].items():
            lines.append(f"| {name} | {v.get('fd_eval', float('nan')):.4g} | {v.get('fd_reward', float('nan')):.4g} |")
        lines.append(f"| **RL-merged** | **{m:.4g}** | {result.get('fd_reward', float('nan')):.4g} |")
        lines += ["", f"RL merging {verdict} the baseline `{result['baseline']}` on held-out FD "
                      f"({m:.4g} vs {b:.4g}, {100 * (m - b) / b:+.1f}%). "
                      f"Coefficients: {', '.join(f'{w:.3f}' for w in result['weights'])}."]
        return "\n".join(lines)
    return render


def demo_stages() -> list:
    """The Stage objects of the merging part of the demo (demo.py registers them on its hook)."""
    from ..demo import Stage

    return [
        Stage("merge_ema", stage_merge_ema, enabled=lambda ctx: snapshot_folder(ctx) is not None,
              section=section("RL merging of the base model's EMA snapshots (merge_ema)",
                              "RL over the coefficients of the power-EMA snapshots vs the best post-hoc EMA length "
                              "(grid, selected on the same held-out FD: a strong baseline). Same ODE sampler and seeds.")),
        Stage("merge_rl", stage_merge_rl,
              section=section("RL merging of the GRPO checkpoints plus the base (merge_rl)",
                              "RL over the coefficients of base + GRPO weights vs the last GRPO checkpoint (its EMA), "
                              "all sampled with the deterministic inference ODE sampler and the same seeds.")),
    ]


def register(demo_module=None) -> None:
    """Add both stages to the demo (idempotent)."""
    from .. import demo

    for s in demo_stages():
        (demo_module or demo).register_stage(s)
