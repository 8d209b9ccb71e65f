"""The forward-process loss's draws (distreward.rl.nft.loss_draws; nft.sigma_draw, nft.antithetic): stratified
levels are U(0, 1) in marginal with one level per stratum, antithetic pairs share sigma with opposite noises, the
defaults are the plain torch.rand / torch.randn draws, every setting consumes the generator the same way (a run
with both on resumes bit for bit), odd nft.timesteps with pairs is refused, and the two together lower the
variance of the loss's gradient at equal K."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

from distreward.rl.nft import antithetic_pairs, loss_draws, nft_loss, nft_update, stratified_levels  # noqa: E402
from distreward.sampling import FlowVelocity  # noqa: E402
from distreward.schema import ConfigError  # noqa: E402
from distreward.train.flow import flow_interpolate, flow_target  # noqa: E402

from test_grpo_dist import SHAPE, make_net  # noqa: E402
from test_rl_run import frame_cfg, run, untimed  # noqa: E402

SETTINGS = [("iid", False), ("stratified", False), ("iid", True), ("stratified", True)]


def ks_uniform(x: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of the sample x from U(0, 1)."""
    s, n = x.flatten().double().sort().values, x.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - s, s - (i - 1) / n).max())


# --------------------------------------------------------------------------------------------- the draw rules

@pytest.mark.parametrize("K", [3, 4, 8])
def test_stratified_levels_are_uniform_with_one_level_per_stratum(K):
    u = torch.rand((20000, K), generator=torch.Generator().manual_seed(K))
    sigma = stratified_levels(u)
    k = torch.arange(K, dtype=sigma.dtype)
    assert torch.all((sigma >= k / K) & (sigma <= (k + 1) / K))              # level k in stratum k, every row
    assert torch.equal((sigma * K).floor().clamp(max=K - 1), k.expand_as(sigma))
    n = sigma.numel()
    assert ks_uniform(sigma) < 1.95 / math.sqrt(n)                           # KS test at alpha = 0.001
    assert ks_uniform(u[:, 0] / K) > 0.5                                     # the test sees a wrong marginal
    hist = torch.histc(sigma, bins=2 * K, min=0, max=1)                      # two bins per stratum
    assert torch.all((hist / n - 1 / (2 * K)).abs() < 4 * math.sqrt(1 / (2 * K) / n))


def test_antithetic_pairs_share_sigma_and_negate_the_noise():
    g = torch.Generator().manual_seed(0)
    sigma, eps = antithetic_pairs(torch.rand((5, 3), generator=g), torch.randn((5, 3, *SHAPE), generator=g))
    assert sigma.shape == (5, 6) and eps.shape == (5, 6, *SHAPE)
    assert torch.equal(sigma[:, 0::2], sigma[:, 1::2])
    assert torch.equal(eps[:, 1::2], -eps[:, 0::2]) and bool((eps[:, 0::2] != 0).all())


