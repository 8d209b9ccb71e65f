"""Continued training and guidance distillation (rl/pretrain.py): the logged loss is the base training's
flow-matching loss on the draws written out here, guidance distillation's target is the frozen base's guided
velocity, and bad training images are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

from distreward.rl import train  # noqa: E402
from distreward.utils.errors import InputError  # noqa: E402

from test_grpo import StandInEvaluator  # noqa: E402
from test_grpo_dist import SHAPE, make_net  # noqa: E402

CLASSES, N_IMAGES = 3, 12


def write_images(path, n: int, shape, classes: int, seed: int = 0):
    """An .npz of n random uint8 images of `shape` with labels 0..classes-1 (as `distreward sample` writes)."""
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (n, *shape), dtype=np.uint8),
             labels=np.arange(n) % classes)
    return path


def cfg(images, iterations: int, **pretrain) -> dict:
    return {"name": "pretrain", "seed": 3, "model": {"num_classes": CLASSES, "image_shape": list(SHAPE)},
            "rl": {"iterations": iterations, "ema_decay": 0.5, "grad_clip": 1e9},
            "pretrain": {"images": str(images), "lr": 1e-2, "batch": 5, "steps": 1, **pretrain},
            "guidance": {"scale": 1.5}, "reward": {"name": "distribution"},
            "eval": {"every": 0}, "checkpoint": {"every": 1}}


def run(name: str, c: dict, path) -> dict:
    return train(name, c, path, net=make_net(), evaluator=StandInEvaluator(), progress=False)


def images_of(path) -> tuple[torch.Tensor, torch.Tensor]:
    z = np.load(path)
    return torch.from_numpy(z["images"]).float() / 127.5 - 1, torch.from_numpy(z["labels"]).long()


def drawn(g: torch.Generator, images, labels, n: int, null: int, dropout: float = 0.1) -> dict:
    """One iteration's draws written out: row indices with replacement, eps ~ N(0, 1), sigma = sigmoid(N(0, 1)),
    each label dropped to the null label with probability `dropout`; x_sigma = (1 - sigma) x0 + sigma eps."""
    idx = torch.randint(images.shape[0], (n,), generator=g)
    x0 = images[idx]
    eps = torch.randn(x0.shape, generator=g)
    sigma = torch.sigmoid(torch.randn(n, generator=g))
    y = torch.where(torch.rand(n, generator=g) < dropout, torch.full((n,), null), labels[idx])
    s = sigma.view(-1, 1, 1, 1)
    return {"x0": x0, "eps": eps, "sigma": sigma, "y": y, "x": (1 - s) * x0 + s * eps}


def mse(v, target) -> float:
    return float(((v - target) ** 2).flatten(1).mean(1).mean())


def test_pretrain_loss_is_the_flow_matching_loss_on_the_same_draws(tmp_path):
    """Iteration 2's loss (before its step: the policy after iteration 1) is |net(x_sigma, sigma, y) - (eps - x0)|^2
    on the run generator's next draws (after iteration 1's draws and its minibatch permutation)."""
    data = write_images(tmp_path / "data.npz", N_IMAGES, SHAPE, CLASSES)
    two = run("pretrain", cfg(data, 2), tmp_path / "two")
    one = run("pretrain", cfg(data, 1), tmp_path / "one")
    images, labels = images_of(data)
    g = torch.Generator().manual_seed(3)
    d1 = drawn(g, images, labels, 5, CLASSES)
    torch.randperm(5, generator=g)
    d2 = drawn(g, images, labels, 5, CLASSES)
    with torch.no_grad():
        first = mse(make_net()(d1["x"], d1["sigma"], d1["y"]), d1["eps"] - d1["x0"])
        second = mse(one["net"](d2["x"], d2["sigma"], d2["y"]), d2["eps"] - d2["x0"])
    assert [h["loss"] for h in two["history"]] == pytest.approx([first, second], rel=1e-5)
    with torch.no_grad():                                     # the policy moved: the base scores d2 otherwise
        assert mse(make_net()(d2["x"], d2["sigma"], d2["y"]), d2["eps"] - d2["x0"]) != pytest.approx(second, rel=1e-4)


def test_guidance_distill_target_is_the_frozen_bases_guided_velocity(tmp_path):
    """Iteration 2's target is v_u + w (v_c - v_u) of the base network (not of the policy after iteration 1):
    v_c = base(x, sigma, y), v_u = base(x, sigma, null)."""
    data = write_images(tmp_path / "data.npz", N_IMAGES, SHAPE, CLASSES)
    two = run("guidance-distill", cfg(data, 2), tmp_path / "two")
    one = run("guidance-distill", cfg(data, 1), tmp_path / "one")
    images, labels = images_of(data)
    g = torch.Generator().manual_seed(3)
    drawn(g, images, labels, 5, CLASSES)
    torch.randperm(5, generator=g)
    d = drawn(g, images, labels, 5, CLASSES)
    policy, null = one["net"], torch.full_like(d["y"], CLASSES)

    def guided(net):
        v_c, v_u = net(d["x"], d["sigma"], d["y"]), net(d["x"], d["sigma"], null)
        return v_u + 1.5 * (v_c - v_u)

    with torch.no_grad():
        v = policy(d["x"], d["sigma"], d["y"])
        expected = mse(v, guided(make_net()))
        assert expected != pytest.approx(mse(v, guided(policy)), rel=1e-4)      # a teacher following the policy
    assert two["history"][1]["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["pretrain", "guidance-distill"])
def test_images_unlike_the_policy_are_refused(tmp_path, name):
    wrong_shape = write_images(tmp_path / "shape.npz", N_IMAGES, (1, 4, 4), CLASSES)
    with pytest.raises(InputError, match=r"images of shape \(1, 4, 4\).*model.image_shape"):
        run(name, cfg(wrong_shape, 1), tmp_path / "a")
    wrong_labels = write_images(tmp_path / "labels.npz", N_IMAGES, SHAPE, CLASSES + 2)
    with pytest.raises(InputError, match=r"labels 0..4 are outside 0..2"):
        run(name, cfg(wrong_labels, 1), tmp_path / "b")


@pytest.mark.parametrize("ema_decay, expected", [(0.75, 0.75), (None, 0.5)])
def test_pretrain_ema_has_its_own_decay(tmp_path, ema_decay, expected):
    """One optimizer step: theta_ema = d theta_base + (1 - d) theta_1, with d = pretrain.ema_decay (null: rl's)."""
    data = write_images(tmp_path / "data.npz", N_IMAGES, SHAPE, CLASSES)
    out = run("pretrain", cfg(data, 1, ema_decay=ema_decay), tmp_path / "r")
    base = make_net().state_dict()
    for name, p in out["net"].named_parameters():
        want = expected * base[name] + (1 - expected) * p.detach()
        torch.testing.assert_close(out["ema"].state_dict()[name], want, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p.detach(), base[n]) for n, p in out["net"].named_parameters())
