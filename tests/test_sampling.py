"""Processes and samplers (distreward.sampling): conventions, adapters, steps, log-probs, samplers.

Exact models of Gaussian data make every sampler error a discretisation error, so the tolerances below are
properties of the samplers, not of a trained network.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distreward.sampling import (CFGVelocity, EDMVelocity, FlowVelocity, SiTVelocity, cps_step, ddim_step,
                                 edm_class_labels, edm_flow_sigmas, edm_sample, edm_sigmas, edm_to_flow_sigma,
                                 edm_to_flow_velocity, euler_step, flow_to_edm_sigma, flow_to_edm_x, GaussianDenoiser,
                                 gaussian_log_prob, GaussianVelocity, ode_sample, rollout, sde_step, sigma_schedule,
                                 sit_sde_sample, step_log_prob)

M, S = 0.3, 0.5  # Gaussian data N(M, S^2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one torch thread is fastest, and on a shared 2-core machine much faster than several."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal_noise(n: int, seed: int = 0, shape=(1, 4, 4)) -> torch.Tensor:
    return torch.randn((n, *shape), generator=gen(seed))


class TinyVelocity(nn.Module):
    """A small random, nonlinear, class-conditional velocity network v = net(x, sigma, labels) (null label 3)."""

    def __init__(self, channels: int = 2, classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv0 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, channels, 3, padding=1)
        self.sig = nn.Linear(1, 8)
        self.emb = nn.Embedding(classes + 1, 8)
        self.null = classes

    def forward(self, x, sigma, labels=None):
        if labels is None:
            labels = torch.full((x.shape[0],), self.null, dtype=torch.long)
        h = self.conv0(x) + (self.sig(sigma[:, None]) + self.emb(labels))[:, :, None, None]
        return self.conv1(torch.tanh(h))


# --- schedules ---------------------------------------------------------------------------------------------------

def test_sigma_schedule_endpoints_and_shift():
    s = sigma_schedule(10)
    assert s.shape == (11,) and s.dtype == torch.float32
    assert s[0] == 1 and s[-1] == 0 and bool((s[1:] < s[:-1]).all())
    torch.testing.assert_close(s, torch.linspace(1, 0, 11))
    sh = sigma_schedule(10, shift=3.0)
    assert sh[0] == 1 and sh[-1] == 0
    assert bool((sh[1:-1] > s[1:-1]).all())  # a shift > 1 keeps more steps at high noise
    assert abs(sh[5].item() - 3 * 0.5 / (1 + 2 * 0.5)) < 1e-6
    with pytest.raises(ValueError, match="positive integer"):
        sigma_schedule(0)
    with pytest.raises(ValueError, match="shift"):
        sigma_schedule(4, shift=0.0)


def test_edm_sigmas_and_flow_mapping():
    t = edm_sigmas(32, 0.002, 80.0, 7.0)
    assert t.shape == (33,) and t[-1] == 0
    assert abs(t[0].item() - 80) < 1e-4 and abs(t[-2].item() - 0.002) < 1e-7
    assert bool((t[1:] < t[:-1]).all())
    fs = edm_flow_sigmas(32)
    torch.testing.assert_close(fs, t / (1 + t))
    torch.testing.assert_close(flow_to_edm_sigma(edm_to_flow_sigma(t[:-1].double())), t[:-1].double())


# --- steps and log-probs -----------------------------------------------------------------------------------------

def test_sde_step_log_prob_equals_torch_normal():
    x, v = normal_noise(6, 1, (2, 3, 3)), normal_noise(6, 2, (2, 3, 3))
    for sigma, sigma_next in [(0.8, 0.6), (1.0, 0.9), (0.1, 0.0)]:
        out = sde_step(x, v, sigma, sigma_next, 0.7, generator=gen(3))
        ref = torch.distributions.Normal(out.mean, out.std).log_prob(out.x_next).flatten(1).mean(1)
        torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-5)
        assert out.log_prob.shape == (6,)
    # per-sample noise levels (B,) broadcast as well
    sig = torch.tensor([0.9, 0.5, 0.3, 0.7, 0.2, 0.6])
    out = sde_step(x, v, sig, sig - 0.1, 0.5, generator=gen(4))
    ref = torch.distributions.Normal(out.mean, out.std.expand_as(x)).log_prob(out.x_next).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-5)


def test_sde_step_matches_method_equations():
    """mean and std are METHOD.md §4's, and x_next = mean + std * noise."""
    x, v, noise = normal_noise(4, 1), normal_noise(4, 2), normal_noise(4, 3)
    sigma, sigma_next, a = 0.6, 0.45, 0.8
    out = sde_step(x, v, sigma, sigma_next, a, noise=noise)
    s_t = a * math.sqrt(sigma / (1 - sigma))
    dsig = sigma_next - sigma
    torch.testing.assert_close(out.mean, x + (v + s_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dsig)
    assert abs(float(out.std) - s_t * math.sqrt(-dsig)) < 1e-6
    torch.testing.assert_close(out.x_next, out.mean + out.std * noise)
    # at sigma = 1 the noise scale uses 1 - sigma_next (Flow-GRPO), so the first step is finite
    first = sde_step(x, v, 1.0, 0.9, a, noise=noise)
    assert abs(float(first.std) - a * math.sqrt(1 / 0.1) * math.sqrt(0.1)) < 1e-5
    assert torch.isfinite(first.x_next).all()


def test_scoring_a_given_point_returns_its_sampled_log_prob():
    x, v = normal_noise(5, 1), normal_noise(5, 2)
    for step in (sde_step, cps_step):
        sampled = step(x, v, 0.7, 0.5, 0.6, generator=gen(7))
        scored = step(x, v, 0.7, 0.5, 0.6, x_next=sampled.x_next)
        torch.testing.assert_close(scored.log_prob, sampled.log_prob, rtol=0, atol=1e-6)
        moved = step(x, v, 0.7, 0.5, 0.6, x_next=sampled.x_next + 0.3)
        assert bool((moved.log_prob != sampled.log_prob).all())


def test_zero_noise_is_deterministic_with_zero_log_prob():
    x, v = normal_noise(3, 1), normal_noise(3, 2)
    for step in (sde_step, cps_step):
        out = step(x, v, 0.5, 0.25, 0.0, generator=gen(1))
        torch.testing.assert_close(out.x_next, euler_step(x, v, 0.5, 0.25), rtol=1e-6, atol=1e-6)
        assert torch.equal(out.log_prob, torch.zeros(3))
    assert torch.equal(sde_step(x, v, 0.5, 0.25, 0.0, generator=gen(1)).x_next, euler_step(x, v, 0.5, 0.25))
    with pytest.raises(ValueError, match=">= 0"):
        sde_step(x, v, 0.5, 0.25, -0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cps_step(x, v, 0.5, 0.25, 1.5)


def test_cps_log_prob_and_clean_last_step():
    x, v = normal_noise(4, 1), normal_noise(4, 2)
    out = cps_step(x, v, 0.6, 0.3, 0.7, generator=gen(2))
    assert abs(float(out.std) - 0.3 * math.sin(0.7 * math.pi / 2)) < 1e-6
    ref = torch.distributions.Normal(out.mean, out.std).log_prob(out.x_next).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-5)
    last = cps_step(x, v, 0.2, 0.0, 0.7, generator=gen(2))  # lands on sigma = 0: the predicted x0, no noise
    torch.testing.assert_close(last.x_next, x - 0.2 * v)
    assert torch.equal(last.log_prob, torch.zeros(4))


def test_gaussian_log_prob_is_zero_only_where_std_is_zero():
    x, mean = normal_noise(2, 1), normal_noise(2, 2)
    std = torch.tensor([0.0, 0.5]).reshape(2, 1, 1, 1)
    lp = gaussian_log_prob(x, mean, std)
    assert lp[0] == 0
    ref = torch.distributions.Normal(mean[1], 0.5).log_prob(x[1]).mean()
    torch.testing.assert_close(lp[1], ref)


def test_ddim_step_follows_the_marginal_and_scores_like_normal():
    x0, eps = normal_noise(8, 1), normal_noise(8, 2)
    abar, abar_next = 0.3, 0.6
    x = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    det = ddim_step(x, eps, abar, abar_next, 0.0)  # exact eps: eta = 0 lands on the same (x0, eps) pair
    torch.testing.assert_close(det.x_next, math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next) * eps, rtol=1e-5, atol=1e-5)
    out = ddim_step(x, eps, abar, abar_next, 1.0, generator=gen(3))
    expected_std = math.sqrt((1 - abar_next) / (1 - abar)) * math.sqrt(1 - abar / abar_next)
    assert abs(float(out.std) - expected_std) < 1e-6
    ref = torch.distributions.Normal(out.mean, out.std).log_prob(out.x_next).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="alpha_bar"):
        ddim_step(x, eps, 0.6, 0.3, 0.0)


