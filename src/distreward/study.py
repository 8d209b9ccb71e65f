"""`distreward study`: a fine-tuning config against its controls over several seeds, reported with the evidence
protocol (evaluation/protocol.py; docs/rl.md "Studies and controls").

Arms, each trained once per seed (cfg.seed = s) at the config's budget:
  grpo      the config with rl.algorithm=grpo (GRPO on SDE rollouts);
  nft       the config with rl.algorithm=nft (the forward-process trainer on ODE samples, rl/nft.py; independent
            starting noises);
  null      the config's own trainer with the rewards of every iteration permuted across the batch
            (rl.null_control=permute): the real rewards' scale and spread, no information about the samples;
  distill   the distillation control (rl.distill): the served grid's velocities regressed onto the base model's
            converged-solver trajectories, same labels, noise budget, optimizer, lr and EMA;
  sample    the sample-wise reward (reward.name=classifier, the classifier log-prob) with the config's trainer.
Then the base and every arm's EMA model are evaluated on the report seed with the served sampler and the
converged solver (and the base with the training-free solver at the served NFE); study.json holds every row,
study.md the table (mean ± std over seeds, per-seed rows) and study.png the picture.

    from distreward.study import run_study
    run_study("fmnist_grpo", seeds=[0, 1, 2], arms=["grpo", "nft", "null", "distill"])
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .build import eval_plan, load_base
from .config import load_config
from .evaluation import Evaluator, eval_cache_for
from .evaluation.protocol import Protocol, evaluate_models, find_converged_steps
from .models import load_generator
from .report import mean_std, save_figure, seed_summary, with_error
from .rl import distill, finetune
from .rl.settings import resolve, with_sample_reward
from .utils.io import atomic_save_json, atomic_write_bytes
from .utils.progress import phase
from .utils.lock import RunLock

ARMS = ("grpo", "nft", "null", "distill", "sample")
CONTROLS = ("null", "distill")
FIGURES = ("fd_eval", "fd_reward", "recall", "coverage", "fd_eval_class_worst")


def arm_config(cfg, arm: str, seed: int):
    """The config of one arm and seed (a copy)."""
    c = copy.deepcopy(cfg)
    c.seed = int(seed)
    if arm in ("grpo", "nft"):
        c.rl.algorithm = arm
        c.rl.shared_noise = bool(c.rl.shared_noise) and arm == "grpo"   # ODE samples need their own noises
    elif arm == "null":
        c.rl.null_control = "permute"
    elif arm == "sample":
        return with_sample_reward(c)
    elif arm != "distill":
        raise ValueError(f"unknown study arm {arm!r}; choose from {', '.join(ARMS)}")
    return resolve(c)


def default_arms(cfg, *, controls: bool = True, sample: bool = False) -> list[str]:
    """The config's own trainer (rl.algorithm), then the controls and the sample-wise arm when asked."""
    return [str(cfg.rl.get("algorithm") or "grpo"), *(CONTROLS if controls else ()), *(("sample",) if sample else ())]


def train_arm(cfg, arm: str, seed: int, folder: Path, *, overwrite: bool, evaluator, progress: bool, base) -> Path:
    """Train one arm (resuming a started or finished run of the same settings); returns its EMA weight file."""
    c = arm_config(cfg, arm, seed)
    trainer: Callable = distill if arm == "distill" else finetune
    out = folder / "model_ema.safetensors"
    phase(f"study: {arm} seed {seed} -> {folder}")
    trainer(c, folder, resume=not overwrite, overwrite=overwrite, net=copy.deepcopy(base), evaluator=evaluator,
            progress=progress)
    return out


def separation(summary: dict, a: str, b: str, key: str = "fd_eval") -> bool | None:
    """Whether every seed of arm a has a lower `key` than every seed of arm b (None when either is missing)."""
    va, vb = (summary.get(x, {}).get(key, {}).get("seeds") for x in (a, b))
    return None if not va or not vb else max(va) < min(vb)


def run_study(config="fmnist_grpo", overrides=(), *, seeds: Sequence[int] = (0, 1, 2),
              arms: Sequence[str] | None = None, run_dir=None, overwrite: bool = False,
              progress: bool = True, evaluator=None, eval_cache="auto") -> dict:
    """Train every arm for every seed, evaluate with the evidence protocol, write study.json / study.md /
    study.png under run_dir (default runs/study_<name>); returns study.json's content. `arms` default: the
    config's own trainer (rl.algorithm) with the controls (null, distill)."""
    t0 = time.perf_counter()
    cfg = resolve(load_config(config, list(overrides)))
    arms = default_arms(cfg) if arms is None else list(arms)
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ValueError(f"unknown study arm(s) {bad or arms}; choose from {', '.join(ARMS)}")
    if not seeds:
        raise ValueError("a study needs at least one seed (--seeds 0 1 2)")
    root = Path(run_dir or f"runs/study_{cfg.name}")
    root.mkdir(parents=True, exist_ok=True)
    evaluator = evaluator or Evaluator.for_fmnist(device=cfg.device)
    cache = eval_cache_for(eval_cache, evaluator)
    base = load_base(cfg.model, cfg.device)
    with RunLock(root, "study"):
        files = {f"{arm}/seed{s}": train_arm(cfg, arm, s, root / f"seed{s}" / arm, overwrite=overwrite,
                                             evaluator=evaluator, progress=progress, base=base)
                 for s in seeds for arm in arms}
        plan = eval_plan(cfg, noise="seed")
        proto = Protocol.of(cfg.get("evidence") or {}, plan.sampler, plan.n)
        phase("study: the converged solver's step count (validation seed)")
        search = find_converged_steps(base, evaluator, plan, proto, device=cfg.device, progress=progress, cache=cache)
        solvers = proto.solvers(search["steps"])
        report = proto.report_plan(plan, evaluator)
        models = {"base": base, **{name: load_generator(p).eval() for name, p in files.items()}}
        phase(f"study: evaluating {len(models)} models on the report seed {proto.report_seed} (n = {proto.n})")
        table = evaluate_models(models, evaluator, report, {k: solvers[k] for k in ("served", "converged")},
                                device=cfg.device, progress=progress, cache=cache)
        table["training_free"] = evaluate_models({"base": base}, evaluator, report,
                                                 {"training_free": solvers["training_free"]}, device=cfg.device,
                                                 progress=progress, cache=cache)["training_free"]
        result = {"config": cfg.name, "algorithm": str(cfg.rl.algorithm), "seeds": list(seeds), "arms": list(arms),
                  "n": proto.n,
                  "report_seed": proto.report_seed, "validation_seed": proto.validation_seed,
                  "converged_search": search, "err": "one bootstrap standard error",
                  "solvers": {k: {"method": s.method, "steps": int(s.steps), "nfe": table[k]["base"]["nfe"]}
                              for k, s in solvers.items()},
                  "rows": table, "summary": {k: seed_summary(table[k], arms, seeds, FIGURES) for k in ("served", "converged")},
                  "seconds": round(time.perf_counter() - t0, 1)}
        atomic_save_json(root / "study.json", result)
        write_study_report(root, result)
    print(f"[study] {root / 'study.md'}")
    return result


