"""`distreward merge-study`: every searcher over the same merging problem at the same image budget, several seeds,
against the merge baselines, reported with the evidence protocol (docs/merge.md "Budget study").

For each searcher (rl.algorithm: ppo, reinforce, cma, random) and seed, one merge run (`run_merge`) is taken to
each budget point in turn (rl.iterations = 2, 4, 8, ... with resume: the run at a later point is the same run
continued, bit for bit as one long run); at each point the searcher's answer is evaluated on the validation seed
(the run's own held-out evaluation, cfg.eval) -- the budget curve, FD against generated images. Then the final
merged model of every run and the baselines (last input, uniform soup, the best post-hoc EMA length chosen on the
reward's features, the greedy soup when baselines.greedy_soup) are evaluated on the report seed, all on the same
noise and labels, with the converged Heun solver (and the served sampler when asked). Nothing in the search sees
the held-out network or the report seed.

Generated images per point: iterations x candidates x samples (every searcher asks P candidates of n samples per
iteration), plus the reference set's reference_size samples of the starting model, the same for every searcher.

    from distreward.merge.study import run_merge_study
    run_merge_study("fmnist_merge_ema", searchers=["ppo", "cma", "random"], seeds=[0, 1, 2], points=[2, 4, 8])
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import OmegaConf

from ..config import load_config
from ..evaluation import Evaluator, eval_cache_for
from ..evaluation.generator import EvalPlan
from ..evaluation.protocol import Protocol, evaluate_models, find_converged_steps
from ..models import load_generator
from ..report import mean_std, save_figure, seed_summary, with_error
from ..sampling.generate import SamplerSpec
from ..utils.io import atomic_save_json, atomic_write_bytes
from ..utils.progress import phase
from ..utils.configdiff import plain_config
from ..utils.lock import RunLock
from .inputs import open_checkpoints
from .search import SEARCHERS
from .trainer import resolve, run_merge

# Where the reporting protocol (seeds, n, bootstrap resamples, converged steps) comes from by default: the evidence
# section of the embedded default's fine-tuning preset, so merged models are reported like the demo's.
EVIDENCE_PRESET = "fmnist_nft"
# Baselines reported beside the searchers (those the run has): the last input, the uniform soup, the best post-hoc
# EMA length (chosen on the reward's features of the validation evaluation), the greedy soup.
BASELINES = ("last", "uniform", "best_ema", "greedy_soup")
FIGURES = ("fd_eval", "fd_reward", "recall", "coverage")     # summarised over seeds


def study_config(config, overrides=(), *, size: str = "demo", checkpoints: Sequence[str] | None = None):
    """The merge config of a study: the preset, its `demo` block when size is "demo" (the block itself dropped),
    then the overrides; the inputs replaced by `checkpoints` when given."""
    cfg = load_config(config)
    if size == "demo" and cfg.get("demo"):
        cfg = OmegaConf.merge(cfg, cfg.demo)
    elif size not in ("demo", "preset"):
        raise ValueError(f"size must be 'demo' (the preset's demo block) or 'preset', got {size!r}")
    cfg = OmegaConf.merge(cfg, load_config(None, list(overrides)))
    cfg.pop("demo", None)           # applied or not wanted: the study runs the config as it stands
    if checkpoints:
        cfg.merge.checkpoints, cfg.merge.snapshots = [str(p) for p in checkpoints], None
    return resolve(cfg)


def images_at(cfg, iterations: int) -> int:
    """Images the searcher generated after `iterations` (iterations x candidates x samples)."""
    return int(iterations) * int(cfg.rl.candidates) * int(cfg.rl.samples)


def search_curve(cfg, searcher: str, seed: int, points: Sequence[int], folder: Path, *, evaluator, progress: bool,
                 cache, parts: dict | None = None) -> tuple[list[dict], dict]:
    """One searcher and seed taken to every budget point (one run, resumed); the validation figures of its answer
    at each point, and the last run's result."""
    record = folder / "curve.json"       # the points done, with the settings they were done with
    key = OmegaConf.to_container(cfg, resolve=True)
    key["seed"], key["rl"]["algorithm"], key["rl"]["iterations"] = int(seed), searcher, None
    key = plain_config(key)
    saved = json.loads(record.read_text()) if record.is_file() else {}
    stale = bool(saved) and saved.get("key") != key     # other settings: that run starts over
    done = {} if stale else {r["iterations"]: r for r in saved.get("rows", [])}
    below = [p for p in points if done and p < max(done) and p not in done]
    if below or (done and max(points) < max(done)):
        raise ValueError(f"{folder} already ran to {max(done)} iterations (points {sorted(done)}); ask for points "
                         f"among those and up to at least {max(done)}, or give a new study folder (--run-dir)")
    rows = []
    for p in points:
        if p in done:
            rows.append(done[p])
            continue
        c = copy.deepcopy(cfg)
        c.rl.algorithm, c.seed, c.rl.iterations = searcher, int(seed), int(p)
        first = stale and not rows       # else resume: a killed point continues from its checkpoint
        res = run_merge(c, folder, resume=not first, overwrite=first,
                        allow_changes=() if first else ("rl.iterations",),
                        evaluator=evaluator, progress=progress, eval_cache=cache, **(parts or {}))
        m = res["merged"]
        rows.append({"iterations": int(p), "images": images_at(c, p), "fd_reward": m.get("fd_reward"),
                     "fd_eval": m.get("fd_eval"), "recall": m.get("recall"), "w": m["w"]})
        done = {r["iterations"]: r for r in rows}
        atomic_save_json(record, {"key": key, "rows": rows})
    return rows, json.loads((folder / "result.json").read_text())


