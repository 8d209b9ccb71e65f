"""`distreward study`: a fine-tuning config against its controls over several seeds, reported with the evidence
protocol (evaluation/protocol.py; docs/rl.md "Studies and controls").

Arms, each trained once per seed (cfg.seed = s) at the config's budget:
  grpo      the config with rl.algorithm=grpo (GRPO on SDE rollouts);
  nft       the config with rl.algorithm=nft (the forward-process trainer on ODE samples, rl/nft.py; independent
            starting noises);
  pool      the config with rl.algorithm=pool (pool rounds, rl/pool.py: reward.reference_size = rl.pool.size);
  pathwise  the config with rl.algorithm=pathwise (the reward's first variation back-propagated through the
            feature network and the sampler's last steps, rl/pathwise.py);
  null      the config's own trainer with the rewards of every iteration permuted across the batch
            (rl.null_control=permute): the real rewards' scale and spread, no information about the samples;
  distill   the distillation control (rl.distill): the served grid's velocities regressed onto the base model's
            converged-solver trajectories, same labels, noise budget, optimizer, lr and EMA;
  sample    the sample-wise reward (reward.name=classifier, the classifier log-prob) with the config's trainer;
  pretrain  the continued-training control (rl.pretrain): the base's flow-matching objective on the training
            images, at the wall time of the config's trainer at the same seed (pretrain.match_wall_time);
  guidance-distill  a reference: the unguided network regressed onto the base's guided velocity (guidance.scale)
            on noised training images, at the same wall time;
  guided    a reference, not trained: the base sampled with classifier-free guidance (guidance.scale).
A wall-time-matched arm first runs PROBE_ITERATIONS iterations, measures its seconds per iteration, sets
rl.iterations to the fine-tune's logged training seconds over that rate (recorded in its budget.json, reused on
every later run) and resumes to it: the probe's iterations are the run's first.
Then the base and every arm's EMA model are evaluated on the report seed with the served sampler and the
converged solver (and the base with the training-free solver at the served NFE); study.json holds every row,
study.md the table (mean ± std over seeds, per-seed rows) and study.png the picture.

    from distreward.study import run_study
    run_study("fmnist_grpo", seeds=[0, 1, 2], arms=["grpo", "nft", "null", "distill", "pretrain", "guided"])
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from omegaconf import OmegaConf

from .build import eval_plan, load_base
from .config import load_config
from .evaluation import Evaluator, eval_cache_for
from .evaluation.protocol import Protocol, evaluate_models, find_converged_steps
from .models import load_generator
from .report import mean_std, save_figure, seed_summary, with_error
from .rl import distill, finetune, guidance_distill, pretrain
from .rl.settings import resolve, with_sample_reward
from .utils.io import atomic_save_json, atomic_write_bytes
from .utils.errors import InputError
from .utils.progress import phase
from .utils.lock import RunLock

ARMS = ("grpo", "nft", "pool", "pathwise", "null", "distill", "sample", "pretrain", "guidance-distill", "guided")
CONTROLS = ("null", "distill", "pretrain")
REFERENCES = ("guided", "guidance-distill")
TRAINERS: dict[str, Callable] = {"distill": distill, "pretrain": pretrain, "guidance-distill": guidance_distill}
WALL_TIME_MATCHED = ("pretrain", "guidance-distill")
UNTRAINED = ("guided",)
PROBE_ITERATIONS = 3        # iterations a wall-time-matched arm runs to measure its rate
FIGURES = ("fd_eval", "fd_reward", "recall", "coverage", "fd_eval_class_worst")


def arm_config(cfg, arm: str, seed: int):
    """The config of one arm and seed (a copy)."""
    c = copy.deepcopy(cfg)
    c.seed = int(seed)
    if arm in ("grpo", "nft", "pool", "pathwise"):
        c.rl.algorithm = arm
        c.rl.shared_noise = bool(c.rl.shared_noise) and arm == "grpo"   # ODE samples need their own noises
    elif arm == "null":
        c.rl.null_control = "permute"
    elif arm == "sample":
        return with_sample_reward(c)
    elif arm not in TRAINERS:
        raise ValueError(f"unknown study arm {arm!r}; choose from {', '.join(ARMS)}")
    return resolve(c)


def default_arms(cfg, *, controls: bool = True, sample: bool = False, references: bool = False) -> list[str]:
    """The config's own trainer (rl.algorithm), then the controls, the sample-wise arm and the guided references
    when asked."""
    return [str(cfg.rl.get("algorithm") or "grpo"), *(CONTROLS if controls else ()), *(("sample",) if sample else ()),
            *(REFERENCES if references else ())]


def trained_arms(arms: Sequence[str]) -> list[str]:
    """The arms trained once per seed (all but the untrained references), the wall-time-matched ones last: they
    need the fine-tune's logged time."""
    trained = [a for a in arms if a not in UNTRAINED]
    return [a for a in trained if a not in WALL_TIME_MATCHED] + [a for a in trained if a in WALL_TIME_MATCHED]


