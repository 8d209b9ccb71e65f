"""The policy-gradient equations of `distreward.pg`, each against an independent computation: the PPO trust region
acts at the default clip range (log-probs are means over dimensions, so rho stays near 1) and its gradient is
exactly zero where the clip binds; advantages do not depend on the reward's scale and are zero for equal rewards;
the KL estimate and the clip shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

from distreward.pg import clip_binds, clip_masks, group_advantages, kl_estimate, ppo_clip_loss  # noqa: E402
from distreward.rl.settings import DEFAULTS  # noqa: E402

EPS = float(DEFAULTS["rl"]["clip_eps"])          # the default clip range


# --------------------------------------------------------------------------------------------- PPO clip

def test_default_clip_range_is_small():
    """The schema default is of the size of |rho - 1| (docs/rl.md), not PPO's 0.2, which never binds here."""
    assert 0 < EPS <= 1e-3


def test_policy_gradient_is_exactly_zero_where_the_clip_binds():
    # log rho just outside / inside the range, on both sides, with both signs of A
    delta = torch.tensor([3.0, 0.5, -3.0, -0.5, 3.0, -3.0], dtype=torch.float64) * EPS
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    log_prob = delta.clone().requires_grad_(True)
    loss, rho = ppo_clip_loss(adv, log_prob, torch.zeros(6, dtype=torch.float64), EPS)
    loss.sum().backward()
    # independent: the clipped objective is flat (gradient 0) where rho is beyond the bound on A's side
    # (A > 0, rho > 1 + eps; A < 0, rho < 1 - eps), and d(-A rho)/d log p = -A rho everywhere else
    bind = torch.tensor([True, False, True, False, False, False])
    expected = torch.where(bind, torch.zeros(6, dtype=torch.float64), -adv * torch.exp(delta))
    assert torch.equal(log_prob.grad[bind], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(log_prob.grad, expected, rtol=1e-12, atol=0)
    assert torch.equal(clip_binds(rho.detach(), adv, EPS), bind)


def test_clip_masks_and_the_kl_estimate_match_their_definitions():
    log_rho = torch.tensor([0.3, -0.2, 0.0, 1e-4, -1e-4], dtype=torch.float64)
    rho = log_rho.exp()
    # beyond 1 +- eps, by hand: 0.3 and 1e-4 (> 1 + 5e-5) above, -0.2 and -1e-4 below
    hi, lo = clip_masks(rho, 5e-5)
    assert hi.tolist() == [True, False, False, True, False] and lo.tolist() == [False, True, False, False, True]
    # k3: (rho - 1) - log rho per sample, non-negative; zero on policy
    assert torch.allclose(kl_estimate(log_rho), (rho - 1) - log_rho, rtol=0, atol=1e-15)
    assert bool((kl_estimate(log_rho) >= 0).all()) and torch.equal(kl_estimate(torch.zeros(4)), torch.zeros(4))


# --------------------------------------------------------------------------------------------- advantages

def reference_advantages(r: np.ndarray, groups: np.ndarray, std: str) -> np.ndarray:
    """(r - group mean) / std with no epsilon (numpy, float64)."""
    out = np.zeros_like(r, dtype=np.float64)
    for g in np.unique(groups):
        m = groups == g
        scale = r[m].std(ddof=1) if std == "group" else r.std(ddof=1)
        out[m] = (r[m] - r[m].mean()) / scale
    return out


@pytest.mark.parametrize("std", ["group", "global"])
def test_advantages_do_not_depend_on_the_reward_scale(std):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(32, generator=g, dtype=torch.float64) * 1e-4   # a subset-replace reward at N = 50k
    groups = torch.arange(4).repeat_interleave(8)
    a, _ = group_advantages(r, groups, std=std, clip=10.0)
    for c in (1e-6, 1e6):
        a_c, _ = group_advantages(r * c, groups, std=std, clip=10.0)
        assert torch.allclose(a_c, a, rtol=1e-5, atol=1e-6)
    # and they are the plain normalised rewards: the relative eps costs at most ~1e-6 of them
    np.testing.assert_allclose(a.numpy(), reference_advantages(r.numpy(), groups.numpy(), std), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("value", [0.1, 0.0, 1e-9, 7.3e5])
def test_all_equal_rewards_give_zero_advantages(std, value):
    groups = torch.arange(3).repeat_interleave(5)
    a, flat = group_advantages(torch.full((15,), value), groups, std=std)
    assert torch.equal(a, torch.zeros(15)) and flat.all()
    # one flat group among spread ones: zeros there, finite elsewhere
    r = torch.cat([torch.full((5,), value), torch.tensor([0.1, 0.3, 0.2, 0.5, 0.4] * 2)])
    a, flat = group_advantages(r, groups, std=std)
    assert torch.isfinite(a).all() and torch.equal(a[:5], torch.zeros(5)) and flat[:5].all() and not flat[5:].any()
