"""GRPO trainer: the equations, the sanity facts of METHOD.md §4, checkpoints and resume, with a tiny stand-in
velocity network and a stand-in reward (defined here) so that the tests run in seconds."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from distreward.utils.threads import set_threads

from _tiny import TinyClassifier

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

from distreward.pg import clip_masks, gaussian_kl, group_advantages, ppo_clip_loss
from distreward.reward import Reward
from distreward.rl.rollout import trained_steps
from distreward.rl.step import ema_update
from distreward.utils.checkpoint import from_storable, load_checkpoint, rng_state, save_checkpoint, set_rng_state, to_storable

SHAPE = (1, 8, 8)


# --------------------------------------------------------------------------------------------- stand-ins

class TinyVelocityNet(nn.Module):
    """net(x, sigma, labels) -> v: two convs conditioned on sigma and the label (a few hundred parameters)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.conv0 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 1, 3, padding=1)
        self.label = nn.Embedding(num_classes + 1, 8)
        self.sigma = nn.Linear(1, 8)

    def forward(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]) if torch.as_tensor(sigma).ndim == 0 else sigma
        h = self.conv0(x) + self.sigma(sigma.view(-1, 1).to(x.dtype))[:, :, None, None]
        if labels is not None:
            h = h + self.label(labels)[:, :, None, None]
        return self.conv1(torch.tanh(h)) - x


class BrightnessReward(Reward):
    """Stand-in reward with state: r = -(mean pixel - target[label])^2 + a small bonus that depends on a running
    mean of the pushed samples (so resuming must restore the state to give the same rewards). Its features are
    the images; `slow`: seconds of sleep per scoring (a run slow enough to be killed mid-way)."""

    name = "brightness"
    keeps_state = True

    def __init__(self, num_classes: int = 3, fail_at_call: int | None = None, slow: float = 0.0):
        self.target = np.linspace(-0.5, 0.5, num_classes)
        self.running = np.zeros(1, dtype=np.float64)
        self.calls, self.fail_at_call, self.slow = 0, fail_at_call, slow

    def score_features(self, images, labels, groups=None):
        time.sleep(self.slow)
        self.calls += 1
        if self.fail_at_call is not None and self.calls == self.fail_at_call:
            raise KeyboardInterrupt("simulated kill")
        m = images.flatten(1).mean(1).double().numpy()
        r = -(m - self.target[labels.numpy()]) ** 2 - 0.1 * np.abs(m - self.running[0])
        return torch.from_numpy(r).float()

    def push_features(self, images, labels=None):
        self.running = 0.5 * self.running + 0.5 * images.mean().double().numpy().reshape(1)

    def state_dict(self):
        return {"running": self.running.copy()}

    def load_state_dict(self, sd):
        self.running = np.asarray(sd["running"], dtype=np.float64).copy()


class StandInEvaluator:
    def evaluate(self, images):
        return {"fd_reward": float(images.mean() ** 2), "fd_eval": float(images.std()), "precision": 0.5,
                "recall": 0.5, "n": images.shape[0]}


def tiny_cfg(**rl):
    return {"name": "test", "seed": 0, "model": {"num_classes": 3, "image_shape": list(SHAPE)},
            "rl": {"iterations": 4, "labels_per_iter": 2, "group_size": 4, "steps": 4, "noise_level": 0.8,
                   "train_steps": {"mode": "window", "window": 2}, "minibatches": 2, "lr": 3e-3, "beta": 0.05,
                   "ema_decay": 0.5, **rl},
            "reward": {"name": "brightness"},
            "eval": {"every": 2, "n": 12, "steps": 4, "method": "euler", "seed": 5, "grid": 6, "batch_size": 12},
            "checkpoint": {"every": 1}}


def make_net(seed: int = 0) -> TinyVelocityNet:
    torch.manual_seed(seed)
    return TinyVelocityNet()


# --------------------------------------------------------------------------------------------- equations

def test_group_advantages_are_normalised_within_groups_and_clipped():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0, 0.0, 0.0, 0.0, 100.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    adv, zero = group_advantages(r, groups, std="group", clip=5.0)
    g0 = adv[:4]
    assert abs(float(g0.mean())) < 1e-6 and abs(float(g0.std()) - 1.0) < 1e-3
    assert torch.all(adv[4:8] == 0) and zero[4:8].all() and not zero[:4].any()
    # a single outlier in a group of 4 sits at 1.5 std; clipping at 1 bounds it
    adv_c, _ = group_advantages(r, groups, std="group", clip=1.0)
    assert float(adv_c.abs().max()) == pytest.approx(1.0)
    # global std: one scale for the batch, so group 0's spread becomes small next to group 2's
    adv_g, _ = group_advantages(r, groups, std="global")
    assert float(adv_g[:4].abs().max()) < float(g0.abs().max())
    with pytest.raises(ValueError, match="group.*global"):
        group_advantages(r, groups, std="batch")


