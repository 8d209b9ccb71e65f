"""Two checks behind docs/rl.md's "seeds decide" finding, on the shipped Fashion-MNIST base model.

agreement: do the subset-replace rewards on the reward's feature network and on the held-out one rank the same
    samples the same way? Draws `--groups` groups of `--group-size` SDE samples (one starting noise per group, the
    trainer's rollout sampler), a reference set of `--reference` independent base samples, and prints the Pearson
    correlation of the two networks' per-sample rewards, raw and centred within groups (what GRPO's advantages
    see), and the share of the reward spread that lies within groups.
samplers: FD / precision / recall of `--n` base samples (fixed seed, class-balanced) drawn by the inference ODE
    sampler and by the rollout samplers GRPO could use (Flow-GRPO SDE step, CPS; clean last step; T = 10 or 20):
    how far each rollout distribution is from what the ODE serves.
snr: how much of one update's gradient is signal. Draws `--batches` independent batches of a trainer's
    update (its preset's P x G samples, rewards against one fixed reference set of the base, advantages, the
    trained steps or noise levels), takes each batch's on-policy gradient of the trainer's loss (GRPO: -A log p on
    the trained SDE steps; `rl.algorithm=nft`: the forward-process loss) and compares the batches: with g_k = mu +
    noise_k, the mean dot product of two batches estimates |mu|^2 and the mean squared norm |mu|^2 + tr(Sigma)/B,
    so their ratio rho is the signal's share of the update and B (1 - rho) / rho the batch at which signal equals
    noise. The same batches with the advantages permuted (the null control's rewards) give rho's noise floor.
null: GRPO on the fmnist_grpo preset with the real rewards of every iteration permuted across the batch
    (`rl.null_control=permute`: the same scale and spread, no information about the samples): how far training on
    uninformative rewards moves the evaluation metrics in the same budget. `distreward study --controls` runs it
    for several seeds beside the real run and the distillation control.

    .venv/bin/python benchmarks/rl_diagnostics.py agreement --threads 1
    .venv/bin/python benchmarks/rl_diagnostics.py samplers --n 2000 --threads 2
    .venv/bin/python benchmarks/rl_diagnostics.py snr --config fmnist_grpo_fine --batches 6 --threads 1
    .venv/bin/python benchmarks/rl_diagnostics.py null --seed 0 --threads 1 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

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


def _flat_grad(net) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in net.parameters() if p.requires_grad]).double()


def grpo_gradient(net, model, ro, adv: torch.Tensor, steps: list[int], a: list[float], clip_eps: float,
                  chunk: int) -> torch.Tensor:
    """The on-policy gradient of GRPO's loss on one batch: the trainer's PPO-clip loss (at rho = 1: -A grad log p),
    mean over samples and trained steps; the KL term's gradient is 0 at the base."""
    from distreward.pg import ppo_clip_loss
    from distreward.sampling import step_log_prob

    net.zero_grad(set_to_none=True)
    B = adv.shape[0]
    for j in steps:
        for i in range(0, B, chunk):
            sl = slice(i, i + chunk)
            log_prob, _, _ = step_log_prob(model, ro.xs[j, sl], ro.xs[j + 1, sl], ro.sigmas[j], ro.sigmas[j + 1],
                                           a[j], ro.labels[sl])
            loss, _ = ppo_clip_loss(adv[sl], log_prob, ro.log_probs[j, sl], clip_eps)
            (loss.sum() / (B * len(steps))).backward()
    return _flat_grad(net)


def nft_gradient(net, model, x0, labels, w, sigma, eps, beta: float, chunk: int) -> torch.Tensor:
    """The on-policy gradient of the forward-process loss on one batch (v_old = v_theta, so it is beta (2w - 1)
    times each sample's flow-matching gradient), at the given noise levels (B, K) and noises."""
    from distreward.rl.nft import nft_loss
    from distreward.train.flow import flow_interpolate, flow_target

    net.zero_grad(set_to_none=True)
    B, K = sigma.shape
    for k in range(K):
        for i in range(0, B, chunk):
            sl = slice(i, i + chunk)
            xt, target = flow_interpolate(x0[sl], eps[sl, k], sigma[sl, k]), flow_target(x0[sl], eps[sl, k])
            v = model(xt, sigma[sl, k], labels[sl])
            (nft_loss(v, v.detach(), target, w[sl], beta).sum() / (B * K)).backward()
    return _flat_grad(net)


