"""The gradient signal-share estimator of benchmarks/rl_diagnostics.py (`snr`), on synthetic batch gradients."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("rl_diagnostics",
                                               Path(__file__).parents[1] / "benchmarks" / "rl_diagnostics.py")
diag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diag)


def batch_gradients(mu: torch.Tensor, noise_std: float, K: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(mu + noise_std * torch.randn(mu.shape, generator=g, dtype=torch.float64)) for _ in range(K)]


@pytest.mark.parametrize("noise_std", [0.02, 0.05, 0.15])
def test_signal_share_recovers_the_share_of_the_mean_gradient(noise_std):
    d = 4000
    mu = torch.full((d,), 0.05, dtype=torch.float64) * torch.linspace(0.5, 1.5, d, dtype=torch.float64)
    expected = float(mu @ mu) / (float(mu @ mu) + noise_std ** 2 * d)
    out = diag.signal_share(batch_gradients(mu, noise_std, K=12, seed=1))
    assert out["rho"] == pytest.approx(expected, rel=0.2)      # 0.87, 0.52, 0.11
    assert (1 - out["rho"]) / out["rho"] == pytest.approx(noise_std ** 2 * d / float(mu @ mu), rel=0.35)
    assert out["grad_norm_mean"] == pytest.approx((float(mu @ mu) + noise_std ** 2 * d) ** 0.5, rel=0.05)
    assert out["cos_pairs_min"] <= out["cos_pairs_mean"] <= out["cos_pairs_max"]


def test_signal_share_of_pure_noise_is_zero_within_its_error():
    out = diag.signal_share(batch_gradients(torch.zeros(4000, dtype=torch.float64), 1.0, K=10, seed=2))
    assert abs(out["rho"]) < 4 * out["rho_err"] and out["rho_err"] < 0.01
