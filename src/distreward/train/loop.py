"""Base training: flow matching counted in images (EDM2 style), two power-function EMAs, periodic snapshots.

One flat loop. Every random draw of step k (batch indices, noise, sigma, label dropout) comes from generators seeded
by (seed, k), so a run resumed from its training-state checkpoint continues exactly as an uninterrupted run.
Layout of the run directory:
  config.yaml, metrics.jsonl, tb/ (TensorBoard)
  checkpoints/training-state.pt   model, both EMAs, optimizer, RNG states, step (atomic; weights_only loadable)
  snapshots/phema-<step>-<std>.safetensors   EMA snapshots for post-hoc EMA (`distreward phema`)
  model.safetensors               the post-hoc EMA at ema.export_std, reconstructed at the end
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from ..config import find_file, to_dict
from ..data import check_images, load_images
from ..data.fmnist import fmnist_files
from ..models import build_network, save_generator
from ..schema import defaults, validate
from ..utils.checkpoint import checkpoint_exists, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..utils.io import RunDir
from ..utils.configdiff import only_raise
from ..utils.hashing import input_files
from ..utils.rundir import prepare_run
from ..utils.progress import progress as tqdm
from ..utils.runlog import RunLog
from .ema import PowerEMA
from .flow import drop_labels, flow_interpolate, flow_loss, flow_target, learning_rate, sample_sigma
from .phema import list_snapshots, save_phema, snapshot_extra, snapshot_filename

STATE_FILE = "checkpoints/training-state.pt"
STATE_VERSION = 1

# Every key train-base reads, with its default (presets in configs/fmnist_base*.yaml override these), derived from
# the train-base schema (distreward.schema; docs/configs.md lists every key).
DEFAULTS: dict = defaults("train-base")

# Settings a resumed run can take new values of (with allow_changes / --allow-change KEY); docs/runs.md.
CHANGEABLE = {"train.total_kimg": only_raise, "checkpoint_kimg": None, "log_kimg": None, "ema.snapshot_kimg": None,
              "ema.export_std": None, "ema.export_method": None, "tensorboard": None, "name": None,
              "train.compile": None}
FMNIST_SPECS = {"fmnist-train": "train", "fmnist:train": "train", "fmnist-test": "test", "fmnist:test": "test"}


def _every(kimg: float, batch: int, what: str) -> int:
    if kimg <= 0:
        raise ValueError(f"{what} must be > 0 kimg, got {kimg}")
    return max(1, round(kimg * 1000 / batch))


def _step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """An independent CPU generator per (seed, step, stream): the draws of a step do not depend on history."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 16 + stream) % (2 ** 63))


class BatchOrder:
    """Batch k holds positions [k*B, (k+1)*B) of epoch k // (N // B)'s permutation (seeded by seed and epoch)."""

    def __init__(self, n: int, batch: int, seed: int):
        if batch > n:
            raise ValueError(f"train.batch={batch} exceeds the dataset size {n}; lower the batch or use more images")
        self.n, self.batch, self.seed = n, batch, seed
        self.per_epoch = n // batch
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=_step_generator(self.seed, epoch, 15))
        return self._perm[i * self.batch:(i + 1) * self.batch]


@functools.lru_cache(maxsize=1)
def _load_images(spec: str):
    return load_images(spec)


def _load_data(cfg: dict):
    images, labels = _load_images(str(cfg["data"]["images"]))
    limit = int(cfg["data"].get("limit") or 0)
    if limit > 0:
        images = images[:limit]
        labels = labels[:limit] if labels is not None else None
    check_images(images, name=f"training images {cfg['data']['images']!r}")
    return images, labels


def _network_kwargs(cfg: dict, images: torch.Tensor, labels: torch.Tensor | None) -> dict:
    kwargs = dict(cfg["network"]["kwargs"])
    kwargs.setdefault("img_resolution", int(images.shape[-1]))
    kwargs.setdefault("img_channels", int(images.shape[1]))
    kwargs.setdefault("num_classes", int(labels.max()) + 1 if labels is not None else 0)
    if kwargs["img_channels"] != images.shape[1] or kwargs["img_resolution"] != images.shape[-1]:
        raise ValueError(f"network expects {kwargs['img_channels']}x{kwargs['img_resolution']}^2 images but the data are "
                         f"{tuple(images.shape[1:])}; fix network.kwargs or data.images")
    if labels is not None and labels.numel() and int(labels.max()) >= kwargs["num_classes"]:
        raise ValueError(f"labels reach {int(labels.max())} but network.kwargs.num_classes={kwargs['num_classes']}")
    return kwargs


