"""The demo's report: <run_dir>/report.md and metrics.json, rebuilt from the stages' results on every run.

metrics.json: a key per model row (base, distribution, sample, merge_ema, merge_rl) whose metrics are the evidence
stage's served-sampler row on the report seed (fd_reward, fd_reward_err, fd_eval, fd_eval_err, ...; the stage's
own validation-seed metrics under `validation`), then `served`, `converged` and `training_free`, each
{"method", "steps", "nfe", "models": {name: row}}, and `evidence` (seeds, n, the converged-step search, the
FD-vs-NFE points). Every `*_err` is one bootstrap standard error.
"""

from __future__ import annotations

from pathlib import Path

from ..evaluation.protocol import SOLVERS, relative_gain
from ..report import change_with_error, metrics_table, plot_fd_curves, plot_fd_vs_nfe, with_error
from ..utils.io import atomic_save_json, atomic_write_bytes
from .evidence import paired_rows
from .finetune import change_summary
from .stages import METRIC_KEYS, DemoContext, Stage

CURVE_KEYS = ("curve", "fd_ref_curve")   # in stage.json and the plot, not in metrics.json
SOLVER_TITLES = {"served": "served sampler", "converged": "converged solver",
                 "training_free": "training-free solver at the served NFE"}


def model_rows(ctx: DemoContext, stages: list[Stage]) -> dict:
    """The table rows: each row stage's result; with the evidence stage, its metrics replaced by the served row
    of the report seed (the stage's own, validation-seed metrics kept under `validation`)."""
    served = ((ctx.results.get("evidence") or {}).get("served") or {}).get("models", {})
    rows = {}
    for s in stages:
        if not (s.row and s.name in ctx.results):
            continue
        r = {k: v for k, v in ctx.results[s.name].items() if k not in CURVE_KEYS}
        if s.name in served:
            own = {k: r.pop(k) for k in (*METRIC_KEYS, "classifier_logp") if k in r}
            r = {**r, **served[s.name], "validation": own}
        rows[s.name] = r
    return rows


def write_metrics(ctx: DemoContext, stages: list[Stage]) -> tuple[dict, dict]:
    """metrics.json (see the module doc); returns (rows, others)."""
    rows = model_rows(ctx, stages)
    others = {s.name: ctx.results[s.name] for s in stages if not s.row and s.name in ctx.results}
    out = {**rows, **{k: v for k, v in others.items() if k != "evidence"}}
    ev = others.get("evidence")
    if ev:
        out.update({sname: ev[sname] for sname in SOLVERS if sname in ev})
        out["evidence"] = {k: v for k, v in ev.items() if k not in SOLVERS}
    atomic_save_json(ctx.run_dir / "metrics.json", out)
    return rows, others


def introduction(ctx: DemoContext, rows: dict) -> list[str]:
    """The report's title, what was evaluated and how, the trainer's settings."""
    cfg = ctx.cfg
    return ["# distreward demo: RL fine-tuning with a distribution-wise reward on Fashion-MNIST", "",
            f"Base model `{cfg.model.path}`. {trainer_summary(cfg)}; reward `{cfg.reward.name}`"
            + (f" vs the sample-wise `{ctx.sample_cfg.reward.name}` baseline on the same budget." if "sample" in rows
               else "."), ""]


def trainer_summary(cfg) -> str:
    """One sentence on the fine-tuning trainer (rl.algorithm) and its budget."""
    rl = cfg.rl
    batch = f"{rl.iterations} iterations of {rl.labels_per_iter} labels x {rl.group_size} samples"
    if rl.algorithm == "nft":
        return (f"The forward-process trainer (rl.algorithm nft): {batch} drawn with the {cfg.nft.method} ODE "
                f"({cfg.nft.steps or cfg.eval.steps} steps), beta = {cfg.nft.beta}, {cfg.nft.timesteps} noise levels "
                f"per sample, lr = {rl.lr}")
    if rl.algorithm == "pathwise":
        return (f"The pathwise trainer (rl.algorithm pathwise): {batch} drawn with the {cfg.pathwise.method} ODE "
                f"({cfg.pathwise.steps or cfg.eval.steps} steps), the reward's gradient back-propagated through the "
                f"last {cfg.pathwise.k} of them, lr = {rl.lr}")
    if rl.algorithm == "pool":
        return (f"Pool rounds (rl.algorithm pool): {rl.iterations} rounds of {rl.pool.size} samples drawn with the "
                f"{rl.pool.method} ODE ({rl.pool.steps} steps), {rl.pool.epochs} epochs of the forward-process loss "
                f"each, lr = {rl.lr}")
    return (f"GRPO: {batch}, T = {rl.steps} SDE steps, a = {rl.noise_level}, beta = {rl.beta}, lr = {rl.lr}, "
            f"clip eps = {rl.clip_eps}")