def test_ppo_clip_loss_flat_outside_the_trust_region():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.1, 1.5, 0.95, 0.5])).requires_grad_(True)
    loss, rho = ppo_clip_loss(adv, logp, old, clip_eps=0.2)
    assert torch.allclose(rho, torch.tensor([1.1, 1.5, 0.95, 0.5]))
    assert torch.allclose(loss, torch.tensor([-1.1, -1.2, 0.95, 0.8]))
    loss.sum().backward()
    # inside the region the gradient is -A rho; clipped samples (A>0, rho>1.2; A<0, rho<0.8) get none
    assert torch.allclose(logp.grad, torch.tensor([-1.1, 0.0, 0.95, 0.0]))
    hi, lo = clip_masks(rho, 0.2)
    assert hi.tolist() == [False, True, False, False] and lo.tolist() == [False, False, False, True]


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    m, mr = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    std = torch.tensor([0.3, 0.5, 1.0])
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m, std.view(-1, 1, 1, 1)),
                                            torch.distributions.Normal(mr, std.view(-1, 1, 1, 1)))
    assert torch.allclose(gaussian_kl(m, mr, std), ref.flatten(1).mean(1), atol=1e-5)
    assert torch.all(gaussian_kl(m, m, 0.2) == 0)


def test_trained_steps_never_include_the_last_step():
    g = torch.Generator().manual_seed(0)
    assert trained_steps(10, "window", window=4) == [0, 1, 2, 3]
    assert trained_steps(10, "window", window=[2, 5]) == [2, 3, 4]
    assert trained_steps(10, "window", window=50) == list(range(9))
    drawn = [trained_steps(10, "window", window=[2, 8], count=2, generator=g) for _ in range(30)]
    assert all(len(s) == 2 and s == sorted(set(s)) and set(s) <= set(range(2, 8)) for s in drawn)
    assert len({tuple(s) for s in drawn}) > 3                         # drawn anew each iteration
    assert trained_steps(10, "window", window=4, count=9, generator=g) == [0, 1, 2, 3]
    for _ in range(20):
        s = trained_steps(10, "fraction", fraction=0.5, generator=g)
        assert len(s) == 4 or len(s) == 5
        assert 9 not in s and s == sorted(set(s))
    assert trained_steps(10, "fraction", fraction=1.0, generator=g) == list(range(9))
    with pytest.raises(ValueError, match="at least 2"):
        trained_steps(1, "window", window=1)
    with pytest.raises(ValueError, match="window"):
        trained_steps(5, "window", window=[4, 6])
    with pytest.raises(ValueError, match="mode"):
        trained_steps(5, "random")


def test_rollout_noise_levels_clean_last_step_and_window():
    from distreward.rl.rollout import rollout_noise_levels

    from distreward.rl.settings import resolve

    def levels(**rl):
        base = {"steps": 6, "noise_level": 0.3, "train_steps": {"mode": "window", "window": 3}}
        return rollout_noise_levels(resolve({"rl": {**base, **rl}, "reward": {"name": "classifier"}}).rl)

    assert levels() == [0.3] * 5 + [0.0]
    assert levels(clean_last_step=False) == [0.3] * 6
    assert levels(noise_steps="window") == [0.3] * 3 + [0.0] * 3
    assert levels(noise_steps="window", train_steps={"mode": "window", "window": [1, 4]}) == [0, 0.3, 0.3, 0.3, 0, 0]
    with pytest.raises(ValueError, match="mode=window"):        # checked with the config, before any work
        levels(noise_steps="window", train_steps={"mode": "fraction", "fraction": 0.5})
    with pytest.raises(ValueError, match="noise_steps"):
        levels(noise_steps="some")


