"""The merge searchers (rl.algorithm ppo / reinforce / cma / random) over the same coefficients, reward and budget,
their resume, their checkpoints, and the greedy soup baseline."""

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

from distreward.merge import (SEARCHERS, CheckpointSet, MergeRL, PolicySearch, RandomSearch, greedy_soup,
                              make_searcher, project_sum_one, run_merge, soup_weights)
from distreward.merge.cmaes import CmaSearch
from distreward.merge.inputs import make_ode_sampler
from distreward.merge.state import load_search_state, search_state
from distreward.schema import ConfigError
from distreward.utils.checkpoint import load_checkpoint

from _spawn import kill_when
from test_merge import StubEvaluator, feature_fn, real_stats, tiny_checkpoints, tiny_cfg


class CountingSampler:
    """The tiny ODE sampler, counting the images it is asked for."""

    def __init__(self):
        self.sample, self.n = make_ode_sampler("unet", 2, "euler", 1.0, 64), 0

    def __call__(self, net, noise, labels):
        self.n += noise.shape[0]
        return self.sample(net, noise, labels)


def recording(cs: CheckpointSet) -> list:
    """Record every coefficient vector merged into the live network."""
    merged, inner = [], cs.merge_into

    def merge_into(net, w):
        merged.append(np.asarray(w, np.float64).copy())
        return inner(net, w)

    cs.merge_into = merge_into
    return merged


def parts(tmp_path, sampler=None):
    return dict(ckpts=CheckpointSet.open(tiny_checkpoints(tmp_path)), sample_fn=sampler or CountingSampler(),
                feature_fn=feature_fn, evaluator=StubEvaluator(), real_stats=real_stats(), progress=False)


def without_times(history):
    return [{k: v for k, v in h.items() if not k.startswith("time_")} for h in history]


def test_the_schema_offers_every_searcher():
    for name in SEARCHERS:
        assert tiny_cfg(algorithm=name).rl.algorithm == name
        assert make_searcher(tiny_cfg(algorithm=name), [1 / 3] * 3).name == name
    with pytest.raises(ConfigError, match="rl.algorithm"):
        tiny_cfg(algorithm="nelder-mead")


# ------------------------------------------------------------------------------------------------------------
# End to end: same budget, same reward, projected candidates, outputs

