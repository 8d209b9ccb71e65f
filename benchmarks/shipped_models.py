"""The README's results table for shipped generators: each model at the served, the converged and the training-free
solver, beside the base and the base with classifier-free guidance, on the report seed with the evidence protocol.

Every model is sampled from the same noise and labels (class-balanced, the report seed), so each row's change against
the base comes with its paired bootstrap standard error. FD is against Fashion-MNIST train on both feature networks
(reward / held out; each change with its paired error) and, for the held-out network, against Fashion-MNIST test
(its value and unpaired error only). The settings are the config's (its
`eval` section: the served sampler; `evidence`: seeds, n, the converged step count, the guidance scale of
`guidance.scale`). Evaluations go through the user's evaluation cache, so the rows a `distreward study` with the same
settings has computed are read, not recomputed.

    .venv/bin/python benchmarks/shipped_models.py --threads 2 --config fmnist_pathwise \\
        --models finetuned=weights/fmnist-finetuned.safetensors evidence.n=2000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distreward.utils.threads import set_threads

SOLVER_NAMES = {"served": "served", "converged": "converged", "training_free": "training-free"}


def parse_models(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--models takes NAME=PATH pairs, got {item!r} (e.g. finetuned=weights/fmnist-finetuned.safetensors)")
        out[name] = path
    return out


def cell(row: dict, base: dict | None, key: str) -> str:
    from distreward.evaluation.protocol import relative_gain
    from distreward.report import change_with_error, with_error
    text = with_error(row.get(key), row.get(f"{key}_err"), "{:.4g}")
    if base is not None and row is not base and f"{key}_boot" in row:     # paired rows only
        text += f" ({change_with_error(relative_gain(row, base, key))})"
    return text


def table(result: dict) -> str:
    lines = ["| model | solver (NFE) | FD reward features | FD held-out | held-out vs test | recall |",
             "|---|---|---|---|---|---|"]
    for sname, rows in result["rows"].items():
        base = rows.get("base")
        for mname, row in rows.items():
            lines.append(f"| {mname} | {SOLVER_NAMES[sname]}: {row['method']} {row['steps']} ({row['nfe']}) | "
                         f"{cell(row, base, 'fd_reward')} | {cell(row, base, 'fd_eval')} | "
                         f"{cell(row, base, 'fd_eval_test')} | {row.get('recall', float('nan')):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="fmnist_pathwise", help="preset whose eval / evidence / guidance settings apply")
    ap.add_argument("--models", nargs="+", default=[], metavar="NAME=PATH", help="the generators besides the base")
    ap.add_argument("--no-guided", action="store_true", help="leave out the guided base's rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/shipped_models.json")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config (e.g. evidence.n=2000)")
    args = ap.parse_args()
    set_threads(args.threads)

    from distreward.build import eval_plan, load_base
    from distreward.config import load_config
    from distreward.evaluation.cache import eval_cache_for
    from distreward.evaluation.evaluator import Evaluator
    from distreward.evaluation.protocol import Protocol, evaluate_models, find_converged_steps
    from distreward.models import load_generator
    from distreward.rl.settings import resolve
    from distreward.study import guided_solvers
    from distreward.utils.io import atomic_save_json

    t0 = time.perf_counter()
    cfg = resolve(load_config(args.config, list(args.overrides)))
    evaluator = Evaluator.for_fmnist(device=cfg.device)
    cache = eval_cache_for("auto", evaluator)
    plan = eval_plan(cfg, noise="seed")
    proto = Protocol.of(cfg.get("evidence") or {}, plan.sampler, plan.n)
    base = load_base(cfg.model, cfg.device)
    search = find_converged_steps(base, evaluator, plan, proto, device=cfg.device, cache=cache)
    solvers = proto.solvers(search["steps"])
    report = proto.report_plan(plan, evaluator)
    figures = proto.test_figures(evaluator, cfg.device)
    files = parse_models(args.models)
    models = {"base": base, **{k: load_generator(p).eval() for k, p in files.items()}}
    print(f"{len(models)} models x {len(solvers)} solvers, report seed {proto.report_seed}, n = {proto.n}, "
          f"{args.threads} thread(s)", flush=True)
    rows = evaluate_models(models, evaluator, report, solvers, device=cfg.device, cache=cache, figures=figures,
                           on_model=lambda s, m, r: print(f"  {m} {s}: FD {r['fd_reward']:.4g} / {r['fd_eval']:.4g}",
                                                          flush=True))
    if not args.no_guided:
        for k, r in evaluate_models({f"base, guidance {float(cfg.guidance.scale):g}": base}, evaluator, report,
                                    guided_solvers(cfg, solvers), device=cfg.device, cache=cache,
                                    figures=figures).items():
            rows[k].update(r)
    result = {"config": cfg.name, "models": files, "n": proto.n, "report_seed": proto.report_seed,
              "converged_steps": search["steps"], "threads": args.threads,
              "rows": {s: {m: {k: v for k, v in r.items() if not k.endswith("_boot")} for m, r in rs.items()}
                       for s, rs in rows.items()},
              "seconds": round(time.perf_counter() - t0, 1)}
    print(table({"rows": rows}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(args.out, result)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
