"""The demo's evidence stage: every model of the demo reported with the evidence protocol (evaluation/protocol.py).

Base, the fine-tuned models and the merged models, on the report seed (fresh: used by no other stage), with the served
sampler, a converged Heun solver (its step count searched on the base model with the validation seed, or the
preset's), and the base with a training-free Heun solver at the served NFE; FD with bootstrap standard errors on both feature
networks, against Fashion-MNIST train and test, per-class FD; and, for Euler and Heun at several NFE, each model's
FD minus the base's on the same noise and labels with its paired standard error (the plot: `paired_curve`).
Beside the demo's own models it reports the shipped fine-tuned model (SHIPPED_FILES) when that was fine-tuned from
the demo's base (the base's sha256 in its metadata), so the report shows the trainer the studies chose next to the
one the demo runs. Its result gives metrics.json its `served`, `converged` and `training_free` entries.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..build import eval_plan
from ..config import find_file
from ..evaluation.generator import heun_for_nfe
from ..evaluation.protocol import (SOLVERS, Protocol, combined_figures, evaluate_models, find_converged_steps,
                                   paired_difference, relative_gain)
from ..models import load_generator, read_generator_metadata
from ..utils.configdiff import plain_config
from ..utils.hashing import hash_inputs
from .finetune import classifier_figures, evaluation_key
from .stages import DemoContext

# The demo's models besides the base, in report order: (name, weight file under the run directory).
MODEL_FILES = (("distribution", "distribution/model_ema.safetensors"), ("sample", "sample/model_ema.safetensors"),
               ("merge_ema", "merge_ema/merged.safetensors"), ("merge_rl", "merge_rl/merged.safetensors"))
# Fine-tuned models shipped in weights/, reported when their metadata's base_sha256 is the demo's base: (name, file).
SHIPPED_FILES = (("finetuned", "weights/fmnist-finetuned.safetensors"),)
CURVE_MODELS = ("base", "distribution", "sample", "merge_ema", "finetuned")   # the FD-vs-NFE plot's models (if present)
FD_KEYS = ("fd_reward", "fd_eval")


def protocol(ctx: DemoContext) -> Protocol:
    plan = eval_plan(ctx.cfg, noise="seed")
    return Protocol.of(ctx.cfg.get("evidence") or {}, plan.sampler, plan.n)


def model_files(ctx: DemoContext) -> dict[str, Path]:
    """The demo's trained / merged models that exist, by name."""
    return {name: ctx.run_dir / rel for name, rel in MODEL_FILES
            if name in ctx.results and (ctx.run_dir / rel).is_file()}


def shipped_files(ctx: DemoContext) -> dict[str, Path]:
    """The shipped fine-tuned models of the demo's base, by name (SHIPPED_FILES whose metadata names the base's
    sha256; a model fine-tuned from another base says nothing about this one)."""
    base = ctx.base_sha256()
    return {name: p for name, rel in SHIPPED_FILES
            if (p := find_file(rel)).is_file() and read_generator_metadata(p)["extra"].get("base_sha256") == base}


def evidence_key(ctx: DemoContext) -> dict:
    """What the evidence stage depends on: the evaluation settings, the evidence section, the models' content."""
    return {**evaluation_key(ctx), "evidence": plain_config(ctx.cfg.get("evidence") or {}),
            "models": hash_inputs([*model_files(ctx).values(), *shipped_files(ctx).values()])}


