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
decompose: where the noise of one update's gradient lives. Nested draws: `--batches` batches of samples (policy
    noise), `--references` reference sets per batch, each N = reward.reference_size fresh base samples (reward
    noise: the same samples, rewards recomputed), `--loss-draws` draws of the loss's own randomness per reference
    set (the forward-process loss's noise levels and eps, GRPO's trained steps); the law of total variance splits
    tr Var g into the three, with the signal |mu|^2 and jackknife errors (distreward.rl.diagnostics).
null: GRPO on the fmnist_grpo preset with the real rewards of every iteration permuted across the batch
    (`rl.null_control=permute`: the same scale and spread, no information about the samples): how far training on
    uninformative rewards moves the evaluation metrics in the same budget. `distreward study --controls` runs it
    for several seeds beside the real run and the distillation control.

    .venv/bin/python benchmarks/rl_diagnostics.py agreement --threads 1
    .venv/bin/python benchmarks/rl_diagnostics.py samplers --n 2000 --threads 2
    .venv/bin/python benchmarks/rl_diagnostics.py snr --config fmnist_grpo_fine --batches 6 --threads 1
    .venv/bin/python benchmarks/rl_diagnostics.py decompose --config fmnist_nft --batches 4 --references 3 \
        --loss-draws 3 --threads 1
    .venv/bin/python benchmarks/rl_diagnostics.py null --seed 0 --threads 1 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

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