def evidence_tables(ev: dict) -> list[str]:
    """FD ± one standard error of every model with every solver, then the other metrics at the converged solver."""
    models = list(ev["served"]["models"])
    solvers = [s for s in SOLVERS if s in ev]
    head = "| model | " + " | ".join(f"{SOLVER_TITLES[s]}: {ev[s]['method']} {ev[s]['steps']} ({ev[s]['nfe']} NFE)"
                                     f", FD reward / held-out" for s in solvers) + " |"
    lines = [head, "|---|" + "---|" * len(solvers)]
    for m in models:
        cells = []
        for s in solvers:
            r = ev[s]["models"].get(m, {})
            cells.append(f"{with_error(r.get('fd_reward'), r.get('fd_reward_err'))} / "
                         f"{with_error(r.get('fd_eval'), r.get('fd_eval_err'), '{:.4f}')}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    conv = ev.get("converged", ev["served"])["models"]
    lines += ["", f"At the {SOLVER_TITLES['converged' if 'converged' in ev else 'served']}: recall, precision, "
              "density, coverage, per-class FD (held-out; mean and worst class) and FD against Fashion-MNIST test:", "",
              "| model | precision | recall | density | coverage | per-class FD mean | worst class | FD test (reward) "
              "| FD test (held-out) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        r = conv.get(m, {})
        f = lambda k, fmt="{:.3f}": fmt.format(r[k]) if r.get(k) is not None else "–"   # noqa: E731
        lines.append(f"| {m} | {f('precision')} | {f('recall')} | {f('density')} | {f('coverage')} | "
                     f"{f('fd_eval_class_mean', '{:.4f}')} | "
                     f"{f('fd_eval_class_worst', '{:.4f}')} | "
                     f"{with_error(r.get('fd_reward_test'), r.get('fd_reward_test_err'))} | "
                     f"{with_error(r.get('fd_eval_test'), r.get('fd_eval_test_err'), '{:.4f}')} |")
    return lines


def verdict(change: tuple[float, float] | None) -> str:
    """'-47.1% ± 2.3%, better' (beyond two standard errors), 'worse', or 'within noise'."""
    if change is None:
        return "–"
    d, e = change
    word = "within noise" if abs(d) <= 2 * e else ("better" if d < 0 else "worse")
    return f"{change_with_error(change)} ({word})"


def evidence_findings(ev: dict) -> list[str]:
    """What the numbers show, stated from them: each model vs the base at each solver (held-out FD, then reward
    FD), and what the training-free solver gives the base at the served cost."""
    lines = ["What the numbers show (relative FD change vs the base at the same solver, ± one paired standard "
             "error: both rows on the same noise, labels and bootstrap resamples; 'better'/'worse' only beyond two "
             "standard errors):", ""]
    served_base = ev["served"]["models"].get("base")
    for m in ev["served"]["models"]:
        if m == "base":
            continue
        parts = []
        for s in (x for x in SOLVERS if x in ev):
            r, b = ev[s]["models"].get(m), ev[s]["models"].get("base")
            if r and b:
                parts.append(f"{SOLVER_TITLES[s]} held-out {verdict(relative_gain(r, b, 'fd_eval'))}, "
                             f"reward features {verdict(relative_gain(r, b, 'fd_reward'))}")
        lines.append(f"- **{m}**: " + "; ".join(parts) + ".")
    tf = ev.get("training_free", {}).get("models", {}).get("base")
    if tf and served_base:
        lines.append(f"- **training-free control**: the base with {ev['training_free']['method']} "
                     f"{ev['training_free']['steps']} steps ({ev['training_free']['nfe']} NFE) instead of the served "
                     f"{ev['served']['method']} {ev['served']['steps']}: held-out "
                     f"{verdict(relative_gain(tf, served_base, 'fd_eval'))}, reward features "
                     f"{verdict(relative_gain(tf, served_base, 'fd_reward'))}.")
    return lines + [""]


def shipped_notes(ev: dict) -> list[str]:
    """Where the shipped fine-tuned models in the tables come from, and where their studies are."""
    lines = []
    for name, s in (ev.get("shipped") or {}).items():
        made = f", made by `{s['command']}`" if s.get("command") else ""
        lines += [f"**{name}** is the shipped fine-tuned model of this base (`{Path(s['path']).name}` in weights/: "
                  f"the {s.get('trainer')} trainer with the {s.get('reward')} reward{made}). Its study over three "
                  "training seeds against the permuted-reward null, the distillation control and continued "
                  "pretraining is in docs/rl.md (\"The deciding study on the shipped plateau base\"); its rows at "
                  "every solver beside the guided base are in the README (\"A better model at the converged solver, "
                  "without guidance\").", ""]
    return lines


def evidence_section(ctx: DemoContext, ev: dict) -> list[str]:
    search = ev.get("converged_search") or {}
    how = (f"searched on the base model with the validation seed ({len(search.get('trace', []))} step counts: "
           "doubling the steps moved FD by less than its standard error on both networks)"
           if search.get("searched") else "set by evidence.converged_steps")
    lines = ["## The evidence: served sampler, converged solver, training-free solver", "",
             f"Every model on the report seed {ev['report_seed']} (used by nothing else; training curves, the "
             f"converged-step search and merge selection use the validation seed {ev['validation_seed']}), "
             f"n = {ev['n']} class-balanced samples, the same noise and labels for every model and solver. "
             f"± is one bootstrap standard error ({ev['uncertainty']} resamples of the generated samples). "
             f"Converged solver: Heun {search.get('steps')} steps, {how}.", "",
             *evidence_tables(ev), "", *evidence_findings(ev), *shipped_notes(ev)]
    if ev.get("curve") and any(r.get("fd_eval_diff") is not None for r in ev["curve"]):
        conv = paired_rows(ev.get("converged", {}).get("models", {}))
        plot_fd_vs_nfe(ev["curve"], ctx.run_dir / "fd_vs_nfe.png", converged=conv, diff=True)
        lines += [f"FD minus the base's FD against NFE, Euler and Heun, each point on the same noise and labels as "
                  f"the base's, ± one paired bootstrap standard error (lines: n = {ev['curve_n']} per point; stars: "
                  f"the converged solver at n = {ev['n']}). FD itself is biased upwards by roughly trace(Sigma)/n, "
                  "about equally for two models, so the difference compares lines with stars where FD does not. "
                  "Below zero at every NFE: a better model; below zero only at the served NFE: a better-fitted "
                  "sampler.", "", "![FD minus the base's FD vs NFE](fd_vs_nfe.png)", ""]
    return lines


def training_summaries(rows: dict, base: dict) -> list[str]:
    """One line per fine-tuning run (validation seed, during training): reward means, the classifier log-prob."""
    lines = []
    for name in ("distribution", "sample"):
        if name in rows:
            r = rows[name]
            v, bv = r.get("validation") or r, base.get("validation") or base
            logp = (f", classifier log p on the evaluation samples {bv['classifier_logp']:.4f} -> "
                    f"{v['classifier_logp']:.4f}" if v.get("classifier_logp") is not None
                    and bv.get("classifier_logp") is not None else "")
            lines.append(change_summary(name, v, bv) + f" (validation seed, n = {int(v.get('n') or 0)})"
                         + f", reward mean {r['reward_mean_first']:.4g} -> {r['reward_mean']:.4g} (first -> last "
                         "iteration)" + logp)
    return lines + [""]


def write_report(ctx: DemoContext, stages: list[Stage], elapsed: float) -> Path:
    """<run_dir>/report.md and metrics.json from the finished stages' results."""
    rows, others = write_metrics(ctx, stages)
    base = rows.get("base")
    curves = {k: ctx.results[k]["curve"] for k in rows if "curve" in ctx.results[k]}
    ref_curves = {k: ctx.results[k]["fd_ref_curve"] for k in rows if ctx.results[k].get("fd_ref_curve")}
    lines = introduction(ctx, rows)
    ev = others.get("evidence")
    if ev:
        lines += evidence_section(ctx, ev)
        rest = {k: v for k, v in rows.items() if k not in ev["served"]["models"]}
        if rest:
            lines += ["Rows without evidence (their stage's own evaluation):", "", metrics_table(rest), ""]
    else:
        lines += ["Every model with the served sampler on the validation seed:", "", metrics_table(rows), ""]
    if base:
        lines += ["## Training", "", *training_summaries(rows, base)]
    if curves:
        plot_fd_curves(curves, ctx.run_dir / "fd_curve.png", base=base.get("validation", base) if base else None,
                       reference=ref_curves)
        lines += ["FD over the fine-tuning iterations (validation seed):", "", "![FD over the fine-tuning iterations](fd_curve.png)", ""]
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


__all__ = ["CURVE_KEYS", "evidence_findings", "evidence_tables", "verdict", "write_metrics",
           "write_report"]