# --- ODE / SDE on exact Gaussian models --------------------------------------------------------------------------

def test_rollout_with_a_zero_reproduces_the_euler_ode_exactly():
    model = TinyVelocity()
    noise, labels = normal_noise(4, 5, (2, 6, 6)), torch.tensor([0, 1, 2, 3])
    sigmas = sigma_schedule(6, shift=2.0)
    traj = rollout(model, noise, labels, sigmas, 0.0, generator=gen(1))
    assert traj.xs.shape == (7, 4, 2, 6, 6) and traj.log_probs.shape == (6, 4) and traj.sigmas.shape == (7,)
    assert torch.equal(traj.xs[0], noise)
    assert torch.equal(traj.xs[-1], ode_sample(model, noise, labels, sigmas, "euler"))
    assert torch.equal(traj.log_probs, torch.zeros(6, 4))
    with torch.no_grad():  # and every intermediate state is the Euler iterate
        x = noise
        for i in range(6):
            x = euler_step(x, model(x, sigmas[i].expand(4), labels), sigmas[i], sigmas[i + 1])
            assert torch.equal(traj.xs[i + 1], x)


@pytest.mark.parametrize("method,steps,tol", [("euler", 100, 0.05), ("heun", 20, 0.02)])
def test_ode_maps_noise_to_gaussian_data(method, steps, tol):
    noise = normal_noise(2000, 0)
    x = ode_sample(GaussianVelocity(M, S), noise, None, sigma_schedule(steps), method)
    # the exact flow map of N(M, S^2) data sends eps to M + S eps
    assert (x - (M + S * noise)).abs().max() < tol
    assert abs(x.mean().item() - M) < 0.01 and abs(x.std().item() - S) < 0.01