def test_balanced_labels_cover_every_class_equally_and_need_no_state():
    from distreward.rl.rollout import draw_labels

    g = torch.Generator().manual_seed(0)
    P, G, C = 16, 3, 10
    stream = torch.cat([draw_labels(P, G, C, g, balanced=True, start=it * P, seed=5)[0][::G] for it in range(5)])
    counts = torch.bincount(stream, minlength=C)
    assert counts.tolist() == [8] * C                       # 80 groups = 8 whole blocks of the 10 classes
    for it in range(5):                                     # any prefix: counts differ by at most one
        c = torch.bincount(stream[:(it + 1) * P], minlength=C)
        assert int(c.max() - c.min()) <= 1
    again, groups = draw_labels(P, G, C, torch.Generator().manual_seed(99), balanced=True, start=2 * P, seed=5)
    assert torch.equal(again[::G], stream[2 * P:3 * P])    # a resumed run draws the same labels
    assert groups.tolist() == torch.arange(P).repeat_interleave(G).tolist()
    other = draw_labels(P, G, C, g, balanced=True, start=2 * P, seed=6)[0][::G]
    assert not torch.equal(other, stream[2 * P:3 * P])


def test_shared_start_noise_is_one_draw_per_group():
    from distreward.rl.rollout import start_noise

    groups = torch.arange(3).repeat_interleave(4)
    z = start_noise(groups, SHAPE, torch.Generator().manual_seed(0), shared=True)
    assert z.shape == (12, *SHAPE)
    for g in range(3):
        assert all(torch.equal(z[4 * g], z[4 * g + i]) for i in range(4))
    assert not torch.equal(z[0], z[4])
    assert not torch.equal(*start_noise(groups, SHAPE, torch.Generator().manual_seed(0))[:2])


def test_ema_update_moves_towards_the_weights():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.75)
    assert torch.allclose(a.weight, 0.75 * before + 0.25 * b.weight)


def test_checkpoint_state_round_trip(tmp_path):
    g = torch.Generator().manual_seed(3)
    np.random.seed(1)
    state = {"reward": {"rows": np.arange(6.0).reshape(2, 3), "n": np.int64(4)}, "rng": rng_state(g), "it": 7}
    save_checkpoint(tmp_path / "c.pt", state)
    expected = (torch.randn(3, generator=g), np.random.rand(2))
    back = load_checkpoint(tmp_path / "c.pt")      # weights_only loading
    assert isinstance(back["reward"]["rows"], np.ndarray) and back["reward"]["rows"].dtype == np.float64
    assert np.array_equal(back["reward"]["rows"], state["reward"]["rows"]) and back["it"] == 7
    set_rng_state(g, back["rng"])
    assert torch.equal(torch.randn(3, generator=g), expected[0]) and np.array_equal(np.random.rand(2), expected[1])
    assert from_storable(to_storable([np.ones(2)]))[0].tolist() == [1.0, 1.0]
    with pytest.raises(FileNotFoundError, match="without --resume"):
        load_checkpoint(tmp_path / "missing.pt")


# --------------------------------------------------------------------------------------------- sanity facts (§4)

def _rollouts(net, a=0.8, seed=0, T=4):
    from distreward.rl.rollout import collect, draw_labels
    from distreward.sampling import FlowVelocity, sigma_schedule

    g = torch.Generator().manual_seed(seed)
    labels, groups = draw_labels(2, 4, 3, g)
    ro = collect(FlowVelocity(net), labels, groups, sigma_schedule(T), a, SHAPE, g)
    return ro, g


def test_a_zero_rollout_reproduces_the_ode_sampler():
    from distreward.rl.rollout import draw_labels
    from distreward.sampling import FlowVelocity, ode_sample, rollout, sigma_schedule

    net = make_net()
    g = torch.Generator().manual_seed(0)
    labels, _ = draw_labels(2, 3, 3, g)
    noise = torch.randn(6, *SHAPE, generator=g)
    sig = sigma_schedule(5)
    with torch.no_grad():
        traj = rollout(FlowVelocity(net), noise, labels, sig, 0.0, generator=g)
        x0 = ode_sample(FlowVelocity(net), noise, labels, sig, method="euler")
    assert torch.allclose(traj.xs[-1], x0, atol=1e-6)
    assert not torch.allclose(x0, noise)


