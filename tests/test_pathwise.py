"""The pathwise trainer (distreward.rl.pathwise) and the FD's first variation it back-propagates
(distreward.metrics.variation): the formula against finite differences of the FD of a set with one member moved,
the gradient cut before the last K sampler steps against a closed form, and a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distreward.utils.threads import set_threads

set_threads()

from distreward.metrics import frechet_distance_sqrtm, sqrtm_psd  # noqa: E402
from distreward.metrics.variation import fd_covariance_gradient, fd_first_variation  # noqa: E402
from distreward.rl import train  # noqa: E402
from distreward.rl.pathwise import first_steps, first_variations, last_steps, null_directions  # noqa: E402
from distreward.sampling import sigma_schedule  # noqa: E402

from test_grpo import StandInEvaluator  # noqa: E402
from test_grpo_dist import make_net, make_reward  # noqa: E402
from test_rl_run import frame_cfg  # noqa: E402


def set_fd(rows: np.ndarray, real_mu: np.ndarray, real_sigma: np.ndarray) -> float:
    """FD of a set of rows (mean, unbiased covariance) against the real statistics, by scipy's sqrtm."""
    return frechet_distance_sqrtm(rows.mean(0), np.cov(rows, rowvar=False), real_mu, real_sigma)


def gaussian_problem(n: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, d))
    real_sigma = a @ a.T / (2 * d) + 0.1 * np.eye(d)
    rows = rng.normal(size=(n, d)) @ b * 0.7 + 0.3
    return rows, rng.normal(size=d) * 0.5, real_sigma


@pytest.mark.parametrize("n, d", [(12, 3), (40, 6)])
def test_first_variation_is_the_fd_derivative_of_a_set_with_one_member_moved(n, d):
    rows, real_mu, real_sigma = gaussian_problem(n, d, seed=n)
    grad = fd_first_variation(rows, rows.mean(0), np.cov(rows, rowvar=False), real_mu, sqrtm_psd(real_sigma), n)
    h = 1e-5
    for i in (0, n // 2, n - 1):
        numeric = np.zeros(d)
        for j in range(d):
            up, down = rows.copy(), rows.copy()
            up[i, j] += h
            down[i, j] -= h
            numeric[j] = (set_fd(up, real_mu, real_sigma) - set_fd(down, real_mu, real_sigma)) / (2 * h)
        np.testing.assert_allclose(grad[i], numeric, rtol=1e-5, atol=1e-8)


def test_first_variation_differs_from_the_two_over_n_form_by_order_one_over_n_squared():
    rows, real_mu, real_sigma = gaussian_problem(200, 4, seed=3)
    mu, sigma, half = rows.mean(0), np.cov(rows, rowvar=False), sqrtm_psd(real_sigma)
    exact = fd_first_variation(rows, mu, sigma, real_mu, half, 200)
    approx = 2 / 200 * ((mu - real_mu) + (rows - mu) @ fd_covariance_gradient(sigma, half))
    gap = np.abs(exact - approx).max()
    assert 0 < gap < 10 * np.abs(exact).max() / 200


def test_covariance_gradient_vanishes_at_the_real_covariance():
    # FD is minimal in Sigma at Sigma = Sigma_r: G = I - R (R Sigma_r R)^{-1/2} R = 0
    _, _, real_sigma = gaussian_problem(10, 5, seed=7)
    np.testing.assert_allclose(fd_covariance_gradient(real_sigma, sqrtm_psd(real_sigma)), 0, atol=1e-9)


def test_first_variation_refuses_mismatched_dimensions():
    with pytest.raises(ValueError, match="share the feature dimension"):
        fd_first_variation(np.zeros((3, 4)), np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), 10)


