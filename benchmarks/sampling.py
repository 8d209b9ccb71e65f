"""Sampling throughput: images per second for each network and sampler (distreward.sampling).

    .venv/bin/python benchmarks/sampling.py --threads 1                      # CPU: UNet, tiny SiT, tiny EDM2
    .venv/bin/python benchmarks/sampling.py --threads 2 --json runs/bench/sampling_cpu.json
    python benchmarks/sampling.py --device cuda --quick                      # GPU: SiT-XL/2 256px, EDM2-XS 512px
    python benchmarks/sampling.py --device cuda --compile --json runs/bench/sampling_gpu.json

Networks have random weights (speed does not depend on them). On CPU: the embedded UNet (Fashion-MNIST 1x32x32)
and tiny SiT / EDM2 configurations on 4x16x16 latents. On CUDA: SiT-XL/2 on 4x32x32 latents (256px) and EDM2-XS on
4x64x64 latents (512px), each in a plain fp32 eager baseline (TF32 off) and in bf16 autocast with TF32 on
(+ torch.compile of the network with --compile), in the same run; the ratio to the baseline is printed.

Samplers: `euler` / `heun` (ode_sample), `sde` / `cps` (rollout, a = 0.7, keeps every state and log-prob),
`edm` (EDM's own Heun sampler, EDM2 only), `sit-sde` (SiT's Euler-Maruyama, SiT only) and `train-step`
(one `step_log_prob` forward + backward: the cost of one trained step of the RL update, per image).
Each measurement is the median of --repeats timed calls after one untimed warm-up call (the fastest call is
also reported: on a shared machine it is the better estimate of the unloaded speed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

A = 0.7  # noise level of the stochastic samplers


# --- networks ----------------------------------------------------------------------------------------------------

def cpu_networks() -> dict:
    return {
        "unet": ("unet", {}, "flow"),
        "sit-tiny": ("sit", dict(input_size=16, patch_size=2, in_channels=4, hidden_size=192, depth=6, num_heads=3,
                                 num_classes=10), "sit"),
        "edm2-tiny": ("edm2", dict(img_resolution=16, img_channels=4, label_dim=10, use_fp16=False, model_channels=32,
                                   channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4]), "edm"),
    }


def gpu_networks() -> dict:
    from distreward.models.edm2 import edm2_config
    from distreward.models.sit import sit_config

    return {
        "sit-xl2-256": ("sit", sit_config("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000), "sit"),
        "edm2-xs-512": ("edm2", edm2_config("XS", use_fp16=False), "edm"),
    }


def build(arch: str, kwargs: dict, device: str):
    """(network in eval mode, image shape, number of classes)."""
    from distreward.models import build_network

    net = build_network(arch, kwargs).eval().to(device)
    if arch == "unet":
        return net, (net.img_channels, net.img_resolution, net.img_resolution), net.num_classes
    if arch == "sit":
        r = kwargs.get("input_size", 32)
        return net, (kwargs.get("in_channels", 4), r, r), net.num_classes
    return net, (net.img_channels, net.img_resolution, net.img_resolution), net.label_dim


# --- samplers ----------------------------------------------------------------------------------------------------

def samplers_for(kind: str) -> dict:
    """name -> (fn(model, net, noise, labels, steps, gen), network evaluations for `steps` steps)."""
    from distreward import sampling as smp

    def sigmas(steps):
        return smp.edm_flow_sigmas(steps) if kind == "edm" else smp.sigma_schedule(steps)

    def train_step(model, net, noise, labels, steps, gen):
        s = sigmas(steps)
        x = (s[0] * noise).detach()
        with torch.no_grad():
            x_next = smp.sde_step(x, model(x, s[0], labels), s[0], s[1], A, generator=gen).x_next
        lp, _, _ = smp.step_log_prob(model, x, x_next, s[0], s[1], A, labels)
        lp.sum().backward()
        net.zero_grad(set_to_none=True)

    table = {
        "euler": (lambda m, n, z, y, T, g: smp.ode_sample(m, z, y, sigmas(T), "euler"), lambda T: T),
        "heun": (lambda m, n, z, y, T, g: smp.ode_sample(m, z, y, sigmas(T), "heun"), lambda T: 2 * T - 1),
        "sde": (lambda m, n, z, y, T, g: smp.rollout(m, z, y, sigmas(T), A, generator=g), lambda T: T),
        "cps": (lambda m, n, z, y, T, g: smp.rollout(m, z, y, sigmas(T), A, generator=g, step="cps"), lambda T: T),
        "train-step": (train_step, lambda T: 1),
    }
    if kind == "edm":
        table["edm"] = (lambda m, n, z, y, T, g: smp.edm_sample(n, z, y, steps=T), lambda T: 2 * T - 1)
    if kind == "sit":
        table["sit-sde"] = (lambda m, n, z, y, T, g: smp.sit_sde_sample(n, z, y, steps=T, generator=g), lambda T: T)
    return table


def adapter(kind: str, net):
    from distreward import sampling as smp

    return {"flow": smp.FlowVelocity, "sit": smp.SiTVelocity, "edm": smp.EDMVelocity}[kind](net)


# --- precision variants ------------------------------------------------------------------------------------------

def set_tf32(on: bool) -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


@contextlib.contextmanager
def variant_context(variant: str, device: str):
    if variant == "fp32":
        set_tf32(False)
        yield
    else:  # bf16 autocast + TF32 (for what stays in float32), optionally with a compiled network
        set_tf32(True)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            yield


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_seconds(fn, repeats: int, device: str) -> tuple[float, float]:
    fn()  # warm-up (compilation, cuDNN autotuning, allocator), not timed
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def device_name(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), model)
    return f"CPU {model}, {threads} of {os.cpu_count()} cores"


# --- main --------------------------------------------------------------------------------------------------------

def run(args) -> list[dict]:
    device = args.device
    gpu = device.startswith("cuda")
    nets = gpu_networks() if gpu else cpu_networks()
    if args.networks:
        unknown = set(args.networks) - set(nets)
        if unknown:
            raise SystemExit(f"unknown network(s) {sorted(unknown)} for {device}; known: {', '.join(nets)}")
        nets = {k: v for k, v in nets.items() if k in args.networks}
    variants = args.variants or (["fp32", "bf16"] if gpu else ["fp32"])
    if args.compile:
        variants = variants + ["bf16+compile"]
    rows = []
    gen = torch.Generator(device).manual_seed(0)
    for name, (arch, kwargs, kind) in nets.items():
        try:
            net, shape, classes = build(arch, kwargs, device)
        except (ImportError, AttributeError, TypeError) as e:
            print(f"skip {name}: cannot build {arch!r} ({e})")
            continue
        nparams = sum(p.numel() for p in net.parameters())
        noise = torch.randn((args.batch, *shape), generator=gen, device=device)
        labels = torch.randint(0, max(classes, 1), (args.batch,), generator=gen, device=device) if classes else None
        table = samplers_for(kind)
        chosen = [s for s in (args.samplers or list(table)) if s in table]
        for variant in variants:
            run_net = torch.compile(net) if variant.endswith("+compile") else net
            model = adapter(kind, run_net)
            for sampler in chosen:
                fn, nfe = table[sampler]
                with variant_context(variant, device):
                    sec, best = timed_seconds(lambda: fn(model, run_net, noise, labels, args.steps, gen), args.repeats, device)
                row = dict(network=name, params_M=round(nparams / 1e6, 2), variant=variant, sampler=sampler,
                           batch=args.batch, steps=args.steps, nfe=nfe(args.steps), seconds=sec,
                           images_per_s=args.batch / sec, images_per_s_best=args.batch / best, ms_per_nfe=1e3 * sec / nfe(args.steps))
                rows.append(row)
                print(f"{name:12s} {variant:13s} {sampler:10s} {row['images_per_s']:10.2f} img/s "
                      f"({row['nfe']:3d} NFE, {row['ms_per_nfe']:8.2f} ms/NFE)", flush=True)
        del net
        if gpu:
            torch.cuda.empty_cache()
    base = {(r["network"], r["sampler"]): r["images_per_s"] for r in rows if r["variant"] == "fp32"}
    for r in rows:
        b = base.get((r["network"], r["sampler"]))
        r["ratio_vs_fp32"] = r["images_per_s"] / b if b else None
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(f"\n{header}")
    print("| network | variant | sampler | batch | steps | NFE | images/s | best images/s | ms/NFE | x fp32 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['ratio_vs_fp32']:.2f}" if r["ratio_vs_fp32"] is not None else "-"
        print(f"| {r['network']} | {r['variant']} | {r['sampler']} | {r['batch']} | {r['steps']} | {r['nfe']} | "
              f"{r['images_per_s']:.2f} | {r['images_per_s_best']:.2f} | {r['ms_per_nfe']:.2f} | {ratio} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch/BLAS threads (default: $DISTREWARD_THREADS, else all)")
    p.add_argument("--quick", action="store_true", help="small batch, few steps, one timed repeat (GPU: < 3 min)")
    p.add_argument("--batch", type=int, default=None, help="images per call (default 16 CPU / 64 GPU; quick: 8 / 32)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 10; quick: 4 CPU / 8 GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement, median (default 3; quick: 1)")
    p.add_argument("--networks", type=lambda s: s.split(","), default=None, help="comma list (default: all for the device)")
    p.add_argument("--samplers", type=lambda s: s.split(","), default=None, help="comma list (default: all that apply)")
    p.add_argument("--variants", type=lambda s: s.split(","), default=None, help="fp32,bf16 (default: fp32 on CPU, both on GPU)")
    p.add_argument("--compile", action="store_true", help="also time bf16 with torch.compile of the network")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the results as JSON")
    args = p.parse_args(argv)

    from distreward.utils.threads import set_threads

    threads = set_threads(args.threads)
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False (a CPU build of torch, or no GPU)")
    if args.variants and set(args.variants) - {"fp32", "bf16"}:
        raise SystemExit(f"--variants takes fp32 and/or bf16, got {args.variants}")
    args.batch = args.batch or ((32 if gpu else 8) if args.quick else (64 if gpu else 16))
    args.steps = args.steps or ((8 if gpu else 4) if args.quick else 10)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.quick and not args.samplers:
        args.samplers = ["euler", "heun", "sde", "edm", "sit-sde", "train-step"]
    name = device_name(args.device, threads)
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}, {args.steps} steps, "
          f"median of {args.repeats}", flush=True)
    t0 = time.perf_counter()
    rows = run(args)
    print_table(rows, f"{name} (torch {torch.__version__}), total {time.perf_counter() - t0:.0f} s")
    if args.json:
        from distreward.utils.io import atomic_save_json

        atomic_save_json(args.json, {"device": name, "torch": torch.__version__, "threads": threads,
                                     "batch": args.batch, "steps": args.steps, "repeats": args.repeats, "results": rows})
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
