"""Post-hoc EMA (EDM2, Karras et al. 2024, §3.2 and appendix C), written from its equations.

Each snapshot i is a power-function EMA with exponent gamma_i taken at step t_i, i.e. the weights averaged under the
profile p_i(tau) = (gamma_i + 1) tau^gamma_i / t_i^(gamma_i + 1) on [0, t_i]. A new EMA (gamma_out at t_out) is
approximated by sum_i x_i * snapshot_i, with x the least-squares fit of the profiles:
minimise || sum_i x_i p_i - p_out ||^2  ->  A x = b,  A_ij = <p_i, p_j>,  b_i = <p_i, p_out>,
then x is normalised to sum to 1 so that a constant parameter stays exactly constant.
The inner products have a closed form (`profile_inner`); the `discrete` method uses the exact per-step weights of
our update instead (`power_weights`), which is more accurate for short runs.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..models import build_network, read_generator_metadata, save_generator
from ..utils.errors import InputError
from .ema import power_weights, sigma_rel_to_gamma


# <p_a, p_b> = (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) t_b) * (t_a / t_b)^g_b  for t_a <= t_b (symmetric otherwise):
# the integral over [0, min(t_a, t_b)] of the product of two power profiles.
def profile_inner(t_a, g_a, t_b, g_b):
    t_a, g_a, t_b, g_b = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b)))
    swap = t_a > t_b
    t_lo, g_lo = np.where(swap, t_b, t_a), np.where(swap, g_b, g_a)
    t_hi, g_hi = np.where(swap, t_a, t_b), np.where(swap, g_a, g_b)
    return (g_lo + 1) * (g_hi + 1) / ((g_lo + g_hi + 1) * t_hi) * (t_lo / t_hi) ** g_hi


def _weights_matrix(ts, gammas, length: int) -> np.ndarray:
    w = np.zeros((len(ts), length), dtype=np.float64)
    for i, (t, g) in enumerate(zip(ts, gammas)):
        w[i, : int(t)] = power_weights(int(t), float(g))
    return w


def solve_phema_coefficients(in_t, in_std, out_t, out_std, method: str = "continuous") -> np.ndarray:
    """Coefficients X (n_in, n_out): output j = sum_i X[i, j] * snapshot i. Times in steps (any unit for continuous)."""
    in_t, in_std = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in np.broadcast_arrays(in_t, in_std))
    out_t, out_std = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in np.broadcast_arrays(out_t, out_std))
    if in_t.size == 0:
        raise ValueError("post-hoc EMA needs at least one snapshot")
    g_in, g_out = np.atleast_1d(sigma_rel_to_gamma(in_std)), np.atleast_1d(sigma_rel_to_gamma(out_std))
    if method == "continuous":
        A = profile_inner(in_t[:, None], g_in[:, None], in_t[None, :], g_in[None, :])
        B = profile_inner(in_t[:, None], g_in[:, None], out_t[None, :], g_out[None, :])
    elif method == "discrete":
        if np.any(in_t != np.round(in_t)) or np.any(out_t != np.round(out_t)):
            raise ValueError("the discrete post-hoc EMA needs integer step counts")
        length = int(max(in_t.max(), out_t.max()))
        w_in, w_out = _weights_matrix(in_t, g_in, length), _weights_matrix(out_t, g_out, length)
        A, B = w_in @ w_in.T, w_in @ w_out.T
    else:
        raise ValueError(f"post-hoc EMA method must be 'continuous' or 'discrete', got {method!r}")
    X = np.linalg.lstsq(A, B, rcond=None)[0]
    return X / X.sum(axis=0, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------
# Snapshot files: written by the training loop with save_generator(extra={"phema": {...}}).

@dataclasses.dataclass(frozen=True)
class Snapshot:
    path: Path
    std: float
    step: int
    kimg: float
    batch: int

    @property
    def name(self) -> str:
        return self.path.name


def snapshot_extra(std: float, step: int, batch: int, gamma: float | None = None) -> dict:
    """The metadata a snapshot carries: which EMA profile (std, gamma) at which training step / kimg."""
    return {"phema": {"std": float(std), "gamma": float(sigma_rel_to_gamma(std) if gamma is None else gamma),
                      "step": int(step), "kimg": step * batch / 1000.0, "batch": int(batch)}}


def snapshot_filename(std: float, step: int) -> str:
    return f"phema-{step:07d}-{std:.3f}.safetensors"


def list_snapshots(directory: str | os.PathLike) -> list[Snapshot]:
    """Every power-EMA snapshot in `directory` (or its snapshots/ subfolder), sorted by (step, std)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"snapshot folder {d} not found; pass the run's snapshots/ folder (written by train-base)")
    def scan(folder: Path) -> list[Snapshot]:
        found = []
        for f in sorted(folder.glob("*.safetensors")):
            try:
                extra = read_generator_metadata(f)["extra"]
            except ValueError:
                continue
            if "phema" in extra:
                p = extra["phema"]
                found.append(Snapshot(f, float(p["std"]), int(p["step"]), float(p["kimg"]), int(p.get("batch", 0))))
        return found

    out = scan(d)
    if not out and (d / "snapshots").is_dir():
        out = scan(d / "snapshots")
    if not out:
        raise FileNotFoundError(f"no power-EMA snapshots (.safetensors with 'phema' metadata) in {d}")
    return sorted(out, key=lambda s: (s.step, s.std))