def test_first_variations_use_each_samples_reference_set():
    """The distribution reward's one set, or under reward.per_class the sample's class's set: d_i as the formula
    gives it from that set's rows (mean, unbiased covariance) and its real statistics."""
    from distreward.reward.reference import ReferenceSet
    from distreward.reward.rewards import ClassDistributionReward, DistributionReward

    rows, real_mu, real_sigma = gaussian_problem(30, 4, seed=5)
    other, _, other_sigma = gaussian_problem(25, 4, seed=6)
    f, labels = rows[:6] + 0.1, torch.tensor([0, 1, 1, 0, 1, 0])

    def expected(ref_rows, mu_r, sigma_r, x):
        return fd_first_variation(x, ref_rows.mean(0), np.cov(ref_rows, rowvar=False), mu_r, sqrtm_psd(sigma_r),
                                  ref_rows.shape[0])

    one = DistributionReward(torch.nn.Identity(), ReferenceSet(rows, real_mu, real_sigma))
    np.testing.assert_allclose(first_variations(one, f, labels), expected(rows, real_mu, real_sigma, f), rtol=1e-9)
    sets = {0: ReferenceSet(rows, real_mu, real_sigma), 1: ReferenceSet(other, -real_mu, other_sigma)}
    per_class = first_variations(ClassDistributionReward(torch.nn.Identity(), sets), f, labels)
    for c, (ref_rows, mu_r, sigma_r) in {0: (rows, real_mu, real_sigma), 1: (other, -real_mu, other_sigma)}.items():
        idx = (labels == c).numpy()
        np.testing.assert_allclose(per_class[idx], expected(ref_rows, mu_r, sigma_r, f[idx]), rtol=1e-9)


class Gain(torch.nn.Module):
    """v = theta x: an Euler step s -> s' multiplies x by (1 + (s' - s) theta)."""

    def __init__(self, theta: float):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta))

    def forward(self, x, sigma, labels):
        return self.theta * x


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gradients_reach_only_the_last_k_steps(k):
    """d x_T / d theta with the first T - K steps held fixed is x_T sum_{j >= T-K} h_j / (1 + h_j theta), the
    Euler product's logarithmic derivative over the last K factors only."""
    T, theta = 4, 0.7
    model, sigmas = Gain(theta), sigma_schedule(T)
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x_start = first_steps(model, noise, None, sigmas[:T - k + 1], "euler")
    assert not x_start.requires_grad
    x = last_steps(model, x_start, None, sigmas[T - k:], "euler")
    x.sum().backward()
    h = (sigmas[1:] - sigmas[:-1]).double()
    expected = float(x.detach().double().sum() * (h[T - k:] / (1 + h[T - k:] * theta)).sum())
    assert float(model.theta.grad) == pytest.approx(expected, rel=1e-5)
    full = (h / (1 + h * theta)).sum() * x.detach().double().sum()
    assert k == T or abs(float(model.theta.grad) - float(full)) > 1e-3      # the earlier steps' share is cut


def test_null_directions_are_the_batchs_own_with_random_signs():
    d = torch.arange(1.0, 41.0).reshape(20, 2)
    out = null_directions(d, torch.Generator().manual_seed(0))
    matches = [(i, sign) for row in out for i in range(20) for sign in (1, -1) if torch.equal(row, sign * d[i])]
    assert sorted(i for i, _ in matches) == list(range(20))                    # a permutation of the rows
    assert {sign for _, sign in matches} == {1, -1}                            # both signs drawn
    assert not torch.equal(out, d)


def run(tmp_path, name, iterations=2, **overrides):
    cfg = frame_cfg("pathwise", iterations)
    for key, value in overrides.items():
        section, leaf = key.split("__")
        cfg[section][leaf] = value
    return train("pathwise", cfg, tmp_path / name, net=make_net(), reward=make_reward(), evaluator=StandInEvaluator(),
                 progress=False)


