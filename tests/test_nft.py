"""The forward-process trainer (rl.algorithm = nft, distreward.rl.nft): its equations (weights in [0, 1], the loss's
minimum, the on-policy gradient equals the reward-weighted flow-matching gradient), a run that logs and writes its
models, resume bit-identical, two processes equal to one, the reference set drawn with the rollouts' ODE, and the
refused shared noise. Tiny networks and rewards (tests/test_grpo_dist.py's stand-ins): every test runs in seconds."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

from distreward.models import read_generator_metadata
from distreward.rl import finetune
from distreward.rl.nft import implicit_velocities, nft_loss, ode_rollouts, optimality_weights
from distreward.rl.settings import resolve
from distreward.rl.setup import ReferenceSampler, reference_features
from distreward.sampling import ode_sample, sigma_schedule
from distreward.schema import ConfigError
from distreward.train.flow import flow_interpolate, flow_loss, flow_target

from _spawn import run_ranks
from _tiny import TinyFeatures
from test_grpo_dist import SHAPE, make_evaluator, make_net, make_reward

WORLD, DEADLINE_S = 2, 90


def nft_cfg(iterations: int = 2, every: int = 2, **nft) -> dict:
    """P = 3 groups of G = 4 (two ranks hold 1 and 2 groups), Heun-3 rollouts, two timesteps per sample."""
    return {"name": "nft", "seed": 0, "model": {"num_classes": 3, "image_shape": list(SHAPE)},
            "rl": {"algorithm": "nft", "iterations": iterations, "labels_per_iter": 3, "group_size": 4,
                   "shared_noise": False, "minibatches": 2, "lr": 3e-3, "ema_decay": 0.5, "batch_size": 8,
                   "adv_std": "global"},
            "nft": {"method": "heun", "steps": 3, "beta": 1.0, "timesteps": 2, **nft},
            "reward": {"name": "distribution"},
            "eval": {"every": every, "n": 10, "steps": 3, "method": "euler", "seed": 5, "grid": 4, "batch_size": 4},
            "checkpoint": {"every": 1}}


def run(cfg, path, **kw):
    return finetune(cfg, path, net=make_net(), reward=make_reward(), evaluator=make_evaluator(False),
                    progress=False, **kw)


def state(res) -> dict:
    ref = res["reward"].ref
    return {"net": {k: v.clone() for k, v in res["net"].state_dict().items()},
            "ema": {k: v.clone() for k, v in res["ema"].state_dict().items()},
            "rows": ref.rows.copy(), "ptr": ref.ptr, "r_mean": [h["r_mean"] for h in res["history"]],
            "loss_nft": [h["loss_nft"] for h in res["history"]], "evals": res["evals"]}


# --------------------------------------------------------------------------------------------- the equations

def test_optimality_weights_lie_in_0_1_with_one_half_at_the_group_mean():
    adv = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.25, 1.0, 3.0])
    w = optimality_weights(adv)
    assert torch.all((w >= 0) & (w <= 1))
    assert w.tolist() == [0.0, 0.0, 0.25, 0.5, 0.625, 1.0, 1.0]
    assert torch.all(w[1:] >= w[:-1])                                # monotone in the advantage


def test_implicit_policies_are_mirror_images_around_the_old_one():
    g = torch.Generator().manual_seed(0)
    v_theta, v_old = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    for beta in (0.3, 1.0):
        v_pos, v_neg = implicit_velocities(v_theta, v_old, beta)
        torch.testing.assert_close((v_pos + v_neg) / 2, v_old)
        torch.testing.assert_close(v_pos - v_old, beta * (v_theta - v_old))


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_loss_is_minimised_at_the_reward_weighted_shift_of_the_old_velocity(beta):
    """argmin over v_theta of w|v+ - v|^2 + (1 - w)|v- - v|^2 is v_old + (2w - 1)(v - v_old) / beta: w = 1 fits the
    sample's target, w = 1/2 stays at v_old, w = 0 reflects the target through v_old."""
    g = torch.Generator().manual_seed(1)
    v_old, target = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    w = torch.tensor([0.0, 0.5, 1.0])
    best = v_old + (2 * w - 1).view(-1, 1, 1, 1) * (target - v_old) / beta
    x = best.clone().requires_grad_(True)
    nft_loss(x, v_old, target, w, beta).sum().backward()
    assert x.grad.abs().max() < 1e-6
    torch.testing.assert_close(best[1], v_old[1])
    torch.testing.assert_close(best[2], v_old[2] + (target[2] - v_old[2]) / beta)
    # any move away from the minimum raises the loss
    for d in (1e-2, -1e-2):
        assert torch.all(nft_loss(best + d, v_old, target, w, beta) > nft_loss(best, v_old, target, w, beta))