def baseline_files(res: dict, cfg, folder: Path) -> dict[str, Path]:
    """The baselines of a finished run written as generator files (those the run has), by name."""
    ckpts = open_checkpoints(cfg.merge)
    b = dict(res["baselines"])
    if res.get("best_ema"):
        b["best_ema"] = b[res["best_ema"]]
    out = {}
    for name in BASELINES:
        if name in b:
            out[name] = ckpts.save(folder / f"{name}.safetensors", np.asarray(b[name]["w"], np.float64),
                                   extra={"baseline": name})
    return out


def verdicts(rows: dict[str, dict], searchers: Sequence[str], seeds: Sequence[int], baselines: Sequence[str],
             key: str = "fd_eval") -> dict:
    """{searcher: {baseline: {"margin", "err", "beats"}}} on one solver's rows: margin = the baseline's FD minus the
    searcher's mean FD over seeds; err = one standard error of that margin, from the evaluation (the paired
    bootstrap: every replicate's baseline FD minus the seeds' mean FD on the same resampled rows) and from the
    seeds (their spread / sqrt(seeds)), added in quadrature; beats when margin > err. Without bootstrap replicates
    the evaluation part is the baseline's own standard error (an upper bound)."""
    out = {}
    for s in searchers:
        runs = [rows[f"{s}/seed{x}"] for x in seeds if f"{s}/seed{x}" in rows]
        if not runs or any(r.get(key) is None for r in runs):
            continue
        vals = np.array([r[key] for r in runs], np.float64)
        seed_err = float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0
        out[s] = {}
        for b in baselines:
            ref = rows.get(b)
            if not ref or ref.get(key) is None:
                continue
            boots = [r.get(f"{key}_boot") for r in runs] + [ref.get(f"{key}_boot")]
            if all(x is not None for x in boots) and len({len(x) for x in boots}) == 1:
                diff = np.asarray(boots[-1]) - np.mean([np.asarray(x) for x in boots[:-1]], axis=0)
                eval_err = float(diff.std(ddof=1))
            else:
                eval_err = float(ref.get(f"{key}_err") or 0.0)
            margin, err = float(ref[key] - vals.mean()), float(np.hypot(eval_err, seed_err))
            out[s][b] = {"margin": margin, "err": err, "beats": bool(margin > err)}
    return out


