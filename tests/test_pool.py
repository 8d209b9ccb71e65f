"""The pool-round trainer (rl/pool.py): rho's estimator against the pairwise one, the rewards against a brute-force
subset-replace FD over the pool (whole or per class), the shards (kept, redrawn alone, keyed), the config's checks,
and a round interrupted during generation or an epoch (in process, and by SIGKILL) resuming bit-identical with
its finished shards kept. The frame's own tests (tests/test_rl_run.py) also run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

import distreward.rl.pool as pool_module  # noqa: E402
from distreward.metrics import frechet_distance  # noqa: E402
from distreward.rl import train  # noqa: E402
from distreward.rl.diagnostics import signal_share  # noqa: E402
from distreward.rl.pool import (PoolShards, gradient_pair_share, pool_groups, pool_signal_share,  # noqa: E402
                                score_against_pool)
from distreward.reward.reference import ReferenceSet  # noqa: E402
from distreward.reward.rewards import ClassDistributionReward, DistributionReward, class_sets  # noqa: E402
from distreward.schema import ConfigError, validate  # noqa: E402
from distreward.utils.checkpoint import load_checkpoint  # noqa: E402

from _spawn import kill_when  # noqa: E402
from test_grpo import StandInEvaluator  # noqa: E402
from test_grpo_dist import FEAT_DIM, SHAPE, TinyFeatures, make_net, make_reward, real_stats  # noqa: E402
from test_rl_run import frame_cfg, untimed  # noqa: E402

TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------- rho

def test_the_running_pair_share_is_the_pairwise_estimator():
    g = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)).double() + 0.4
    rho = gradient_pair_share(g.sum(0), float((g * g).sum()), 6)
    assert rho == pytest.approx(signal_share(list(g))["rho"], rel=1e-10)
    assert gradient_pair_share(g[0], float(g[0] @ g[0]), 1) is None


def test_the_pool_share_is_the_share_at_the_pool_size():
    mu2, trace, b, m = 2.0, 30.0, 10, 120           # |mu|^2 and tr(Sigma): the share at batch n is mu2 / (mu2 + tr / n)
    assert pool_signal_share(mu2 / (mu2 + trace / b), b, m) == pytest.approx(mu2 / (mu2 + trace / m), rel=1e-12)
    assert pool_signal_share(-0.01, b, m) is None and pool_signal_share(None, b, m) is None


# --------------------------------------------------------------------------------------------- rewards

def fd_of(rows: np.ndarray, mu, sigma) -> float:
    return frechet_distance(rows.mean(0), np.cov(rows, rowvar=False), mu, sigma)


def brute_force(feats: np.ndarray, mu, sigma) -> np.ndarray:
    """FD(pool) - FD(pool with its first row replaced by x_i), row by row."""
    base = fd_of(feats, mu, sigma)
    out = []
    for x in feats:
        rows = feats.copy()
        rows[0] = x
        out.append(base - fd_of(rows, mu, sigma))
    return np.array(out)


def pool_images(m: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((m, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_rewards_are_scored_against_the_pool_itself():
    m = 40
    reward = make_reward()                                      # a 40-row reference set of other rows
    images, labels = pool_images(m), torch.arange(m) % 3
    r = score_against_pool(reward, images, labels, pool_groups(labels, "pool"))
    feats = reward.features(images)
    st = real_stats(3)
    assert r.dtype == torch.float32 and r.shape == (m,)
    np.testing.assert_allclose(r.double().numpy(), brute_force(feats, st.mu, st.sigma), rtol=1e-4, atol=1e-7)
    assert reward.fd() == pytest.approx(fd_of(feats, st.mu, st.sigma), rel=1e-9)


def test_class_credit_scores_each_class_against_its_part_of_the_pool():
    m, classes = 30, 3
    stats = {c: real_stats(10 + c) for c in range(classes)}
    labels = torch.arange(m) % classes
    init = np.random.default_rng(5).normal(size=(m, FEAT_DIM))
    reward = ClassDistributionReward(TinyFeatures(1, FEAT_DIM).eval().requires_grad_(False),
                                     class_sets(init, labels, stats))
    images = pool_images(m, 1)
    r = score_against_pool(reward, images, labels, pool_groups(labels, "class")).double().numpy()
    feats = reward.features(images)
    for c in range(classes):
        idx = np.flatnonzero(labels.numpy() == c)
        np.testing.assert_allclose(r[idx], brute_force(feats[idx], stats[c].mu, stats[c].sigma), rtol=1e-4,
                                   atol=1e-7)
    assert torch.equal(pool_groups(labels, "class"), labels) and pool_groups(labels, "pool").unique().tolist() == [0]


# --------------------------------------------------------------------------------------------- shards

def shards(root, key=None, round_=1) -> PoolShards:
    return PoolShards(root, round_, size=10, shard=4, num_classes=3, image_shape=SHAPE, seed=7,
                      key=key or {"policy": "a"})


def draw_counting(sh: PoolShards):
    calls = []

    def sample(noise, labels):
        calls.append(labels.tolist())
        return noise * 0.5 + labels[:, None, None, None]
    x, kept = sh.draw(sample)
    return x, kept, calls


def test_finished_shards_are_kept_and_the_others_drawn_alone(tmp_path):
    full, kept, calls = draw_counting(shards(tmp_path / "a"))
    assert kept == 0 and [len(c) for c in calls] == [4, 4, 2]
    assert calls == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0]]                  # class-balanced over the pool
    sh = shards(tmp_path / "b")
    first, _, _ = draw_counting(sh)
    sh.path(1).unlink()                                                  # shard 1 never finished
    stat0 = os.stat(sh.path(0))
    again, kept, calls = draw_counting(sh)
    assert kept == 2 and calls == [[1, 2, 0, 1]]
    assert torch.equal(again, full) and torch.equal(first, full)
    assert (os.stat(sh.path(0)).st_ino, os.stat(sh.path(0)).st_mtime_ns) == (stat0.st_ino, stat0.st_mtime_ns)
    sh.path(2).write_bytes(b"damaged")                                   # a damaged file: drawn again
    again, kept, calls = draw_counting(sh)
    assert kept == 2 and calls == [[2, 0]] and torch.equal(again, full)
    other, kept, calls = draw_counting(shards(tmp_path / "b", key={"policy": "b"}))    # another policy: redrawn
    assert kept == 0 and len(calls) == 3 and torch.equal(other, full)
    assert not torch.equal(draw_counting(shards(tmp_path / "c", round_=2))[0], full)   # each round its own noise


# --------------------------------------------------------------------------------------------- config

def pool_cfg(reference_size: int = 64, credit: str = "pool", per_class: bool = False) -> dict:
    return {"rl": {"algorithm": "pool", "pool": {"size": 64, "credit": credit}},
            "reward": {"name": "distribution", "reference_size": reference_size, "per_class": per_class}}


@pytest.mark.parametrize("changes,key", [({"reference_size": 100}, "reward.reference_size"),
                                         ({"credit": "class"}, "rl.pool.credit"),
                                         ({"per_class": True}, "rl.pool.credit")])
def test_a_pool_that_is_not_the_reference_set_is_refused(changes, key):
    validate("finetune", pool_cfg())
    validate("finetune", pool_cfg(credit="class", per_class=True))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate("finetune", pool_cfg(**changes))


# --------------------------------------------------------------------------------------------- resume

def run(path, iterations: int = 3, **kw) -> dict:
    return train("pool", frame_cfg("pool", iterations), path, net=make_net(), reward=make_reward(),
                 evaluator=StandInEvaluator(), progress=False, **kw)


def assert_same(a: dict, b: dict) -> None:
    for key in ("net", "ema"):
        for (k, x), y in zip(a[key].state_dict().items(), b[key].state_dict().values()):
            assert torch.equal(x, y), (key, k)
    assert untimed(a["history"]) == untimed(b["history"])
    assert repr(a["reward"].state_dict()) == repr(b["reward"].state_dict())


def shard_files(path: Path, round_: int) -> dict:
    folder = path / "pool" / f"round_{round_:05d}"
    return {p.name: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in sorted(folder.glob("shard_*.safetensors"))}


def crash_at_shard(monkeypatch, n: int) -> None:
    """Stop the run (as a kill would) while it draws its n-th shard."""
    sample, calls = pool_module.Pool.sample, []

    def failing(self, ctx, noise, labels):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("killed while drawing a shard")
        return sample(self, ctx, noise, labels)
    monkeypatch.setattr(pool_module.Pool, "sample", failing)


def test_a_round_stopped_while_drawing_its_pool_resumes_with_its_finished_shards(tmp_path, monkeypatch):
    full = run(tmp_path / "full")
    crash_at_shard(monkeypatch, 5)                  # round 2 (3 shards a round), its second shard
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    kept = shard_files(tmp_path / "cut", 1)
    assert list(kept) == ["shard_0000.safetensors"]
    monkeypatch.undo()
    seen = {}
    sample = pool_module.Pool.sample
    monkeypatch.setattr(pool_module.Pool, "sample",
                        lambda self, ctx, noise, labels: seen.setdefault(len(seen), sample(self, ctx, noise, labels)))
    resumed = run(tmp_path / "cut", resume=True)
    assert len(seen) == 2 + 3                                       # round 2's last two shards, then round 3's
    assert_same(full, resumed)


def test_a_round_stopped_during_an_epoch_resumes_bit_identical(tmp_path, monkeypatch):
    full = run(tmp_path / "full")
    update, calls = pool_module.nft_update, []

    def failing(net, model, old_model, ema, optimizer, *args, **kw):
        calls.append(1)
        if len(calls) == 2:                          # round 2: its third optimizer step (of 4 an epoch) fails
            steps = []

            def hook(*_):
                steps.append(1)
                if len(steps) == 3:
                    raise KeyboardInterrupt("killed in an epoch")
            optimizer.register_step_pre_hook(hook)
        return update(net, model, old_model, ema, optimizer, *args, **kw)
    monkeypatch.setattr(pool_module, "nft_update", failing)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.undo()
    before = shard_files(tmp_path / "cut", 1)
    assert len(before) == 3
    drawn = []
    sample = pool_module.Pool.sample
    monkeypatch.setattr(pool_module.Pool, "sample",
                        lambda self, ctx, noise, labels: drawn.append(1) or sample(self, ctx, noise, labels))
    resumed = run(tmp_path / "cut", resume=True)
    assert len(drawn) == 3                                          # round 3 only: round 2's pool was kept
    assert_same(full, resumed)
    assert not (tmp_path / "cut" / "pool").exists() or not any((tmp_path / "cut" / "pool").iterdir())


# --------------------------------------------------------------------------------------------- SIGKILL

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import distreward.rl.pool as P
    import test_pool as T
    slow, marker, sample, update, steps = float(sys.argv[4]), Path(sys.argv[5]), P.Pool.sample, P.nft_update, []
    if sys.argv[3] == "pool":           # slow shards
        P.Pool.sample = lambda self, ctx, noise, labels: (time.sleep(slow), sample(self, ctx, noise, labels))[1]
    else:                               # slow optimizer steps; the marker once round 2's epochs run (8 steps a round)

        def step(*_):
            steps.append(1)
            if len(steps) > 8:
                marker.touch()
            time.sleep(slow)

        def slow_update(net, model, old_model, ema, optimizer, *args, **kw):
            if not steps:
                optimizer.register_step_pre_hook(step)
            return update(net, model, old_model, ema, optimizer, *args, **kw)
        P.nft_update = slow_update
    T.run(sys.argv[2])
""")


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["pool", "epoch"])
def test_sigkill_in_a_round_resumes_bit_identical_with_its_finished_shards(tmp_path, monkeypatch, phase):
    """Killed in round 2 while it draws its pool (after its first shard) or during one of its epochs."""
    full = run(tmp_path / "full")
    cut, marker = tmp_path / "cut", tmp_path / "in_epoch"
    env = {**os.environ, "DISTREWARD_THREADS": str(torch.get_num_threads())}     # the same sums as this process
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(TESTS), str(cut), phase, "0.5", str(marker)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    waits_for = marker if phase == "epoch" else cut / "pool" / "round_00001" / "shard_0000.safetensors.json"
    deadline = time.time() + 120
    while not waits_for.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_when(child, cut / "checkpoints" / "last.pt", "iteration", 1, 10)
    assert load_checkpoint(cut / "checkpoints" / "last.pt")["iteration"] == 1    # killed inside round 2
    kept = shard_files(cut, 1)
    if phase == "epoch":
        assert len(kept) == 3
    else:
        assert "shard_0000.safetensors" in kept and len(kept) < 3, kept
    drawn, sample = [], pool_module.Pool.sample
    monkeypatch.setattr(pool_module.Pool, "sample",
                        lambda self, ctx, noise, labels: drawn.append(1) or sample(self, ctx, noise, labels))
    resumed = run(cut, resume=True)                                            # takes over the dead child's lock
    assert len(drawn) == 3 - len(kept) + 3                                     # round 2's missing shards, round 3
    assert_same(full, resumed)
    records = [json.loads(line)["iteration"] for line in (cut / "metrics.jsonl").read_text().splitlines()
               if "eval/fd_reward" not in line]
    assert records == [1, 2, 3]


# --------------------------------------------------------------------------------------------- study

def test_a_study_runs_pool_rounds_as_the_configs_trainer_and_its_null():
    from distreward.config import load_config
    from distreward.study import ARMS, arm_config, default_arms

    cfg = validate("finetune", load_config("fmnist_pool_tiny"))
    assert default_arms(cfg)[0] == "pool" and set(default_arms(cfg)) <= set(ARMS)
    null = arm_config(cfg, "null", 3)
    assert (null.rl.algorithm, null.rl.null_control, null.seed) == ("pool", "permute", 3)
    assert arm_config(validate("finetune", load_config("fmnist_pool_tiny", ["rl.algorithm=nft"])), "pool",
                      0).rl.algorithm == "pool"