def trainer_setup(args, what: str) -> SimpleNamespace:
    """What snr and decompose share: the preset's config, the base policy, the reward with its initial reference set
    (fixed), the trainer's sampling grid."""
    from distreward.config import load_config
    from distreward.evaluation import Evaluator
    from distreward.rl.loopstate import PolicyWeights
    from distreward.rl.rollout import rollout_noise_levels
    from distreward.rl.settings import ode_grid, resolve
    from distreward.rl.setup import ReferenceSampler, build_reward_for_run
    from distreward.sampling import sigma_schedule

    cfg = resolve(load_config(args.config, [f"seed={args.seed}", *args.overrides]))
    rl = cfg.rl
    algorithm = str(rl.get("algorithm", "grpo"))
    if algorithm not in ("grpo", "nft"):
        raise SystemExit(f"{what}: rl.algorithm={algorithm}; the gradients are GRPO's or the forward-process "
                         "trainer's (grpo, nft)")
    pol = PolicyWeights.build(cfg, "cpu", None, args.seed)
    run_dir = Path(args.run_dir or f"runs/{what}_{cfg.name}_seed{args.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    sampler = ReferenceSampler.of_run(cfg, int(cfg.reward.reference_size))
    reward = build_reward_for_run(OmegaConf.to_container(cfg.reward, resolve=True), sampler, pol.net, run_dir,
                                  Evaluator.for_fmnist(), model=pol.model, decode=pol.decode, progress=True)
    S = SimpleNamespace(cfg=cfg, rl=rl, nft=cfg.get("nft"), algorithm=algorithm, P=int(rl.labels_per_iter),
                        G=int(rl.group_size), shape=tuple(cfg.model.image_shape),
                        num_classes=int(cfg.model.num_classes), pol=pol, reward=reward, sampler=sampler,
                        chunk=args.chunk, seed=args.seed)
    if algorithm == "grpo":
        S.T = int(rl.steps)
        S.sigmas, S.a = sigma_schedule(S.T, shift=float(rl.shift)), rollout_noise_levels(rl)
    else:
        S.method, steps = ode_grid(cfg.nft, cfg)
        S.sigmas = sigma_schedule(steps, shift=float(rl.shift))
    return S


def draw_batch(S, k: int):
    """Batch k of the trainer's update: labels, groups, its samples (GRPO's rollouts or the ODE's x_0) and images."""
    from distreward.rl.nft import ode_rollouts
    from distreward.rl.rollout import collect, draw_labels, start_noise

    rl, gen = S.rl, S.pol.generator
    labels, groups = draw_labels(S.P, S.G, S.num_classes, gen, balanced=rl.labels == "balanced", start=k * S.P,
                                 seed=S.seed)
    if S.algorithm == "grpo":
        sample = collect(S.pol.model, labels, groups, S.sigmas, S.a, S.shape, gen, "cpu", bool(rl.shared_noise))
        return labels, groups, sample, S.pol.decode(sample.xs[-1])
    noise = start_noise(groups, S.shape, gen, shared=False)
    sample = ode_rollouts(S.pol.model, noise, labels, S.sigmas, S.method, range(labels.shape[0]), "cpu",
                          int(rl.batch_size))
    return labels, groups, sample, S.pol.decode(sample)


def advantages(S, r, groups):
    from distreward.pg import group_advantages

    return group_advantages(r, groups, std=str(S.rl.adv_std), clip=float(S.rl.adv_clip))[0]


def loss_draw(S, batch: int):
    """The loss's own randomness for one gradient: GRPO's trained steps, or the forward-process loss's noise
    levels (B, K) and noises (nft.sigma_draw, nft.antithetic)."""
    from distreward.rl.nft import loss_draws
    from distreward.rl.rollout import trained_steps

    rl, gen = S.rl, S.pol.generator
    if S.algorithm == "grpo":
        return trained_steps(S.T, str(rl.train_steps.mode), fraction=float(rl.train_steps.fraction),
                             window=rl.train_steps.window, generator=gen, count=rl.train_steps.get("count"))
    return loss_draws(batch, int(S.nft.timesteps), S.shape, gen, sigma_draw=str(S.nft.sigma_draw),
                      antithetic=bool(S.nft.antithetic))


def gradient(S, sample, labels, A, draw) -> torch.Tensor:
    """The trainer's on-policy gradient of one batch with advantages A and the loss draw `draw`."""
    from distreward.rl.nft import optimality_weights

    net, model = S.pol.net, S.pol.model
    if S.algorithm == "grpo":
        return grpo_gradient(net, model, sample, A, draw, S.a, float(S.rl.clip_eps), S.chunk)
    sigma, eps = draw
    return nft_gradient(net, model, sample, labels, optimality_weights(A), sigma, eps, float(S.nft.beta), S.chunk)


def snr(args) -> dict:
    from distreward.rl import parallel
    from distreward.rl.context import null_permutation
    from distreward.rl.diagnostics import signal_report

    if args.batches < 3:
        raise SystemExit("snr: --batches must be at least 3 (the error of rho comes from the spread of the pairs)")
    S = trainer_setup(args, "snr")
    real, null = [], []
    for k in range(args.batches):
        t0 = time.perf_counter()
        labels, groups, sample, images = draw_batch(S, k)
        r, _ = parallel.score(S.reward, images, labels, groups)      # against the fixed initial reference set
        A = advantages(S, r, groups)
        A_null = advantages(S, null_permutation(r, S.pol.generator), groups)    # the null control's rewards
        draw = loss_draw(S, labels.shape[0])
        real.append(gradient(S, sample, labels, A, draw))
        null.append(gradient(S, sample, labels, A_null, draw))
        print(f"batch {k + 1}/{args.batches}: {time.perf_counter() - t0:.0f} s, r mean {float(r.mean()):.4g} "
              f"std {float(r.std()):.3g}", flush=True)
    return {"config": S.cfg.name, "algorithm": S.algorithm, "samples_per_update": S.P * S.G, "batches": args.batches,
            "seed": args.seed, **signal_report(real, null, S.P * S.G)}


def decompose(args) -> dict:
    """Nested gradients: --batches batches of samples x --references reference sets of the base (fresh, disjoint) x
    --loss-draws draws of the loss's noise; rl.diagnostics.decomposition_report splits the variance."""
    from dataclasses import replace

    from distreward.reward import ReferenceSet
    from distreward.rl.diagnostics import decomposition_report
    from distreward.rl.setup import reference_features

    I, J, K = args.batches, args.references, args.loss_draws
    if min(I, J, K) < 2 or I < 3:
        raise SystemExit("decompose: --batches >= 3, --references >= 2 and --loss-draws >= 2 (each source needs "
                         "replicates; the jackknife leaves one batch out)")
    S = trainer_setup(args, "decompose")
    if not isinstance(getattr(S.reward, "ref", None), ReferenceSet):
        raise SystemExit("decompose: the reward noise comes from the reference set; use reward.name=distribution "
                         "without reward.per_class")
    ref, N = S.reward.ref, int(S.cfg.reward.reference_size)
    pool = replace(S.sampler, n=I * J * N, seed=S.sampler.seed + 1)      # other base samples than the run's set
    print(f"decompose: {I * J} reference sets of {N} base samples", flush=True)
    feats = reference_features(S.pol.model, S.pol.decode, S.reward.net, pool, progress=True)
    grads = []
    for i in range(I):
        t0 = time.perf_counter()
        labels, groups, sample, images = draw_batch(S, i)
        f = S.reward.features(images)
        cell = []
        for j in range(J):
            refs = ReferenceSet(feats[(i * J + j) * N:(i * J + j + 1) * N], ref.real_mu, ref.real_sigma)
            r = torch.from_numpy(refs.rewards(f, groups=groups.numpy(), mode=S.reward.mode, credit=S.reward.credit)
                                 * S.reward.scale).float()
            A = advantages(S, r, groups)
            cell.append(torch.stack([gradient(S, sample, labels, A, loss_draw(S, labels.shape[0]))
                                     for _ in range(K)]))
        grads.append(torch.stack(cell))
        print(f"batch {i + 1}/{I}: {time.perf_counter() - t0:.0f} s", flush=True)
    return {"config": S.cfg.name, "algorithm": S.algorithm, "samples_per_update": S.P * S.G, "batches": I,
            "references": J, "loss_draws": K, "reference_size": N, "seed": args.seed,
            **decomposition_report(torch.stack(grads), S.P * S.G)}


def null(args) -> dict:
    from distreward.config import load_config
    from distreward.rl import finetune

    cfg = load_config("fmnist_grpo", [f"seed={args.seed}", "rl.null_control=permute", *args.overrides])
    res = finetune(cfg, args.run_dir or f"runs/null_reward_seed{args.seed}", progress=True)
    keys = ("fd_reward", "fd_eval", "precision", "recall", "n")
    return {"evals": [{"iteration": e["iteration"], **{k: e[k] for k in keys}} for e in res["evals"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["agreement", "samplers", "null", "snr", "decompose"])
    p.add_argument("--config", default="fmnist_grpo_fine", help="snr, decompose: the trainer's preset")
    p.add_argument("--batches", type=int, default=6, help="snr, decompose: independent batches (one update's samples "
                   "each)")
    p.add_argument("--references", type=int, default=2, help="decompose: reference sets of the base per batch")
    p.add_argument("--loss-draws", type=int, default=2, help="decompose: draws of the loss's noise per reference set")
    p.add_argument("--chunk", type=int, default=64, help="snr, decompose: samples per backward pass (memory)")
    p.add_argument("--n", type=int, default=2000, help="samplers: samples per sampler")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="weights/fmnist-base.safetensors")
    p.add_argument("--groups", type=int, default=128)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--reference", type=int, default=1000)
    p.add_argument("--run-dir", default=None)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the preset (agreement, null: fmnist_grpo; "
                   "snr, decompose: --config)")
    args = p.parse_intermixed_args()
    set_threads(args.threads)
    checks = {"agreement": agreement, "samplers": samplers, "null": null, "snr": snr, "decompose": decompose}
    print(json.dumps(checks[args.check](args), indent=1))


if __name__ == "__main__":
    main()