# A run's training seconds: the sum of its iterations' logged time_* entries (evaluations and checkpoints excluded).
def training_seconds(history: Sequence[dict]) -> float:
    return float(sum(v for h in history for k, v in h.items() if k.startswith("time_")))


# Iterations at equal wall time: the reference's training seconds over the probe's seconds per iteration (at least
# the probe's iterations, which the run has already done).
def matched_iterations(reference_seconds: float, probe_history: Sequence[dict]) -> int:
    rate = training_seconds(probe_history) / len(probe_history)
    return max(len(probe_history), round(reference_seconds / rate))


def train_arm(cfg, arm: str, seed: int, folder: Path, *, overwrite: bool, evaluator, progress: bool, base) -> Path:
    """Train one arm (resuming a started or finished run of the same settings); returns its EMA weight file."""
    c = arm_config(cfg, arm, seed)
    trainer: Callable = TRAINERS.get(arm, finetune)
    phase(f"study: {arm} seed {seed} -> {folder}")
    kw = {"net": copy.deepcopy(base), "evaluator": evaluator, "progress": progress}
    if arm in WALL_TIME_MATCHED and bool(c.pretrain.match_wall_time):
        c.rl.iterations = wall_time_budget(c, arm, folder, trainer, overwrite=overwrite, **kw)["iterations"]
        saved = folder / "config.yaml"       # the probe's, until the run has been resumed to the budget
        raised = not saved.is_file() or int(OmegaConf.load(saved).rl.iterations) != int(c.rl.iterations)
        trainer(c, folder, resume=True, allow_changes=["rl.iterations"] if raised else [], **kw)
    else:
        trainer(c, folder, resume=not overwrite, overwrite=overwrite, **kw)
    return folder / "model_ema.safetensors"


def reference_result(c, arm: str, folder: Path) -> Path:
    """The result.json of the fine-tune a wall-time-matched arm (in `folder`) is compared with: the config's trainer
    at the same seed; refused when it has none."""
    reference = folder.parent / str(c.rl.algorithm) / "result.json"
    if not reference.is_file():
        raise InputError(f"{reference}: missing; the {arm} arm runs at the wall time of the {c.rl.algorithm} arm of "
                         f"the same seed: add {c.rl.algorithm} to the arms, or set pretrain.match_wall_time=false "
                         "(rl.iterations as given)")
    return reference


def check_references(cfg, arms: Sequence[str], seeds: Sequence[int], root: Path, overwrite: bool) -> None:
    """Before any work: every wall-time-matched arm without a recorded budget has its fine-tune among the arms or
    already trained."""
    if str(cfg.rl.algorithm) in arms or not bool(cfg.pretrain.match_wall_time):
        return
    for folder in (root / f"seed{s}" / a for s in seeds for a in arms if a in WALL_TIME_MATCHED):
        if overwrite or not (folder / "budget.json").is_file():
            reference_result(cfg, folder.name, folder)


def wall_time_budget(c, arm: str, folder: Path, trainer: Callable, *, overwrite: bool, **kw) -> dict:
    """The iteration count of a wall-time-matched arm (config `c`, one seed): its budget.json when it has one,
    else PROBE_ITERATIONS iterations of the run itself timed against the training seconds logged by the config's
    trainer at the same seed (seed<s>/<rl.algorithm>/result.json), recorded in budget.json."""
    path = folder / "budget.json"
    if path.is_file() and not overwrite:
        return json.loads(path.read_text())
    seconds = training_seconds(json.loads(reference_result(c, arm, folder).read_text())["history"])
    probe = copy.deepcopy(c)
    probe.rl.iterations = PROBE_ITERATIONS
    history = trainer(probe, folder, resume=not overwrite, overwrite=overwrite, **kw)["history"][:PROBE_ITERATIONS]
    budget = {"reference": f"{c.rl.algorithm}/seed{int(c.seed)}", "reference_seconds": seconds,
              "probe_iterations": len(history), "seconds_per_iteration": training_seconds(history) / len(history),
              "iterations": matched_iterations(seconds, history)}
    atomic_save_json(path, budget)
    return budget


def separation(summary: dict, a: str, b: str, key: str = "fd_eval") -> bool | None:
    """Whether every seed of arm a has a lower `key` than every seed of arm b (None when either is missing)."""
    va, vb = (summary.get(x, {}).get(key, {}).get("seeds") for x in (a, b))
    return None if not va or not vb else max(va) < min(vb)


