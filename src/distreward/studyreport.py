"""study.md and study.png of a `distreward study` from its result (study.json's content, built by
distreward.study): the tables per solver with each model's paired change vs the base, the separations from the
controls, the Target section, and the held-out FD picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .report import change_with_error, mean_std, save_figure, with_error
from .utils.io import atomic_write_bytes

ANSWERS = {True: "yes", False: "no", None: "not measured"}


def target_lines(target: dict, solver: dict) -> list[str]:
    """The Target section: one line per criterion with yes / no / not measured and its numbers."""
    lines = [f"## Target: {target['arm']} at the {target['solver']} solver ({solver['method']} {solver['steps']} "
             f"steps), no guidance: {ANSWERS[target['met']]}", ""]
    lines += [f"- {c['criterion']}: **{ANSWERS[c['met']]}** ({c['detail']})" for c in target["criteria"]]
    if target.get("beyond"):
        b = target["beyond"]
        lines += ["", f"Beyond the target: {b['criterion']}: **{ANSWERS[b['met']]}** ({b['detail']})"]
    return lines + [""]


def single_row(name: str, r: dict) -> str:
    """A table row of one model (the base, the guided base): its figures with their errors, not over seeds."""
    return (f"| {name} | {with_error(r.get('fd_eval'), r.get('fd_eval_err'), '{:.4f}')} | "
            f"{with_error(r.get('fd_reward'), r.get('fd_reward_err'))} | {r.get('recall', float('nan')):.3f} | "
            f"{r.get('coverage') or float('nan'):.3f} | {r.get('fd_eval_class_worst', float('nan')):.4f} |")


def write_study_report(root: Path, result: dict) -> Path:
    """study.md (tables, the Target section) and study.png (held-out FD per arm and seed, at both solvers)."""
    arms, seeds = result["arms"], result["seeds"]
    lines = [f"# Study of `{result['config']}`: {', '.join(arms)} over seeds {', '.join(map(str, seeds))}", "",
             f"Report seed {result['report_seed']}, n = {result['n']} (every model on the same noise and labels); "
             f"converged solver: {result['solvers']['converged']['method']} {result['solvers']['converged']['steps']} "
             f"steps (validation seed {result['validation_seed']}). Mean ± std over seeds; per-seed FD ± one "
             f"bootstrap standard error below, with the change of held-out FD vs the base on the same noise and "
             f"labels ± its paired standard error. Wall time {result['seconds'] / 60:.1f} min.", ""]
    if result.get("target"):
        lines += target_lines(result["target"], result["solvers"][result["target"]["solver"]])
    for sname in ("served", "converged"):
        s = result["solvers"][sname]
        lines += [f"## {sname}: {s['method']} {s['steps']} steps ({s['nfe']} NFE)", "",
                  "| arm | FD held-out | FD reward features | recall | coverage | worst-class FD (held-out) |",
                  "|---|---|---|---|---|---|",
                  *[single_row(name, result["rows"][sname][name]) for name in ("base", "guided")
                    if name in result["rows"][sname]]]
        for arm, a in result["summary"][sname].items():
            lines.append(f"| {arm} | {mean_std(a.get('fd_eval'))} | {mean_std(a.get('fd_reward'), '{:.3f}')} | "
                         f"{mean_std(a.get('recall'), '{:.3f}')} | {mean_std(a.get('coverage'), '{:.3f}')} | "
                         f"{mean_std(a.get('fd_eval_class_worst'))} |")
        for control, sep in result.get("separation", {}).get(sname, {}).items():
            lines += ["", f"Every {result['algorithm']} seed below every {control} seed (held-out FD): "
                          f"{ANSWERS[sep]}."]
        lines += ["", "| model | FD held-out | held-out vs base (paired) | FD reward features | recall |",
                  "|---|---|---|---|---|"]
        for name, r in result["rows"][sname].items():
            lines.append(f"| {name} | {with_error(r.get('fd_eval'), r.get('fd_eval_err'), '{:.4f}')} | "
                         f"{change_with_error((r.get('gain') or {}).get('fd_eval'))} | "
                         f"{with_error(r.get('fd_reward'), r.get('fd_reward_err'))} | {r.get('recall', float('nan')):.3f} |")
        lines.append("")
    tf = result["rows"]["training_free"]["base"]
    lines += [f"Training-free control: the base with {result['solvers']['training_free']['method']} "
              f"{result['solvers']['training_free']['steps']} steps ({tf['nfe']} NFE): FD held-out "
              f"{with_error(tf.get('fd_eval'), tf.get('fd_eval_err'), '{:.4f}')}, reward features "
              f"{with_error(tf.get('fd_reward'), tf.get('fd_reward_err'))}.", ""]
    for name, b in result.get("budgets", {}).items():
        lines.append(f"Equal wall time: {name} ran {b['iterations']} iterations at {b['seconds_per_iteration']:.3g} s "
                     f"each (measured on its first {b['probe_iterations']}) for the {b['reference_seconds']:.1f} s "
                     f"{b['reference']} trained.")
    lines += ["", "![study](study.png)", ""]
    plot_study(result, root / "study.png")
    return atomic_write_bytes(root / "study.md", "\n".join(lines).encode())


def plot_study(result: dict, path: Path) -> Path:
    """Held-out FD of every arm's seeds (dots) and their mean ± std, at the served and the converged solver; the
    base as a line with its ± one-standard-error band, the guided base as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, seeds = list(result["summary"]["served"]), result["seeds"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for ax, sname in zip(axes[0], ("served", "converged")):
        rows = result["rows"][sname]
        base = rows["base"]
        ax.axhline(base["fd_eval"], color="gray", linestyle="--", label="base")
        if base.get("fd_eval_err"):
            ax.axhspan(base["fd_eval"] - base["fd_eval_err"], base["fd_eval"] + base["fd_eval_err"], color="gray", alpha=0.15)
        if "guided" in rows:
            ax.axhline(rows["guided"]["fd_eval"], color="black", linestyle=":", label="guided")
        for i, arm in enumerate(arms):
            vals = [rows[f"{arm}/seed{s}"]["fd_eval"] for s in seeds if f"{arm}/seed{s}" in rows]
            ax.scatter([i] * len(vals), vals, color=f"C{i}", alpha=0.7)
            if len(vals) > 1:
                ax.errorbar([i + 0.15], [np.mean(vals)], yerr=[np.std(vals, ddof=1)], fmt="s", color=f"C{i}")
        ax.set_xticks(range(len(arms)), arms)
        s = result["solvers"][sname]
        ax.set_title(f"{sname}: {s['method']} {s['steps']} steps ({s['nfe']} NFE)")
        ax.set_ylabel("FD, held-out features")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