def test_heun_converges_faster_than_euler():
    noise = normal_noise(500, 0)
    target = M + S * noise
    err = {m: (ode_sample(GaussianVelocity(M, S), noise, None, sigma_schedule(10), m) - target).abs().max().item()
           for m in ("euler", "heun")}
    assert err["heun"] < err["euler"] / 4


@pytest.mark.parametrize("a", [0.7, 1.0])
def test_sde_rollout_reproduces_gaussian_mean_and_std(a):
    traj = rollout(GaussianVelocity(M, S), normal_noise(2000, 0), None, sigma_schedule(20), a, generator=gen(1))
    x = traj.xs[-1]
    assert abs(x.mean().item() - M) < 0.01
    assert abs(x.std().item() - S) < 0.02
    assert torch.isfinite(traj.log_probs).all() and bool((traj.log_probs != 0).all())
    # the samples are not the ODE's: the SDE really is stochastic
    ode = ode_sample(GaussianVelocity(M, S), normal_noise(2000, 0), None, sigma_schedule(20))
    assert (x - ode).abs().mean() > 0.05


def test_cps_rollout_keeps_the_mean_and_is_reproducible():
    noise = normal_noise(2000, 0)
    t1 = rollout(GaussianVelocity(M, S), noise, None, sigma_schedule(20), 0.5, generator=gen(1), step="cps")
    t2 = rollout(GaussianVelocity(M, S), noise, None, sigma_schedule(20), 0.5, generator=gen(1), step="cps")
    assert torch.equal(t1.xs, t2.xs)
    assert abs(t1.xs[-1].mean().item() - M) < 0.01
    assert t1.log_probs[-1].abs().max() == 0  # the last CPS step lands on sigma = 0 without noise