def run_merge_study(config="fmnist_merge_ema", overrides=(), *, checkpoints: Sequence[str] | None = None,
                    searchers: Sequence[str] = ("ppo", "cma", "random"), seeds: Sequence[int] = (0, 1, 2),
                    points: Sequence[int] = (2, 4, 8), size: str = "demo", run_dir=None,
                    evidence=EVIDENCE_PRESET, solvers: Sequence[str] = ("converged",),
                    report_n: int | None = None, converged_steps: int | None = None, progress: bool = True,
                    evaluator=None, eval_cache="auto", parts: dict | None = None) -> dict:
    """Every searcher x seed to every budget point, then the report; writes merge_study.json / .md / .png under
    run_dir (default runs/merge_study_<config name>) and returns the json's content. `evidence`: a fine-tuning
    preset whose evidence section sets the report (or that section as a mapping); `report_n` and
    `converged_steps` override its n and converged_steps; `solvers`: converged and / or served; `parts`: run_merge's
    sample_fn / feature_fn / real_stats for every run (default: built from the config)."""
    t0 = time.perf_counter()
    bad = [s for s in searchers if s not in SEARCHERS]
    if bad or not searchers:
        raise ValueError(f"unknown searcher(s) {bad or list(searchers)}; choose from {', '.join(SEARCHERS)}")
    if not seeds:
        raise ValueError("a study needs at least one seed (--seeds 0 1 2)")
    points = sorted({int(p) for p in points})
    if not points or points[0] < 1:
        raise ValueError(f"budget points are iteration counts >= 1 (e.g. --points 2 4 8), got {list(points)}")
    bad = [s for s in solvers if s not in ("converged", "served")]
    if bad or not solvers:
        raise ValueError(f"report solvers must be among converged, served; got {list(solvers)}")
    cfg = study_config(config, overrides, size=size, checkpoints=checkpoints)
    if cfg.merge.get("format") == "edm2-pkl" or cfg.model.get("vae") is not None:
        raise ValueError(f"{cfg.name}: merge-study reports pixel-space generators of our own format on the "
                         "embedded default's evaluator; for EDM2 pickles or latent models run `distreward merge "
                         "--config ... rl.algorithm=ppo|cma|random` once per searcher and seed")
    ev = dict(load_config(evidence).get("evidence") or {}) if isinstance(evidence, (str, Path)) else dict(evidence or {})
    if report_n:
        ev["n"] = int(report_n)
    if converged_steps:
        ev["converged_steps"] = int(converged_steps)
    root = Path(run_dir or f"runs/merge_study_{cfg.name}")
    root.mkdir(parents=True, exist_ok=True)
    evaluator = evaluator or Evaluator.for_fmnist(device=cfg.device)
    cache = eval_cache_for(eval_cache, evaluator)
    with RunLock(root, "merge-study"):
        curves, finals, last = {}, {}, None
        for s in searchers:
            for seed in seeds:
                folder = root / s / f"seed{seed}"
                phase(f"merge-study: {s} seed {seed}, budget points {points} iterations -> {folder}")
                curves[f"{s}/seed{seed}"], last = search_curve(cfg, s, seed, points, folder, evaluator=evaluator,
                                                               progress=progress, cache=cache, parts=parts)
                finals[f"{s}/seed{seed}"] = folder / "merged.safetensors"
        base_files = baseline_files(last, cfg, root / "baselines")
        s = cfg.sampler
        served = SamplerSpec(kind="ode", steps=int(s.steps), method=str(s.method), shift=float(s.shift))
        proto = Protocol.of(ev, served, int(cfg.eval.n))
        plan = EvalPlan(n=proto.n, seed=proto.validation_seed, batch_size=int(s.batch_size), grid=0,
                        num_classes=int(cfg.model.num_classes), image_shape=tuple(cfg.model.image_shape),
                        sampler=served, noise="seed")
        models = {name: load_generator(p).eval() for name, p in {**base_files, **finals}.items()}
        phase("merge-study: the converged solver's step count (validation seed, the last input)")
        search = find_converged_steps(models["last"], evaluator, plan, proto, device=cfg.device, progress=progress,
                                      cache=cache)
        spec = proto.solvers(search["steps"])
        phase(f"merge-study: {len(models)} models on the report seed {proto.report_seed} (n = {proto.n}), "
              f"{', '.join(f'{k} {spec[k].method} {spec[k].steps}' for k in solvers)}")
        table = evaluate_models(models, evaluator, proto.report_plan(plan, evaluator), {k: spec[k] for k in solvers},
                                device=cfg.device, progress=progress, cache=cache)
        summary = {k: seed_summary(table[k], searchers, seeds, FIGURES) for k in solvers}
        result = {"config": cfg.name, "inputs": last["checkpoints"], "searchers": list(searchers),
                  "seeds": list(seeds), "points": points, "candidates": int(cfg.rl.candidates),
                  "samples": int(cfg.rl.samples), "reference_size": int(cfg.reward.reference_size),
                  "validation": {"seed": int(cfg.eval.seed), "n": int(cfg.eval.n),
                                 "sampler": f"{served.method} {served.steps}"},
                  "validation_baselines": {k: {m: v.get(m) for m in ("fd_reward", "fd_eval")}
                                           for k, v in last["baselines"].items()},
                  "best_ema": last.get("best_ema"), "curves": curves, "n": proto.n, "report_seed": proto.report_seed,
                  "converged_search": search,
                  "solvers": {k: {"method": spec[k].method, "steps": int(spec[k].steps)} for k in solvers},
                  "rows": table, "summary": summary,
                  "verdicts": {k: verdicts(table[k], searchers, seeds, list(base_files)) for k in solvers},
                  "err": "one bootstrap standard error", "seconds": round(time.perf_counter() - t0, 1)}
        atomic_save_json(root / "merge_study.json", result)
        write_report(root, result)
    print(f"[merge-study] {root / 'merge_study.md'}")
    return result


def curve_stats(curves: dict, searcher: str, seeds: Sequence[int], key: str) -> tuple[list[int], list[float], list[float]]:
    """(images, mean, std over seeds) of one searcher's budget curve."""
    runs = [curves[f"{searcher}/seed{s}"] for s in seeds if f"{searcher}/seed{s}" in curves]
    images = [r["images"] for r in runs[0]]
    vals = np.array([[r[key] for r in run] for run in runs], np.float64)
    std = vals.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(images))
    return images, vals.mean(axis=0).tolist(), std.tolist()


