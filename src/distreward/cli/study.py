"""`distreward study --config PRESET --seeds 0 1 2 --controls [--references]`: a config against its controls (and the
guided references) over several seeds (thin over distreward.study.run_study)."""

from __future__ import annotations

import argparse

from ..config import load_config
from ..study import ARMS, default_arms, default_run_dir, run_study
from ..report import mean_std
from ..schema import validate
from ..runreport import write_run_report
from . import new_output


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="fmnist_grpo", help="the fine-tuning preset or YAML file (default: fmnist_grpo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--controls", action="store_true",
                   help="add the controls: the permuted-reward null, the distillation control and continued "
                        "flow-matching training (pretrain, at the trainer's wall time)")
    p.add_argument("--sample", action="store_true", help="add the sample-wise reward (classifier log-prob) arm")
    p.add_argument("--references", action="store_true",
                   help="add the guided references: the base sampled with guidance (guided) and the network "
                        "regressed onto it (guidance-distill, at the trainer's wall time); scale: guidance.scale")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=None,
                   help="the arms explicitly (default: the config's trainer rl.algorithm, plus the controls / "
                        "sample arm / references when asked)")
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/study_<config name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="train every arm afresh (default: resume or reuse runs of the same settings)")
    p.add_argument("--no-eval-cache", action="store_true", help="evaluate every model afresh, without the cache")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every arm, e.g. rl.iterations=10 evidence.n=500")


def run(args) -> int:
    cfg = validate("finetune", load_config(args.config, args.overrides))     # a bad key named before any work
    arms = args.arms or default_arms(cfg, controls=args.controls,
                                     sample=args.sample, references=args.references)
    out = args.run_dir and new_output(args.run_dir)
    result = run_study(args.config, args.overrides, seeds=args.seeds, arms=arms, run_dir=out,
                       overwrite=args.overwrite, progress=not args.no_progress,
                       eval_cache=None if args.no_eval_cache else "auto")
    print(f"study: report {write_run_report(out or default_run_dir(cfg))}")
    for sname in ("served", "converged"):
        s, rows = result["solvers"][sname], result["rows"][sname]
        where = f"{sname} {s['method']} {s['steps']}"
        print(f"  {where} base: fd_eval {rows['base']['fd_eval']:.4f}")
        if "guided" in rows:
            print(f"  {where} guided: fd_eval {rows['guided']['fd_eval']:.4f} (the base with guidance)")
        for arm, figs in result["summary"][sname].items():
            e = figs.get("fd_eval")
            if e:
                print(f"  {where} {arm}: fd_eval {mean_std(e)} over {len(e['seeds'])} seeds")
    return 0
