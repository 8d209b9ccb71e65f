"""The frame every RL trainer runs in (rl/run.py, rl/context.py), checked for every registered algorithm: a run
stopped after a checkpoint and resumed ends bit for bit where an uninterrupted run does, and the null control
gives the batch's own rewards to other samples. A trainer added to ALGORITHMS gets these tests for free."""

from __future__ import annotations

import json

import pytest
import torch

from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

from distreward.rl import ALGORITHMS, train  # noqa: E402

from test_grpo import StandInEvaluator  # noqa: E402
from test_grpo_dist import SHAPE, make_net, make_reward  # noqa: E402

REWARDED = [name for name, algorithm in ALGORITHMS.items() if algorithm.uses_reward]


def frame_cfg(name: str, iterations: int, **rl) -> dict:
    """A tiny config every trainer accepts: P = 2 groups of G = 3, 4 served steps, two minibatches; the trainer's
    own sections at their smallest. A trainer of the finetune command is named by rl.algorithm."""
    algorithm = {"algorithm": name} if ALGORITHMS[name].command == "finetune" else {}
    return {"name": "frame", "seed": 0, "model": {"num_classes": 3, "image_shape": list(SHAPE)},
            "rl": {"iterations": iterations, "labels_per_iter": 2, "group_size": 3, "steps": 4, "noise_level": 0.8,
                   "shared_noise": False, "train_steps": {"mode": "window", "window": 2}, "minibatches": 2,
                   "lr": 3e-3, "beta": 0.05, "ema_decay": 0.5, "batch_size": 8, **algorithm, **rl},
            "nft": {"method": "euler", "steps": 3, "timesteps": 2}, "distill": {"teacher_steps": 8},
            "reward": {"name": "distribution"},
            "eval": {"every": 2, "n": 6, "steps": 3, "method": "euler", "seed": 5, "grid": 3, "batch_size": 6},
            "checkpoint": {"every": 1}}


def run(name: str, cfg: dict, path, **kw) -> dict:
    reward = {"reward": make_reward()} if ALGORITHMS[name].uses_reward else {}
    return train(name, cfg, path, net=make_net(), evaluator=StandInEvaluator(), progress=False, **reward, **kw)


def untimed(history: list) -> list:
    return [{k: v for k, v in h.items() if not k.startswith("time_")} for h in history]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_resume_after_a_checkpoint_equals_an_uninterrupted_run(tmp_path, name):
    full = run(name, frame_cfg(name, 3), tmp_path / "full")
    run(name, frame_cfg(name, 1), tmp_path / "cut")
    resumed = run(name, frame_cfg(name, 3), tmp_path / "cut", resume=True, allow_changes=["rl.iterations"])
    for key in ("net", "ema"):
        for (k, a), b in zip(full[key].state_dict().items(), resumed[key].state_dict().values()):
            assert torch.equal(a, b), (key, k)
    assert untimed(resumed["history"]) == untimed(full["history"]) and len(full["history"]) == 3
    assert [e["iteration"] for e in full["evals"]] == [0, 2, 3]
    assert [e for e in resumed["evals"] if e["iteration"] != 1] == full["evals"]   # 1: the short run's last
    if "reward" in full:
        assert repr(resumed["reward"].state_dict()) == repr(full["reward"].state_dict())
    lines = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "eval/fd_reward" not in r] == [1, 2, 3]


@pytest.mark.parametrize("name", REWARDED)
def test_null_control_gives_the_batchs_rewards_to_other_samples(tmp_path, name):
    """rl.null_control=permute: the first iteration scores the same samples (its mean and spread are the real
    run's) but the rewards land on other samples, so the update differs."""
    real = run(name, frame_cfg(name, 1), tmp_path / "real")
    null = run(name, frame_cfg(name, 1, null_control="permute"), tmp_path / "null")
    for key in ("r_mean", "r_std"):
        assert null["history"][0][key] == pytest.approx(real["history"][0][key], rel=1e-6, abs=1e-12)
    assert real["history"][0]["r_std"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(real["net"].parameters(), null["net"].parameters()))


def test_a_reward_outside_the_interface_is_refused_before_any_work(tmp_path):
    def brightness(images, labels, groups=None):
        return images.mean((1, 2, 3))

    with pytest.raises(TypeError, match="not a distreward.reward.Reward; subclass it"):
        train("grpo", frame_cfg("grpo", 1), tmp_path / "run", net=make_net(), reward=brightness, progress=False)
    assert not (tmp_path / "run").exists()