def test_rollout_reproducible_per_step_noise_levels_and_errors():
    model = GaussianVelocity(M, S)
    noise = normal_noise(16, 0)
    a = rollout(model, noise, None, sigma_schedule(5), 0.7, generator=gen(3))
    b = rollout(model, noise, None, sigma_schedule(5), 0.7, generator=gen(3))
    c = rollout(model, noise, None, sigma_schedule(5), 0.7, generator=gen(4))
    assert torch.equal(a.xs, b.xs) and not torch.equal(a.xs, c.xs)
    d = rollout(model, noise, None, sigma_schedule(5), [0.7, 0.7, 0.0, 0.7, 0.0], generator=gen(3))
    assert torch.equal(d.log_probs[2], torch.zeros(16)) and torch.equal(d.log_probs[4], torch.zeros(16))
    assert bool((d.log_probs[0] != 0).all())
    with pytest.raises(ValueError, match="noise levels for 5 steps"):
        rollout(model, noise, None, sigma_schedule(5), [0.7, 0.7])
    with pytest.raises(ValueError, match="strictly decreasing"):
        rollout(model, noise, None, torch.tensor([0.0, 1.0]), 0.7)
    with pytest.raises(ValueError, match="unknown stochastic step"):
        rollout(model, noise, None, sigma_schedule(5), 0.7, step="ddpm")
    with pytest.raises(ValueError, match="'euler' or 'heun'"):
        ode_sample(model, noise, None, sigma_schedule(5), method="rk4")


class SizeRecorder(nn.Module):
    """Wraps a velocity model and records the batch size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x, sigma, labels=None):
        self.sizes.append(x.shape[0])
        return self.model(x, sigma, labels)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_ode_sample_runs_a_large_cpu_batch_in_chunks_with_the_same_result(method, monkeypatch):
    from distreward.sampling import samplers

    chunk = samplers.CPU_CHUNK
    n, steps = 2 * chunk + 5, 3
    noise, labels = normal_noise(n, 4, (2, 6, 6)), torch.arange(n) % 4  # every class and the null label
    kept = noise.clone()
    model = SizeRecorder(TinyVelocity(seed=2))
    chunked = ode_sample(model, noise, labels, sigma_schedule(steps), method)
    calls = steps if method == "euler" else 2 * steps - 1
    assert model.sizes == [chunk] * calls + [chunk] * calls + [5] * calls
    assert torch.equal(noise, kept) and chunked.is_contiguous() and not chunked.requires_grad
    monkeypatch.setattr(samplers, "CPU_CHUNK", 10**9)
    model.sizes.clear()
    whole = ode_sample(model, noise, labels, sigma_schedule(steps), method)
    assert model.sizes == [n] * calls
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)  # a per-sample model: chunks cannot matter
    single = ode_sample(model, noise[chunk + 3:chunk + 4], labels[chunk + 3:chunk + 4], sigma_schedule(steps), method)
    torch.testing.assert_close(chunked[chunk + 3:chunk + 4], single, rtol=0, atol=1e-6)


def test_unet_fast_path_keeps_the_rl_step_on_policy_with_the_same_gradients():
    """rollout (no gradients: the UNet's in-place fast path) and step_log_prob (with gradients: the plain path) see the
    same velocities, so the on-policy log-prob is reproduced exactly, and the gradients are the plain path's."""
    from distreward.models.unet import UNet

    torch.manual_seed(0)
    net = UNet(img_resolution=16, img_channels=1, num_classes=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
               attn_resolutions=[8])
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape))
    model = FlowVelocity(net)
    noise, labels = normal_noise(5, 3, (1, 16, 16)), torch.tensor([0, 1, 2, 3, 1])
    traj = rollout(model, noise, labels, sigma_schedule(4), 0.7, generator=gen(2))
    grads = {}
    for fast in (True, False):
        net.fast_cpu = fast
        net.zero_grad()
        total = 0
        for j in range(4):
            lp, _, _ = step_log_prob(model, traj.xs[j], traj.xs[j + 1], traj.sigmas[j], traj.sigmas[j + 1], 0.7, labels)
            if fast:
                assert torch.equal(lp.detach(), traj.log_probs[j])  # the on-policy ratio is exactly 1
            total = total + lp.sum()
        total.backward()
        grads[fast] = [p.grad.clone() for p in net.parameters()]
    for g_fast, g_plain in zip(grads[True], grads[False]):
        assert torch.equal(g_fast, g_plain)
    assert grads[True][-2].abs().sum() > 0  # conv_out.weight: the gradient reaches the network