def write_study_report(root: Path, result: dict) -> Path:
    """study.md (tables) and study.png (held-out FD per arm and seed, at both solvers)."""
    arms, seeds = result["arms"], result["seeds"]
    lines = [f"# Study of `{result['config']}`: {', '.join(arms)} over seeds {', '.join(map(str, seeds))}", "",
             f"Report seed {result['report_seed']}, n = {result['n']} (every model on the same noise and labels); "
             f"converged solver: {result['solvers']['converged']['method']} {result['solvers']['converged']['steps']} "
             f"steps (validation seed {result['validation_seed']}). Mean ± std over seeds; per-seed FD ± one "
             f"bootstrap standard error below. Wall time {result['seconds'] / 60:.1f} min.", ""]
    for sname in ("served", "converged"):
        s = result["solvers"][sname]
        base = result["rows"][sname]["base"]
        lines += [f"## {sname}: {s['method']} {s['steps']} steps ({s['nfe']} NFE)", "",
                  "| arm | FD held-out | FD reward features | recall | coverage | worst-class FD (held-out) |",
                  "|---|---|---|---|---|---|",
                  f"| base | {with_error(base.get('fd_eval'), base.get('fd_eval_err'), '{:.4f}')} | "
                  f"{with_error(base.get('fd_reward'), base.get('fd_reward_err'))} | {base.get('recall', float('nan')):.3f} | "
                  f"{base.get('coverage') or float('nan'):.3f} | {base.get('fd_eval_class_worst', float('nan')):.4f} |"]
        summ = result["summary"][sname]
        for arm in arms:
            a = summ.get(arm, {})
            lines.append(f"| {arm} | {mean_std(a.get('fd_eval'))} | {mean_std(a.get('fd_reward'), '{:.3f}')} | "
                         f"{mean_std(a.get('recall'), '{:.3f}')} | {mean_std(a.get('coverage'), '{:.3f}')} | "
                         f"{mean_std(a.get('fd_eval_class_worst'))} |")
        for trainer in ("grpo", "nft"):
            if trainer in arms and "null" in arms and trainer == result.get("algorithm", "grpo"):
                sep = separation(summ, trainer, "null")
                lines += ["", f"Every {trainer} seed below every null seed (held-out FD): {'yes' if sep else 'no'}."]
        lines += ["", "| model | FD held-out | FD reward features | recall |", "|---|---|---|---|"]
        for name, r in result["rows"][sname].items():
            lines.append(f"| {name} | {with_error(r.get('fd_eval'), r.get('fd_eval_err'), '{:.4f}')} | "
                         f"{with_error(r.get('fd_reward'), r.get('fd_reward_err'))} | {r.get('recall', float('nan')):.3f} |")
        lines.append("")
    tf = result["rows"]["training_free"]["base"]
    lines += [f"Training-free control: the base with {result['solvers']['training_free']['method']} "
              f"{result['solvers']['training_free']['steps']} steps ({tf['nfe']} NFE): FD held-out "
              f"{with_error(tf.get('fd_eval'), tf.get('fd_eval_err'), '{:.4f}')}, reward features "
              f"{with_error(tf.get('fd_reward'), tf.get('fd_reward_err'))}.", "", "![study](study.png)", ""]
    plot_study(result, root / "study.png")
    return atomic_write_bytes(root / "study.md", "\n".join(lines).encode())


def plot_study(result: dict, path: Path) -> Path:
    """Held-out FD of every arm's seeds (dots) and their mean ± std, at the served and the converged solver; the
    base as a line with its ± one-standard-error band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, seeds = result["arms"], result["seeds"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for ax, sname in zip(axes[0], ("served", "converged")):
        rows = result["rows"][sname]
        base = rows["base"]
        ax.axhline(base["fd_eval"], color="gray", linestyle="--", label="base")
        if base.get("fd_eval_err"):
            ax.axhspan(base["fd_eval"] - base["fd_eval_err"], base["fd_eval"] + base["fd_eval_err"], color="gray", alpha=0.15)
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
