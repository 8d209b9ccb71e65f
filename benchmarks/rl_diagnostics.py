"""Two checks behind docs/rl.md's "seeds decide" finding, on the shipped Fashion-MNIST base model.

agreement: do the subset-replace rewards on the reward's feature network and on the held-out one rank the same
    samples the same way? Draws `--groups` groups of `--group-size` SDE samples (one starting noise per group, the
    trainer's rollout sampler), a reference set of `--reference` independent base samples, and prints the Pearson
    correlation of the two networks' per-sample rewards, raw and centred within groups (what GRPO's advantages
    see), and the share of the reward spread that lies within groups.
samplers: FD / precision / recall of `--n` base samples (fixed seed, class-balanced) drawn by the inference ODE
    sampler and by the rollout samplers GRPO could use (Flow-GRPO SDE step, CPS; clean last step; T = 10 or 20):
    how far each rollout distribution is from what the ODE serves.
null: GRPO on the fmnist_grpo preset with the real rewards of every iteration permuted across the batch
    (`rl.null_control=permute`: the same scale and spread, no information about the samples): how far training on
    uninformative rewards moves the evaluation metrics in the same budget. `distreward study --controls` runs it
    for several seeds beside the real run and the distillation control.

    .venv/bin/python benchmarks/rl_diagnostics.py agreement --threads 1
    .venv/bin/python benchmarks/rl_diagnostics.py samplers --n 2000 --threads 2
    .venv/bin/python benchmarks/rl_diagnostics.py null --seed 0 --threads 1 [key=value ...]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from distreward.utils.threads import set_threads


def sde_samples(model, noise, labels, sigmas, levels, generator, batch: int = 256) -> torch.Tensor:
    from distreward.sampling import rollout

    with torch.no_grad():
        return torch.cat([rollout(model, noise[i:i + batch], labels[i:i + batch], sigmas, levels, generator=generator)
                          .xs[-1] for i in range(0, noise.shape[0], batch)]).clamp(-1, 1)


def agreement(args) -> dict:
    from distreward.config import load_config
    from distreward.evaluation import Evaluator
    from distreward.models import load_generator
    from distreward.reward import ReferenceSet
    from distreward.rl.rollout import rollout_noise_levels, start_noise
    from distreward.sampling.generate import balanced_labels
    from distreward.sampling import FlowVelocity, sigma_schedule

    cfg = load_config("fmnist_grpo", args.overrides)
    net = load_generator(args.model).eval()
    model, ev = FlowVelocity(net), Evaluator.for_fmnist()
    sigmas, levels = sigma_schedule(int(cfg.rl.steps)), rollout_noise_levels(cfg.rl)
    g = torch.Generator().manual_seed(args.seed)
    shape = tuple(cfg.model.image_shape)
    ref_labels = balanced_labels(args.reference, 10)
    ref = sde_samples(model, torch.randn((args.reference, *shape), generator=g), ref_labels, sigmas, levels, g)
    groups = torch.arange(args.groups).repeat_interleave(args.group_size)
    labels = (torch.arange(args.groups) % 10)[groups]
    cand = sde_samples(model, start_noise(groups, shape, g, shared=True), labels, sigmas, levels, g)
    rewards = []
    for f_ref, f_cand, st in zip(ev.features(ref), ev.features(cand), ev.real_stats):
        rewards.append(ReferenceSet(f_ref, st.mu, st.sigma).rewards(f_cand, groups=groups.numpy(), credit="sample"))
    gid = groups.numpy()

    def centred(r):
        return r - np.bincount(gid, weights=r)[gid] / args.group_size

    a, b = (centred(r) for r in rewards)
    return {"corr_raw": float(np.corrcoef(*rewards)[0, 1]), "corr_within_group": float(np.corrcoef(a, b)[0, 1]),
            "within_group_std_share": [float(a.std() / rewards[0].std()), float(b.std() / rewards[1].std())],
            "networks": list(ev.labels), "samples": int(groups.numel()), "reference": args.reference}


def samplers(args) -> dict:
    from distreward.evaluation import Evaluator
    from distreward.models import load_generator
    from distreward.sampling.generate import balanced_labels
    from distreward.sampling import FlowVelocity, ode_sample, rollout, sigma_schedule

    model, ev = FlowVelocity(load_generator(args.model).eval()), Evaluator.for_fmnist()

    def ode(T):
        return lambda z, lab, g: ode_sample(model, z, lab, sigma_schedule(T), method="euler")

    def sde(T, levels, step="sde"):
        return lambda z, lab, g: rollout(model, z, lab, sigma_schedule(T), levels, generator=g, step=step).xs[-1]

    cases = {"ode euler T=20 (the evaluation sampler)": ode(20), "ode euler T=10": ode(10),
             "sde a=0.3 T=10": sde(10, [0.3] * 9 + [0.0]), "sde a=0.3 T=20": sde(20, [0.3] * 19 + [0.0]),
             "sde a=0.3 T=10, noise on steps 0-5 only": sde(10, [0.3] * 6 + [0.0] * 4),
             "cps a=0.3 T=10": sde(10, [0.3] * 9 + [0.0], "cps"), "cps a=0.5 T=10": sde(10, [0.5] * 9 + [0.0], "cps")}
    out = {}
    for name, fn in cases.items():
        g = torch.Generator().manual_seed(args.seed)
        labels = balanced_labels(args.n, 10)
        noise = torch.randn((args.n, 1, 32, 32), generator=g)
        with torch.no_grad():
            images = torch.cat([fn(noise[i:i + 500], labels[i:i + 500], g).clamp(-1, 1) for i in range(0, args.n, 500)])
        m = ev.evaluate(images)
        out[name] = {k: round(float(m[k]), 4) for k in ("fd_reward", "fd_eval", "precision", "recall")}
        print(name, out[name], flush=True)
    return out


def null(args) -> dict:
    from distreward.config import load_config
    from distreward.rl import finetune

    cfg = load_config("fmnist_grpo", [f"seed={args.seed}", "rl.null_control=permute", *args.overrides])
    res = finetune(cfg, args.run_dir or f"runs/null_reward_seed{args.seed}", progress=True)
    keys = ("fd_reward", "fd_eval", "precision", "recall", "n")
    return {"evals": [{"iteration": e["iteration"], **{k: e[k] for k in keys}} for e in res["evals"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["agreement", "samplers", "null"])
    p.add_argument("--n", type=int, default=2000, help="samplers: samples per sampler")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="weights/fmnist-base.safetensors")
    p.add_argument("--groups", type=int, default=128)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--reference", type=int, default=1000)
    p.add_argument("--run-dir", default=None)
    p.add_argument("overrides", nargs="*", help="agreement, null: key=value overrides of the fmnist_grpo preset")
    args = p.parse_intermixed_args()
    set_threads(args.threads)
    print(json.dumps({"agreement": agreement, "samplers": samplers, "null": null}[args.check](args), indent=1))


if __name__ == "__main__":
    main()
