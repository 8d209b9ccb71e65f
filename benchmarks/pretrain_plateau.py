"""Where the base's pretraining plateaus: converged-solver FD against the number of pretraining steps.

A fine-tune of an under-trained base can look good by doing no more than training longer, so the base a study
fine-tunes should sit where more pretraining no longer lowers FD beyond its error. This check reads one long
`distreward train-base` run (its power-EMA snapshots) and, at each `--steps` point:

1. reconstructs the post-hoc EMA at every `--stds` length from the snapshots up to that step, and chooses the length
   by FD on the reward's features on the validation seed (`--val-n` samples; the held-out network chooses nothing);
2. evaluates the chosen model on the report seed (`--n` samples, converged Heun `--heun` steps, class-balanced,
   the same noise and labels for every model), with bootstrap errors, FD against Fashion-MNIST train (both feature
   networks) and test, recall, and the paired difference (same rows resampled) to the previous point.

Results are kept in `--out` (a folder) after each evaluation, so a killed run resumes without redoing finished
models; a longer training run only adds its new points.

    .venv/bin/distreward train-base --config fmnist_base --threads 1 --run-dir runs/plateau \\
        train.total_kimg=2048 ema.snapshot_kimg=51.2
    .venv/bin/python benchmarks/pretrain_plateau.py --run runs/plateau --steps 2000 4000 8000 16000 --threads 1
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np

from distreward.utils.threads import set_threads


def model_at(snapshots, std: float, step: int):
    """The post-hoc EMA of length `std` at training step `step`, as an eval-mode network."""
    from distreward.models import build_network
    from distreward.train.phema import reconstruct
    sd, info = reconstruct(snapshots, std, step)
    net = build_network(info["arch"], info["kwargs"])
    net.load_state_dict(sd, strict=True)
    return net.eval()


def features_of(net, evaluator, n: int, seed: int, heun: int, path: Path) -> list[np.ndarray]:
    """The evaluator's features of `net`'s n class-balanced samples on `seed` (Heun), cached in `path` (.npz)."""
    if path.exists():
        z = np.load(path)
        return [z[f"f{i}"] for i in range(len(z.files))]
    from distreward.evaluation.generator import EvalPlan, score_generator
    from distreward.sampling.generate import SamplerSpec
    from distreward.utils.io import atomic_write_bytes
    plan = EvalPlan(n=n, seed=seed, sampler=SamplerSpec(kind="ode", method="heun", steps=heun), noise="seed")
    _, _, feats = score_generator(net, evaluator, plan, keep_features=True)
    buf = io.BytesIO()
    np.savez(buf, **{f"f{i}": f for i, f in enumerate(feats)})
    atomic_write_bytes(path, buf.getvalue())
    return feats


def row_of(feats, evaluators: dict, resamples: int, seed: int) -> dict:
    """FD with a bootstrap error for each feature network against each split's real statistics, and recall."""
    from distreward.metrics.evidence import fd_bootstrap
    from distreward.metrics.prdc import precision_recall
    row = {}
    for split, ev in evaluators.items():
        for name, f, st, half in zip(("reward", "eval"), feats, ev.real_stats, ev.real_sigma_half):
            fd, err = fd_bootstrap(f, st, resamples, seed, sigma_half=half)
            row[f"fd_{name}_{split}"], row[f"fd_{name}_{split}_err"] = fd, err
    real = evaluators["train"].network(evaluators["train"].labels[0])[2]
    if real is not None:
        row["recall"] = float(precision_recall(real, feats[0])["recall"])
    return row


