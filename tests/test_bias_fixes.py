"""Four things that biased results, each checked against an independent computation: the PPO trust region acts at
the default clip range (log-probs are means over dimensions, so rho stays near 1), advantages do not depend on
the reward's scale, merge inputs holding the same weights are used once, and the cached initial reference set of
GRPO is recomputed when what it was built from changes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

from distreward.demo.merge import grpo_inputs
from distreward.merge.inputs import distinct_inputs, open_checkpoints
from distreward.models import save_generator
from distreward.models.unet import UNet
from distreward.rl.losses import clip_binds, group_advantages, ppo_clip_loss
from distreward.rl.settings import DEFAULTS, resolve

EPS = float(DEFAULTS["rl"]["clip_eps"])          # the default clip range
SHAPE = (1, 32, 32)                              # D = 1024, as Fashion-MNIST
KW = dict(img_resolution=32, img_channels=1, num_classes=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
          attn_resolutions=[])


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(**KW)
    net.generator_meta = {"arch": "unet", "kwargs": KW}      # so finetune saves its merge inputs
    return net


class MeanPixelReward:
    """Stand-in sample-wise reward: -(mean pixel - target[label])^2 (no state)."""

    name = "mean-pixel"

    def __call__(self, images, labels, groups=None):
        target = torch.tensor([-0.4, 0.0, 0.4])[labels.cpu()]
        return -(images.cpu().float().mean((1, 2, 3)) - target) ** 2

    def after_step(self, images, labels):
        pass


def grpo_cfg(**rl):
    return {"name": "bias", "seed": 0, "model": {"num_classes": 3, "image_shape": list(SHAPE)},
            "rl": {"iterations": 2, "labels_per_iter": 2, "group_size": 4, "steps": 4, "noise_level": 0.7,
                   "train_steps": {"mode": "window", "window": 2}, "inner_epochs": 3, "minibatches": 2,
                   "lr": 1e-4, "ema_decay": 0.5, **rl},
            "reward": {"name": "mean-pixel"}, "eval": {"every": 0}, "checkpoint": {"every": 1}}


# --------------------------------------------------------------------------------------------- 1. PPO clip

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


def test_clipping_engages_with_several_inner_epochs_and_is_logged_per_iteration(tmp_path):
    """A tiny UNet on 32x32 images (D = 1024), 3 inner epochs x 2 minibatches: with the default eps some ratios
    leave the trust region in every iteration (clip_hi / clip_lo / clip_bind > 0 in metrics.jsonl); PPO's usual
    0.2 never does. (lr 1e-3: with 45k parameters an Adam step moves |rho - 1| less than the Fashion-MNIST UNet's
    at the preset's 1e-4; its |rho - 1| here stays below 1e-3, as there.)"""
    from distreward.rl.grpo import finetune

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


# --------------------------------------------------------------------------------------------- 2. advantages

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


# --------------------------------------------------------------------------------------------- 4. merge inputs

def test_merge_inputs_with_equal_weights_are_used_once(tmp_path, capsys):
    a, b = tiny_unet(0), tiny_unet(1)
    pa = save_generator(tmp_path / "a.safetensors", a, "unet", KW, extra={"note": "first"})
    pb = save_generator(tmp_path / "b.safetensors", b, "unet", KW)
    pa2 = save_generator(tmp_path / "a_again.safetensors", a, "unet", KW, extra={"note": "other metadata"})
    assert pa.read_bytes() != pa2.read_bytes()                          # the same weights, other files
    near = {k: v.clone() for k, v in a.state_dict().items()}
    first = next(k for k, v in near.items() if v.is_floating_point())
    near[first].view(-1)[0] += 1e-6                                      # one value differs: a distinct input
    pn = save_generator(tmp_path / "near.safetensors", a, "unet", KW, state_dict=near)

    kept = distinct_inputs([pa, pb, pn, pa2])
    assert kept == [pb, pn, pa2]                                         # the last copy keeps its place
    err = capsys.readouterr().err
    assert "a.safetensors dropped" in err and "a_again.safetensors" in err
    cfg = OmegaConf.create({"checkpoints": [str(pa), str(pb), str(pa2), str(pa2)], "snapshots": None})
    ckpts = open_checkpoints(cfg)
    assert ckpts.paths == [pb, pa2]
    # the uniform soup is the mean of the distinct weights
    soup = ckpts.merge(np.full(ckpts.k, 1.0 / ckpts.k))
    want = (load_file(pb)[first].double() + load_file(pa2)[first].double()) / 2
    assert torch.allclose(soup[first].double(), want, atol=1e-7)


def test_grpo_inputs_do_not_list_the_final_ema_twice(tmp_path):
    """A real GRPO run's files: checkpoints/ema_00001, ema_00002 (the final EMA), model.safetensors,
    model_ema.safetensors; the merge_rl stage lists the final EMA once, last."""
    from distreward.rl.grpo import finetune

    d = tmp_path / "demo" / "distribution"
    finetune(grpo_cfg(inner_epochs=1), d, net=tiny_unet(), reward=MeanPixelReward(), progress=False)
    ck = d / "checkpoints"
    final, ema = load_file(ck / "ema_00002.safetensors"), load_file(d / "model_ema.safetensors")
    assert all(torch.equal(final[k], ema[k]) for k in ema)               # the duplicate the stage used to list
    files = grpo_inputs(SimpleNamespace(run_dir=tmp_path / "demo"))
    assert files == [ck / "ema_00001.safetensors", d / "model.safetensors", d / "model_ema.safetensors"]


# --------------------------------------------------------------------------------------------- 5. reference cache

def test_reference_cache_is_recomputed_when_its_settings_change(tmp_path, monkeypatch):
    """The initial reference set (base_reference_features.npy) is reused under the same settings only: a changed
    reward.reference_size or seed draws it again."""
    from distreward.rl import setup
    from distreward.sampling import velocity_model

    net = tiny_unet().eval()
    model = velocity_model(net, "unet")
    calls = []
    real = setup.reference_features

    def counting(*args, **kwargs):
        calls.append(args[3].n)
        return real(*args, **kwargs)

    monkeypatch.setattr(setup, "reference_features", counting)

    def build(**over):
        cfg = resolve({**grpo_cfg(), "device": "cpu", **{k: v for k, v in over.items() if k == "seed"},
                       "reward": {"name": "distribution", "features": "random", "reference_size": over.get("n", 12)}})
        sampler = setup.ReferenceSampler.of_run(cfg, int(cfg.reward.reference_size))
        setup.build_reward_for_run(OmegaConf.to_container(cfg.reward), sampler, net, tmp_path, model=model,
                                   decode=lambda x: x.clamp(-1, 1))
        return np.load(tmp_path / setup.REFERENCE_CACHE)

    first = build()
    again = build()
    assert calls == [12] and np.array_equal(first, again)               # same settings: the cache
    assert build(n=10).shape[0] == 10 and calls == [12, 10]             # another N: drawn again
    other_seed = build(n=10, seed=1)
    assert calls == [12, 10, 10] and not np.array_equal(other_seed, first[:10])