def test_first_update_is_on_policy_and_kl_starts_at_zero_with_gradient_after():
    from omegaconf import OmegaConf

    from distreward.rl.settings import DEFAULTS
    from distreward.rl.grpo import grpo_update, step_terms
    from distreward.sampling import FlowVelocity

    net = make_net()
    ro, g = _rollouts(net)
    ro.adv, _ = group_advantages(torch.randn(8, generator=g), ro.groups)
    ref = make_net()
    model, ref_model = FlowVelocity(net), FlowVelocity(ref)
    idx = torch.arange(8)
    # on-policy: the policy's log-prob of its own rollouts equals log p_old (ratio exactly 1) at every step
    for j in range(3):
        _, kl, rho, _ = step_terms(model, ref_model, ro, j, idx, 0.8, 0.2)
        assert torch.allclose(rho, torch.ones_like(rho), atol=1e-5)
        assert torch.all(kl.abs() < 1e-10)
    # KL at the start: zero, and so is its gradient (a minimum)
    net.zero_grad()
    _, kl, _, _ = step_terms(model, ref_model, ro, 0, idx, 0.8, 0.2)
    kl.mean().backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in net.parameters())
    # one optimizer step (one minibatch): its logged ratios are those of the policy that drew the rollouts
    rl = OmegaConf.merge(OmegaConf.create(DEFAULTS["rl"]), {"noise_level": 0.8, "lr": 1e-2, "minibatches": 1})
    ema = make_net()
    opt = torch.optim.AdamW(net.parameters(), lr=rl.lr)
    stats = grpo_update(net, model, ref_model, ema, opt, ro, [0, 1], rl, g)
    assert stats["rho_mean/t0"] == pytest.approx(1, abs=1e-5) and stats["rho_mean/t1"] == pytest.approx(1, abs=1e-5)
    assert stats["kl_approx"] == pytest.approx(0, abs=1e-9) and stats["clip_hi"] == stats["clip_lo"] == 0
    # then two minibatches: the second sees the moved policy, and KL > 0 with a non-zero gradient
    stats = grpo_update(net, model, ref_model, ema, opt, ro, [0, 1], OmegaConf.merge(rl, {"minibatches": 2}), g)
    assert abs(stats["rho_mean/t0"] - 1) > 1e-6 and stats["kl_approx"] > 0
    net.zero_grad()
    _, kl, _, _ = step_terms(model, ref_model, ro, 0, idx, 0.8, 0.2)
    assert float(kl.mean().detach()) > 0
    kl.mean().backward()
    assert sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None) > 0


def test_update_raises_the_log_prob_of_positive_advantage_samples():
    from omegaconf import OmegaConf

    from distreward.rl.settings import DEFAULTS
    from distreward.rl.grpo import grpo_update, step_terms
    from distreward.sampling import FlowVelocity

    net = make_net()
    ro, g = _rollouts(net)
    ro.adv = torch.tensor([1.0, -1.0] * 4)
    model = FlowVelocity(net)
    ref_model = FlowVelocity(make_net())
    rl = OmegaConf.merge(OmegaConf.create(DEFAULTS["rl"]),
                         {"noise_level": 0.8, "lr": 3e-3, "minibatches": 1, "beta": 0.0, "clip_eps": 0.5})
    opt = torch.optim.AdamW(net.parameters(), lr=rl.lr)
    for _ in range(3):
        grpo_update(net, model, ref_model, make_net(), opt, ro, [0, 1, 2], rl, g)
    with torch.no_grad():
        log_rho = sum(step_terms(model, ref_model, ro, j, torch.arange(8), 0.8, 0.5)[3] for j in range(3))
    assert float(log_rho[ro.adv > 0].mean()) > float(log_rho[ro.adv < 0].mean())


# --------------------------------------------------------------------------------------------- the loop

