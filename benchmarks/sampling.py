"""Sampling throughput: images per second for each network and sampler (distreward.sampling).

    .venv/bin/python benchmarks/sampling.py --threads 1                      # CPU: UNet, tiny SiT, tiny EDM2
    .venv/bin/python benchmarks/sampling.py --threads 2 --json runs/bench/sampling_cpu.json
    python benchmarks/sampling.py --device cuda --quick                      # GPU: SiT-XL/2 256px, EDM2-XS 512px
    python benchmarks/sampling.py --device cuda --compile --json runs/bench/sampling_gpu.json
    .venv/bin/python benchmarks/sampling.py --efficiency --threads 1 --json runs/bench/cpu_speed.json   # CPU speed
    .venv/bin/python benchmarks/sampling.py --layout --layout-threads 1 2          # NHWC default: speed, deviations

`--layout` (CPU): the ODE sampler on the shipped UNet (weights/fmnist-base.safetensors) with its NCHW path
(`samplers.CPU_NHWC = False`: the samples as they were before the default changed) and with the default NHWC path,
at each thread count of --layout-threads: the speed ratio NCHW time / NHWC time per interleaved pair of calls
(10 Euler steps on --batch images; the order within a pair alternates, so load hits both alike), then the
deviations on the evaluation protocol (--n class-balanced samples of seed 1234, Euler 10 and Heun 16): max |x_nhwc -
x_nchw| over the samples and the relative change of FD on both Fashion-MNIST networks (cached real features),
against the tolerance of a default (1e-4 max abs, 1e-3 relative FD; docs/sampling.md "CPU speed").

`--efficiency` (CPU): for each network, the GFLOP of one network call per image (torch.utils.flop_counter:
convolutions and matmuls, a multiply-add counted as 2), the GFLOP/s the Euler ODE sampler reaches at the
evaluation batch (500 images, 10 steps) on each code path (`before`: the plain network on the whole batch, as
before the CPU fast path; `nchw`: the in-place fast path with NCHW maps, the default before; `default`: + the UNet's
channels_last maps at the full resolution; on request `chunks`: the plain
UNet in chunks, and `compile`: torch.compile of the network), a single-thread 1024x1024 float32 matmul measured
right before and right after each sampler call, and the ratio. Rates are given per CPU-second of the calling
thread (robust on a shared machine: time slices lost to other processes do not count) and per wall-clock second;
every line names the thread count and the load average.

Networks have random weights (speed does not depend on them). On CPU: the embedded UNet (Fashion-MNIST 1x32x32)
as shipped (`unet-fmnist`, configs/fmnist_base.yaml) and with its default constructor arguments (`unet`), and tiny
SiT / EDM2 configurations on 4x16x16 latents. On CUDA: SiT-XL/2 on 4x32x32 latents (256px) and EDM2-XS on
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

# the shipped embedded default (weights/fmnist-base.safetensors, configs/fmnist_base.yaml), 0.48M parameters
UNET_FMNIST = dict(img_resolution=32, img_channels=1, num_classes=10, model_channels=16, channel_mult=[1, 2, 3],
                   num_blocks=1, attn_resolutions=[8], num_heads=1, dropout=0.0)


def cpu_networks() -> dict:
    return {
        "unet-fmnist": ("unet", UNET_FMNIST, "flow"),
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
                           images_per_s=args.batch / sec, images_per_s_best=args.batch / best, ms_per_nfe=1e3 * sec / nfe(args.steps),
                           threads=torch.get_num_threads(), load=list(os.getloadavg()))
                rows.append(row)
                print(f"{name:12s} {variant:13s} {sampler:10s} {row['images_per_s']:10.2f} img/s "
                      f"({row['nfe']:3d} NFE, {row['ms_per_nfe']:8.2f} ms/NFE) | {row['threads']} thread(s), {load()}",
                      flush=True)
        del net
        if gpu:
            torch.cuda.empty_cache()
    base = {(r["network"], r["sampler"]): r["images_per_s"] for r in rows if r["variant"] == "fp32"}
    for r in rows:
        b = base.get((r["network"], r["sampler"]))
        r["ratio_vs_fp32"] = r["images_per_s"] / b if b else None
    return rows


# --- CPU efficiency: GFLOP/s of the ODE sampler vs a single-thread matmul, in the same run -----------------------

MATMUL_N = 1024


def load() -> str:
    return "load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def gflop_per_image_call(model, shape: tuple, classes: int) -> float:
    """GFLOP of one velocity call for one image, counted by FlopCounterMode on a forward pass of one image
    (convolutions, linear layers and attention matmuls; a multiply-add is 2 FLOPs; GroupNorm, SiLU and other
    elementwise work are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *shape)
    labels = torch.zeros(1, dtype=torch.long) if classes else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.full((1,), 0.5), labels)
    return counter.get_total_flops() / 1e9


