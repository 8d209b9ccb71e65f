"""Time one GRPO iteration of SiT-XL/2 at 256 px (latents 4x32x32) with random weights, and the reward's share.

The parts, in the trainer's order (distreward.rl: rollout.py, update.py): rollout (P x G samples, T Flow-GRPO SDE steps),
decode (a random AutoencoderKL with sd-vae-ft-ema's architecture), features (a random FID Inception-v3, d = 2048),
reward (the subset-replace FD reward, fast exact mode, against a reference set of N = 50k rows: scoring + push),
update (PPO-clip + KL on the trained steps, AdamW, EMA: the trainer's own update). The reward's share is
reward / iteration; the target is < 5 %. "reward+features" adds the feature network's forward pass.
Nothing is downloaded: every network is built from its architecture with random weights.

    python benchmarks/gpu_step.py --device cuda             # the paper sizes: P=32, G=16, T=10, 6 trained steps
    python benchmarks/gpu_step.py --device cuda --json
    python benchmarks/gpu_step.py --device cpu --tiny       # a smoke run of the same code (< 1 min on one core)

The reference set is numpy float64 on the CPU: `--threads` sets its BLAS threads (default: all cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32}
TINY_VAE = {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4}


def sizes(tiny: bool) -> dict:
    if tiny:
        return dict(sit={"input_size": 8, "patch_size": 2, "hidden_size": 64, "depth": 2, "num_heads": 2,
                         "num_classes": 10}, latent=(4, 8, 8), vae=TINY_VAE, P=4, G=4, T=4, window=2,
                    minibatches=2, batch=16, N=2000, d=64, features="random")
    from distreward.models.sit import sit_config

    return dict(sit=sit_config("SiT-XL/2", input_size=32, num_classes=1000), latent=(4, 32, 32), vae=SD_VAE,
                P=32, G=16, T=10, window=6, minibatches=8, batch=64, N=50_000, d=2048, features="inception")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device):
        self.device, self.times = device, {}

    def __call__(self, name):
        timer = self

        class _Block:
            def __enter__(self):
                sync(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                sync(timer.device)
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0

        return _Block()


def random_reference(N: int, d: int, seed: int = 0):
    """N generated rows and real (mu, Sigma) with a decaying spectrum (like Inception features), float64."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, d + 1, dtype=np.float64) ** -0.55
    rows = rng.standard_normal((N, d)) * scale * 1.1 + 0.05
    a = rng.standard_normal((d, d)) * scale
    return rows, np.zeros(d), (a @ a.T) / d + np.diag(scale ** 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (with --tiny: a smoke run)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (forced on cpu unless --full-on-cpu)")
    ap.add_argument("--full-on-cpu", action="store_true", help="allow the full sizes on cpu (hours)")
    ap.add_argument("--groups", type=int, default=None, help="P (default 32; tiny 4)")
    ap.add_argument("--group-size", type=int, default=None, help="G (default 16; tiny 4)")
    ap.add_argument("--reference", type=int, default=None, help="N rows of the reference set (default 50000)")
    ap.add_argument("--minibatches", type=int, default=None,
                    help="update minibatches (default 8: 64 samples per backward; raise it if memory runs out)")
    ap.add_argument("--iterations", type=int, default=2, help="timed iterations after one warm-up (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch and BLAS (default: all)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from distreward.features.inception import FIDInceptionV3, InceptionFeatures
    from distreward.models.sit import SiT
    from distreward.models.vae import LatentCodec
    from distreward.reward import ReferenceSet
    from distreward.pg import group_advantages
    from distreward.rl.grpo import grpo_update as update
    from distreward.rl.rollout import Rollouts, collect, draw_labels, trained_steps
    from distreward.rl.settings import DEFAULTS
    from distreward.build import RandomFeatures, random_autoencoder, randomise_zero_init
    from distreward.sampling import SiTVelocity, sigma_schedule
    from distreward.utils.threads import set_threads

    threads = set_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU visible: run with --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    tiny = args.tiny or (device.type == "cpu" and not args.full_on_cpu)
    S = sizes(tiny)
    P, G = args.groups or S["P"], args.group_size or S["G"]
    N = args.reference or S["N"]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # networks (random weights)
    torch.manual_seed(0)
    net = randomise_zero_init(SiT(**S["sit"])).to(device).eval()
    ref_net = SiT(**S["sit"]).to(device).eval().requires_grad_(False)
    ref_net.load_state_dict(net.state_dict())
    ema = SiT(**S["sit"]).to(device).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    model, ref_model = SiTVelocity(net), SiTVelocity(ref_net)
    codec = LatentCodec(random_autoencoder(S["vae"]), "sit", batch_size=min(32, S["batch"])).to(device)
    fnet = (InceptionFeatures(FIDInceptionV3()) if S["features"] == "inception" else RandomFeatures(S["d"]))
    fnet = fnet.to(device).eval().requires_grad_(False)
    d = int(fnet.dim)
    t0 = time.perf_counter()
    rows, mu_r, sigma_r = random_reference(N, d)
    ref = ReferenceSet(rows, mu_r, sigma_r)
    del rows
    setup_reference = time.perf_counter() - t0

    rl = OmegaConf.merge(OmegaConf.create(DEFAULTS["rl"]),
                         {"labels_per_iter": P, "group_size": G, "steps": S["T"],
                          "minibatches": args.minibatches or S["minibatches"],
                          "lr": 1e-5, "ema_decay": 0.999, "noise_level": 0.7})
    optimizer = torch.optim.AdamW(net.parameters(), lr=float(rl.lr))
    sigmas = sigma_schedule(S["T"])
    gen = torch.Generator().manual_seed(0)
    num_classes = int(S["sit"]["num_classes"])
    bs = S["batch"]

    def iteration(timer: Timer) -> None:
        with timer("rollout"):
            labels, groups = draw_labels(P, G, num_classes, gen)
            parts = [collect(model, labels[i:i + bs], groups[i:i + bs], sigmas, 0.7, S["latent"], gen, device)
                     for i in range(0, P * G, bs)]
            ro = Rollouts(labels=labels, groups=groups, xs=torch.cat([p.xs for p in parts], 1),
                          log_probs=torch.cat([p.log_probs for p in parts], 1), sigmas=parts[0].sigmas)
        with timer("decode"), torch.no_grad():
            images = codec.decode(ro.xs[-1]).clamp(-1, 1)
        with timer("features"), torch.no_grad():
            feats = torch.cat([fnet(images[i:i + bs]).double().cpu() for i in range(0, images.shape[0], bs)]).numpy()
        with timer("reward"):
            r = ref.rewards(feats, groups=groups.numpy(), mode="fast", credit="sample")
            ref.push(feats)
        ro.adv, _ = group_advantages(torch.from_numpy(r).float(), ro.groups)
        with timer("update"):
            steps = trained_steps(S["T"], "window", window=S["window"])
            update(net, model, ref_model, ema, optimizer, ro, steps, rl, gen)

    iteration(Timer(device))                      # warm-up (allocations, cuDNN autotuning, first eigendecomposition)
    timer = Timer(device)
    for _ in range(max(1, args.iterations)):
        iteration(timer)
    k = max(1, args.iterations)
    t = {name: v / k for name, v in timer.times.items()}
    total = sum(t.values())
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tiny": tiny, "threads": threads, "P": P, "G": G, "T": S["T"], "trained_steps": S["window"],
        "latent": list(S["latent"]), "N": N, "d": d, "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "seconds": {**t, "iteration": total}, "setup_reference_s": setup_reference,
        "reward_share": t["reward"] / total, "reward_plus_features_share": (t["reward"] + t["features"]) / total,
        "target_share": 0.05,
        "peak_gpu_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"one GRPO iteration, SiT {'tiny' if tiny else 'XL/2'} ({result['params_M']:.1f}M params) on {result['device']}, "
          f"P={P} x G={G} samples, T={S['T']} steps ({S['window']} trained), latents {tuple(S['latent'])}, "
          f"reward d={d}, N={N}, {threads} CPU threads; mean of {k} after a warm-up")
    for name in ("rollout", "decode", "features", "reward", "update"):
        print(f"  {name:<10} {t[name]:9.3f} s  {100 * t[name] / total:5.1f} %")
    print(f"  {'iteration':<10} {total:9.3f} s")
    verdict = "below" if result["reward_share"] < 0.05 else "ABOVE"
    print(f"reward share {100 * result['reward_share']:.2f} % ({verdict} the 5 % target); with the feature network "
          f"{100 * result['reward_plus_features_share']:.2f} %; reference set built in {setup_reference:.1f} s")
    if result["peak_gpu_GiB"] is not None:
        print(f"peak GPU memory {result['peak_gpu_GiB']:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