def test_finetune_logs_checkpoints_and_evaluates(tmp_path):
    from distreward.rl import finetune

    res = finetune(tiny_cfg(), tmp_path, net=make_net(), reward=BrightnessReward(), evaluator=StandInEvaluator(),
                   progress=False)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in recs if "r_mean" in r]
    assert [r["iteration"] for r in its] == [1, 2, 3, 4]
    for key in ("r_mean", "r_std", "zero_std_frac", "kl_approx", "clip_hi", "clip_lo", "loss_pg", "loss_kl",
                "rho_mean/t0", "rho_mean/t1", "time_rollout", "time_reward", "time_update", "time_push", "grad_norm"):
        assert key in its[0] and np.isfinite(its[0][key]), key
    assert "rho_mean/t2" not in its[0]                      # window of 2 steps
    assert [e["iteration"] for e in res["evals"]] == [0, 2, 4]
    from distreward.sampling.generate import ode_images   # the final evaluation's images come back (the demo reuses them)

    again, _ = ode_images(res["ema"], 12, num_classes=3, image_shape=SHAPE, steps=4, seed=5, batch_size=12)
    assert torch.equal(res["final_images"], again)
    assert (tmp_path / "samples" / "ema_0004.png").is_file() and (tmp_path / "checkpoints" / "last.pt").is_file()
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ck["iteration"] == 4 and set(ck) >= {"net", "ema", "optimizer", "reward", "rng"}
    # the policy moved, the EMA lies between base and policy
    base = make_net()
    d_net = sum(float((a - b).detach().abs().sum()) for a, b in zip(res["net"].parameters(), base.parameters()))
    d_ema = sum(float((a - b).detach().abs().sum()) for a, b in zip(res["ema"].parameters(), base.parameters()))
    assert 0 < d_ema < d_net


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    from distreward.rl import finetune

    cfg = tiny_cfg(iterations=4)
    cfg["checkpoint"]["every"] = 2
    full = finetune(cfg, tmp_path / "full", net=make_net(), reward=BrightnessReward(), evaluator=StandInEvaluator(),
                    progress=False)
    # killed inside iteration 4 (its reward call), after the checkpoint at iteration 2 and work on iteration 3
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, tmp_path / "cut", net=make_net(), reward=BrightnessReward(fail_at_call=4),
                 evaluator=StandInEvaluator(), progress=False)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["iteration"] == 2
    resumed = finetune(cfg, tmp_path / "cut", resume=True, net=make_net(), reward=BrightnessReward(),
                       evaluator=StandInEvaluator(), progress=False)
    for a, b in zip(full["net"].state_dict().values(), resumed["net"].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full["ema"].state_dict().values(), resumed["ema"].state_dict().values()):
        assert torch.equal(a, b)
    assert [h["r_mean"] for h in full["history"]] == [h["r_mean"] for h in resumed["history"]]
    lines = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "r_mean" in r] == [1, 2, 3, 4]     # no duplicated iteration 3


def test_bad_config_is_named(tmp_path):
    from distreward.rl import finetune

    with pytest.raises(ValueError, match="group_size"):
        finetune(tiny_cfg(group_size=1), tmp_path, net=make_net(), reward=BrightnessReward(), progress=False)
    with pytest.raises(ValueError, match="noise_level"):
        finetune(tiny_cfg(noise_level=0.0), tmp_path, net=make_net(), reward=BrightnessReward(), progress=False)


def test_clipping_engages_with_several_inner_epochs_and_is_logged_per_iteration(tmp_path):
    """A tiny UNet on 32x32 images (D = 1024), 3 inner epochs x 2 minibatches: with the default eps some ratios
    leave the trust region in every iteration (clip_hi / clip_lo / clip_bind > 0 in metrics.jsonl); PPO's usual
    0.2 never does. (lr 1e-3: with 45k parameters an Adam step moves |rho - 1| less than the Fashion-MNIST UNet's
    at the preset's 1e-4; its |rho - 1| here stays below 1e-3, as there.)"""
    from _unet32 import MeanPixelReward, grpo_cfg, tiny_unet
    from distreward.rl import finetune

    run = tmp_path / "run"
    res = finetune(grpo_cfg(lr=1e-3), run, net=tiny_unet(), reward=MeanPixelReward(), progress=False)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in recs if "r_mean" in r]
    assert [r["iteration"] for r in its] == [1, 2]
    for r in its:
        assert r["clip_hi"] + r["clip_lo"] > 0 and r["clip_bind"] > 0, r
        assert r["clip_bind"] <= r["clip_hi"] + r["clip_lo"] + 1e-12 <= 1 + 1e-12
    wide = finetune(grpo_cfg(lr=1e-3, clip_eps=0.2), tmp_path / "wide", net=tiny_unet(), reward=MeanPixelReward(),
                    progress=False)
    assert all(h["clip_hi"] == h["clip_lo"] == h["clip_bind"] == 0 for h in wide["history"])
    assert res["history"][0]["kl_approx"] > 0


# --------------------------------------------------------------------------------------------- end to end (slow)

def tiny_evaluator(shape=SHAPE, n: int = 300):
    from distreward.evaluation import Evaluator

    g = torch.Generator().manual_seed(11)
    ref = (0.6 * torch.randn((n, *shape), generator=g)).clamp(-1, 1)
    return Evaluator(ref, feature_nets=(TinyClassifier(1), TinyClassifier(2)), labels=["fmnist-reward", "fmnist-eval"],
                     cache_dir=None, max_real=n, kid_subsets=5, kid_subset_size=20)