def run_study(config="fmnist_grpo", overrides=(), *, seeds: Sequence[int] = (0, 1, 2),
              arms: Sequence[str] | None = None, run_dir=None, overwrite: bool = False,
              progress: bool = True, evaluator=None, eval_cache="auto") -> dict:
    """Train every arm for every seed, evaluate with the evidence protocol, write study.json / study.md /
    study.png under run_dir (default runs/study_<name>); returns study.json's content. `arms` default: the
    config's own trainer (rl.algorithm) with the controls (null, distill, pretrain)."""
    t0 = time.perf_counter()
    cfg = resolve(load_config(config, list(overrides)))
    arms = default_arms(cfg) if arms is None else list(arms)
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ValueError(f"unknown study arm(s) {bad or arms}; choose from {', '.join(ARMS)}")
    if not seeds:
        raise ValueError("a study needs at least one seed (--seeds 0 1 2)")
    root = Path(run_dir or f"runs/study_{cfg.name}")
    check_references(cfg, arms, seeds, root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    evaluator = evaluator or Evaluator.for_fmnist(device=cfg.device)
    cache = eval_cache_for(eval_cache, evaluator)
    base = load_base(cfg.model, cfg.device)
    with RunLock(root, "study"):
        files = {f"{arm}/seed{s}": train_arm(cfg, arm, s, root / f"seed{s}" / arm, overwrite=overwrite,
                                             evaluator=evaluator, progress=progress, base=base)
                 for s in seeds for arm in trained_arms(arms)}
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
        if "guided" in arms:
            guided = {k: replace(solvers[k], cfg_scale=float(cfg.guidance.scale), null_label=int(cfg.model.num_classes))
                      for k in ("served", "converged")}
            for k, rows in evaluate_models({"guided": base}, evaluator, report, guided, device=cfg.device,
                                           progress=progress, cache=cache).items():
                table[k].update(rows)
        table["training_free"] = evaluate_models({"base": base}, evaluator, report,
                                                 {"training_free": solvers["training_free"]}, device=cfg.device,
                                                 progress=progress, cache=cache)["training_free"]
        result = {"config": cfg.name, "algorithm": str(cfg.rl.algorithm), "seeds": list(seeds), "arms": list(arms),
                  "n": proto.n,
                  "report_seed": proto.report_seed, "validation_seed": proto.validation_seed,
                  "converged_search": search, "err": "one bootstrap standard error",
                  "solvers": {k: {"method": s.method, "steps": int(s.steps), "nfe": table[k]["base"]["nfe"]}
                              for k, s in solvers.items()},
                  "rows": table, "budgets": budgets(root, arms, seeds),
                  "summary": {k: seed_summary(table[k], trained_arms(arms), seeds, FIGURES)
                              for k in ("served", "converged")},
                  "seconds": round(time.perf_counter() - t0, 1)}
        atomic_save_json(root / "study.json", result)
        write_study_report(root, result)
    print(f"[study] {root / 'study.md'}")
    return result


def budgets(root: Path, arms: Sequence[str], seeds: Sequence[int]) -> dict:
    """{"<arm>/seed<s>": budget.json} of the wall-time-matched arms."""
    paths = {f"{a}/seed{s}": root / f"seed{s}" / a / "budget.json" for s in seeds for a in arms}
    return {k: json.loads(p.read_text()) for k, p in paths.items() if p.is_file()}


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
        lines += [f"## {sname}: {s['method']} {s['steps']} steps ({s['nfe']} NFE)", "",
                  "| arm | FD held-out | FD reward features | recall | coverage | worst-class FD (held-out) |",
                  "|---|---|---|---|---|---|",
                  *[single_row(name, result["rows"][sname][name]) for name in ("base", "guided")
                    if name in result["rows"][sname]]]
        summ = result["summary"][sname]
        for arm in trained_arms(arms):
            a = summ.get(arm, {})
            lines.append(f"| {arm} | {mean_std(a.get('fd_eval'))} | {mean_std(a.get('fd_reward'), '{:.3f}')} | "
                         f"{mean_std(a.get('recall'), '{:.3f}')} | {mean_std(a.get('coverage'), '{:.3f}')} | "
                         f"{mean_std(a.get('fd_eval_class_worst'))} |")
        own = result.get("algorithm", "grpo")
        for control in (c for c in CONTROLS if own in arms and c in arms):
            sep = separation(summ, own, control)
            lines += ["", f"Every {own} seed below every {control} seed (held-out FD): {'yes' if sep else 'no'}."]
        lines += ["", "| model | FD held-out | FD reward features | recall |", "|---|---|---|---|"]
        for name, r in result["rows"][sname].items():
            lines.append(f"| {name} | {with_error(r.get('fd_eval'), r.get('fd_eval_err'), '{:.4f}')} | "
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


def single_row(name: str, r: dict) -> str:
    """A table row of one model (the base, the guided base): its figures with their errors, not over seeds."""
    return (f"| {name} | {with_error(r.get('fd_eval'), r.get('fd_eval_err'), '{:.4f}')} | "
            f"{with_error(r.get('fd_reward'), r.get('fd_reward_err'))} | {r.get('recall', float('nan')):.3f} | "
            f"{r.get('coverage') or float('nan'):.3f} | {r.get('fd_eval_class_worst', float('nan')):.4f} |")


def plot_study(result: dict, path: Path) -> Path:
    """Held-out FD of every arm's seeds (dots) and their mean ± std, at the served and the converged solver; the
    base as a line with its ± one-standard-error band, the guided base as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, seeds = trained_arms(result["arms"]), result["seeds"]
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