def matmul_rate(repeats: int = 5) -> tuple[float, float]:
    """(GFLOP/s per CPU-second, GFLOP/s per wall second) of a 1024x1024 float32 matmul on one thread, medians."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
        a @ b
        cpu, wall = [], []
        for _ in range(repeats):
            c0, w0 = time.thread_time(), time.perf_counter()
            a @ b
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
    finally:
        torch.set_num_threads(threads)
    flops = 2 * MATMUL_N**3 / 1e9
    return flops / statistics.median(cpu), flops / statistics.median(wall)


@contextlib.contextmanager
def cpu_path(net, arch: str, path: str, batch: int):
    """Run the sampler on a code path: `before` (the plain network, the whole batch per call: the sampler before
    the CPU fast path), `chunks` (UNet: the plain network in chunks of CPU_CHUNK), `nchw` (UNet: the in-place
    fast path on NCHW maps), `default` (+ channels_last maps at the full resolution), `compile` (torch.compile of
    the plain network, chunked)."""
    from distreward.sampling import samplers

    saved = samplers.CPU_CHUNK, samplers.CPU_NHWC, getattr(net, "fast_cpu", None)
    if path == "before":
        samplers.CPU_CHUNK = max(batch, 1)
    samplers.CPU_NHWC = path == "default"
    if arch == "unet":  # compile: inductor fuses the plain ops itself (the fast path's out= / in-place ops break graphs)
        net.fast_cpu = path not in ("before", "chunks", "compile")
    try:
        yield
    finally:
        samplers.CPU_CHUNK, samplers.CPU_NHWC = saved[0], saved[1]
        if arch == "unet":
            net.fast_cpu = saved[2]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def efficiency(args, threads: int) -> tuple[list[dict], list[dict]]:
    """Per (network, path, repeat): one Euler ODE sampler call on the batch, a matmul right before and after it.
    Repeats are the outer loop, so that a change of load hits every path alike."""
    from distreward.sampling import edm_flow_sigmas, ode_sample, sigma_schedule

    clock = time.thread_time if threads == 1 else time.process_time
    nets = cpu_networks()
    if args.networks:
        nets = {k: v for k, v in nets.items() if k in args.networks}
    gen = torch.Generator().manual_seed(0)
    rows, summary = [], []
    for name, (arch, kwargs, kind) in nets.items():
        net, shape, classes = build(arch, kwargs, "cpu")
        model = adapter(kind, net)
        gflop = gflop_per_image_call(model, shape, classes)
        noise = torch.randn((args.batch, *shape), generator=gen)
        labels = torch.randint(0, max(classes, 1), (args.batch,), generator=gen) if classes else None
        sigmas = edm_flow_sigmas(args.steps) if kind == "edm" else sigma_schedule(args.steps)
        paths = [p for p in (args.paths or ["before", "nchw", "default"]) if arch == "unet" or p not in ("chunks", "nchw")]
        models, compile_s = {}, {}
        for path in paths:
            models[path] = model
            if path == "compile":
                models[path] = adapter(kind, torch.compile(net, dynamic=False))
            with cpu_path(net, arch, path, args.batch):  # warm-up; for compile: the compilation of both chunk shapes
                w0 = time.perf_counter()
                ode_sample(models[path], noise, labels, sigmas[:2].clone() if path != "compile" else sigmas, "euler")
                compile_s[path] = time.perf_counter() - w0
        print(f"{name}: {gflop:.4f} GFLOP per image-call; batch {args.batch}, {args.steps} Euler steps, "
              f"{threads} thread(s); paths {', '.join(paths)}", flush=True)
        per_path = {p: [] for p in paths}
        for r in range(args.repeats):
            for path in paths:
                mm_before = matmul_rate()
                with cpu_path(net, arch, path, args.batch):
                    load0 = os.getloadavg()[0]
                    c0, w0 = clock(), time.perf_counter()
                    ode_sample(models[path], noise, labels, sigmas, "euler")
                    cpu, wall = clock() - c0, time.perf_counter() - w0
                mm_after = matmul_rate()
                calls = args.batch * args.steps
                mm_cpu, mm_wall = (mm_before[0] + mm_after[0]) / 2, (mm_before[1] + mm_after[1]) / 2
                row = dict(network=name, path=path, repeat=r, threads=threads, batch=args.batch, steps=args.steps,
                           gflop_per_image_call=gflop, gflops_cpu=gflop * calls / cpu, gflops_wall=gflop * calls / wall,
                           matmul_gflops_cpu=mm_cpu, matmul_gflops_wall=mm_wall,
                           matmul_before_after_cpu=[mm_before[0], mm_after[0]],
                           ms_per_image_call_cpu=1e3 * cpu / calls, ms_per_image_call_wall=1e3 * wall / calls,
                           load_start=load0, load_end=os.getloadavg()[0])
                row["ratio_cpu"] = row["gflops_cpu"] / mm_cpu
                row["ratio_wall"] = row["gflops_wall"] / mm_wall
                if path == "compile":
                    row["first_call_s"] = compile_s[path]
                rows.append(row)
                per_path[path].append(row)
                print(f"  {path:8s} #{r + 1}: {row['gflops_cpu']:6.1f} GFLOP/s ({row['ms_per_image_call_cpu']:.2f} ms/image-call)"
                      f" vs matmul {mm_before[0]:5.1f}/{mm_after[0]:5.1f} before/after: ratio {row['ratio_cpu']:.2f}"
                      f" | wall {row['gflops_wall']:6.1f} vs {mm_wall:5.1f}: {row['ratio_wall']:.2f}"
                      f" | {threads} thread(s), {load()}", flush=True)
        for path, rs in per_path.items():
            summary.append(dict(network=name, path=path, threads=threads, gflop_per_image_call=gflop,
                                **{k: spread([r[k] for r in rs]) for k in (
                                    "gflops_cpu", "matmul_gflops_cpu", "ratio_cpu", "ms_per_image_call_cpu",
                                    "gflops_wall", "matmul_gflops_wall", "ratio_wall", "ms_per_image_call_wall",
                                    "load_start")},
                                **({"first_call_s": compile_s[path]} if path == "compile" else {})))
        del net, models
    return rows, summary


def print_efficiency(summary: list[dict], header: str) -> None:
    def f(d, fmt="{:.1f}"):
        return f"{fmt.format(d['median'])} ({fmt.format(d['min'])}-{fmt.format(d['max'])})"

    print(f"\n{header}\nmedian (min-max) over the repeats; per CPU-second of the sampling thread, then per wall second")
    print("| network | path | GFLOP/image-call | GFLOP/s | matmul GFLOP/s | ratio | ms per image-call "
          "| wall GFLOP/s | wall matmul | wall ratio | threads | load (1 min) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        print(f"| {s['network']} | {s['path']} | {s['gflop_per_image_call']:.4f} | {f(s['gflops_cpu'])} | "
              f"{f(s['matmul_gflops_cpu'])} | {f(s['ratio_cpu'], '{:.2f}')} | {f(s['ms_per_image_call_cpu'], '{:.2f}')} | "
              f"{f(s['gflops_wall'])} | {f(s['matmul_gflops_wall'])} | {f(s['ratio_wall'], '{:.2f}')} | {s['threads']} | "
              f"{f(s['load_start'])} |")


TOLERANCE = {"max_abs": 1e-4, "fd_rel": 1e-3}    # a default path's deviation bound (docs/sampling.md "CPU speed")
SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "fmnist-base.safetensors"


def layout_samples(model, n: int, method: str, steps: int, nhwc: bool) -> torch.Tensor:
    """The evaluation's class-balanced samples (seed 1234) with the NHWC path on or off."""
    from distreward.sampling import samplers, sigma_schedule
    from distreward.sampling.generate import generate, shared_noise

    noise, labels = shared_noise(n, (1, 32, 32), 10, 1234)
    saved, samplers.CPU_NHWC = samplers.CPU_NHWC, nhwc
    try:
        return generate(model, noise, labels, sigma_schedule(steps), method=method, batch_size=500)
    finally:
        samplers.CPU_NHWC = saved