def stage_evidence(ctx: DemoContext) -> dict:
    """Every model with the served and the converged solver on the report seed, the base with the training-free
    solver at the served NFE (the control a fine-tuned model's served gain is read against), and the FD-vs-NFE
    curve."""
    proto = protocol(ctx)
    base_plan = eval_plan(ctx.cfg, noise="seed")
    search = find_converged_steps(ctx.base_net, ctx.evaluator, base_plan, proto, device=ctx.cfg.device,
                                  progress=ctx.progress, cache=ctx.eval_cache)
    solvers = proto.solvers(search["steps"])
    shipped = shipped_files(ctx)
    models = {"base": ctx.base_net, **{name: load_generator(p).eval()
                                       for name, p in {**model_files(ctx), **shipped}.items()}}
    plan = proto.report_plan(base_plan, ctx.evaluator)
    figures = combined_figures(classifier_figures(ctx), proto.test_figures(ctx.evaluator, ctx.cfg.device))
    print(f"[demo] evidence: {len(models)} models x {len(solvers)} solvers ({', '.join(f'{k}: {s.method} {s.steps}' for k, s in solvers.items())}), "
          f"n = {proto.n}, report seed {proto.report_seed}")
    trained = {k: solvers[k] for k in ("served", "converged")}
    table = evaluate_models(models, ctx.evaluator, plan, trained, device=ctx.cfg.device, progress=ctx.progress,
                            cache=ctx.eval_cache, figures=figures)
    table["training_free"] = evaluate_models({"base": models["base"]}, ctx.evaluator, plan,       # the base's control
                                             {"training_free": solvers["training_free"]}, device=ctx.cfg.device,
                                             progress=ctx.progress, cache=ctx.eval_cache,
                                             figures=figures)["training_free"]
    curve = []
    if proto.curve_n:
        curve_models = {k: v for k, v in models.items() if k in CURVE_MODELS}
        curve_plan = replace(base_plan, n=proto.curve_n, seed=proto.report_seed, uncertainty=proto.uncertainty)
        curve = paired_curve(evaluate_models(curve_models, ctx.evaluator, curve_plan, curve_solvers(proto),
                                             device=ctx.cfg.device, progress=ctx.progress, cache=ctx.eval_cache))
    out = {"converged_search": search, "n": proto.n, "report_seed": proto.report_seed,
           "validation_seed": proto.validation_seed, "uncertainty": proto.uncertainty, "curve": curve,
           "curve_n": proto.curve_n, "err": "one bootstrap standard error",
           "shipped": {name: shipped_summary(p) for name, p in shipped.items()}}
    for sname, spec in solvers.items():
        out[sname] = {"method": spec.method, "steps": int(spec.steps), "nfe": next(iter(table[sname].values()))["nfe"],
                      "models": table[sname]}
    return out


def shipped_summary(path: Path) -> dict:
    """What the report says of a shipped model: its file, trainer and the command that made it (its metadata)."""
    extra = read_generator_metadata(path)["extra"]
    return {"path": str(path), "trainer": extra.get("rl"), "reward": extra.get("reward"),
            "command": extra.get("command")}


def curve_solvers(proto: Protocol) -> dict:
    """The FD-vs-NFE plot's solvers: Euler with each NFE of evidence.curve_nfe steps, Heun with the most steps
    within it."""
    out = {}
    for budget in proto.curve_nfe:
        out[f"euler {budget}"] = replace(proto.served, kind="ode", method="euler", steps=int(budget))
        out[f"heun {budget}"] = heun_for_nfe(int(budget), proto.served)
    return out


def paired_rows(rows: dict, base: str = "base", keys=FD_KEYS) -> dict:
    """{model: row} of one solver with, per FD key, `<key>_diff` and `<key>_diff_err`: the model's FD minus the
    base's on the same noise and labels, and its paired bootstrap standard error (None without replicates).
    FD's small-sample bias (of order trace(Sigma)/n) is nearly the same for two models of one plan, so the
    difference compares across sample sizes where FD itself does not."""
    ref = rows.get(base)
    out = {}
    for m, r in rows.items():
        r = {k: v for k, v in r.items() if not k.endswith("_boot")}
        for key in keys:
            d = paired_difference(rows[m], ref, key) if ref is not None else None
            r[f"{key}_diff"], r[f"{key}_diff_err"] = (None, None) if d is None else d
        out[m] = r
    return out


def paired_curve(table: dict, base: str = "base") -> list[dict]:
    """The FD-vs-NFE plot's rows from `evaluate_models`' {solver: {model: row}}: {model, method, steps, nfe,
    fd_reward, fd_eval, n, and each key's paired difference to the base with its standard error}."""
    rows = []
    for models in table.values():
        for m, r in paired_rows(models, base).items():
            rows.append({"model": m, **{k: r.get(k) for k in ("method", "steps", "nfe", "n")},
                         **{k: r.get(k) for key in FD_KEYS for k in (key, f"{key}_err", f"{key}_diff", f"{key}_diff_err")}})
    return rows


def gains(result: dict, key: str = "fd_eval") -> dict[str, dict[str, tuple[float, float] | None]]:
    """{solver: {model: (relative change of `key` vs the base, its standard error)}} of an evidence result."""
    out = {}
    for sname in SOLVERS:
        rows = result.get(sname, {}).get("models", {})
        base = rows.get("base")
        out[sname] = {m: relative_gain(r, base, key) for m, r in rows.items() if m != "base" and base}
    return out
