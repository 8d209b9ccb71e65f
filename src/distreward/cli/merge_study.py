"""`distreward merge-study --config fmnist_merge_ema --searchers ppo cma random --seeds 0 1 2 --points 2 4 8`:
every merge searcher at the same image budget over several seeds, against the merge baselines (thin over
distreward.merge.study.run_merge_study)."""

from __future__ import annotations

import argparse

from ..merge.search import SEARCHERS
from ..merge.study import EVIDENCE_PRESET, run_merge_study
from ..report import mean_std
from . import new_output


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="fmnist_merge_ema", help="the merge preset or YAML file (default: fmnist_merge_ema)")
    p.add_argument("--checkpoints", nargs="+", default=None, metavar="FILE",
                   help="K generator files in training order, instead of the preset's inputs")
    p.add_argument("--searchers", nargs="+", choices=SEARCHERS, default=["ppo", "cma", "random"],
                   help="rl.algorithm values compared (default: ppo cma random)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds (default: 0 1 2)")
    p.add_argument("--points", type=int, nargs="+", default=[2, 4, 8],
                   help="budget points in search iterations (default: 2 4 8; the last is the run's length)")
    p.add_argument("--size", choices=("demo", "preset"), default="demo",
                   help="demo: the preset's demo block (the demo's merge size, default); preset: the preset as it is")
    p.add_argument("--evidence", default=EVIDENCE_PRESET,
                   help=f"fine-tuning preset whose evidence section sets the report (default: {EVIDENCE_PRESET})")
    p.add_argument("--solvers", nargs="+", choices=("converged", "served"), default=["converged"],
                   help="report solvers (default: converged)")
    p.add_argument("--report-n", type=int, default=None, help="samples per reported evaluation (default: evidence.n)")
    p.add_argument("--converged-steps", type=int, default=None,
                   help="Heun steps of the converged solver (default: evidence.converged_steps, else searched on the "
                        "last input)")
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/merge_study_<config name>)")
    p.add_argument("--no-eval-cache", action="store_true", help="evaluate every model afresh, without the cache")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="merge config overrides for every run, e.g. rl.candidates=8 eval.n=500")


def run(args) -> int:
    out = args.run_dir and new_output(args.run_dir)
    result = run_merge_study(args.config, args.overrides, checkpoints=args.checkpoints, searchers=args.searchers,
                             seeds=args.seeds, points=args.points, size=args.size, run_dir=out,
                             evidence=args.evidence, solvers=args.solvers, report_n=args.report_n,
                             converged_steps=args.converged_steps, progress=not args.no_progress,
                             eval_cache=None if args.no_eval_cache else "auto")
    print(f"merge-study: {', '.join(result['rows'])} solver(s); figures held-out FD (fd_eval)")
    for sname, rows in result["rows"].items():
        print(f"  {sname}: " + ", ".join(f"{k} {v['fd_eval']:.4f}" for k, v in rows.items() if "/seed" not in k))
        for s, figs in result["summary"][sname].items():
            e = figs.get("fd_eval")
            if e:
                print(f"  {sname} {s}: fd_eval {mean_std(e)} over {len(e['seeds'])} seeds")
    return 0
