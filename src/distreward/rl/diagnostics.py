"""How much of one update's gradient is signal, from the gradients of independent batches (docs/rl.md).

With g_k = mu + noise_k over K independent batches of B samples, the mean dot product of two batches estimates
|mu|^2 and the mean squared norm |mu|^2 + tr(Sigma)/B: their ratio rho is the signal's share of the update, and
B (1 - rho) / rho the batch at which signal equals noise. `benchmarks/rl_diagnostics.py snr` draws the batches.
"""

from __future__ import annotations

import numpy as np
import torch


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