def _check_resumable(saved: dict, cfg: dict) -> None:
    """Everything but the length of training must match the run being resumed."""
    for path in (("seed",), ("network",), ("data",), ("train", "batch"), ("ema", "stds")):
        a, b = saved, cfg
        for k in path:
            a, b = a.get(k), b.get(k)
        if a != b:
            raise ValueError(f"cannot resume: {'.'.join(path)} was {a!r} in the saved run but is {b!r} now; "
                             "resume with the original config or start a new --run-dir")


def train_base(cfg, run_dir: str | os.PathLike, *, device: str | torch.device = "cpu", resume: bool = False,
               overwrite: bool = False, allow_changes: Sequence[str] = (), progress: bool = True,
               stop_after_step: int | None = None) -> dict:
    """Train a base generator; returns a summary dict. `stop_after_step` ends the run early without any final
    writes, exactly as a kill would (used to test resuming).

    resume=True continues from checkpoints/training-state.pt (or its .prev when it is damaged) and needs one; a
    setting that differs from the saved config.yaml is refused unless named in `allow_changes` and in CHANGEABLE.
    Without resume, a run_dir holding a previous run is refused unless `overwrite` (then emptied). The directory
    is locked while the run lives (`utils.rundir.prepare_run`, docs/runs.md)."""
    cfg = to_dict(validate("train-base", cfg))      # checked in full before any work
    tc, ec = cfg["train"], cfg["ema"]
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    state_path = Path(run_dir) / STATE_FILE
    if resume and not checkpoint_exists(state_path):
        raise FileNotFoundError(f"--resume: no training state at {state_path}; start without --resume")

    batch = int(tc["batch"])
    sched = {"total_steps": max(1, math.ceil(float(tc["total_kimg"]) * 1000 / batch)),
             "snapshot_every": _every(float(ec["snapshot_kimg"]), batch, "ema.snapshot_kimg"),
             "checkpoint_every": _every(float(cfg["checkpoint_kimg"]), batch, "checkpoint_kimg"),
             "log_every": _every(float(cfg["log_kimg"]), batch, "log_kimg")}

    images, labels = _load_data(cfg)
    kwargs = _network_kwargs(cfg, images, labels)
    cfg["network"]["kwargs"] = kwargs
    spec = str(cfg["data"]["images"])
    data_files = fmnist_files(FMNIST_SPECS[spec]) if spec in FMNIST_SPECS else []
    run = prepare_run(run_dir, cfg, command="train-base", resume=resume, overwrite=overwrite,
                      allow_changes=allow_changes, changeable=CHANGEABLE, defaults=DEFAULTS,
                      inputs=input_files(cfg, find_file) + data_files)
    try:
        return base_run(cfg, run, device, images, labels, sched, resume=resume, progress=progress,
                        stop_after_step=stop_after_step)
    finally:
        run.close()