def test_every_searcher_spends_the_same_images_on_projected_candidates(tmp_path):
    cfg = tiny_cfg()        # 4 iterations x 3 candidates x 8 samples, reference 24, eval 8, init uniform
    expect = 2 * 8 + 24 + 4 * 3 * 8 + 8   # baselines last + uniform (= init), reference set, search, merged model
    counts, merged = {}, {}
    for name in SEARCHERS:
        kw = parts(tmp_path / name)
        seen = recording(kw["ckpts"])
        res = run_merge(tiny_cfg(algorithm=name), tmp_path / name / "run", **kw)
        counts[name] = kw["sample_fn"].n
        merged[name] = res["merged"]["w"]
        assert res["searcher"] == name
        coef = json.loads((tmp_path / name / "run" / "coefficients.json").read_text())
        assert coef["searcher"] == name and coef["weights"] == res["merged"]["w"] and len(coef["std"]) == 3
        # every merged vector (baselines, reference, all candidates, the result) is on sum(w) = 1
        assert len(seen) >= 4 * 3 and all(abs(w.sum() - 1.0) < 1e-12 for w in seen)
        log = [json.loads(x) for x in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [x["iteration"] for x in log] == [1, 2, 3, 4]
        for rec in log:
            assert rec["r_max"] >= rec["r_mean"] and len(rec["w"]) == 3 and rec["std_mean"] > 0
        assert log[-1]["w"] == res["merged"]["w"]
    assert counts == {name: expect for name in SEARCHERS}
    assert len({tuple(w) for w in merged.values()}) == len(SEARCHERS)      # four different answers
    assert cfg.rl.candidates == 3


@pytest.mark.parametrize("name", SEARCHERS)
def test_candidates_are_projected_before_merging_and_scored_alike(tmp_path, name):
    """One step: the searcher's raw candidates (off the plane) are merged as project_sum_one(raw); identical
    projected candidates get identical rewards whatever the searcher (one scoring path)."""
    cs = CheckpointSet.open(tiny_checkpoints(tmp_path))
    mu, sigma = real_stats()
    rl = MergeRL(tiny_cfg(algorithm=name), cs, [0.5, 0.3, 0.2], sample_fn=make_ode_sampler("unet", 2, "euler", 1.0, 64),
                 feature_fn=feature_fn, real_mu=mu, real_sigma=sigma)
    rl.init_reference()
    asked, told, inner_ask, inner_tell = [], [], rl.searcher.ask, rl.searcher.tell
    rl.searcher.ask = lambda: asked.append(inner_ask()) or asked[-1]
    rl.searcher.tell = lambda w, r: told.append(r) or inner_tell(w, r)
    seen = recording(cs)
    rl.step()
    raw = asked[0].numpy()
    assert raw.shape == (3, 3) and not np.allclose(raw.sum(1), 1.0)
    np.testing.assert_array_equal(np.stack(seen), project_sum_one(asked[0]).numpy())
    # the same rewards from the trainer's scoring path for the same projected weights
    noise, labels = rl.sampler.noise(8, 0)
    feats = [feature_fn(rl.sampler.images(w, noise, labels)) for w in list(seen)]
    rl2 = MergeRL(tiny_cfg(), cs, [0.5, 0.3, 0.2], sample_fn=rl.sampler.sample_fn, feature_fn=feature_fn, real_mu=mu,
                  real_sigma=sigma)
    rl2.init_reference()
    np.testing.assert_array_equal(rl2.scorer(feats), told[0])


# ------------------------------------------------------------------------------------------------------------
# The searcher objects on a synthetic reward (no networks)

TARGET = torch.tensor([0.5, -0.2, 0.3, 0.25, 0.15], dtype=torch.float64)     # on sum(w) = 1


def quadratic_reward(w: torch.Tensor) -> np.ndarray:
    return (-((project_sum_one(w) - TARGET) ** 2).sum(-1)).numpy()


def run_searcher(searcher, iterations=30):
    for _ in range(iterations):
        w = searcher.ask()
        searcher.tell(w, quadratic_reward(w))
    return float((project_sum_one(searcher.result()) - TARGET).norm())


def test_cma_finds_the_optimum_better_than_random_search_at_equal_budget():
    start = float((project_sum_one(torch.full((5,), 0.2, dtype=torch.float64)) - TARGET).norm())
    for seed in range(3):
        cma_err = run_searcher(CmaSearch([0.2] * 5, candidates=8, init_std=0.05, seed=seed))
        rnd_err = run_searcher(RandomSearch([0.2] * 5, candidates=8, init_std=0.05, seed=seed))
        assert cma_err < 0.05 * start and cma_err < 0.25 * rnd_err, (seed, cma_err, rnd_err)


def test_random_search_returns_its_best_candidate():
    s = RandomSearch([0.2] * 5, candidates=4, init_std=0.1, seed=3)
    p = PolicySearch([0.2] * 5, candidates=4, init_std=0.1, seed=3)
    assert torch.equal(s.result(), torch.full((5,), 0.2, dtype=torch.float64))     # before any candidate
    std0 = s.std().clone()
    torch.testing.assert_close(std0, torch.full((5,), 0.1, dtype=torch.float64), rtol=1e-12, atol=0)
    draws, rewards = [], []
    for it in range(5):
        w = s.ask()
        if it == 0:         # the initial policy's draws, the same numbers as the RL searcher's first iteration
            assert torch.equal(w, p.ask())
        r = quadratic_reward(w)
        s.tell(w, r)
        draws.append(w)
        rewards.append(r)
    draws, rewards = torch.cat(draws), np.concatenate(rewards)
    assert torch.equal(s.result(), draws[int(np.argmax(rewards))]) and s.best_r == rewards.max()
    assert torch.equal(s.std(), std0)       # the sampling distribution is never updated


def test_cma_state_replays_bit_for_bit():
    a = CmaSearch([0.2] * 5, candidates=6, init_std=0.05, seed=1)
    run_searcher(a, iterations=7)
    st = a.state_dict()
    assert st["asked"].shape == (7, 6, 5) and st["fitness"].shape == (7, 6)
    b = CmaSearch([0.2] * 5, candidates=6, init_std=0.05, seed=1)
    b.load_state_dict(st)
    assert np.array_equal(a.es.mean, b.es.mean) and np.array_equal(a.es.C, b.es.C) and a.es.sigma == b.es.sigma
    for _ in range(3):      # and they continue alike
        wa, wb = a.ask(), b.ask()
        assert torch.equal(wa, wb)
        a.tell(wa, quadratic_reward(wa))
        b.tell(wb, quadratic_reward(wb))
    assert torch.equal(a.result(), b.result())


# ------------------------------------------------------------------------------------------------------------
# Resume and checkpoints

def plain_values(obj, where="checkpoint"):
    """Every leaf a number, string, bool, None, tensor or numpy array (no other library's objects)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            plain_values(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            plain_values(v, f"{where}[{i}]")
    else:
        assert obj is None or type(obj) in (int, float, str, bool, np.ndarray, torch.Tensor), f"{where}: {type(obj)}"


@pytest.mark.parametrize("name", ["cma", "random"])
def test_resume_is_bit_identical_and_checkpoints_are_plain(tmp_path, name):
    kw = parts(tmp_path)
    full = run_merge(tiny_cfg(algorithm=name), tmp_path / "full", **kw)
    run_merge(tiny_cfg(algorithm=name, iterations=2), tmp_path / "split", **kw)
    ck = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")      # the restricted (weights-only) loader
    plain_values(ck)
    assert ck["searcher"] == name and ck["iteration"] == 2
    if name == "cma":
        assert ck["asked"].shape == (2, 3, 3) and ck["fitness"].shape == (2, 3)
    resumed = run_merge(tiny_cfg(algorithm=name), tmp_path / "split", resume=True, allow_changes=["rl.iterations"], **kw)
    assert resumed["merged"] == full["merged"]
    assert without_times(resumed["history"]) == without_times(full["history"])
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("full", "split"))
    assert np.array_equal(a["reward"]["rows"], b["reward"]["rows"])
    if name == "cma":
        assert np.array_equal(a["asked"], b["asked"]) and np.array_equal(a["fitness"], b["fitness"])
    else:
        assert torch.equal(a["best_w"], b["best_w"]) and a["best_r"] == b["best_r"]
    for d in ("full", "split"):
        coef = json.loads((tmp_path / d / "coefficients.json").read_text())
        assert coef["weights"] == full["merged"]["w"]


def cma_run(run_dir, length: int, slow: float = 0.0, **kw):
    """A CMA-ES run of `length` iterations, checkpointed every iteration, on inputs beside run_dir; `slow`: seconds
    of sleep per sampler call (the child that is killed)."""
    folder = Path(run_dir).parent / "inputs"
    paths = sorted(folder.glob("ckpt*.safetensors")) or tiny_checkpoints(folder)
    cfg = tiny_cfg(algorithm="cma", iterations=length)
    cfg.checkpoint.every = 1
    sampler = make_ode_sampler("unet", 2, "euler", 1.0, 64)

    def sample_fn(net, noise, labels):
        time.sleep(slow)
        return sampler(net, noise, labels)

    return run_merge(cfg, run_dir, ckpts=CheckpointSet.open(paths), sample_fn=sample_fn, feature_fn=feature_fn,
                     evaluator=StubEvaluator(), real_stats=real_stats(), progress=False, **kw)


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import test_merge_search as S
    S.cma_run(sys.argv[2], int(sys.argv[3]), slow=float(sys.argv[4]))
""")


