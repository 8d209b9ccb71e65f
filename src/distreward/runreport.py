"""report.md of a finetune, merge or study run directory, built from the directory's own files only.

`write_run_report(run_dir)` reads what the trainer wrote (config.yaml, metrics.jsonl, result.json, coefficients.json,
study.json, samples/, merged.safetensors) and writes the demo's kind of report beside it: tables of the evaluations
(FD ± one standard error where the evaluation has one), the curves over the iterations (PNG) and a sample grid.
The kind of run is read from its files (`run_kind`): study.json -> study, coefficients.json -> merge,
metrics.jsonl -> finetune. Called by `distreward finetune`, `merge` and `study` after the run returns; rebuilt on
every call, so a resumed run's report covers the whole run.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .models import load_generator, read_generator_metadata
from .report import plot_fd_curves, relative_change, save_image_grid, with_error
from .sampling.generate import ode_images
from .utils.errors import reading
from .utils.io import atomic_write_bytes

EVAL_PREFIX = "eval/"          # the evaluation records of a fine-tuning run's metrics.jsonl
FD_KEYS = ("fd_reward", "fd_eval")
GRID = 40                      # images in a merge run's sample grid (4 per class of 10)
FIX = "rerun the command, or delete the file to report without it"


def read_json(path: Path):
    """A JSON file of the run (None when it is missing)."""
    if not path.is_file():
        return None
    with reading(path, "JSON file of the run", FIX):
        return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[dict]:
    """metrics.jsonl's records ([] when it is missing)."""
    if not path.is_file():
        return []
    with reading(path, "metrics log (JSON lines)", FIX):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_config(run_dir: Path) -> dict:
    """config.yaml of the run as plain values ({} when it is missing)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    with reading(path, "resolved config (YAML)", FIX):
        return yaml.safe_load(path.read_text()) or {}


def run_kind(run_dir: Path) -> str:
    """study, merge or finetune, from the files the run wrote."""
    if (run_dir / "study.json").is_file():
        return "study"
    if (run_dir / "coefficients.json").is_file() or (run_dir / "merged.safetensors").is_file():
        return "merge"
    if (run_dir / "metrics.jsonl").is_file():
        return "finetune"
    raise ValueError(f"{run_dir}: no study.json, coefficients.json or metrics.jsonl; give the directory of a "
                     "finetune, merge or study run")


def evaluations(records: list[dict]) -> list[dict]:
    """The evaluation records of a fine-tuning log: {iteration, fd_reward, fd_eval, ...} without the prefix."""
    return [{"iteration": r["iteration"], **{k[len(EVAL_PREFIX):]: v for k, v in r.items() if k.startswith(EVAL_PREFIX)}}
            for r in records if any(k.startswith(EVAL_PREFIX) for k in r)]


def fd_cells(row: dict) -> str:
    """'FD reward ± err | FD held-out ± err' cells of a table row."""
    return (f"{with_error(row.get('fd_reward'), row.get('fd_reward_err'))} | "
            f"{with_error(row.get('fd_eval'), row.get('fd_eval_err'), '{:.4f}')}")


def number(row: dict, key: str, fmt: str = "{:.3f}") -> str:
    v = row.get(key)
    return fmt.format(v) if isinstance(v, (int, float)) else "–"


def eval_table(rows: dict[str, dict]) -> list[str]:
    """A markdown table of evaluations: FD on both networks with their errors, precision, recall, coverage, n;
    a note when the evaluations carry no error."""
    lines = ["| | FD reward features | FD held-out | precision | recall | coverage | n |", "|---|---|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {fd_cells(r)} | {number(r, 'precision')} | {number(r, 'recall')} | "
                     f"{number(r, 'coverage')} | {number(r, 'n', '{:.0f}')} |")
    if not any(r.get(f"{k}_err") is not None for r in rows.values() for k in FD_KEYS):
        lines += ["", "No standard errors: these evaluations ran with eval.uncertainty 0 (eval.uncertainty=50 "
                  "gives each FD ± one bootstrap standard error)."]
    else:
        lines += ["", "± one bootstrap standard error of the generated samples."]
    return lines


def change_line(first: dict, last: dict, what: str) -> str:
    """How FD changed between two evaluations of the same plan (relative, both networks)."""
    parts = [f"{k} {first[k]:.4g} -> {last[k]:.4g} ({relative_change(last[k], first[k]):+.1%})"
             for k in FD_KEYS if first.get(k) is not None and last.get(k) is not None]
    return f"{what}: " + ", ".join(parts) + "." if parts else ""


def image_links(run_dir: Path, paths: list[Path], title: str) -> list[str]:
    """Markdown image links (relative to the run directory) under a title."""
    out = []
    for p in paths:
        rel = p.relative_to(run_dir).as_posix()
        out += [f"**{title} {p.stem}**", "", f"![{p.stem}]({rel})", ""]
    return out


def first_and_last(folder: Path) -> list[Path]:
    """The first and the last sample grid of a samples/ folder (one if there is one)."""
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    return list(dict.fromkeys([pngs[0], pngs[-1]])) if pngs else []


def finetune_report(run_dir: Path) -> list[str]:
    """A fine-tuning run: its evaluations (metrics.jsonl, result.json), the curves, the first and last sample grid."""
    cfg, records = read_config(run_dir), read_jsonl(run_dir / "metrics.jsonl")
    result = read_json(run_dir / "result.json") or {}
    rl, ev = cfg.get("rl") or {}, cfg.get("eval") or {}
    evals = evaluations(records)
    train = [r for r in records if "r_mean" in r]
    lines = [f"# Fine-tuning run `{cfg.get('name', run_dir.name)}`", "",
             f"Trainer {rl.get('algorithm', 'grpo')}, reward `{(cfg.get('reward') or {}).get('name')}`, "
             f"{len(train)} of {rl.get('iterations')} iterations logged; every evaluation: {ev.get('n')} samples of the "
             f"EMA model, {ev.get('method', 'euler')} {ev.get('steps')} steps, seed {ev.get('seed')} (the same noise "
             "and labels each time).", ""]
    rows = {f"iteration {e['iteration']}": e for e in evals}
    final = result.get("final")
    if final and not any(e["iteration"] == final.get("iteration") for e in evals):
        rows["final"] = final
    if rows:
        lines += ["## Evaluations", "", *eval_table(rows), ""]
        first, last = next(iter(rows.values())), list(rows.values())[-1]
        lines += [change_line(first, last, "First -> last evaluation"), ""]
    else:
        lines += ["No evaluation in metrics.jsonl (eval.every 0, or the run stopped before the first).", ""]
    if evals or train:
        refs = {"reference set": [r for r in train if r.get("fd_ref") is not None]}
        plot_fd_curves({"EMA model": evals}, run_dir / "fd_curve.png", reference=refs if refs["reference set"] else None,
                       xlabel="iteration")
        lines += ["## Curves", "", "FD of the evaluations over the iterations (and of the reward's reference set):", "",
                  "![FD over the iterations](fd_curve.png)", ""]
    if train:
        lines += [f"Reward mean, first -> last iteration: {train[0]['r_mean']:.4g} -> {train[-1]['r_mean']:.4g}.", ""]
    grids = first_and_last(run_dir / "samples")
    lines += ["## Samples", "", "The EMA model's evaluation samples (the same noise and labels), first and last grid:", "",
              *image_links(run_dir, grids, "samples")] if grids else []
    return lines


def merged_grid(run_dir: Path, cfg: dict) -> Path | None:
    """samples_merged.png: GRID class-balanced samples of merged.safetensors with the run's sampler (our pixel-space
    generator files only; None for latent or foreign models)."""
    path = run_dir / "merged.safetensors"
    model, sampler = cfg.get("model") or {}, cfg.get("sampler") or {}
    if not path.is_file() or model.get("vae") or not model.get("image_shape"):
        return None
    try:
        arch = read_generator_metadata(path)["arch"]
    except (ValueError, KeyError):
        return None
    net = load_generator(path)
    images, _ = ode_images(net, GRID, num_classes=int(model.get("num_classes") or 0),
                           image_shape=tuple(model["image_shape"]), steps=int(sampler.get("steps", 20)),
                           method=str(sampler.get("method", "euler")), shift=float(sampler.get("shift", 1.0)),
                           seed=int((cfg.get("eval") or {}).get("seed", 0)), arch=arch)
    return save_image_grid(images, run_dir / "samples_merged.png", nrow=int(model.get("num_classes") or 0) or None)


def coefficient_lines(w) -> list[str]:
    """Merged coefficients as text: one line for one coefficient per input, else one per block group
    ("group 0: ...")."""
    rows = w if w and isinstance(w[0], (list, tuple)) else [w]
    return [("group " + str(i) + ": " if len(rows) > 1 else "") + ", ".join(f"{v:.3f}" for v in r)
            for i, r in enumerate(rows)]


def merge_report(run_dir: Path) -> list[str]:
    """A merge run: every baseline, the start and the merged model (result.json), the search curve, the
    coefficients (coefficients.json) and a sample grid of the merged model."""
    cfg, records = read_config(run_dir), read_jsonl(run_dir / "metrics.jsonl")
    result = read_json(run_dir / "result.json") or {}
    coef = read_json(run_dir / "coefficients.json") or {}
    merge, rl, sampler, ev = (cfg.get(k) or {} for k in ("merge", "rl", "sampler", "eval"))
    lines = [f"# Merge run `{cfg.get('name', run_dir.name)}`", "",
             f"{coef.get('searcher', rl.get('algorithm', ''))} over the merging coefficients of "
             f"{len(coef.get('checkpoints') or result.get('checkpoints') or [])} inputs, space "
             f"`{coef.get('space', merge.get('space', 'global'))}`, start `{merge.get('init')}`, "
             f"{coef.get('iterations', len(records))} iterations of {rl.get('candidates')} candidates x "
             f"{rl.get('samples')} samples; every model sampled with {sampler.get('method')} {sampler.get('steps')} "
             f"steps and evaluated on {ev.get('n')} samples of seed {ev.get('seed')} (the same noise and labels).", ""]
    rows = dict(result.get("baselines") or {})
    for k in ("init", "merged"):
        if result.get(k):
            rows[k] = result[k]
    if rows:
        lines += ["## Evaluations", "", *eval_table(rows), ""]
        scored = {k: v for k, v in rows.items() if k not in ("init", "merged") and v.get("fd_eval") is not None}
        best = min(scored, key=lambda k: scored[k]["fd_eval"]) if scored else None
        if best and result.get("merged"):
            lines += [change_line(rows[best], result["merged"], f"Best baseline (`{best}`) -> merged"), ""]
    if records:
        plot_fd_curves({"search": records}, run_dir / "search_curve.png", keys=("r_mean", "fd_ref"), xlabel="iteration")
        lines += ["## Curves", "", "Mean reward of the candidates and FD of the reward's reference set per iteration:", "",
                  "![the search](search_curve.png)", ""]
    w = coef.get("weights")
    if w is not None:
        lines += ["## Coefficients", "", *coefficient_lines(w), ""]
    grid = merged_grid(run_dir, cfg)
    if grid is not None:
        lines += ["## Samples", "", f"The merged model, {GRID} samples, one class per column:", "",
                  "![merged](samples_merged.png)", ""]
    return lines


def study_report(run_dir: Path) -> list[str]:
    """A study: study.md's tables, then every arm's and seed's FD curve and each arm's last sample grid."""
    study = read_json(run_dir / "study.json")
    lines = []
    md = run_dir / "study.md"
    if md.is_file():        # the study's own tables (FD ± error of every arm and seed, both solvers)
        lines += [md.read_text(), ""]
    else:
        lines += [f"# Study of `{study.get('config')}`", "", *eval_table(study["rows"]["served"]), ""]
    curves, grids = {}, []
    for seed in study.get("seeds", []):
        for arm in study.get("arms", []):
            d = run_dir / f"seed{seed}" / arm
            evals = evaluations(read_jsonl(d / "metrics.jsonl"))
            if evals:
                curves[f"{arm}/seed{seed}"] = evals
            if seed == study["seeds"][0]:
                grids += [(arm, p) for p in first_and_last(d / "samples")[-1:]]
    if curves:
        plot_fd_curves(curves, run_dir / "fd_curve.png", xlabel="iteration")
        lines += ["## Training curves", "", "FD of each arm's and seed's evaluations over the iterations (validation "
                  "seed):", "", "![FD over the iterations](fd_curve.png)", ""]
    if grids:
        lines += ["## Samples", "", f"Each arm's last evaluation samples, seed {study['seeds'][0]}:", "",
                  *[x for arm, p in grids for x in image_links(run_dir, [p], arm)]]
    return lines


REPORTS = {"finetune": finetune_report, "merge": merge_report, "study": study_report}


def write_run_report(run_dir, kind: str | None = None) -> Path:
    """<run_dir>/report.md from the run's own files (`kind`: finetune, merge or study; default: `run_kind`)."""
    run_dir = Path(run_dir)
    kind = kind or run_kind(run_dir)
    if kind not in REPORTS:
        raise ValueError(f"unknown run kind {kind!r}; use one of {', '.join(REPORTS)}")
    lines = REPORTS[kind](run_dir)
    return atomic_write_bytes(run_dir / "report.md", "\n".join(lines).encode())


__all__ = ["coefficient_lines", "run_kind", "write_run_report"]