def base_run(cfg: dict, run: RunDir, device: torch.device, images, labels, sched: dict, *, resume: bool,
             progress: bool, stop_after_step: int | None) -> dict:
    """The training of `train_base` in its prepared (locked, checked) run directory."""
    tc, ec, kwargs = cfg["train"], cfg["ema"], cfg["network"]["kwargs"]
    batch, seed, state_path = int(tc["batch"]), int(cfg["seed"]), run.root / STATE_FILE
    total_steps, snapshot_every = sched["total_steps"], sched["snapshot_every"]
    checkpoint_every, log_every = sched["checkpoint_every"], sched["log_every"]
    arch = cfg["network"]["arch"]
    torch.manual_seed(seed)
    net = build_network(arch, kwargs).to(device).train()
    memory_format = torch.channels_last if tc.get("channels_last") else torch.contiguous_format
    net = net.to(memory_format=memory_format)  # channels_last: about 15% faster convolutions on CPU
    forward = torch.compile(net) if tc.get("compile") else net       # the same parameters; compiled on first call
    null_label = getattr(net, "null_label", kwargs.get("num_classes", 0))
    ema = PowerEMA(net, ec["stds"])
    opt = torch.optim.AdamW(net.parameters(), lr=float(tc["lr"]), betas=tuple(tc["betas"]), eps=float(tc["eps"]),
                            weight_decay=float(tc["weight_decay"]))
    step = 0
    if resume:
        state = load_checkpoint(state_path)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{state_path} has state version {state.get('version')}, expected {STATE_VERSION}")
        _check_resumable(state["config"], cfg)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(None, state["rng"], device)
        step = int(state["step"])

    data = images.to(device)
    targets = labels.to(device) if labels is not None else None
    order = BatchOrder(len(images), batch, seed)
    n_params = sum(p.numel() for p in net.parameters())

    log = RunLog(run.root, start=step, key="step", tensorboard=bool(cfg.get("tensorboard", True)),
                 purge_step=step if resume else None)

    def save_state(at_step: int) -> None:
        save_checkpoint(state_path, {
            "version": STATE_VERSION, "step": at_step, "config": cfg, "net": net.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "rng": rng_state(None, device)})

    def save_snapshots(at_step: int) -> None:
        for std, gamma, e in zip(ema.stds, ema.gammas, ema.emas):
            save_generator(run.path("snapshots", snapshot_filename(std, at_step)), e, arch, kwargs,
                           extra=snapshot_extra(std, at_step, batch, gamma) | {"config": cfg["name"]})

    bar = tqdm(total=total_steps, initial=step, unit="step", desc=f"train-base {cfg['name']}", disable=not progress,
               dynamic_ncols=True)
    loss_sum, grad_sum, n_acc, t_last = torch.zeros((), device=device), 0.0, 0, time.perf_counter()
    start_step = step
    while step < total_steps:
        # One training step on the batch of step `step` (0-based); the EMA time is t = step + 1.
        idx = order.indices(step)
        g_noise, g_sigma, g_label = (_step_generator(seed, step, s) for s in range(3))
        x0 = data[idx.to(device)]
        eps = torch.randn(x0.shape, generator=g_noise).to(device)
        sigma = sample_sigma(batch, tc["sigma_sampling"], float(tc["logit_mean"]), float(tc["logit_std"]), g_sigma).to(device)
        y = None
        if targets is not None:
            y = drop_labels(targets[idx.to(device)], float(tc["label_dropout"]), null_label, g_label)
        kimg = (step + 1) * batch / 1000
        lr = learning_rate(step * batch / 1000, float(tc["lr"]), float(tc["lr_rampup_kimg"]), float(tc["lr_decay_kimg"]))
        for group in opt.param_groups:
            group["lr"] = lr
        x_sigma = flow_interpolate(x0, eps, sigma).contiguous(memory_format=memory_format)
        loss = flow_loss(forward(x_sigma, sigma, y), flow_target(x0, eps)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float(tc["grad_clip"]) if tc["grad_clip"] else float("inf"))
        opt.step()
        step += 1
        ema.update(net, step)
        loss_sum += loss.detach()
        grad_sum += float(grad_norm)
        n_acc += 1
        bar.update(1)

        if step % log_every == 0 or step == total_steps:
            now = time.perf_counter()
            rec = {"step": step, "kimg": round(kimg, 4), "loss": float(loss_sum) / n_acc, "grad_norm": grad_sum / n_acc,
                   "lr": lr, "sec_per_step": (now - t_last) / n_acc}
            log.write(rec)
            log.scalars({k: rec[k] for k in ("loss", "grad_norm", "lr", "sec_per_step")}, step, prefix="train/")
            bar.set_postfix(loss=f"{rec['loss']:.4f}", kimg=f"{kimg:.1f}")
            loss_sum.zero_()
            grad_sum, n_acc, t_last = 0.0, 0, now
        if step % snapshot_every == 0 or step == total_steps:
            save_snapshots(step)
        if step % checkpoint_every == 0 or step == total_steps:
            save_state(step)
        if stop_after_step is not None and step >= stop_after_step:
            break
    bar.close()
    log.close()
    summary = {"run_dir": str(run.root), "step": step, "total_steps": total_steps, "kimg": step * batch / 1000,
               "params": n_params, "steps_this_session": step - start_step}
    if step >= total_steps and ec.get("export_std"):
        out = save_phema(run.path("model.safetensors"), list_snapshots(run.path("snapshots")), float(ec["export_std"]),
                         method=ec.get("export_method", "continuous"))
        summary["model"] = str(out)
    return summary