@pytest.mark.parametrize("step", ["sde", "cps"])
def test_step_log_prob_recomputes_rollout_log_probs_with_gradients(step):
    model = TinyVelocity(seed=1)
    noise, labels = normal_noise(4, 2, (2, 6, 6)), torch.tensor([0, 1, 2, 1])
    sigmas = sigma_schedule(4, shift=3.0)
    traj = rollout(model, noise, labels, sigmas, 0.7, generator=gen(5), step=step)
    assert not traj.xs.requires_grad and not traj.log_probs.requires_grad
    for j in range(3):
        lp, mean, std = step_log_prob(model, traj.xs[j], traj.xs[j + 1], traj.sigmas[j], traj.sigmas[j + 1], 0.7,
                                      labels, step=step)
        torch.testing.assert_close(torch.exp(lp - traj.log_probs[j]), torch.ones(4), rtol=0, atol=1e-5)  # on-policy ratio
        assert lp.requires_grad and mean.requires_grad
    model.zero_grad()
    lp.sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


# --- adapters ----------------------------------------------------------------------------------------------------

def test_edm_adapter_is_the_exact_flow_velocity_of_an_exact_denoiser():
    x = normal_noise(64, 1, (1, 3, 3))
    s = torch.rand(64, generator=gen(2)) * 0.97 + 0.02  # below s_max = 80/81
    v_edm = EDMVelocity(GaussianDenoiser(M, S))(x, s)
    v_flow = GaussianVelocity(M, S)(x, s)
    torch.testing.assert_close(v_edm, v_flow, rtol=1e-4, atol=1e-4)
    # METHOD.md's form v = (x - D) / sigma - D in EDM variables gives the same numbers
    col = s.reshape(-1, 1, 1, 1)
    sig, x_edm = flow_to_edm_sigma(col), flow_to_edm_x(x, col)
    torch.testing.assert_close(x_edm / (1 + sig), x, rtol=1e-5, atol=1e-5)  # the inverse mapping round-trips
    d = GaussianDenoiser(M, S)(x_edm, sig.reshape(-1))
    torch.testing.assert_close(edm_to_flow_velocity(x_edm, d, sig), v_flow, rtol=1e-4, atol=1e-4)


def test_edm_adapter_above_sigma_max_and_bad_sigma():
    x = normal_noise(256, 3)
    v = EDMVelocity(GaussianDenoiser(M, S))(x, torch.ones(256))  # s = 1: pure noise, exact v = x - M
    assert (v - (x - M)).abs().max() < 0.02
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        EDMVelocity(GaussianDenoiser(M, S))(x, torch.zeros(256))


