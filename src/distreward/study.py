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
converged solver (and the base with the training-free solver at the served NFE), also against Fashion-MNIST test
when the evaluator is the Fashion-MNIST one (evidence.test_split); every row but the base's carries its paired
change vs the base (`paired_gains`), and the config's trainer is checked against the target at the converged
solver (`target_check`). study.json holds all of it; studyreport.py writes study.md (the tables: mean ± std over
seeds, per-seed rows; the Target section) and study.png (the picture).

    from distreward.study import run_study
    run_study("fmnist_grpo", seeds=[0, 1, 2], arms=["grpo", "nft", "null", "distill", "pretrain", "guided"])
"""

from __future__ import annotations

import copy
import json
import operator
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from omegaconf import OmegaConf

from .build import eval_plan, load_base
from .config import load_config
from .evaluation import Evaluator, eval_cache_for
from .evaluation.protocol import Protocol, evaluate_models, find_converged_steps, relative_gain
from .models import load_generator
from .report import change_with_error, seed_summary
from .rl import distill, finetune, guidance_distill, pretrain
from .rl.settings import resolve, with_sample_reward
from .studyreport import write_study_report
from .utils.io import atomic_save_json
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
FIGURES = ("fd_eval", "fd_reward", "recall", "coverage", "fd_eval_class_worst", "fd_eval_test", "fd_reward_test")
GAIN_KEYS = ("fd_eval", "fd_reward")     # the FDs whose change vs the base carries a paired standard error
# The target of a fine-tuned model (docs/rl.md "Studies and controls"), at the converged solver without guidance:
TARGET_SOLVER = "converged"
TARGET_GAIN = -0.15     # held-out FD change vs the base, mean over the training seeds: at most -15%
TARGET_N = 2000         # samples of each report-seed evaluation: at least 2,000
TARGET_SEEDS = 3        # training seeds of the config's trainer: at least 3
TARGET_CONTROLS = ("null", "distill", "pretrain")   # every seed below every seed of each of these arms


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


def separations(summary: dict, arm: str, arms: Sequence[str]) -> dict:
    """{control: `separation` of `arm` from it} for every control among `arms` (empty without `arm`)."""
    return {c: separation(summary, arm, c) for c in CONTROLS if c in arms and c != arm} if arm in arms else {}


def paired_gains(rows: dict, base: str = "base") -> dict:
    """{model: {"fd_eval": [g, se], "fd_reward": [g, se], "fd_eval_test": g}} of one solver's rows: each model's
    relative change of FD vs the base on the same noise and labels with its paired standard error
    (`relative_gain`; None where a value or error is missing); the test split's change without an error (its FDs
    carry no replicates)."""
    ref = rows.get(base)
    if ref is None:
        return {}
    out = {}
    for m, r in rows.items():
        if m != base:
            g = {k: relative_gain(r, ref, k) for k in (*GAIN_KEYS, "fd_eval_test")}
            out[m] = {**{k: None if g[k] is None else list(g[k]) for k in GAIN_KEYS},
                      "fd_eval_test": None if g["fd_eval_test"] is None else g["fd_eval_test"][0]}
    return out


def criterion(name: str, met: bool | None, detail: str) -> dict:
    """One line of the target: met is None when what it needs was not measured."""
    return {"criterion": name, "met": met, "detail": detail}


def compared(name: str, entry: dict | None, ref: dict | None, key: str, ref_name: str, holds: Callable) -> dict:
    """The criterion `holds(mean over seeds, reference row's value)` of figure `key`."""
    mine, theirs = (entry or {}).get("mean"), (ref or {}).get(key)
    if mine is None or theirs is None:
        return criterion(name, None, f"no {key} in the {'arm' if mine is None else ref_name + ' row'}")
    return criterion(name, bool(holds(mine, theirs)), f"mean {mine:.4g} vs {ref_name} {theirs:.4g}")


def gain_criteria(gains: list) -> list[dict]:
    """The target's paired-gain lines from the seeds' [g, se] of held-out FD (None: a seed without one)."""
    mean_name = f"held-out FD {-TARGET_GAIN:.0%} or more below the base's (paired; mean over seeds)"
    se_name = "every seed's held-out change beyond two paired standard errors (g + 2 se < 0)"
    if not gains:
        return [criterion(mean_name, None, "no seed of the arm"), criterion(se_name, None, "no seed of the arm")]
    shown = ", ".join(change_with_error(p) for p in gains)
    if any(p is None for p in gains):
        missing = "a seed without a paired change: " + shown
        return [criterion(mean_name, None, missing), criterion(se_name, None, missing)]
    mean = float(np.mean([g for g, _ in gains]))
    return [criterion(mean_name, mean <= TARGET_GAIN, f"mean {mean:+.1%}; seeds {shown}"),
            criterion(se_name, all(g + 2 * se < 0 for g, se in gains),
                      "g + 2 se: " + ", ".join(f"{g + 2 * se:+.1%}" for g, se in gains))]


def target_check(rows: dict, summary: dict, arm: str, seeds: Sequence[int], n: int) -> dict:
    """The target of `arm` (the config's trainer) from one solver's rows (with their `gain`s) and summary: one
    criterion per line, each met (True), missed (False) or not measured (None: its arm or row is missing); met
    overall only when every line is. `beyond`: the aim past the paper's claim (the guided base's held-out FD without
    guidance), reported beside the target, not part of it."""
    trained = [rows[f"{arm}/seed{s}"] for s in seeds if f"{arm}/seed{s}" in rows]
    mine = summary.get(arm, {})
    lines = [*gain_criteria([(r.get("gain") or {}).get("fd_eval") for r in trained]),
             criterion(f"at least {TARGET_SEEDS} training seeds", len(trained) >= TARGET_SEEDS if trained else None,
                       f"{len(trained)} seed(s)")]
    for control in TARGET_CONTROLS:
        sep = separation(summary, arm, control)
        detail = (f"no {control} arm" if sep is None else
                  f"{arm} worst {max(mine['fd_eval']['seeds']):.4g}, {control} best "
                  f"{min(summary[control]['fd_eval']['seeds']):.4g}")
        lines.append(criterion(f"every seed below every {control} seed (held-out FD)", sep, detail))
    lines += [compared("recall not below the guided base's", mine.get("recall"), rows.get("guided"), "recall",
                       "guided", operator.ge),
              compared("reward-feature FD below the base's", mine.get("fd_reward"), rows.get("base"), "fd_reward",
                       "base", operator.lt),
              compared("held-out FD against Fashion-MNIST test below the base's", mine.get("fd_eval_test"),
                       rows.get("base"), "fd_eval_test", "base", operator.lt),
              criterion(f"n >= {TARGET_N} on the report seed", int(n) >= TARGET_N, f"n = {int(n)}")]
    met = [c["met"] for c in lines]
    beyond = compared("held-out FD at or below the guided base's, with one network call per step to its two",
                      mine.get("fd_eval"), rows.get("guided"), "fd_eval", "guided", operator.le)
    return {"arm": arm, "solver": TARGET_SOLVER, "criteria": lines,
            "met": False if False in met else (True if all(met) else None), "beyond": beyond}


def guided_solvers(cfg, solvers: dict) -> dict:
    """The served and the converged solver with classifier-free guidance at guidance.scale (null label:
    model.num_classes): the guided base's rows."""
    return {k: replace(solvers[k], cfg_scale=float(cfg.guidance.scale), null_label=int(cfg.model.num_classes))
            for k in ("served", "converged")}