def phema_coefficients(snapshots: list[Snapshot], std: float, step: int | None = None,
                       method: str = "continuous") -> tuple[list[Snapshot], np.ndarray]:
    """The snapshots used (those at or before `step`, default the latest) and their coefficients for EMA `std`."""
    step = max(s.step for s in snapshots) if step is None else int(step)
    used = [s for s in snapshots if s.step <= step]
    if not used:
        raise InputError(f"no snapshot at or before step {step} (earliest is step {min(s.step for s in snapshots)})")
    x = solve_phema_coefficients([s.step for s in used], [s.std for s in used], step, std, method=method)[:, 0]
    return used, x


@torch.no_grad()
def reconstruct(snapshots: list[Snapshot], std: float, step: int | None = None, method: str = "continuous") -> tuple[dict, dict]:
    """The post-hoc EMA state dict sum_i x_i theta_i (accumulated in float64) and its metadata."""
    used, x = phema_coefficients(snapshots, std, step, method)
    acc: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    meta0 = read_generator_metadata(used[0].path)
    for snap, coef in zip(used, x):
        if read_generator_metadata(snap.path)["kwargs"] != meta0["kwargs"]:
            raise InputError(f"snapshot {snap.path} belongs to a different network than {used[0].path}; keep one run per folder")
        for k, v in load_file(str(snap.path)).items():
            dtypes.setdefault(k, v.dtype)
            if k not in acc:
                acc[k] = torch.zeros(v.shape, dtype=torch.float64)
            acc[k] += float(coef) * v.double()
    sd = {k: v.to(dtypes[k]) for k, v in acc.items()}
    out_step = max(s.step for s in used) if step is None else int(step)
    batch = used[-1].batch
    info = {"arch": meta0["arch"], "kwargs": meta0["kwargs"],
            "phema": {"std": float(std), "step": out_step, "kimg": out_step * batch / 1000.0, "method": method,
                      "sources": [s.name for s in used], "coefficients": [float(c) for c in x]}}
    return sd, info


def save_phema(path: str | os.PathLike, snapshots: list[Snapshot], std: float, step: int | None = None,
               method: str = "continuous") -> Path:
    """Reconstruct EMA `std` and write it as a generator file (loadable with distreward.models.load_generator)."""
    sd, info = reconstruct(snapshots, std, step, method)
    net = build_network(info["arch"], info["kwargs"])
    net.load_state_dict(sd, strict=True)
    return save_generator(path, net, info["arch"], info["kwargs"], extra={"phema_reconstruction": info["phema"]})