@pytest.mark.slow
def test_cma_killed_mid_run_then_resumed_is_bit_identical(tmp_path):
    length = 6
    straight = cma_run(tmp_path / "straight", length)
    run, ckpt = tmp_path / "killed", tmp_path / "killed" / "checkpoints" / "last.pt"
    env = {**os.environ, "DISTREWARD_THREADS": str(torch.get_num_threads())}      # the same sums as this process
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(Path(__file__).parent), str(run), str(length), "0.05"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when(child, ckpt, "iteration", 2, 120)
    assert 2 <= load_checkpoint(ckpt)["iteration"] < length
    resumed = cma_run(run, length, resume=True)
    assert resumed["merged"] == straight["merged"]
    assert without_times(resumed["history"]) == without_times(straight["history"])
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (tmp_path / "straight", run))
    assert np.array_equal(a["asked"], b["asked"]) and np.array_equal(a["fitness"], b["fitness"])
    assert np.array_equal(a["reward"]["rows"], b["reward"]["rows"])
    logged = [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, length + 1))


def test_a_checkpoint_of_another_searcher_is_refused(tmp_path):
    cs = CheckpointSet.open(tiny_checkpoints(tmp_path))
    mu, sigma = real_stats()
    make = lambda name: MergeRL(tiny_cfg(algorithm=name), cs, [1 / 3] * 3, sample_fn=None, feature_fn=feature_fn,  # noqa: E731
                                real_mu=mu, real_sigma=sigma)
    st = search_state(make("cma"))
    plain_values(st)
    with pytest.raises(ValueError, match="'cma' searcher"):
        load_search_state(make("ppo"), st)