@pytest.mark.slow
def test_finetune_end_to_end_with_the_distribution_reward(tmp_path):
    from distreward.rl import finetune

    cfg = tiny_cfg(iterations=3)
    cfg["reward"] = {"name": "distribution", "mode": "fast", "credit": "sample", "features": "fmnist-reward",
                     "reference_size": 48}
    cfg["eval"]["every"] = 3
    res = finetune(cfg, tmp_path, net=make_net(), evaluator=tiny_evaluator(), progress=False)
    feats = np.load(tmp_path / "base_reference_features.npy")
    assert feats.shape == (48, 6)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fd = [r["fd_ref"] for r in recs if "fd_ref" in r]
    assert len(fd) == 3 and all(np.isfinite(fd)) and len(set(fd)) == 3      # the reference set follows the policy
    assert {"fd_reward", "fd_eval", "precision", "recall"} <= set(res["final"])
    # the reward's reference set is in the checkpoint and resumes
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert "reference_set" in ck["reward"]


def test_group_credit_with_group_advantages_is_refused(tmp_path):
    from distreward.rl import finetune

    cfg = tiny_cfg()
    cfg["reward"] = {"name": "distribution", "credit": "group"}
    with pytest.raises(ValueError, match="credit=sample"):
        finetune(cfg, tmp_path, net=make_net(), reward=BrightnessReward(), progress=False)


def test_ode_rows_are_the_euler_ode_of_the_policy():
    from distreward.rl.rollout import ode_rows
    from distreward.sampling import FlowVelocity, ode_sample, sigma_schedule

    model, sigmas, labels = FlowVelocity(make_net()), sigma_schedule(4), torch.tensor([0, 2, 1])
    rows = ode_rows(model, labels, SHAPE, sigmas, torch.Generator().manual_seed(3), "cpu", batch_size=2)
    noise = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(rows, ode_sample(model, noise, labels, sigmas).clamp(-1, 1))


@pytest.mark.slow
def test_ode_reference_set_holds_ode_samples_of_the_policy(tmp_path, monkeypatch):
    import distreward.rl.grpo as grpo
    from distreward.rl import finetune
    from distreward.sampling.generate import balanced_labels
    from distreward.features import compute_features
    from distreward.sampling import FlowVelocity, ode_sample, sigma_schedule

    pushed = []

    def recording(model, labels, *args, **kw):
        out = real(model, labels, *args, **kw)
        pushed.append((labels.clone(), out.clone()))
        return out

    real = grpo.ode_rows
    monkeypatch.setattr(grpo, "ode_rows", recording)
    cfg = tiny_cfg(iterations=2, reference="ode", push="one_per_group")
    cfg["reward"] = {"name": "distribution", "mode": "fast", "credit": "sample", "features": "fmnist-reward",
                     "reference_size": 24}
    cfg["eval"]["every"] = 0
    ev = tiny_evaluator()
    res = finetune(cfg, tmp_path, net=make_net(), evaluator=ev, progress=False)
    # the initial rows: Euler-ODE samples of the base (one batch: the noise is the first draw of the seed)
    noise = torch.randn((24, *SHAPE), generator=torch.Generator().manual_seed(7919))
    with torch.no_grad():
        base = ode_sample(FlowVelocity(make_net()), noise, balanced_labels(24, 3), sigma_schedule(4)).clamp(-1, 1)
    np.testing.assert_allclose(np.load(tmp_path / "base_reference_features.npy"),
                               compute_features(ev.nets[0], base), rtol=1e-5, atol=1e-6)
    # each iteration pushes one ODE sample per group (P = 2), with the group's label, and nothing else
    assert [lab.shape[0] for lab, _ in pushed] == [2, 2]
    ref = res["reward"].ref
    latest = np.concatenate([compute_features(ev.nets[0], img) for _, img in pushed])
    np.testing.assert_allclose(ref.rows[:4], latest, rtol=1e-6)
    assert ref.pushed == 4


def test_bad_reference_sampler_is_named(tmp_path):
    from distreward.rl import finetune

    with pytest.raises(ValueError, match=r"rl.reference: 'sde' is not allowed \(one of: rollout, ode"):
        finetune(tiny_cfg(reference="sde"), tmp_path, net=make_net(), reward=BrightnessReward(), progress=False)