def layout(args, threads: int) -> dict:
    """Speed ratio (NCHW / NHWC time, interleaved pairs) and the deviations at `threads` threads."""
    from distreward.evaluation import Evaluator
    from distreward.models import load_generator
    from distreward.sampling import FlowVelocity, ode_sample, samplers, sigma_schedule
    from distreward.utils.threads import set_threads

    set_threads(threads)
    model = FlowVelocity(load_generator(SHIPPED))
    g = torch.Generator().manual_seed(0)
    noise, labels = torch.randn((args.batch, 1, 32, 32), generator=g), torch.arange(args.batch) % 10
    clock = time.thread_time if threads == 1 else time.process_time

    def call(nhwc: bool) -> tuple[float, float]:
        samplers.CPU_NHWC = nhwc
        w0, c0 = time.perf_counter(), clock()
        ode_sample(model, noise, labels, sigma_schedule(10))
        return time.perf_counter() - w0, clock() - c0

    saved = samplers.CPU_NHWC
    try:
        call(False), call(True)                              # warm-up
        wall, cpu = [], []
        for r in range(args.repeats):
            order = (False, True) if r % 2 == 0 else (True, False)
            t = {nhwc: call(nhwc) for nhwc in order}
            wall.append(t[False][0] / t[True][0])
            cpu.append(t[False][1] / t[True][1])
    finally:
        samplers.CPU_NHWC = saved
    ev = Evaluator.for_fmnist()
    dev = {}
    for method, steps in (("euler", 10), ("heun", 16)):
        a, b = (layout_samples(model, args.n, method, steps, nhwc) for nhwc in (False, True))
        ma, mb = ev.evaluate(a), ev.evaluate(b)
        dev[f"{method} {steps}"] = {"max_abs": float((b - a).abs().max()),
                                    **{f"{k}_rel": abs(mb[k] / ma[k] - 1) for k in ("fd_reward", "fd_eval")},
                                    **{k: (ma[k], mb[k]) for k in ("fd_reward", "fd_eval")}}
    return {"threads": threads, "batch": args.batch, "repeats": args.repeats, "n": args.n, "load": load(),
            "speed_wall": spread(wall), "speed_cpu": spread(cpu), "deviations": dev}