def test_edm_heun_sampler_and_flow_heun_agree_on_an_exact_denoiser():
    noise = normal_noise(1000, 4)
    den = GaussianDenoiser(M, S)
    x_edm = edm_sample(den, noise, steps=32)
    x_flow = ode_sample(EDMVelocity(den), noise, None, edm_flow_sigmas(32), "heun")
    exact = M + S * (80 * noise - M) / math.sqrt(S**2 + 80**2)  # the ODE solution from x = 80 eps at sigma = 80
    assert (x_edm - exact).abs().max() < 0.05 and (x_flow - exact).abs().max() < 0.05
    assert (x_edm - x_flow).abs().max() < 0.05
    # Euler steps coincide exactly under the mapping (both are DDIM steps)
    e_edm = edm_sample(den, noise, steps=16, second_order=False)
    e_flow = ode_sample(EDMVelocity(den), noise, None, edm_flow_sigmas(16), "euler")
    torch.testing.assert_close(e_edm, e_flow, rtol=1e-4, atol=1e-4)


def test_edm_stochastic_sampler_reproduces_gaussian_and_uses_the_generator():
    noise = normal_noise(2000, 5)
    den = GaussianDenoiser(M, S)
    x = edm_sample(den, noise, steps=32, S_churn=10, generator=gen(1))
    assert abs(x.mean().item() - M) < 0.02 and abs(x.std().item() - S) < 0.05
    assert torch.equal(x, edm_sample(den, noise, steps=32, S_churn=10, generator=gen(1)))
    assert not torch.equal(x, edm_sample(den, noise, steps=32, S_churn=10, generator=gen(2)))
    assert not torch.equal(x, edm_sample(den, noise, steps=32))


def test_edm_class_labels_one_hot_and_null():
    class P:
        label_dim = 4
    oh = edm_class_labels(P(), torch.tensor([0, 3, 4]))
    torch.testing.assert_close(oh, torch.tensor([[1., 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]))
    assert edm_class_labels(P(), None) is None
    with pytest.raises(ValueError, match="null label"):
        edm_class_labels(P(), torch.tensor([5]))


def sit_gaussian_u(x, t, y):
    """SiT convention, derived on its own: x_t = t x1 + (1 - t) x0 with x1 ~ N(M, S^2) data, x0 noise; u = E[x1 - x0 | x_t]."""
    t = t.reshape(-1, 1, 1, 1)
    var = t**2 * S**2 + (1 - t) ** 2
    r = x - t * M
    return (M + t * S**2 / var * r) - (1 - t) / var * r


def test_sit_adapter_matches_the_flow_velocity():
    x, sigma = normal_noise(32, 1), torch.rand(32, generator=gen(2))
    v = SiTVelocity(sit_gaussian_u)(x, sigma, torch.zeros(32, dtype=torch.long))
    torch.testing.assert_close(v, GaussianVelocity(M, S)(x, sigma), rtol=1e-5, atol=1e-5)


def test_sit_sde_sampler_reproduces_gaussian():
    x = sit_sde_sample(sit_gaussian_u, normal_noise(2000, 3), None, steps=100, generator=gen(4))
    assert abs(x.mean().item() - M) < 0.01 and abs(x.std().item() - S) < 0.02
    y = sit_sde_sample(sit_gaussian_u, normal_noise(2000, 3), None, steps=100, generator=gen(5))
    assert not torch.equal(x, y)


def test_cfg_velocity():
    model = TinyVelocity(seed=2)
    x, sigma, labels = normal_noise(4, 1, (2, 5, 5)), torch.full((4,), 0.6), torch.tensor([0, 1, 2, 0])
    null = torch.full((4,), 3)
    with torch.no_grad():
        v_c, v_u = model(x, sigma, labels), model(x, sigma, null)
        torch.testing.assert_close(CFGVelocity(model, 1.0, 3)(x, sigma, labels), v_c)
        torch.testing.assert_close(CFGVelocity(model, 0.0, 3)(x, sigma, labels), v_u, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(CFGVelocity(model, 2.5, 3)(x, sigma, labels), v_u + 2.5 * (v_c - v_u), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="class labels"):
        CFGVelocity(model, 2.0, 3)(x, sigma, None)


def test_flow_velocity_wraps_the_unet():
    from distreward.models import build_network

    net = build_network("unet", dict(img_resolution=8, img_channels=1, num_classes=3, model_channels=8,
                                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]))
    model = FlowVelocity(net)
    assert list(model.parameters())  # the adapter exposes the network's parameters to the optimiser
    noise, labels = normal_noise(3, 1, (1, 8, 8)), torch.tensor([0, 1, 3])
    traj = rollout(model, noise, labels, sigma_schedule(3), 0.7, generator=gen(1))
    lp, _, _ = step_log_prob(model, traj.xs[0], traj.xs[1], traj.sigmas[0], traj.sigmas[1], 0.7, labels)
    torch.testing.assert_close(lp, traj.log_probs[0], rtol=0, atol=1e-5)
    lp.sum().backward()
    assert net.conv_out.weight.grad.abs().sum() > 0


def test_real_sit_and_edm2_networks_through_the_adapters():
    sit = pytest.importorskip("distreward.models.sit")
    edm2 = pytest.importorskip("distreward.models.edm2")
    torch.manual_seed(0)
    net = sit.SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5).eval()
    x = normal_noise(2, 1, (4, 8, 8))
    with torch.no_grad():
        v = SiTVelocity(net)(x, torch.tensor([0.3, 0.9]), None)  # None -> SiT's null label
        u = net(x, torch.tensor([0.7, 0.1]), torch.tensor([5, 5]))
    torch.testing.assert_close(v, -u)
    pre = edm2.Precond(img_resolution=8, img_channels=4, label_dim=5, use_fp16=False, model_channels=16,
                       channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16).eval()
    out = ode_sample(EDMVelocity(pre), x, torch.tensor([1, 5]), edm_flow_sigmas(3), "heun")
    assert out.shape == x.shape and torch.isfinite(out).all()


