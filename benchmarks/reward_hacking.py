"""Where a sample-wise reward loses diversity and the distribution-wise one does not (docs/rl.md "Reward hacking").

Trains the same preset twice with the same trainer, seed and budget, once with the sample-wise reward (the
fmnist-reward classifier's log-probability of the intended class, `reward.name=classifier`) and once with the
distribution-wise subset-replace FD reward, evaluating the EMA model every `--every` iterations (served sampler,
validation seed, `--n` samples: held-out FD, recall, coverage, density, precision). Then writes `hacking.json` and
`hacking.png`: each run's own reward over training (the classifier's mean log p of the rollouts; for the
distribution-wise run the FD of its reference set, i.e. of the policy's recent samples, on the reward's features)
against recall and coverage, and held-out FD over the iterations. Runs resume (`finetune --resume`).

    .venv/bin/python benchmarks/reward_hacking.py --out runs/hacking --iterations 40 --threads 1 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distreward.utils.threads import set_threads

RUNS = {"sample-wise (classifier log p)": {"reward": {"name": "classifier", "features": "fmnist-reward"}},
        "distribution-wise (subset-replace FD)": {}}


def train(name: str, extra: dict, args) -> dict:
    from omegaconf import OmegaConf

    from distreward.config import load_config
    from distreward.rl import finetune

    cfg = load_config(args.config, list(args.overrides) + [f"rl.iterations={args.iterations}", f"rl.lr={args.lr}",
                                                           f"eval.every={args.every}", f"eval.n={args.n}",
                                                           f"checkpoint.every={args.every}"])
    cfg = OmegaConf.merge(cfg, OmegaConf.create(extra))
    if "reward" in extra:
        cfg.reward = {**extra["reward"], "reference_size": int(cfg.reward.get("reference_size", 1000))}
    run = Path(args.out) / ("sample" if "reward" in extra else "distribution")
    started = (run / "checkpoints" / "last.pt").is_file()
    res = finetune(cfg, run, resume=started, overwrite=not started, progress=not args.no_progress)
    own = [h["r_mean"] for h in res["history"]] if "reward" in extra else [-h["fd_ref"] for h in res["history"]]
    evals = [{k: e.get(k) for k in ("iteration", "fd_eval", "fd_reward", "recall", "coverage", "density", "precision")}
             for e in res["evals"]]
    return {"name": name, "own_reward": own, "own_reward_name": "mean log p (rollouts)" if "reward" in extra
            else "-FD of the reference set (reward features)", "evals": evals}


def own_change(run: dict, iteration: int) -> float:
    """The run's own reward at `iteration` (the training batch's, iteration 0: the first batch's) as a change from
    its start, in % of |start|: the two rewards live on different scales."""
    own = run["own_reward"]
    x0, x = own[0], own[max(iteration - 1, 0)]
    return 100.0 * (x - x0) / abs(x0)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in result["runs"]:
        its = [e["iteration"] for e in run["evals"]]
        own = [own_change(run, i) for i in its]
        for ax, key in zip(axes[:2], ("recall", "coverage")):
            ys = [e[key] for e in run["evals"]]
            ax.plot(own, ys, "o-", label=f"{run['name']}: {run['own_reward_name']}")
            for x, y, i in zip(own, ys, its):
                ax.annotate(str(i), (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
            ax.set_xlabel("own reward: change from the start (% of |start|)")
            ax.set_ylabel(f"{key} (held-out features)")
        axes[2].plot(its, [e["fd_eval"] for e in run["evals"]], "o-", label=run["name"])
    axes[0].set_title("own reward vs recall (labels: iteration)")
    axes[1].set_title("own reward vs coverage")
    axes[2].set_title("held-out FD (served sampler)")
    axes[2].set_xlabel("iteration")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="fmnist_grpo")
    p.add_argument("--out", default="runs/hacking")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--only", choices=("sample", "distribution"), default=None, help="train one of the two runs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    set_threads(args.threads)
    runs = [(k, v) for k, v in RUNS.items() if args.only is None or (args.only == "sample") == ("reward" in v)]
    result = {"config": args.config, "iterations": args.iterations, "lr": args.lr, "n": args.n,
              "overrides": list(args.overrides), "runs": [train(k, v, args) for k, v in runs]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"hacking{'_' + args.only if args.only else ''}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{name}.png")
    for run in result["runs"]:
        first, last = run["evals"][0], run["evals"][-1]
        print(f"{run['name']}: own reward {run['own_reward'][0]:.4g} -> {run['own_reward'][-1]:.4g}; "
              + ", ".join(f"{k} {first[k]:.4g} -> {last[k]:.4g}" for k in ("fd_eval", "recall", "coverage", "density")
                          if first.get(k) is not None and last.get(k) is not None))


if __name__ == "__main__":
    main()