@pytest.mark.parametrize("beta", [0.4, 1.0])
def test_on_policy_gradient_is_the_reward_weighted_flow_matching_gradient(beta):
    """With v_old = v_theta (on policy) the NFT loss's parameter gradient equals that of
    sum_i beta (2 w_i - 1) flow_loss(v_theta(x_sigma,i), v_i): fit the better samples, push away from the worse."""
    net = make_net()
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(6, *SHAPE, generator=g), torch.randn(6, *SHAPE, generator=g)
    sigma, labels = torch.rand(6, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0, 0.9])
    xt, target = flow_interpolate(x0, eps, sigma), flow_target(x0, eps)

    def grads(loss_fn):
        net.zero_grad()
        loss_fn().backward()
        return [p.grad.clone() for p in net.parameters()]

    def nft():
        v = net(xt, sigma, labels)
        return nft_loss(v, v.detach(), target, w, beta).sum()

    def weighted_fm():
        return (beta * (2 * w - 1) * flow_loss(net(xt, sigma, labels), target)).sum()

    a, b = grads(nft), grads(weighted_fm)
    assert sum(float(t.abs().sum()) for t in a) > 1e-4
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------- the run

def test_run_logs_writes_models_and_moves_the_reference_set(tmp_path):
    res = run(nft_cfg(2, every=1), tmp_path / "run")
    assert len(res["history"]) == 2 and res["reward"].ref.ptr == 2 * 12 % 40
    for rec in res["history"]:
        for key in ("r_mean", "r_std", "loss_nft", "w_mean", "grad_norm", "w_frac_clipped", "time_rollout"):
            assert math.isfinite(rec[key]), key
        assert 0.0 <= rec["w_mean"] <= 1.0
    assert [e["iteration"] for e in res["evals"]] == [0, 1, 2]
    base = make_net().state_dict()
    assert sum(float((v - base[k]).abs().sum()) for k, v in res["net"].state_dict().items()) > 1e-3
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs if "loss_nft" in r] == [1, 2]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["history"][1]["loss_nft"] == \
        res["history"][1]["loss_nft"]


def test_no_shared_noise_refused_and_null_control_permutes(tmp_path):
    with pytest.raises(ConfigError, match="rl.shared_noise"):
        resolve({**nft_cfg(), "rl": {**nft_cfg()["rl"], "shared_noise": True}})
    real = run(nft_cfg(1, every=0), tmp_path / "real")
    null = run({**nft_cfg(1, every=0), "rl": {**nft_cfg()["rl"], "iterations": 1, "null_control": "permute"}},
               tmp_path / "null")
    assert real["history"][0]["r_mean"] == pytest.approx(null["history"][0]["r_mean"], rel=1e-6)  # same rewards...
    assert not all(torch.equal(a, b) for a, b in zip(real["net"].state_dict().values(),
                                                      null["net"].state_dict().values()))  # ...given to others


def test_resume_from_1_to_3_equals_3_straight(tmp_path):
    full = state(run(nft_cfg(3, every=3, old_decay=0.5), tmp_path / "full"))
    run(nft_cfg(1, every=3, old_decay=0.5), tmp_path / "cut")
    resumed = state(run(nft_cfg(3, every=3, old_decay=0.5), tmp_path / "cut", resume=True,
                        allow_changes=["rl.iterations"]))
    for key in ("net", "ema"):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key]), key
    assert np.array_equal(full["rows"], resumed["rows"]) and full["ptr"] == resumed["ptr"]
    assert full["r_mean"] == resumed["r_mean"] and full["loss_nft"] == resumed["loss_nft"]
    assert full["evals"] == [e for e in resumed["evals"] if e["iteration"] != 1]


def test_reference_set_is_drawn_with_the_rollouts_ode():
    """The initial rows of a forward-process run are Heun samples on nft's grid (cache key names the method)."""
    cfg = resolve(nft_cfg())
    sampler = ReferenceSampler.of_run(cfg, 6)
    assert (sampler.method, sampler.steps, sampler.noise_levels) == ("heun", 3, 0.0)
    net, feats_net = make_net(), TinyFeatures(1, 6)
    assert sampler.key(net, feats_net)["method"] == "heun"
    feats = reference_features(net, lambda x: x.clamp(-1, 1), feats_net, sampler)
    gen = torch.Generator().manual_seed(sampler.seed + 7919)
    noise = torch.randn((6, *SHAPE), generator=gen)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    x = ode_sample(net, noise, labels, sigma_schedule(3), "heun").clamp(-1, 1)
    np.testing.assert_allclose(feats, feats_net(x).double().detach().numpy(), rtol=1e-5, atol=1e-6)


def test_rollouts_of_a_ranks_rows_in_batches_are_those_rows_of_one_ode_call():
    """Rows 2..7 in batches of 4 (the last one short) equal the same rows of one ODE call over the whole batch;
    to_cpu returns them on the CPU."""
    net, gen = make_net(), torch.Generator().manual_seed(3)
    noise, labels, sigmas = torch.randn((9, *SHAPE), generator=gen), torch.arange(9) % 3, sigma_schedule(3)
    with torch.no_grad():
        whole = ode_sample(net, noise, labels, sigmas, "heun")
    for to_cpu in (False, True):
        x = ode_rollouts(net, noise, labels, sigmas, "heun", range(2, 8), "cpu", 4, to_cpu=to_cpu)
        assert x.shape == (6, *SHAPE) and x.device.type == "cpu"
        torch.testing.assert_close(x, whole[2:8], rtol=1e-5, atol=1e-6)
    assert ode_rollouts(net, noise, labels, sigmas, "heun", range(4, 4), "cpu", 4).shape == (0, *SHAPE)