def snr(args) -> dict:
    from distreward.config import load_config
    from distreward.evaluation import Evaluator
    from distreward.rl import parallel
    from distreward.pg import group_advantages
    from distreward.rl.context import null_permutation
    from distreward.rl.loopstate import PolicyWeights
    from distreward.rl.diagnostics import signal_report
    from distreward.rl.nft import ode_rollouts, optimality_weights
    from distreward.rl.rollout import collect, draw_labels, rollout_noise_levels, start_noise, trained_steps
    from distreward.rl.settings import nft_rollout_grid, resolve
    from distreward.rl.setup import ReferenceSampler, build_reward_for_run
    from distreward.sampling import sigma_schedule

    if args.batches < 3:
        raise SystemExit("snr: --batches must be at least 3 (the error of rho comes from the spread of the pairs)")
    cfg = resolve(load_config(args.config, [f"seed={args.seed}", *args.overrides]))
    rl, nft = cfg.rl, cfg.get("nft")
    algorithm = str(rl.get("algorithm", "grpo"))
    P, G = int(rl.labels_per_iter), int(rl.group_size)
    shape, num_classes = tuple(cfg.model.image_shape), int(cfg.model.num_classes)
    pol = PolicyWeights.build(cfg, "cpu", None, args.seed)
    net, model, gen = pol.net, pol.model, pol.generator
    ev = Evaluator.for_fmnist()
    run_dir = Path(args.run_dir or f"runs/snr_{cfg.name}_seed{args.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    sampler = ReferenceSampler.of_run(cfg, int(cfg.reward.reference_size))
    reward = build_reward_for_run(OmegaConf.to_container(cfg.reward, resolve=True), sampler, net, run_dir, ev,
                                  model=model, decode=pol.decode, progress=True)
    if algorithm == "grpo":
        T = int(rl.steps)
        sigmas, a = sigma_schedule(T, shift=float(rl.shift)), rollout_noise_levels(rl)
    else:
        method, steps = nft_rollout_grid(cfg)
        sigmas = sigma_schedule(steps, shift=float(rl.shift))

    def advantages(r, groups):
        return group_advantages(r, groups, std=str(rl.adv_std), clip=float(rl.adv_clip))[0]

    real, null = [], []
    for k in range(args.batches):
        t0 = time.perf_counter()
        labels, groups = draw_labels(P, G, num_classes, gen, balanced=rl.labels == "balanced", start=k * P,
                                     seed=args.seed)
        if algorithm == "grpo":
            ro = collect(model, labels, groups, sigmas, a, shape, gen, "cpu", bool(rl.shared_noise))
            images = pol.decode(ro.xs[-1])
        else:
            noise = start_noise(groups, shape, gen, shared=False)
            x0 = ode_rollouts(model, noise, labels, sigmas, method, range(labels.shape[0]), "cpu", int(rl.batch_size))
            images = pol.decode(x0)
        r, _ = parallel.score(reward, images, labels, groups)      # against the fixed initial reference set
        A = advantages(r, groups)
        A_null = advantages(null_permutation(r, gen), groups)    # the null control's rewards
        if algorithm == "grpo":
            steps = trained_steps(T, str(rl.train_steps.mode), fraction=float(rl.train_steps.fraction),
                                  window=rl.train_steps.window, generator=gen, count=rl.train_steps.get("count"))
            real.append(grpo_gradient(net, model, ro, A, steps, a, float(rl.clip_eps), args.chunk))
            null.append(grpo_gradient(net, model, ro, A_null, steps, a, float(rl.clip_eps), args.chunk))
        else:
            K = int(nft.timesteps)
            sigma = torch.rand((labels.shape[0], K), generator=gen)
            eps = torch.randn((labels.shape[0], K, *shape), generator=gen)
            real.append(nft_gradient(net, model, x0, labels, optimality_weights(A), sigma, eps, float(nft.beta),
                                     args.chunk))
            null.append(nft_gradient(net, model, x0, labels, optimality_weights(A_null), sigma, eps,
                                     float(nft.beta), args.chunk))
        print(f"batch {k + 1}/{args.batches}: {time.perf_counter() - t0:.0f} s, r mean {float(r.mean()):.4g} "
              f"std {float(r.std()):.3g}", flush=True)
    return {"config": cfg.name, "algorithm": algorithm, "samples_per_update": P * G, "batches": args.batches,
            "seed": args.seed, **signal_report(real, null, P * G)}


def null(args) -> dict:
    from distreward.config import load_config
    from distreward.rl import finetune

    cfg = load_config("fmnist_grpo", [f"seed={args.seed}", "rl.null_control=permute", *args.overrides])
    res = finetune(cfg, args.run_dir or f"runs/null_reward_seed{args.seed}", progress=True)
    keys = ("fd_reward", "fd_eval", "precision", "recall", "n")
    return {"evals": [{"iteration": e["iteration"], **{k: e[k] for k in keys}} for e in res["evals"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["agreement", "samplers", "null", "snr"])
    p.add_argument("--config", default="fmnist_grpo_fine", help="snr: the trainer's preset")
    p.add_argument("--batches", type=int, default=6, help="snr: independent batches (one update's samples each)")
    p.add_argument("--chunk", type=int, default=64, help="snr: samples per backward pass (memory)")
    p.add_argument("--n", type=int, default=2000, help="samplers: samples per sampler")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="weights/fmnist-base.safetensors")
    p.add_argument("--groups", type=int, default=128)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--reference", type=int, default=1000)
    p.add_argument("--run-dir", default=None)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the preset (agreement, null: fmnist_grpo; "
                   "snr: --config)")
    args = p.parse_intermixed_args()
    set_threads(args.threads)
    checks = {"agreement": agreement, "samplers": samplers, "null": null, "snr": snr}
    print(json.dumps(checks[args.check](args), indent=1))


if __name__ == "__main__":
    main()
