"""RL over merging coefficients: streaming merge, policy, the set-replace reward (ReferenceSet), the loop and its
resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import distreward.merge.trainer as T
from distreward.merge import (CheckpointSet, GaussianPolicy, MergeRL, normalise_rewards, policy_update, ppo_clip_loss,
                              project_sum_one, reinforce_loss, resolve, run_merge, shared_noise)
from distreward.merge.inputs import make_ode_sampler, open_checkpoints
from distreward.merge.baselines import baseline_weights, best_baseline, initial_mean
from distreward.merge.state import load_search_state, search_state
from distreward.metrics import GaussianStats, frechet_distance
from distreward.models import build_network, load_generator, save_generator
from distreward.reward import ReferenceSet
from distreward.train.phema import list_snapshots as list_phema, phema_coefficients, snapshot_extra, snapshot_filename

TINY = {"img_resolution": 8, "img_channels": 1, "num_classes": 2, "model_channels": 4, "channel_mult": [1, 2],
        "num_blocks": 1, "attn_resolutions": [], "num_heads": 1}


def tiny_checkpoints(tmp_path, k=3, seed=0, const=None, kwargs=TINY):
    paths = []
    for i in range(k):
        torch.manual_seed(seed + i)
        net = build_network("unet", kwargs)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.1)
            if const is not None:
                net.conv_in.bias.fill_(const)
        paths.append(save_generator(tmp_path / f"ckpt{i}.safetensors", net, "unet", kwargs, extra={"step": i}))
    return paths


def state(path):
    return load_file(str(path))


# ------------------------------------------------------------------------------------------------------------
# Streaming merge

def test_one_hot_reproduces_checkpoint_exactly(tmp_path):
    paths = tiny_checkpoints(tmp_path)
    cs = CheckpointSet.open(paths)
    for k in range(3):
        merged = cs.merge(np.eye(3)[k])
        ref = state(paths[k])
        assert set(merged) == set(ref)
        for name in ref:
            assert torch.equal(merged[name], ref[name]), name


def test_sum_one_keeps_constant_parameter(tmp_path):
    cs = CheckpointSet.open(tiny_checkpoints(tmp_path, const=0.37))
    w = project_sum_one(torch.tensor([[0.9, -0.6, 0.4]], dtype=torch.float64))[0]
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    merged = cs.merge(w)
    assert torch.allclose(merged["conv_in.bias"], torch.full_like(merged["conv_in.bias"], 0.37), rtol=0, atol=1e-7)
    # and a coefficient vector that does not sum to one scales it
    assert torch.allclose(cs.merge([0.5, 0.5, 0.5])["conv_in.bias"], torch.full((4,), 0.555), atol=1e-6)


def test_streaming_equals_in_memory_weighted_sum(tmp_path):
    paths = tiny_checkpoints(tmp_path, k=4)
    w = np.array([0.3, -0.2, 0.6, 0.3])
    sds = [state(p) for p in paths]
    merged = CheckpointSet.open(paths).merge(w)
    for name in sds[0]:
        expect = sum(wk * sd[name].double() for wk, sd in zip(w, sds)).float()
        torch.testing.assert_close(merged[name], expect, rtol=0, atol=1e-7)


def test_merge_into_network_and_save_load_roundtrip(tmp_path):
    paths = tiny_checkpoints(tmp_path)
    cs = CheckpointSet.open(paths)
    w = [0.2, 0.5, 0.3]
    net = cs.merge_into(cs.build_network(), w)
    out = cs.save(tmp_path / "merged.safetensors", w)
    loaded = load_generator(out)
    for name, t in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t)
    assert loaded.generator_meta["extra"]["merge_weights"] == w


def test_non_float_buffers_must_agree(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(3), "count": torch.tensor([5])}, str(a))
    save_file({"w": torch.zeros(3), "count": torch.tensor([5])}, str(b))
    merged = CheckpointSet.open([a, b]).merge([0.25, 0.75])
    assert torch.equal(merged["count"], torch.tensor([5]))
    assert torch.allclose(merged["w"], torch.full((3,), 0.25))
    save_file({"w": torch.zeros(3), "count": torch.tensor([6])}, str(b))
    with pytest.raises(ValueError, match="non-float tensor 'count'"):
        CheckpointSet.open([a, b])


def test_mismatched_checkpoints_and_bad_weights_are_rejected(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(3)}, str(a))
    save_file({"w": torch.ones(4)}, str(b))
    with pytest.raises(ValueError, match="same network"):
        CheckpointSet.open([a, b])
    cs = CheckpointSet.open([a, a])
    with pytest.raises(ValueError, match="one coefficient per checkpoint"):
        cs.merge([1.0])
    with pytest.raises(FileNotFoundError):
        CheckpointSet.open([tmp_path / "missing.safetensors"])


# ------------------------------------------------------------------------------------------------------------
# Reward

def old_set_replace_rewards(G, ptr, cands, mu_r, sigma_r):
    """The former merge/reward.py SetReplaceReward written out: r_c = FD(G) - FD(G - S + X_c), S the n oldest rows
    (ring buffer from ptr), every candidate replacing the same rows; no reference set: r_c = -FD(X_c)."""
    def fd(x):
        return frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu_r, sigma_r)

    if G is None:
        return np.array([-fd(c) for c in cands])
    idx = (ptr + np.arange(cands[0].shape[0])) % G.shape[0]
    out = []
    for c in cands:
        G2 = G.copy()
        G2[idx] = c
        out.append(fd(G) - fd(G2))
    return np.array(out)


def test_merge_rewards_equal_the_set_replace_formula(tmp_path):
    """MergeRL scores with ReferenceSet.set_rewards (group credit); the numbers are the former SetReplaceReward's,
    also after a push that wraps the ring buffer, after a checkpoint round trip, and from an old {rows, ptr}
    checkpoint; reference_size 0 gives -FD(X_c)."""
    rng = np.random.default_rng(0)
    d, N, n = 6, 60, 6
    st = GaussianStats.from_features(rng.normal(size=(500, d)))
    G = rng.normal(0.3, 1.2, size=(N, d))
    cands = [rng.normal(size=(n, d)) * s for s in (0.5, 1.0, 1.5)]
    cs = CheckpointSet.open(tiny_checkpoints(tmp_path))
    rl = MergeRL(tiny_cfg(), cs, [1 / 3] * 3, sample_fn=euler_sampler(), feature_fn=feature_fn,
                 real_mu=st.mu, real_sigma=st.sigma)
    rl.scorer.load_state_dict({"rows": G.copy(), "ptr": N - 2})      # an old checkpoint; the replaced rows wrap around
    assert isinstance(rl.reward, ReferenceSet) and rl.reward.ptr == N - 2
    np.testing.assert_allclose(rl.scorer(cands), old_set_replace_rewards(G, N - 2, cands, st.mu, st.sigma),
                               rtol=1e-9, atol=1e-9)
    rl.reward.push(np.concatenate(cands))
    idx = (N - 2 + np.arange(3 * n)) % N
    G[idx] = np.concatenate(cands)
    assert rl.reward.ptr == (N - 2 + 3 * n) % N and np.array_equal(rl.reward.rows, G)
    new = [rng.normal(size=(n, d)) for _ in range(4)]
    expect = old_set_replace_rewards(G, rl.reward.ptr, new, st.mu, st.sigma)
    np.testing.assert_allclose(rl.scorer(new), expect, rtol=1e-9, atol=1e-9)
    back = MergeRL(tiny_cfg(), cs, [1 / 3] * 3, sample_fn=euler_sampler(), feature_fn=feature_fn,
                   real_mu=st.mu, real_sigma=st.sigma)
    load_search_state(back, search_state(rl))
    np.testing.assert_array_equal(back.scorer(new), rl.scorer(new))
    plain = MergeRL(tiny_cfg(reference_size=0), cs, [1 / 3] * 3, sample_fn=euler_sampler(), feature_fn=feature_fn,
                    real_mu=st.mu, real_sigma=st.sigma)
    plain.init_reference()
    assert plain.reward is None
    sets = [rng.normal(size=(40, d)) * s for s in (0.8, 1.0, 1.2)]    # n > d: a well-conditioned covariance
    np.testing.assert_allclose(plain.scorer(sets), old_set_replace_rewards(None, 0, sets, st.mu, st.sigma),
                               rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="whole reference set"):
        rl.scorer([rng.normal(size=(N, d))] * 2)


# ------------------------------------------------------------------------------------------------------------
# Policy

def test_policy_gradient_moves_mean_toward_better_candidates():
    target = torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64)
    for algorithm in ("reinforce", "ppo"):
        policy = GaussianPolicy([1 / 3] * 3, init_std=0.1)
        opt = torch.optim.Adam(policy.parameters(), lr=0.02)
        gen = torch.Generator().manual_seed(0)
        d0 = float((policy.mean.detach() - target).norm())
        for _ in range(10):
            w = policy.sample(32, gen)
            r = -((w - target) ** 2).sum(1)
            policy_update(policy, opt, w, normalise_rewards(r), algorithm=algorithm, epochs=3)
        assert float((policy.mean.detach() - target).norm()) < 0.5 * d0, algorithm


def test_ppo_equals_reinforce_on_policy():
    policy = GaussianPolicy([0.2, 0.8], init_std=0.3)
    w = policy.sample(16, torch.Generator().manual_seed(1))
    adv = normalise_rewards(torch.randn(16, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    assert float(adv.mean()) == pytest.approx(0, abs=1e-12) and float(adv.std()) == pytest.approx(1, abs=1e-6)
    lp = policy.log_prob(w)
    g_ppo = torch.autograd.grad(ppo_clip_loss(adv, lp, lp.detach(), 0.2)[0].mean(), policy.mean, retain_graph=True)[0]
    g_rf = torch.autograd.grad(reinforce_loss(lp, adv), policy.mean)[0]
    torch.testing.assert_close(g_ppo, g_rf)


# ------------------------------------------------------------------------------------------------------------
# The loop (a stand-in deterministic sampler and feature map keep it tiny)

def euler_sampler(steps=2):
    return make_ode_sampler("unet", steps, "euler", 1.0, 64)


_PROJ = torch.randn(64, 6, generator=torch.Generator().manual_seed(3))


def feature_fn(images):
    return (images.reshape(images.shape[0], -1) @ _PROJ).double().numpy()


class StubEvaluator:
    def evaluate(self, images):
        f = feature_fn(images)
        return {"fd_eval": float(np.abs(f.mean(0)).sum()), "fd_reward": float(f.std()), "n": len(images)}


def tiny_cfg(reference_size=24, **rl):
    return resolve({
        "merge": {"init": "uniform"}, "policy": {"init_std": 0.2},
        "rl": {"iterations": 4, "candidates": 3, "samples": 8, "epochs": 2, "lr": 0.05, **rl},
        "reward": {"reference_size": reference_size}, "model": {"num_classes": 2, "image_shape": [1, 8, 8]},
        "eval": {"n": 8, "seed": 5}, "checkpoint": {"every": 2}})


def real_stats():
    f = np.random.default_rng(0).normal(size=(200, 6))
    return f.mean(0), np.cov(f, rowvar=False)


def test_identical_candidates_get_identical_rewards(tmp_path):
    cs = CheckpointSet.open(tiny_checkpoints(tmp_path))
    mu, sigma = real_stats()
    rl = MergeRL(tiny_cfg(), cs, [1 / 3] * 3, sample_fn=euler_sampler(), feature_fn=feature_fn,
                 real_mu=mu, real_sigma=sigma)
    rl.init_reference()
    noise, labels = shared_noise(8, (1, 8, 8), 2, seed=11)
    w_same, w_other = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.1, 0.8])
    feats = [feature_fn(rl.sampler.images(w, noise, labels)) for w in (w_same, w_other, w_same)]
    r = rl.scorer(feats)
    assert r[0] == r[2]
    assert r[0] != r[1]


def test_run_merge_outputs_and_resume(tmp_path):
    paths = tiny_checkpoints(tmp_path)
    kw = dict(ckpts=CheckpointSet.open(paths), sample_fn=euler_sampler(), feature_fn=feature_fn,
              evaluator=StubEvaluator(), real_stats=real_stats(), progress=False)
    full = run_merge(tiny_cfg(), tmp_path / "full", **kw)
    run_merge(tiny_cfg(iterations=2), tmp_path / "split", **kw)
    resumed = run_merge(tiny_cfg(), tmp_path / "split", resume=True, allow_changes=["rl.iterations"], **kw)
    assert resumed["merged"]["w"] == full["merged"]["w"]
    assert full["merged"]["w"] != full["init"]["w"]  # the policy moved
    assert sum(full["merged"]["w"]) == pytest.approx(1.0)
    assert set(full["baselines"]) == {"last", "uniform"}
    assert full["baselines"]["last"]["w"] == [0.0, 0.0, 1.0]
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3, 4]
    coef = json.loads((tmp_path / "full" / "coefficients.json").read_text())
    net = load_generator(tmp_path / "full" / "merged.safetensors")
    ref = CheckpointSet.open(paths).merge(coef["weights"])
    for name, t in net.state_dict().items():
        assert torch.equal(t, ref[name])


def test_baselines_with_the_same_weights_are_evaluated_once(tmp_path, monkeypatch):
    class Counting(StubEvaluator):
        calls = 0

        def evaluate(self, images):
            Counting.calls += 1
            return super().evaluate(images)

    real = T.baseline_weights

    def with_twin(ckpts, cfg):      # phema at the snapshots' own length: the last snapshot up to rounding
        out = real(ckpts, cfg)
        out["phema@0.1"] = out["last"] + np.array([1e-9, -1e-9, 0.0])
        return out

    monkeypatch.setattr(T, "baseline_weights", with_twin)
    res = run_merge(tiny_cfg(iterations=1), tmp_path / "run", ckpts=CheckpointSet.open(tiny_checkpoints(tmp_path)),
                    sample_fn=euler_sampler(), feature_fn=feature_fn, evaluator=Counting(), real_stats=real_stats(),
                    progress=False)
    assert Counting.calls == 3      # last, uniform (also the initial mean), merged
    twin, last = res["baselines"]["phema@0.1"], res["baselines"]["last"]
    assert {k: v for k, v in twin.items() if k != "w"} == {k: v for k, v in last.items() if k != "w"}
    assert twin["w"] != last["w"]


def test_phema_baselines_use_the_train_solve(tmp_path):
    folder = tmp_path / "snaps"
    for step in (10, 20, 30):
        for std in (0.05, 0.10):
            torch.manual_seed(step + int(std * 100))
            net = build_network("unet", TINY)
            save_generator(folder / snapshot_filename(std, step), net, "unet", TINY, extra=snapshot_extra(std, step, 4))
    cs = open_checkpoints({"snapshots": str(folder), "checkpoints": []})
    assert cs.k == 6 and [p.name for p in cs.paths] == [s.path.name for s in list_phema(folder)]
    cfg = tiny_cfg()
    cfg.baselines.ema_grid = [0.07, 0.12]
    base = baseline_weights(cs, cfg)
    assert set(base) == {"last", "uniform", "phema@0.07", "phema@0.12"}
    used, x = phema_coefficients(list_phema(folder), 0.07)
    coef = dict(zip([u.path.name for u in used], x))
    np.testing.assert_allclose(base["phema@0.07"], [coef[p.name] for p in cs.paths])
    # the best EMA length is chosen on the reward's features, never on the held-out network
    results = {"phema@0.07": {"fd_reward": 1.0, "fd_eval": 2.0}, "phema@0.12": {"fd_reward": 3.0, "fd_eval": 1.0}}
    np.testing.assert_array_equal(initial_mean("phema", cs, base, results), base["phema@0.07"])
    assert best_baseline(results, "phema@") == "phema@0.07"
    assert best_baseline({"last": {"fd_reward": 0.0}}, "phema@") is None
    # merge.init best: the baseline with the lowest fd_reward (a held-out winner is not chosen)
    results = {k: {"fd_reward": r, "fd_eval": e, "w": base[k].tolist()}
               for k, r, e in (("last", 2.0, 0.5), ("uniform", 1.5, 3.0), ("phema@0.07", 1.0, 2.0))}
    np.testing.assert_array_equal(initial_mean("best", cs, base, results), base["phema@0.07"])
    with pytest.raises(ValueError, match="merge.init"):
        initial_mean("median", cs, base, results)