SHIPPED = __import__("pathlib").Path(__file__).resolve().parents[1] / "weights" / "fmnist-base.safetensors"


@pytest.mark.skipif(not SHIPPED.is_file(), reason=f"{SHIPPED} (the shipped embedded default) is missing")
@pytest.mark.parametrize("method,steps", [("euler", 10), ("heun", 4)])
def test_nhwc_default_stays_within_the_tolerance_of_the_nchw_samples(method, steps, monkeypatch):
    """The ODE sampler's default UNet path (channels_last maps on the CPU) against the NCHW path on the shipped
    network: samples within 1e-4 (max abs) and the FD of a fixed feature map within 1e-3 relative
    (docs/sampling.md "CPU speed"); the network's own `nhwc` setting is left as it was."""
    import numpy as np

    from distreward.metrics import frechet_distance
    from distreward.models import load_generator
    from distreward.sampling import samplers

    assert samplers.CPU_NHWC                       # the default
    net = load_generator(SHIPPED)
    model, n = FlowVelocity(net), samplers.CPU_CHUNK + 6       # two chunks
    noise, labels = torch.randn((n, 1, 32, 32), generator=gen(4)), torch.arange(n) % 10
    calls = []
    conv_in = net.conv_in.forward
    monkeypatch.setattr(net.conv_in, "forward", lambda x, nhwc=None: calls.append(nhwc) or conv_in(x, nhwc))
    fast = ode_sample(model, noise, labels, sigma_schedule(steps), method)
    assert calls and all(calls) and net.nhwc is False          # NHWC inside the sampler, restored after it
    monkeypatch.setattr(samplers, "CPU_NHWC", False)
    calls.clear()
    plain = ode_sample(model, noise, labels, sigma_schedule(steps), method)
    assert calls and not any(calls)
    assert float((fast - plain).abs().max()) <= 1e-4

    proj = torch.randn((32 * 32, 8), generator=gen(5)) / 32          # a fixed random feature map, d = 8
    real = torch.randn((4 * n, 8), generator=gen(6)).double().numpy() * 0.5

    def fd(x):
        f = (x.flatten(1) @ proj).double().numpy()
        return frechet_distance(f.mean(0), np.cov(f, rowvar=False), real.mean(0), np.cov(real, rowvar=False))

    assert abs(fd(fast) / fd(plain) - 1) <= 1e-3
