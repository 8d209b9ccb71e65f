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
from test_pretrain import write_images  # noqa: E402

REWARDED = [name for name, algorithm in ALGORITHMS.items() if algorithm.uses_reward]
DATA: dict = {}     # the training images of the trainers that read them (pretrain.images)


@pytest.fixture(scope="module", autouse=True)
def training_images(tmp_path_factory):
    DATA["images"] = str(write_images(tmp_path_factory.mktemp("data") / "images.npz", 12, SHAPE, 3))


# Pool rounds at their smallest: the pool is as large as make_reward's reference set (40 rows), in 3 shards.
POOL = {"size": 40, "shard": 16, "method": "euler", "steps": 3, "epochs": 2, "minibatch": 10}


def frame_cfg(name: str, iterations: int, **rl) -> dict:
    """A tiny config every trainer accepts: P = 2 groups of G = 3, 4 served steps, two minibatches; the trainer's
    own sections at their smallest. A trainer of the finetune command is named by rl.algorithm."""
    algorithm = {"algorithm": name} if ALGORITHMS[name].command == "finetune" else {}
    return {"name": "frame", "seed": 0, "model": {"num_classes": 3, "image_shape": list(SHAPE)},
            "rl": {"iterations": iterations, "labels_per_iter": 2, "group_size": 3, "steps": 4, "noise_level": 0.8,
                   "shared_noise": False, "train_steps": {"mode": "window", "window": 2}, "minibatches": 2,
                   "lr": 3e-3, "beta": 0.05, "ema_decay": 0.5, "batch_size": 8, "pool": POOL, **algorithm, **rl},
            "nft": {"method": "euler", "steps": 3, "timesteps": 2}, "distill": {"teacher_steps": 8},
            "pathwise": {"k": 2, "steps": 3},
            "pretrain": {"images": DATA.get("images", "fmnist-train"), "batch": 3, "steps": 2},
            "reward": {"name": "distribution", "reference_size": POOL["size"]},
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


def test_finetune_checks_the_config_once_and_runs_the_trainer_it_names(tmp_path, monkeypatch):
    import distreward.rl.run as frame
    from distreward.rl import finetune

    checks, runs, resolve = [], [], frame.resolve
    monkeypatch.setattr(frame, "resolve", lambda cfg, **kw: checks.append(kw) or resolve(cfg, **kw))
    monkeypatch.setattr(frame, "run_checked", lambda algorithm, cfg, run_dir, **kw: runs.append((algorithm, cfg)))
    finetune(frame_cfg("nft", 1), tmp_path / "run", reward=make_reward(), progress=False)
    assert checks == [{"own_reward": True}]
    (algorithm, cfg), = runs
    assert algorithm is ALGORITHMS["nft"] and cfg.rl.algorithm == "nft" and cfg.rl.lr == 3e-3


def test_the_shared_update_is_the_plain_minibatch_loop():
    """step.minibatch_steps against the loop written out: one permutation per epoch from the run's generator,
    per minibatch zero_grad, backward, grad-norm clip, AdamW step, EMA; the logged means over the updates."""
    from types import SimpleNamespace

    from distreward.rl.step import ema_update, minibatch_steps, stat_sums

    rl = SimpleNamespace(minibatches=3, inner_epochs=2, grad_clip=0.5, ema_decay=0.9)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randn(10, generator=torch.Generator().manual_seed(2))

    def setup():
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 1)
        return net, torch.nn.Linear(4, 1).requires_grad_(False), torch.optim.AdamW(net.parameters(), lr=0.1)

    def loss_of(net, rows):
        return (net(x[rows])[:, 0] - y[rows]) ** 2

    net, ema, opt = setup()

    def backward(mb, _):
        loss = loss_of(net, mb.local)
        (loss.mean() * mb.share).backward()
        return stat_sums(loss.sum(), torch.tensor(float(mb.idx.numel())))

    stats = minibatch_steps(net, ema, opt, rl, torch.Generator().manual_seed(3), batch=10, rows=range(10),
                            names=("loss", "size"), divisors=(1, 2), backward=backward)

    ref, ref_ema, ref_opt = setup()
    g, losses, norms = torch.Generator().manual_seed(3), [], []
    for _ in range(2):
        for idx in torch.randperm(10, generator=g).chunk(3):
            ref_opt.zero_grad()
            loss = loss_of(ref, idx)
            loss.mean().backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)))
            ref_opt.step()
            ema_update(ref_ema, ref, 0.9)
            losses.append(float(loss.detach().mean()))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), ref_ema.parameters()))
    assert stats["loss"] == pytest.approx(sum(losses) / 6, rel=1e-6) and stats["size"] == 0.5
    assert stats["grad_norm"] == pytest.approx(sum(norms) / 6, rel=1e-6)
