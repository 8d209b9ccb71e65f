"""How much of one update's gradient is signal, from the gradients of independent batches (docs/rl.md), and where
its noise lives.

With g_k = mu + noise_k over K independent batches of B samples, the mean dot product of two batches estimates
|mu|^2 and the mean squared norm |mu|^2 + tr(Sigma)/B: their ratio rho is the signal's share of the update, and
B (1 - rho) / rho the batch at which signal equals noise. `benchmarks/rl_diagnostics.py snr` draws the batches.

The decomposition (`variance_components`) splits tr(Sigma) by nested resampling: I batches of samples (policy
noise), J reference sets per batch (reward noise: the same samples scored against other draws of the reference
set), K draws of the loss's own randomness per reference set (noise levels and eps of the forward-process loss,
trained steps of GRPO). With g_ijk = s + p_i + r_ij + l_ijk, the law of total variance gives
tr Var g = tr Var p + tr Var r + tr Var l, and the nested sums of squares estimate each term without bias.
`benchmarks/rl_diagnostics.py decompose` draws the gradients.
"""

from __future__ import annotations

import numpy as np
import torch

from ..utils.configdiff import flatten


def signal_share(grads: list[torch.Tensor]) -> dict:
    """rho = mean_{k<l} g_k . g_l / mean_k |g_k|^2 (unbiased for |mu|^2 / E|g|^2 over independent batches), with
    the standard error of the pairs' mean dot product (pairs share batches: an underestimate, a guide)."""
    if len(grads) < 3:
        raise ValueError(f"signal_share: {len(grads)} gradients given; pass at least 3 (the error of rho comes "
                         "from the spread of the pairs)")
    G = torch.stack(grads)
    gram = (G @ G.T).numpy()
    i, j = np.triu_indices(len(grads), 1)
    dots, norms = gram[i, j], np.sqrt(np.diag(gram))
    sq = float(np.mean(norms ** 2))
    cos = dots / (norms[i] * norms[j])
    return {"rho": float(dots.mean() / sq), "rho_err": float(dots.std(ddof=1) / np.sqrt(dots.size) / sq),
            "cos_pairs_mean": float(cos.mean()), "cos_pairs_min": float(cos.min()), "cos_pairs_max": float(cos.max()),
            "grad_norm_mean": float(np.sqrt(sq))}


def batch_for_signal_equal_noise(rho: float, batch: int) -> float | None:
    """B (1 - rho) / rho: the batch at which the noise's share equals the signal's (None where rho <= 0)."""
    return float(batch * (1 - rho) / rho) if rho > 0 else None


def signal_report(real: list[torch.Tensor], null: list[torch.Tensor], batch: int) -> dict:
    """rho of the real and the null control's gradients, and the batch for signal = noise: at rho, and at least
    (at rho + 2 standard errors)."""
    out = {"real": signal_share(real), "null": signal_share(null)}
    rho, high = out["real"]["rho"], out["real"]["rho"] + 2 * out["real"]["rho_err"]
    out["batch_for_signal_equal_noise"] = batch_for_signal_equal_noise(rho, batch)
    out["batch_for_signal_equal_noise_at_least"] = batch_for_signal_equal_noise(high, batch) if high < 1 else None
    return out


# ------------------------------------------------------------------------------------------ the decomposition

# Within-cell mean square: sum_ijk |g_ijk - g_ij.|^2 / (I J (K - 1)), unbiased for tr Var l (the loss's noise).
def within_cells(x: torch.Tensor) -> float:
    I, J, K = x.shape[:3]
    return float(((x - x.mean(2, keepdim=True)) ** 2).sum() / (I * J * (K - 1)))


# Between reference sets of one batch: sum_ij |g_ij. - g_i..|^2 / (I (J - 1)), unbiased for tr Var r + tr Var l / K.
def between_references(x: torch.Tensor) -> float:
    I, J = x.shape[:2]
    cells = x.mean(2)
    return float(((cells - cells.mean(1, keepdim=True)) ** 2).sum() / (I * (J - 1)))


# Between batches: sum_i |g_i.. - g_...|^2 / (I - 1), unbiased for tr Var p + tr Var r / J + tr Var l / (J K).
def between_batches(x: torch.Tensor) -> float:
    means = x.mean((1, 2))
    return float(((means - means.mean(0)) ** 2).sum() / (x.shape[0] - 1))


# |s|^2 from the batches' means: sum_{i != i'} g_i.. . g_i'.. / (I (I - 1)) (independent batches: unbiased).
def signal_from_pairs(x: torch.Tensor) -> float:
    means = x.mean((1, 2))
    total = means.sum(0)
    return float((total @ total - (means * means).sum()) / (x.shape[0] * (x.shape[0] - 1)))


def variance_components(x: torch.Tensor) -> dict:
    """Unbiased estimates from gradients x (I batches, J reference sets, K loss draws, P parameters), I, J, K >= 2:
    `signal` |s|^2, and the traces of one gradient's noise by source, `policy`, `reward`, `loss`; `total` =
    |s|^2 + their sum (E|g|^2), each source's `share` of it, `rho` (the signal's), and rho with each source
    removed (`rho_without`: what infinite resampling of that source alone would give)."""
    if x.ndim != 4 or min(x.shape[:3]) < 2:
        raise ValueError(f"variance_components: gradients of shape {tuple(x.shape)}; pass (I, J, K, P) with I, J, "
                         "K >= 2 (batches, reference sets per batch, loss draws per reference set)")
    x = x.double()
    J, K = x.shape[1], x.shape[2]
    w, b_r, b_p = within_cells(x), between_references(x), between_batches(x)
    parts = {"policy": b_p - b_r / J, "reward": b_r - w / K, "loss": w}
    signal = signal_from_pairs(x)
    total = signal + sum(parts.values())
    return {"signal": signal, **parts, "total": total, "rho": signal / total,
            "share": {k: v / total for k, v in parts.items()},
            "rho_without": {k: signal / (total - v) if total > v else None for k, v in parts.items()}}


def jackknife_errors(x: torch.Tensor, estimate=variance_components) -> dict:
    """Standard errors of variance_components' scalars by the delete-one-batch jackknife (the I batches are the
    independent units; I >= 3)."""
    I = x.shape[0]
    if I < 3:
        raise ValueError(f"jackknife_errors: {I} batches; pass at least 3 (one is left out at a time)")
    leave_one = [flatten(estimate(torch.cat([x[:i], x[i + 1:]]))) for i in range(I)]
    errors = {}
    for k in leave_one[0]:
        v = np.array([np.nan if d[k] is None else d[k] for d in leave_one], dtype=np.float64)
        errors[k] = float(np.sqrt((I - 1) / I * np.sum((v - v.mean()) ** 2)))
    return errors


def decomposition_report(x: torch.Tensor, batch: int) -> dict:
    """variance_components of the gradients x, their jackknife errors (`err`, flat keys) and the batch at which
    signal equals noise at rho (as signal_report)."""
    out = variance_components(x)
    out["err"] = jackknife_errors(x) if x.shape[0] >= 3 else None
    out["batch_for_signal_equal_noise"] = batch_for_signal_equal_noise(out["rho"], batch)
    return out
