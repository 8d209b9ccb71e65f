"""The demo's report: <run_dir>/report.md and metrics.json, rebuilt from the stages' results on every run."""

from __future__ import annotations

from pathlib import Path

from ..report import metrics_table, plot_fd_curves, relative_change
from ..utils.io import atomic_save_json, atomic_write_bytes
from .grpo import change_summary
from .stages import DemoContext, Stage

CURVE_KEYS = ("curve", "fd_ref_curve")   # in stage.json and the plot, not in metrics.json


def write_metrics(ctx: DemoContext, stages: list[Stage]) -> tuple[dict, dict]:
    """metrics.json: every finished stage's result (table rows without their curves); returns (rows, others)."""
    rows = {s.name: ctx.results[s.name] for s in stages if s.row and s.name in ctx.results}
    others = {s.name: ctx.results[s.name] for s in stages if not s.row and s.name in ctx.results}
    atomic_save_json(ctx.run_dir / "metrics.json", {**{k: {kk: vv for kk, vv in v.items() if kk not in CURVE_KEYS}
                                                       for k, v in rows.items()}, **others})
    return rows, others


def introduction(ctx: DemoContext, rows: dict) -> list[str]:
    """The report's title, what was evaluated and how, the GRPO settings, and the table of rows."""
    cfg = ctx.cfg
    rl = cfg.rl
    return ["# distreward demo: GRPO with a distribution-wise reward on Fashion-MNIST", "",
            f"Base model `{cfg.model.path}`; every model evaluated with the inference ODE sampler "
            f"({cfg.eval.method}, {cfg.eval.steps} steps) on {cfg.eval.n} class-balanced samples from fixed seeds, "
            "the EMA weights for the fine-tuned runs. FD on the reward's feature network (`fmnist-reward`) and on a "
            "held-out one (`fmnist-eval`, never seen by the reward).", "",
            f"GRPO: {rl.iterations} iterations of {rl.labels_per_iter} labels x {rl.group_size} samples, "
            f"T = {rl.steps} SDE steps, a = {rl.noise_level}, beta = {rl.beta}, lr = {rl.lr}; "
            f"reward `{cfg.reward.name}`" + (f" vs the sample-wise `{ctx.sample_cfg.reward.name}` baseline on the same "
                                              "budget." if "sample" in rows else "."), "",
            metrics_table(rows), ""]


def grpo_summaries(rows: dict, base: dict) -> list[str]:
    """One line per GRPO run: FD and recall changes, reward means, the classifier log-prob."""
    lines = []
    for name in ("distribution", "sample"):
        if name in rows:
            r = rows[name]
            logp = (f", classifier log p on the evaluation samples {base['classifier_logp']:.4f} -> "
                    f"{r['classifier_logp']:.4f}" if r.get("classifier_logp") is not None
                    and base.get("classifier_logp") is not None else "")
            lines.append(change_summary(name, r, base)
                         + f", reward mean {r['reward_mean_first']:.4g} -> {r['reward_mean']:.4g} (first -> last iteration)"
                         + logp)
    return lines + [""]


def write_report(ctx: DemoContext, stages: list[Stage], elapsed: float) -> Path:
    """<run_dir>/report.md and metrics.json from the finished stages' results."""
    rows, _ = write_metrics(ctx, stages)
    base = rows.get("base")
    curves = {k: v["curve"] for k, v in rows.items() if "curve" in v}
    ref_curves = {k: v["fd_ref_curve"] for k, v in rows.items() if v.get("fd_ref_curve")}
    if curves:
        plot_fd_curves(curves, ctx.run_dir / "fd_curve.png", base=base, reference=ref_curves)
    lines = introduction(ctx, rows)
    if base:
        lines += grpo_summaries(rows, base)
    if curves:
        lines += ["## FD over iterations", "", "![FD over GRPO iterations](fd_curve.png)", ""]
    lines += ["## Samples", "", "Same noise seeds and labels (one class per column) in every grid.", ""]
    for s in stages:
        png = ctx.run_dir / f"samples_{s.name}.png"
        if png.is_file():
            lines += [f"**{s.name}**", "", f"![{s.name}](samples_{s.name}.png)", ""]
    for s in stages:   # the stages' own sections (cross-check, merging, registered stages)
        if s.section is not None and s.name in ctx.results:
            lines += [s.section(ctx.results[s.name], ctx), ""]
    lines += [f"Total time of this invocation: {elapsed / 60:.1f} min (finished stages are reused on re-runs).", ""]
    return atomic_write_bytes(ctx.run_dir / "report.md", "\n".join(lines).encode())