def test_a_tiny_run_moves_the_policy_and_logs_the_drift_watch(tmp_path):
    res = run(tmp_path, "run")
    first = res["history"][0]
    for key in ("r_mean", "fd_ref", "loss_pathwise", "grad_norm", "direction_norm", "watch_fd_reward",
                "watch_fd_eval"):
        assert np.isfinite(first[key]), key
    assert first["grad_norm"] > 0 and first["direction_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(make_net().parameters(), res["net"].parameters()))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["watch_fd_eval"] for r in logged if "watch_fd_eval" in r] == [h["watch_fd_eval"] for h in res["history"]]


def test_more_gradient_steps_give_a_different_update(tmp_path):
    one, two = run(tmp_path, "k1", 1, pathwise__k=1), run(tmp_path, "k2", 1, pathwise__k=2)
    assert any(not torch.equal(a, b) for a, b in zip(one["net"].parameters(), two["net"].parameters()))
    assert one["history"][0]["r_mean"] == two["history"][0]["r_mean"]      # the same samples before the update


def test_the_update_in_chunks_of_one_sample_equals_the_whole_minibatch(tmp_path):
    whole, chunked = run(tmp_path, "whole", 1, rl__batch_size=8), run(tmp_path, "chunked", 1, rl__batch_size=1)
    for a, b in zip(whole["net"].parameters(), chunked["net"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in ("loss_pathwise", "grad_norm"):      # grad_norm: before the clip, so the gradient's scale too
        assert chunked["history"][0][key] == pytest.approx(whole["history"][0][key], rel=1e-5)


class Logits(torch.nn.Module):
    """A classifier over 3 classes: the first 3 pixels are the logits (differentiable in the image)."""

    def logits(self, images):
        return images.flatten(1)[:, :3] * 4


def sample_wise_run(tmp_path, name, **rl):
    from distreward.reward.rewards import ClassifierLogProbReward

    cfg = frame_cfg("pathwise", 1, minibatches=1, **rl)
    cfg["reward"] = {"name": "classifier"}
    return train("pathwise", cfg, tmp_path / name, net=make_net(), reward=ClassifierLogProbReward(Logits()),
                 evaluator=StandInEvaluator(), progress=False)


def test_classifier_loss_is_minus_the_classifier_rewards_score():
    from distreward.reward.rewards import ClassifierLogProbReward
    from distreward.rl.pathwise import classifier_loss

    images, labels = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2, 1, 1, 0])
    reward = ClassifierLogProbReward(Logits())
    torch.testing.assert_close(classifier_loss(Logits().logits(images), labels), -reward(images, labels).float())


def test_the_sample_wise_reward_trains_on_minus_its_log_probability(tmp_path):
    """With the classifier reward each sample's loss is -log p(y_i | x_i): one minibatch, so the logged loss is
    the rollout's own -r (the same samples at the same weights), and the update moves the policy."""
    res = sample_wise_run(tmp_path, "sample")
    first = res["history"][0]
    assert first["loss_pathwise"] == pytest.approx(-first["r_mean"], rel=1e-5)
    assert first["grad_norm"] > 0 and "direction_norm" not in first
    assert any(not torch.equal(a, b) for a, b in zip(make_net().parameters(), res["net"].parameters()))


def test_k_beyond_the_sampler_other_rewards_and_a_sample_wise_null_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pathwise.k = 5 exceeds"):
        run(tmp_path, "k", 1, pathwise__k=5)
    from distreward.reward.rewards import KNNRealismReward

    from _tiny import TinyFeatures

    with pytest.raises(ValueError, match="reward.name=distribution or reward.name=classifier"):
        train("pathwise", frame_cfg("pathwise", 1), tmp_path / "knn", net=make_net(),
              reward=KNNRealismReward(TinyFeatures(1, 4), np.zeros((5, 4))), evaluator=StandInEvaluator(),
              progress=False)
    with pytest.raises(ValueError, match="null control permutes the FD's first variations"):
        sample_wise_run(tmp_path, "null", null_control="permute")


@pytest.mark.parametrize("method,steps,served", [("heun", 5, 4), ("euler", None, 4)])
def test_the_reference_set_is_drawn_with_the_samples_ode(method, steps, served):
    """The reference set's initial rows are samples of the trainer's own sampler (pathwise.method, pathwise.steps
    or the served step count), noise-free whatever rl.reference says: the first variations compare like with like."""
    from omegaconf import OmegaConf

    from distreward.rl.settings import resolve
    from distreward.rl.setup import ReferenceSampler
    from distreward.schema import validate

    raw = frame_cfg("pathwise", 1, reference="rollout")
    raw["pathwise"] = {"k": 1, "method": method, "steps": steps}
    raw["eval"]["steps"] = served
    cfg = resolve(OmegaConf.create(validate("finetune", raw)))
    sampler = ReferenceSampler.of_run(cfg, 6)
    assert (sampler.method, sampler.steps, sampler.noise_levels) == (method, steps or served, 0.0)
