"""The gradient signal-share estimator and the nested variance decomposition (distreward.rl.diagnostics), on
synthetic gradients with known parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distreward.rl.diagnostics import (batch_for_signal_equal_noise, decomposition_report, jackknife_errors,
                                       signal_report, signal_share, variance_components)


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


# --------------------------------------------------------------------------------------------- the decomposition

def nested_gradients(I: int, J: int, K: int, d: int, signal: float, policy: float, reward: float, loss: float,
                     seed: int) -> torch.Tensor:
    """g_ijk = s + p_i + r_ij + l_ijk with |s|^2 = signal and isotropic Gaussian parts of the given traces."""
    g = torch.Generator().manual_seed(seed)

    def part(shape, trace):
        return (trace / d) ** 0.5 * torch.randn((*shape, d), generator=g, dtype=torch.float64)

    s = torch.full((d,), (signal / d) ** 0.5, dtype=torch.float64)
    return (s + part((I, 1, 1), policy) + part((I, J, 1), reward) + part((I, J, K), loss))


@pytest.mark.parametrize("parts", [(1.0, 4.0, 2.0, 8.0), (0.5, 0.5, 6.0, 1.0), (2.0, 3.0, 0.0, 12.0)])
def test_variance_components_recover_known_traces(parts):
    signal, policy, reward, loss = parts
    x = nested_gradients(8, 3, 2, 20000, signal, policy, reward, loss, seed=int(10 * sum(parts)))
    out = variance_components(x)
    assert out["signal"] == pytest.approx(signal, rel=0.1)
    assert out["policy"] == pytest.approx(policy, rel=0.1)
    assert out["loss"] == pytest.approx(loss, rel=0.05)
    assert out["reward"] == pytest.approx(reward, rel=0.1, abs=0.1)      # the naive mean square is off by loss / K
    total = signal + policy + reward + loss
    assert out["rho"] == pytest.approx(signal / total, rel=0.1)
    assert out["share"]["loss"] == pytest.approx(loss / total, rel=0.1)
    assert out["rho_without"]["policy"] == pytest.approx(signal / (total - policy), rel=0.1)


def test_the_jackknife_error_covers_the_spread_over_repeats():
    # few dimensions: the estimates scatter; the jackknife's error matches their spread over repeats
    runs = [nested_gradients(6, 2, 2, 50, 1.0, 2.0, 1.0, 2.0, seed=s) for s in range(150)]
    policy = np.array([variance_components(x)["policy"] for x in runs])
    err = np.array([jackknife_errors(x)["policy"] for x in runs])
    assert policy.mean() == pytest.approx(2.0, abs=3 * policy.std() / np.sqrt(len(runs)))    # unbiased
    assert 0.6 < np.median(err) / policy.std() < 1.6


def test_variance_components_refuse_a_design_without_replicates():
    with pytest.raises(ValueError, match="I, J, K >= 2"):
        variance_components(torch.zeros(4, 1, 3, 10))


def test_decomposition_report_names_the_batch_for_signal_equal_noise():
    out = decomposition_report(nested_gradients(5, 2, 2, 5000, 1.0, 1.0, 1.0, 1.0, seed=1), batch=64)
    assert out["batch_for_signal_equal_noise"] == pytest.approx(64 * (1 - out["rho"]) / out["rho"])
    assert set(out["err"]) >= {"signal", "policy", "reward", "loss", "share.reward", "rho_without.loss"}