@pytest.mark.parametrize("sigma_draw, antithetic", SETTINGS)
def test_draws_are_one_uniform_then_one_normal_draw(sigma_draw, antithetic):
    """iid without pairs is exactly the former torch.rand((B, K)), torch.randn((B, K, ...)); the others transform
    the same two draws (of K / 2 levels when paired)."""
    B, K = 6, 4
    sigma, eps = loss_draws(B, K, SHAPE, torch.Generator().manual_seed(7), sigma_draw=sigma_draw,
                            antithetic=antithetic)
    g = torch.Generator().manual_seed(7)
    n = K // 2 if antithetic else K
    u, e = torch.rand((B, n), generator=g), torch.randn((B, n, *SHAPE), generator=g)
    s = stratified_levels(u) if sigma_draw == "stratified" else u
    want = antithetic_pairs(s, e) if antithetic else (s, e)
    assert sigma.shape == (B, K) and eps.shape == (B, K, *SHAPE)
    assert torch.equal(sigma, want[0]) and torch.equal(eps, want[1])
    if (sigma_draw, antithetic) == ("iid", False):
        assert torch.equal(sigma, u) and torch.equal(eps, e)
    if sigma_draw == "stratified" and antithetic:                            # K / 2 strata, a pair in each
        assert torch.equal((sigma * (K // 2)).floor(), torch.arange(K // 2).repeat_interleave(2).expand(B, K).float())


def test_antithetic_with_odd_timesteps_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^nft.timesteps: 3 is not allowed .*even nft.timesteps such as 4"):
        loss_draws(4, 3, SHAPE, torch.Generator(), antithetic=True)
    cfg = frame_cfg("nft", 1)
    cfg["nft"].update(timesteps=3, antithetic=True)
    with pytest.raises(ConfigError, match=r"^nft.timesteps: 3 is not allowed .*nft.antithetic=false\)$"):
        run("nft", cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- in the trainer

@pytest.mark.parametrize("sigma_draw, antithetic", SETTINGS)
def test_update_consumes_the_generator_the_same_way_per_setting(sigma_draw, antithetic):
    """nft_update's draws per epoch: the permutation, then loss_draws; the generator ends where that sequence
    written out ends (so a checkpointed generator state resumes the same draws)."""
    B, K, epochs = 6, 4, 2
    net = make_net()
    model, old = FlowVelocity(net), FlowVelocity(make_net().requires_grad_(False))
    ema = make_net()
    g = torch.Generator().manual_seed(1)
    x0, labels = torch.randn((B, *SHAPE), generator=g), torch.randint(0, 3, (B,), generator=g)
    rl = SimpleNamespace(minibatches=2, inner_epochs=epochs, grad_clip=1.0, ema_decay=0.9)
    nft = SimpleNamespace(timesteps=K, beta=1.0, sigma_draw=sigma_draw, antithetic=antithetic)
    gen = torch.Generator().manual_seed(2)
    nft_update(net, model, old, ema, torch.optim.AdamW(net.parameters(), lr=1e-3), x0, labels, torch.rand(B),
               rl, nft, gen, rows=range(B), batch=B)
    ref = torch.Generator().manual_seed(2)
    for _ in range(epochs):
        torch.randperm(B, generator=ref)
        loss_draws(B, K, SHAPE, ref, sigma_draw=sigma_draw, antithetic=antithetic)
    assert torch.equal(gen.get_state(), ref.get_state())


@pytest.mark.parametrize("name", ["nft", "pool"])
def test_a_run_with_stratified_antithetic_draws_resumes_bit_for_bit(tmp_path, name):
    def cfg(iterations, **nft):
        c = frame_cfg(name, iterations)
        c["nft"].update(timesteps=4, **nft)
        return c

    on = {"sigma_draw": "stratified", "antithetic": True}
    full = run(name, cfg(3, **on), tmp_path / "full")
    run(name, cfg(1, **on), tmp_path / "cut")
    resumed = run(name, cfg(3, **on), tmp_path / "cut", resume=True, allow_changes=["rl.iterations"])
    for key in ("net", "ema"):
        for (k, a), b in zip(full[key].state_dict().items(), resumed[key].state_dict().values()):
            assert torch.equal(a, b), (key, k)
    assert untimed(resumed["history"]) == untimed(full["history"]) and len(full["history"]) == 3
    plain = run(name, cfg(1), tmp_path / "plain")                            # the settings reach the update
    assert plain["history"][0]["loss_nft"] != full["history"][0]["loss_nft"]


# --------------------------------------------------------------------------------------------- the variance

def loss_gradient(net, x0, labels, w, sigma, eps, beta: float = 1.0) -> torch.Tensor:
    """The flattened gradient of the forward-process loss (batch mean, mean over the K levels) on policy
    (v_old = v_theta) at the given levels and noises."""
    net.zero_grad(set_to_none=True)
    K = sigma.shape[1]
    for k in range(K):
        xt, target = flow_interpolate(x0, eps[:, k], sigma[:, k]), flow_target(x0, eps[:, k])
        v = net(xt, sigma[:, k], labels)
        (nft_loss(v, v.detach(), target, w, beta).mean() / K).backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def test_stratified_antithetic_draws_lower_the_gradient_variance_at_equal_k():
    """Fixed network, samples, labels and weights; 32 generator seeds each. Total variance (trace of the
    covariance) of the gradient: stratified + antithetic at K = 4 below iid at K = 4, and both unbiased."""
    net = make_net()
    g = torch.Generator().manual_seed(11)
    B, K, seeds = 16, 4, 32
    x0 = torch.randn((B, *SHAPE), generator=g).tanh()
    labels, w = torch.randint(0, 3, (B,), generator=g), torch.rand(B, generator=g)

    def gradients(sigma_draw, antithetic):
        return torch.stack([loss_gradient(net, x0, labels, w, *loss_draws(
            B, K, SHAPE, torch.Generator().manual_seed(100 + s), sigma_draw=sigma_draw, antithetic=antithetic))
            for s in range(seeds)]).double()

    iid, both = gradients("iid", False), gradients("stratified", True)
    var_iid, var_both = iid.var(0).sum(), both.var(0).sum()
    ratio = float(var_both / var_iid)
    print(f"gradient variance, stratified + antithetic / iid at K = {K} over {seeds} seeds: {ratio:.3f}")
    assert ratio < 0.6
    # the means agree within their standard errors (unbiased): |mean difference|^2 vs its expected size
    diff = (both.mean(0) - iid.mean(0)).pow(2).sum()
    assert float(diff) < 3 * float((var_iid + var_both) / seeds)