# ------------------------------------------------------------------------------------------------------------
# Greedy soup

def test_greedy_soup_adds_an_input_only_when_it_lowers_the_score():
    """Inputs are scalars x_i, a soup is their mean, its score |mean - 1|: by hand, the order by own score is
    4 (0.05), 3 (0.10), 1 (0.12), 0 (0.40), 2 (1.60); adding 3 gives 0.025 (kept), 1 gives 0.0233 (kept), 0 gives
    0.0825 (dropped), 2 gives 0.408 (dropped)."""
    x = np.array([1.4, 0.88, 2.6, 1.1, 0.95])
    calls = []

    def score(inputs):
        calls.append(list(inputs))
        return abs(x[inputs].mean() - 1.0)

    soup = greedy_soup(np.abs(x - 1.0), score)
    assert soup["order"] == [4, 3, 1, 0, 2]
    assert soup["inputs"] == [4, 3, 1]
    assert soup["score"] == pytest.approx(abs((0.95 + 1.1 + 0.88) / 3 - 1.0))
    assert calls == [[4, 3], [4, 3, 1], [4, 3, 1, 0], [4, 3, 1, 2]]
    assert [t["added"] for t in soup["trials"]] == [True, True, False, False]
    np.testing.assert_allclose(soup_weights(soup["inputs"], 5), [0, 1 / 3, 0, 1 / 3, 1 / 3])
    # an input that does not lower the score is never added, even when it ties
    tie = greedy_soup([1.0, 1.0], lambda inputs: 1.0)
    assert tie["inputs"] == [0] and tie["trials"] == [{"input": 1, "score": 1.0, "added": False}]


def test_greedy_soup_baseline_in_a_run(tmp_path):
    kw = parts(tmp_path)
    cfg = tiny_cfg(iterations=1)
    cfg.baselines.greedy_soup = True
    res = run_merge(cfg, tmp_path / "run", **kw)
    base = res["baselines"]
    assert {"one@0", "one@1", "one@2", "greedy_soup"} <= set(base)
    assert base["one@2"]["fd_reward"] == base["last"]["fd_reward"]      # the last input: evaluated once
    soup = base["greedy_soup"]
    singles = [base[f"one@{i}"]["fd_reward"] for i in range(3)]
    assert soup["soup"][0] == int(np.argmin(singles))
    assert soup["fd_reward"] <= min(singles)
    np.testing.assert_allclose(soup["w"], soup_weights(soup["soup"], 3))
    running = min(singles)
    for t in soup["trials"]:            # added exactly when the soup's fd_reward went down
        assert t["added"] == (t["score"] < running)
        running = min(running, t["score"]) if t["added"] else running
    assert soup["fd_reward"] == running
    stored = json.loads((tmp_path / "run" / "baselines.json").read_text())
    assert stored["greedy_soup"]["soup"] == soup["soup"]