def write_report(root: Path, result: dict) -> Path:
    """merge_study.md (the report tables, the budget curve's table) and merge_study.png (the curve)."""
    searchers, seeds = result["searchers"], result["seeds"]
    val = result["validation"]
    lines = [f"# Merge study of `{result['config']}`: {', '.join(searchers)} over seeds {', '.join(map(str, seeds))}",
             "", f"{len(result['inputs'])} inputs; {result['candidates']} candidates x {result['samples']} samples per "
             f"iteration, reference set {result['reference_size']}. Report seed {result['report_seed']}, n = "
             f"{result['n']}, every model on the same noise and labels; FD ± one bootstrap standard error, searchers "
             f"mean ± std over seeds. Wall time {result['seconds'] / 60:.1f} min.", ""]
    for sname, spec in result["solvers"].items():
        rows, summ = result["rows"][sname], result["summary"][sname]
        lines += [f"## {sname}: {spec['method']} {spec['steps']} steps", "",
                  "| model | FD held-out | FD reward features | recall | coverage |", "|---|---|---|---|---|"]
        for name, r in rows.items():
            if "/seed" in name:
                continue
            lines.append(f"| {name} | {with_error(r.get('fd_eval'), r.get('fd_eval_err'), '{:.4f}')} | "
                         f"{with_error(r.get('fd_reward'), r.get('fd_reward_err'))} | {r.get('recall', float('nan')):.3f} | "
                         f"{r.get('coverage') or float('nan'):.3f} |")
        for s in searchers:
            a = summ.get(s, {})
            lines.append(f"| **{s}** | {mean_std(a.get('fd_eval'))} | {mean_std(a.get('fd_reward'), '{:.3f}')} | "
                         f"{mean_std(a.get('recall'), '{:.3f}')} | {mean_std(a.get('coverage'), '{:.3f}')} |")
        lines += ["", "| searcher | " + " | ".join(f"beats {b}?" for b in next(iter(result['verdicts'][sname].values()), {}))
                  + " |", "|---|" + "---|" * len(next(iter(result['verdicts'][sname].values()), {}))]
        for s, v in result["verdicts"][sname].items():
            lines.append(f"| {s} | " + " | ".join(f"{'yes' if x['beats'] else 'no'} ({x['margin']:+.4f} ± {x['err']:.4f})"
                                                  for x in v.values()) + " |")
        lines.append("")
    lines += [f"## Budget curve (validation seed {val['seed']}, n = {val['n']}, {val['sampler']})", "",
              "| searcher | " + " | ".join(f"{p} it ({r['images']} images)" for p, r in
                                         zip(result["points"], result["curves"][f"{searchers[0]}/seed{seeds[0]}"]))
              + " |", "|---|" + "---|" * len(result["points"])]
    for s in searchers:
        _, mean, std = curve_stats(result["curves"], s, seeds, "fd_reward")
        lines.append(f"| {s} | " + " | ".join(f"{m:.3f} ± {d:.3f}" for m, d in zip(mean, std)) + " |")
    lines += ["", "FD on the reward's features (the searched objective's network) of each searcher's answer; the "
              "baselines on the same evaluation: " + ", ".join(f"{k} {v['fd_reward']:.3f}" for k, v in
                                                              result["validation_baselines"].items()
                                                              if v.get("fd_reward") is not None and not k.startswith("one@")),
              "", "![budget curve](merge_study.png)", ""]
    plot_curves(result, root / "merge_study.png")
    return atomic_write_bytes(root / "merge_study.md", "\n".join(lines).encode())


def plot_curves(result: dict, path: Path) -> Path:
    """FD (reward features and held-out, validation seed) against generated images, mean ± std over seeds, with the
    baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    base = result["validation_baselines"]
    for ax, key, label in zip(axes[0], ("fd_reward", "fd_eval"), ("FD, reward features", "FD, held-out features")):
        for i, s in enumerate(result["searchers"]):
            x, mean, std = curve_stats(result["curves"], s, result["seeds"], key)
            ax.errorbar(x, mean, yerr=std, marker="o", color=f"C{i}", label=s, capsize=3)
        for j, name in enumerate(b for b in ("last", "uniform", result.get("best_ema"), "greedy_soup") if b):
            if base.get(name, {}).get(key) is not None:
                ax.axhline(base[name][key], color=f"C{j + 5}", linestyle="--", label=name)
        ax.set_xlabel("generated images (search)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"validation seed {result['validation']['seed']}, n = {result['validation']['n']}")
    return save_figure(fig, path)
