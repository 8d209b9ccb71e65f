"""The gradient signal-share estimator (distreward.rl.diagnostics), on synthetic batch gradients."""

from __future__ import annotations

import pytest
import torch

from distreward.rl.diagnostics import batch_for_signal_equal_noise, signal_report, signal_share


def batch_gradients(mu: torch.Tensor, noise_std: float, K: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(mu + noise_std * torch.randn(mu.shape, generator=g, dtype=torch.float64)) for _ in range(K)]


@pytest.mark.parametrize("noise_std", [0.02, 0.05, 0.15])
def test_signal_share_recovers_the_share_of_the_mean_gradient(noise_std):
    d = 4000
    mu = torch.full((d,), 0.05, dtype=torch.float64) * torch.linspace(0.5, 1.5, d, dtype=torch.float64)
    expected = float(mu @ mu) / (float(mu @ mu) + noise_std ** 2 * d)
    out = signal_share(batch_gradients(mu, noise_std, K=12, seed=1))
    assert out["rho"] == pytest.approx(expected, rel=0.2)      # 0.87, 0.52, 0.11
    assert (1 - out["rho"]) / out["rho"] == pytest.approx(noise_std ** 2 * d / float(mu @ mu), rel=0.35)
    assert out["grad_norm_mean"] == pytest.approx((float(mu @ mu) + noise_std ** 2 * d) ** 0.5, rel=0.05)
    assert out["cos_pairs_min"] <= out["cos_pairs_mean"] <= out["cos_pairs_max"]


def test_signal_share_of_pure_noise_is_zero_within_its_error():
    out = signal_share(batch_gradients(torch.zeros(4000, dtype=torch.float64), 1.0, K=10, seed=2))
    assert abs(out["rho"]) < 4 * out["rho_err"] and out["rho_err"] < 0.01


def test_signal_share_of_three_hand_made_gradients():
    # dots (1, 0, 0) . (1, 1, 0) = 1, (1, 0, 0) . (1, 0, 1) = 1, (1, 1, 0) . (1, 0, 1) = 1; norms^2 1, 2, 2
    out = signal_share([torch.tensor(v, dtype=torch.float64) for v in ([1, 0, 0], [1, 1, 0], [1, 0, 1])])
    assert out["rho"] == pytest.approx(1 / (5 / 3))
    assert out["rho_err"] == 0
    assert out["grad_norm_mean"] == pytest.approx((5 / 3) ** 0.5)
    assert out["cos_pairs_max"] == pytest.approx(2 ** -0.5) and out["cos_pairs_min"] == pytest.approx(0.5)


def test_signal_share_needs_three_gradients():
    with pytest.raises(ValueError, match="at least 3"):
        signal_share([torch.ones(3), torch.ones(3)])


def test_batch_for_signal_equal_noise():
    # rho = |mu|^2 / (|mu|^2 + v / B): at B' = B (1 - rho) / rho the noise v / B' equals |mu|^2
    mu2, v, B = 0.3, 12.0, 64
    rho = mu2 / (mu2 + v / B)
    assert batch_for_signal_equal_noise(rho, B) == pytest.approx(v / mu2)
    assert batch_for_signal_equal_noise(0.0, B) is None and batch_for_signal_equal_noise(-0.1, B) is None


def test_signal_report_bounds_the_batch_from_below_at_two_errors():
    mu = torch.full((4000,), 0.05, dtype=torch.float64)
    real, null = batch_gradients(mu, 0.1, K=8, seed=3), batch_gradients(mu * 0, 0.1, K=8, seed=4)
    out = signal_report(real, null, 32)
    assert out["real"] == signal_share(real) and out["null"] == signal_share(null)
    assert 0 < out["batch_for_signal_equal_noise_at_least"] < out["batch_for_signal_equal_noise"]