def test_model_files_name_the_trainer_the_config_and_the_command(tmp_path, monkeypatch):
    """The final model files carry the trainer, the resolved config and the command line that started the run."""
    from distreward.models import build_network, save_generator

    kwargs = {"img_resolution": 8, "img_channels": 1, "num_classes": 3, "model_channels": 4, "channel_mult": [1],
              "num_blocks": 1, "attn_resolutions": [], "num_heads": 1}
    torch.manual_seed(0)
    path = save_generator(tmp_path / "base.safetensors", build_network("unet", kwargs), "unet", kwargs)
    cfg = nft_cfg(1, every=0)
    cfg["model"]["path"] = str(path)
    monkeypatch.setattr("sys.argv", ["/venv/bin/distreward", "finetune", "--config", "x y", "rl.lr=1e-5"])
    finetune(cfg, tmp_path / "run", reward=make_reward(), evaluator=make_evaluator(False), progress=False)
    for name in ("model_ema.safetensors", "model.safetensors", "checkpoints/ema_00001.safetensors"):
        assert read_generator_metadata(tmp_path / "run" / name)["extra"]["rl"] == "nft", name
    for name in ("model_ema.safetensors", "model.safetensors"):
        extra = read_generator_metadata(tmp_path / "run" / name)["extra"]
        assert extra["command"] == "distreward finetune --config 'x y' rl.lr=1e-5"
        assert extra["config"]["name"] == cfg["name"] and extra["config"]["model"]["path"] == str(path)
        assert extra["config"]["rl"]["algorithm"] == "nft"


# --------------------------------------------------------------------------------------------- two processes

def _worker(r: int, port: int, outdir: str) -> None:
    os.environ.update(RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from distreward.utils import dist as D

    D.init_distributed("cpu", timeout_s=30)
    res = run(nft_cfg(2, every=2, old_decay=0.5), os.path.join(outdir, "run"))
    torch.save(state(res), os.path.join(outdir, f"rank{r}.pt"))
    D.destroy_distributed()


def test_two_processes_equal_one(tmp_path):
    one = state(run(nft_cfg(2, every=2, old_decay=0.5), tmp_path / "one"))
    res = run_ranks(_worker, tmp_path, WORLD, DEADLINE_S, "NFT run")
    for o in res:
        assert o["ptr"] == one["ptr"]
        np.testing.assert_allclose(o["rows"], one["rows"], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(o["r_mean"], one["r_mean"], rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(o["loss_nft"], one["loss_nft"], rtol=1e-4, atol=1e-8)
        for k, v in o["net"].items():
            torch.testing.assert_close(v, one["net"][k], rtol=1e-4, atol=2e-5)
    assert all(torch.equal(res[0]["net"][k], res[1]["net"][k]) for k in res[0]["net"])     # in sync, bit for bit
    assert res[0]["evals"] == res[1]["evals"] and len(res[0]["evals"]) == 2   # the sharded evaluation, gathered


def test_per_class_reward_runs_with_the_evaluators_class_statistics(tmp_path):
    """reward.per_class: the run builds one reference set per class from the evaluator's per-class real statistics
    (N / classes initial rows each) and each iteration's rows go to their class's set."""
    from distreward.evaluation import Evaluator
    from distreward.reward import ClassDistributionReward

    g = torch.Generator().manual_seed(11)
    ref = (0.6 * torch.randn((240, *SHAPE), generator=g)).clamp(-1, 1)
    ev = Evaluator(ref, feature_nets=(TinyFeatures(1, 6), TinyFeatures(2, 6)), labels=["fmnist-reward", "fmnist-eval"],
                   cache_dir=None, max_real=200, ref_labels=torch.arange(240) % 3)
    cfg = nft_cfg(2, every=0)
    cfg["reward"] = {"name": "distribution", "per_class": True, "reference_size": 30}
    res = finetune(cfg, tmp_path / "run", net=make_net(), evaluator=ev, progress=False)
    reward = res["reward"]
    assert isinstance(reward, ClassDistributionReward) and sorted(reward.sets) == [0, 1, 2]
    assert all(s.n == 10 for s in reward.sets.values())
    assert sum(s.pushed for s in reward.sets.values()) == 2 * 12           # every sample went to its class's set
    assert all(math.isfinite(h["fd_ref"]) and h["r_std"] > 0 for h in res["history"])
    plain = Evaluator(ref, feature_nets=(TinyFeatures(1, 6), TinyFeatures(2, 6)),
                      labels=["fmnist-reward", "fmnist-eval"], cache_dir=None, max_real=200)
    with pytest.raises(ValueError, match="per-class real statistics"):
        finetune(cfg, tmp_path / "plain", net=make_net(), evaluator=plain, progress=False)