def default_run_dir(cfg) -> Path:
    """Where a study of `cfg` writes without --run-dir: runs/study_<config name>."""
    return Path(f"runs/study_{cfg.name}")


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
    root = Path(run_dir or default_run_dir(cfg))
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
        figures = proto.test_figures(evaluator, cfg.device)
        table = evaluate_models(models, evaluator, report, {k: solvers[k] for k in ("served", "converged")},
                                device=cfg.device, progress=progress, cache=cache, figures=figures)
        if "guided" in arms:
            for k, rows in evaluate_models({"guided": base}, evaluator, report, guided_solvers(cfg, solvers),
                                           device=cfg.device,
                                           progress=progress, cache=cache, figures=figures).items():
                table[k].update(rows)
        table["training_free"] = evaluate_models({"base": base}, evaluator, report,
                                                 {"training_free": solvers["training_free"]}, device=cfg.device,
                                                 progress=progress, cache=cache, figures=figures)["training_free"]
        for sname in ("served", "converged"):
            for name, gain in paired_gains(table[sname]).items():
                table[sname][name]["gain"] = gain
        summary = {k: seed_summary(table[k], trained_arms(arms), seeds, FIGURES) for k in ("served", "converged")}
        own = str(cfg.rl.algorithm)
        result = {"config": cfg.name, "algorithm": own, "seeds": list(seeds), "arms": list(arms),
                  "n": proto.n,
                  "report_seed": proto.report_seed, "validation_seed": proto.validation_seed,
                  "converged_search": search, "err": "one bootstrap standard error",
                  "solvers": {k: {"method": s.method, "steps": int(s.steps), "nfe": table[k]["base"]["nfe"]}
                              for k, s in solvers.items()},
                  "rows": table, "budgets": budgets(root, arms, seeds), "summary": summary,
                  "separation": {k: separations(summary[k], own, arms) for k in ("served", "converged")},
                  "target": target_check(table[TARGET_SOLVER], summary[TARGET_SOLVER], own, seeds, proto.n),
                  "seconds": round(time.perf_counter() - t0, 1)}
        atomic_save_json(root / "study.json", result)
        write_study_report(root, result)
    print(f"[study] {root / 'study.md'}")
    return result


def budgets(root: Path, arms: Sequence[str], seeds: Sequence[int]) -> dict:
    """{"<arm>/seed<s>": budget.json} of the wall-time-matched arms."""
    paths = {f"{a}/seed{s}": root / f"seed{s}" / a / "budget.json" for s in seeds for a in arms}
    return {k: json.loads(p.read_text()) for k, p in paths.items() if p.is_file()}