def paired(feats_a, feats_b, evaluator, resamples: int, seed: int) -> dict:
    """FD(a) - FD(b) with its paired bootstrap error, per feature network (train split)."""
    from distreward.metrics.evidence import paired_difference
    out = {}
    for name, fa, fb, st, half in zip(("reward", "eval"), feats_a, feats_b, evaluator.real_stats,
                                      evaluator.real_sigma_half):
        out[f"d_fd_{name}"], out[f"d_fd_{name}_err"] = paired_difference(fa, fb, st, resamples, seed, sigma_half=half)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a train-base run directory (its snapshots/)")
    p.add_argument("--steps", type=int, nargs="+", required=True, help="training steps to evaluate")
    p.add_argument("--stds", type=float, nargs="+", default=[0.05, 0.075, 0.10, 0.15], help="post-hoc EMA lengths")
    p.add_argument("--base", default="weights/fmnist-base.safetensors", help="a reference model row ('' for none)")
    p.add_argument("--val-n", type=int, default=500)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--heun", type=int, default=16, help="converged solver: Heun steps (31 network calls)")
    p.add_argument("--validation-seed", type=int, default=777)
    p.add_argument("--report-seed", type=int, default=4321)
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--out", default=None, help="results folder (default: RUN/plateau)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    set_threads(args.threads)

    from distreward.evaluation.evaluator import Evaluator
    from distreward.models import load_generator
    from distreward.train.phema import list_snapshots
    from distreward.utils.io import atomic_save_json
    out = Path(args.out or Path(args.run) / "plateau")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"validation": {}, "report": {}}
    snaps = list_snapshots(args.run)
    last = max(s.step for s in snaps)
    steps = [s for s in args.steps if s <= last]
    if len(steps) < len(args.steps):
        print(f"skipping steps past the last snapshot (step {last}): {sorted(set(args.steps) - set(steps))}")
    evaluators = {"train": Evaluator.for_fmnist(per_class=False), "test": Evaluator.for_fmnist(split="test", per_class=False)}
    ev = evaluators["train"]

    def save():
        atomic_save_json(results_path, results, indent=1)

    t0 = time.perf_counter()
    report_feats = {}
    if args.base:
        report_feats["base"] = features_of(load_generator(args.base).eval(), ev, args.n, args.report_seed, args.heun,
                                           out / f"report-base-n{args.n}.npz")
        results["report"]["base"] = {"std": None, **row_of(report_feats["base"], evaluators, args.resamples,
                                                             args.report_seed)}
        save()
    prev = None
    for step in steps:
        val = results["validation"].setdefault(str(step), {})
        for std in args.stds:
            if str(std) not in val:
                f = features_of(model_at(snaps, std, step), ev, args.val_n, args.validation_seed, args.heun,
                                out / f"val-{step}-{std}-n{args.val_n}.npz")
                val[str(std)] = row_of(f, {"train": ev}, args.resamples, args.validation_seed)
                save()
                print(f"validation step {step} std {std}: FD reward {val[str(std)]['fd_reward_train']:.3f} "
                      f"held-out {val[str(std)]['fd_eval_train']:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        std = min(args.stds, key=lambda s: val[str(s)]["fd_reward_train"])
        key = str(step)
        report_feats[key] = features_of(model_at(snaps, std, step), ev, args.n, args.report_seed, args.heun,
                                        out / f"report-{step}-{std}-n{args.n}.npz")
        row = {"std": std, **row_of(report_feats[key], evaluators, args.resamples, args.report_seed)}
        if prev is not None:
            row["vs_previous"] = {"step": int(prev), **paired(report_feats[key], report_feats[prev], ev,
                                                              args.resamples, args.report_seed)}
        if "base" in report_feats:
            row["vs_base"] = paired(report_feats[key], report_feats["base"], ev, args.resamples, args.report_seed)
        results["report"][key] = row
        save()
        prev = key
        print(f"report step {step} (std {std}): FD reward {row['fd_reward_train']:.3f} ± {row['fd_reward_train_err']:.3f}"
              f", held-out {row['fd_eval_train']:.4f} ± {row['fd_eval_train_err']:.4f}, recall {row.get('recall', float('nan')):.3f}"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\nreport seed {args.report_seed}, n = {args.n}, Heun {args.heun}; {args.threads} thread(s)")
    print(f"{'model':>8} {'std':>6} {'FD reward':>15} {'FD held-out':>17} {'held-out test':>17} {'recall':>7} "
          f"{'d reward vs prev':>18} {'d held-out vs prev':>22}")
    for k, r in results["report"].items():
        vp = r.get("vs_previous")
        dr = f"{vp['d_fd_reward']:+.3f} ± {vp['d_fd_reward_err']:.3f}" if vp else "-"
        d = f"{vp['d_fd_eval']:+.4f} ± {vp['d_fd_eval_err']:.4f}" if vp else "-"
        print(f"{k:>8} {str(r['std']):>6} {r['fd_reward_train']:>7.3f} ± {r['fd_reward_train_err']:.3f} "
              f"{r['fd_eval_train']:>8.4f} ± {r['fd_eval_train_err']:.4f} {r['fd_eval_test']:>8.4f} ± "
              f"{r['fd_eval_test_err']:.4f} {r.get('recall', float('nan')):>7.3f} {dr:>18} {d:>22}")
    steps_done = [k for k in results["report"] if k != "base" and "vs_previous" in results["report"][k]]
    flat = [k for k in steps_done if not still_improving(results["report"][k]["vs_previous"])]
    if flat:
        ship = results["report"][flat[0]]["vs_previous"]["step"]
        print(f"plateau: step {flat[0]} lowers neither FD beyond two paired standard errors of step {ship}: "
              f"ship step {ship}")
    elif steps_done:
        print(f"no plateau yet: step {steps_done[-1]} still lowers FD beyond two paired standard errors")


def still_improving(d: dict, z: float = 2.0) -> bool:
    """Whether a point lowers FD on either feature network beyond z paired standard errors of the previous one."""
    return any(d[f"d_fd_{n}"] + z * d[f"d_fd_{n}_err"] < 0 for n in ("reward", "eval"))


if __name__ == "__main__":
    main()