def print_layout(r: dict) -> None:
    """One thread count's --layout figures, each deviation against TOLERANCE."""
    w, c = r["speed_wall"], r["speed_cpu"]
    print(f"\n{r['threads']} thread(s), {r['load']}: NHWC default vs NCHW, 10 Euler steps on {r['batch']} images, "
          f"{r['repeats']} interleaved pairs: speed x{w['median']:.2f} wall ({w['min']:.2f}-{w['max']:.2f}), "
          f"x{c['median']:.2f} CPU time ({c['min']:.2f}-{c['max']:.2f})")
    for name, d in r["deviations"].items():
        ok = d["max_abs"] <= TOLERANCE["max_abs"] and max(d["fd_reward_rel"], d["fd_eval_rel"]) <= TOLERANCE["fd_rel"]
        print(f"  {name}, n = {r['n']}: max |dx| {d['max_abs']:.2e}; FD reward {d['fd_reward'][0]:.5f} -> "
              f"{d['fd_reward'][1]:.5f} (rel {d['fd_reward_rel']:.1e}), held-out {d['fd_eval'][0]:.6f} -> "
              f"{d['fd_eval'][1]:.6f} (rel {d['fd_eval_rel']:.1e}): {'within' if ok else 'OUTSIDE'} the tolerance "
              f"({TOLERANCE['max_abs']:.0e} max abs, {TOLERANCE['fd_rel']:.0e} relative FD)", flush=True)


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
    p.add_argument("--efficiency", action="store_true",
                   help="CPU: GFLOP/s of the Euler ODE sampler per code path vs a single-thread matmul, in the same run "
                        "(default batch 500, 10 steps, 3 repeats)")
    p.add_argument("--paths", type=lambda s: s.split(","), default=None,
                   help="--efficiency code paths: before,nchw,default (default), chunks, compile")
    p.add_argument("--layout", action="store_true",
                   help="CPU: the UNet's NHWC default against its NCHW path: speed ratio and sample / FD deviations")
    p.add_argument("--layout-threads", type=int, nargs="+", default=[1, 2], help="--layout thread counts (default 1 2)")
    p.add_argument("--n", type=int, default=500, help="--layout: samples behind the deviations (default 500)")
    args = p.parse_args(argv)

    from distreward.utils.threads import set_threads

    threads = set_threads(args.threads)
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False (a CPU build of torch, or no GPU)")
    if args.variants and set(args.variants) - {"fp32", "bf16"}:
        raise SystemExit(f"--variants takes fp32 and/or bf16, got {args.variants}")
    if args.efficiency:
        if gpu:
            raise SystemExit("--efficiency measures the CPU paths; drop --device cuda")
        if args.paths and set(args.paths) - {"before", "chunks", "nchw", "default", "compile"}:
            raise SystemExit(f"--paths takes before, chunks, nchw, default, compile; got {args.paths}")
        args.batch = args.batch or (64 if args.quick else 500)
        args.steps = args.steps or (2 if args.quick else 10)
        args.repeats = args.repeats or (1 if args.quick else 3)
        name = device_name(args.device, threads)
        print(f"device: {name}; torch {torch.__version__}; {threads} thread(s); {load()}", flush=True)
        t0 = time.perf_counter()
        rows, summary = efficiency(args, threads)
        print_efficiency(summary, f"{name} (torch {torch.__version__}), batch {args.batch}, {args.steps} Euler steps, "
                                  f"total {time.perf_counter() - t0:.0f} s")
        if args.json:
            from distreward.utils.io import atomic_save_json

            atomic_save_json(args.json, {"device": name, "torch": torch.__version__, "threads": threads,
                                         "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                                         "matmul_n": MATMUL_N, "rows": rows, "summary": summary})
            print(f"-> {args.json}")
        return 0
    if args.layout:
        if gpu:
            raise SystemExit("--layout measures the CPU's NHWC path; drop --device cuda")
        args.batch, args.repeats = args.batch or 128, args.repeats or 5
        for t in args.layout_threads:
            print_layout(layout(args, t))
        return 0
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
