"""The evaluation cache (distreward.evaluation.cache): a hit returns the very numbers (and grid) of the evaluation
it stored, without sampling; any changed input is a miss (one table of single-input changes, extend it with a
row); damaged or foreign entries are misses; under torchrun every rank gets rank 0's verdict; the merge trainer's
baselines and the demo reuse evaluations across runs without changing a number."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from _spawn import run_ranks
from _tiny import TinyClassifier, TinyFeatures, save_tiny_unet
from distreward.evaluation import (EvalCache, EvalPlan, Evaluator, ImageFigures, converged_steps, evaluate_generator,
                                   evaluate_solvers)
from distreward.evaluation.cache import decode, encode, shown
from distreward.sampling.generate import SamplerSpec
from distreward.utils import dist as D

SHAPE = (1, 8, 8)


class TinyVelocity(nn.Module):
    """A generator with weights (the cache key hashes them) that counts its forward calls (a hit samples nothing)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.calls = 0

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        lab = 0.0 if labels is None else 0.05 * labels.float().view(-1, 1, 1, 1)
        return self.conv(x) + 0.3 * sigma.view(-1, 1, 1, 1) * x + lab


def tiny_evaluator(ref_seed: int = 11, net_seeds=(0, 1), **kw) -> Evaluator:
    g = torch.Generator().manual_seed(ref_seed)
    ref = (0.2 + 0.4 * torch.randn((300, *SHAPE), generator=g)).clamp(-1, 1)
    return Evaluator(ref, feature_nets=[TinyClassifier(net_seeds[0]), TinyFeatures(net_seeds[1], dim=5)],
                     labels=["fmnist-reward", "fmnist-eval"], cache_dir=None, max_real=200, kid_subsets=5,
                     kid_subset_size=40, ref_labels=torch.arange(300) % 3, **kw)


def tiny_plan(**kw) -> EvalPlan:
    return EvalPlan(**{"n": 60, "seed": 3, "batch_size": 20, "grid": 8, "num_classes": 3, "image_shape": SHAPE,
                       "sampler": SamplerSpec(steps=3, method="euler"), **kw})


@pytest.fixture(scope="module")
def evaluator():
    return tiny_evaluator()


def evaluate(net, ev, plan, cache, **kw):
    before = net.calls
    m, grid = evaluate_generator(net, ev, plan, cache=cache, **kw)
    return m, grid, net.calls > before      # sampled?


# ------------------------------------------------------------------------------------------------------------
# A hit returns identical numbers

def test_a_hit_returns_the_stored_numbers_and_grid_without_sampling(tmp_path, evaluator):
    plan = tiny_plan(uncertainty=10, fd_infinity=True, per_class=True)    # nested, int-keyed values too
    net, cache = TinyVelocity(), EvalCache(tmp_path)
    plain, plain_grid = evaluate_generator(net, evaluator, plan)          # no cache
    miss, miss_grid, sampled = evaluate(net, evaluator, plan, cache)
    assert sampled and cache.misses == 1 and len(list(tmp_path.glob("*.json"))) == 1
    hit, hit_grid, sampled = evaluate(net, evaluator, plan, cache)
    assert not sampled and cache.hits == 1
    assert hit == miss == plain                                           # the same numbers, types and structure
    assert set(hit["fd_class"]["fmnist-eval"]["fd"]) == {0, 1, 2}          # int class keys survive the JSON
    assert hit_grid.shape == (8, *SHAPE) and torch.equal(hit_grid, miss_grid)
    assert torch.equal(hit_grid, shown(plain_grid))                       # what a PNG of the grid shows
    entry = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert entry["key"]["sampling"]["n"] == 60 and entry["grid"] == 8 and entry["seconds"] >= 0


def test_figures_of_all_images_are_cached_with_the_metrics(tmp_path, evaluator):
    seen = []

    def logp(images):
        seen.append(images.shape[0])
        return {"mean_pixel": float(images.double().mean())}

    net, cache = TinyVelocity(), EvalCache(tmp_path)
    figures = ImageFigures({"mean_pixel": 1}, logp)
    first, grid, _ = evaluate(net, evaluator, tiny_plan(), cache, figures=figures)
    again, _, sampled = evaluate(net, evaluator, tiny_plan(), cache, figures=figures)
    assert seen == [60] and not sampled and again == first and grid.shape[0] == 8   # all n images, computed once
    other = ImageFigures({"mean_pixel": 2}, logp)                        # another figure's key: a miss
    assert evaluate(net, evaluator, tiny_plan(), cache, figures=other)[2]


def test_grid_is_not_in_the_key_but_a_larger_grid_recomputes(tmp_path, evaluator):
    net, cache = TinyVelocity(), EvalCache(tmp_path)
    _, g8, _ = evaluate(net, evaluator, tiny_plan(grid=8), cache)
    _, g4, sampled = evaluate(net, evaluator, tiny_plan(grid=4), cache)
    assert not sampled and torch.equal(g4, g8[:4])
    _, g16, sampled = evaluate(net, evaluator, tiny_plan(grid=16), cache)
    assert sampled and torch.equal(g16[:8], g8)


# ------------------------------------------------------------------------------------------------------------
# Any changed input misses: one row per input (name, change). A change returns (net, evaluator, plan, kwargs).

def perturbed(net):
    with torch.no_grad():
        net.conv.weight[0, 0, 0, 0] += 1e-3
    return net


CHANGES = [
    ("weights", lambda net, ev, plan: (perturbed(net), ev, plan, {})),
    ("steps", lambda net, ev, plan: (net, ev, replace(plan, sampler=replace(plan.sampler, steps=4)), {})),
    ("method", lambda net, ev, plan: (net, ev, replace(plan, sampler=replace(plan.sampler, method="heun")), {})),
    ("shift", lambda net, ev, plan: (net, ev, replace(plan, sampler=replace(plan.sampler, shift=2.0)), {})),
    ("cfg scale", lambda net, ev, plan: (net, ev, replace(plan, sampler=replace(plan.sampler, cfg_scale=1.5,
                                                                                null_label=3)), {})),
    ("seed", lambda net, ev, plan: (net, ev, replace(plan, seed=4), {})),
    ("n", lambda net, ev, plan: (net, ev, replace(plan, n=40), {})),
    ("batch_size", lambda net, ev, plan: (net, ev, replace(plan, batch_size=30), {})),
    ("noise scheme", lambda net, ev, plan: (net, ev, replace(plan, noise="seed"), {})),
    ("feature network weights", lambda net, ev, plan: (net, tiny_evaluator(net_seeds=(0, 2)), plan, {})),
    ("real statistics", lambda net, ev, plan: (net, tiny_evaluator(ref_seed=12), plan, {})),
    ("evaluator settings (k)", lambda net, ev, plan: (net, tiny_evaluator(k=4), plan, {})),
    ("uncertainty", lambda net, ev, plan: (net, ev, replace(plan, uncertainty=10), {})),
    ("fd_infinity", lambda net, ev, plan: (net, ev, replace(plan, fd_infinity=True), {})),
    ("per_class", lambda net, ev, plan: (net, ev, replace(plan, per_class=True), {})),
    ("decoder", lambda net, ev, plan: (net, ev, plan, {"decode": lambda x: x.clamp(-0.9, 0.9), "decode_key": "d1"})),
    ("architecture", lambda net, ev, plan: (net, ev, plan, {"arch": "sit"})),
]


@pytest.mark.parametrize("name, change", CHANGES, ids=[c[0] for c in CHANGES])
def test_any_changed_input_is_a_miss(tmp_path, evaluator, name, change):
    cache = EvalCache(tmp_path)
    net, plan = TinyVelocity(), tiny_plan()
    base, _, _ = evaluate(net, evaluator, plan, cache)
    net2, ev2, plan2, kw = change(net, evaluator, plan)
    changed, _, sampled = evaluate(net2, ev2, plan2, cache, **kw)
    assert sampled, f"changing {name} must recompute"
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert not evaluate(net2, ev2, plan2, cache, **kw)[2]                 # and the changed one is then a hit
    if name not in ("fd_infinity", "uncertainty", "per_class", "evaluator settings (k)"):
        assert changed["fd_eval"] != base["fd_eval"]                     # the input mattered


def test_key_fields_name_every_input(tmp_path, evaluator):
    from distreward.evaluation import generator_key

    key = generator_key(TinyVelocity(), evaluator, tiny_plan(), arch="unet", decode=None, decode_key=None,
                        device="cpu")
    assert {"version", "code", "torch", "numpy", "device", "weights", "arch", "decode", "sampling", "evaluator",
            "extra"} <= set(key)
    assert {"n", "seed", "batch_size", "noise", "sampler", "uncertainty", "fd_infinity", "per_class",
            "num_classes", "image_shape"} <= set(key["sampling"]) and "grid" not in key["sampling"]
    assert {"steps", "method", "shift", "cfg_scale", "kind"} <= set(key["sampling"]["sampler"])


# ------------------------------------------------------------------------------------------------------------
# Damaged entries, what is never cached, refused combinations

def test_damaged_or_foreign_entries_are_recomputed_and_overwritten(tmp_path, evaluator):
    net, cache = TinyVelocity(), EvalCache(tmp_path)
    first, _, _ = evaluate(net, evaluator, tiny_plan(), cache)
    entry = next(tmp_path.glob("*.json"))
    entry.write_text(entry.read_text()[:40])                              # truncated
    again, _, sampled = evaluate(net, evaluator, tiny_plan(), cache)
    assert sampled and again == first
    data = json.loads(entry.read_text())
    data["key"]["sampling"]["n"] = 999                                    # another key under this name
    entry.write_text(json.dumps(data))
    assert evaluate(net, evaluator, tiny_plan(), cache)[2]
    entry.with_suffix(".npz").write_bytes(b"not a zip")                  # a damaged grid
    assert evaluate(net, evaluator, tiny_plan(), cache)[2]
    assert not evaluate(net, evaluator, tiny_plan(), cache)[2]


def test_unknown_state_is_never_cached_and_bad_combinations_are_refused(tmp_path, evaluator):
    from distreward.sampling.analytic import GaussianVelocity

    class StandIn:                                                        # not an Evaluator: unknown state
        def evaluate(self, images):
            return {"fd_reward": float(images.mean()), "fd_eval": 0.0, "n": images.shape[0]}

    cache = EvalCache(tmp_path)
    evaluate_generator(TinyVelocity(), StandIn(), tiny_plan(), cache=cache)
    evaluate_generator(GaussianVelocity(0.2, 0.4), evaluator, tiny_plan(), cache=cache)   # no weights to hash
    assert not list(tmp_path.iterdir()) and cache.hits == cache.misses == 0
    with pytest.raises(ValueError, match="keep_images"):
        evaluate_generator(TinyVelocity(), evaluator, tiny_plan(), cache=cache, keep_images=True)
    with pytest.raises(ValueError, match="decode_key"):
        evaluate_generator(TinyVelocity(), evaluator, tiny_plan(), cache=cache, decode=lambda x: x.clamp(-1, 1))


def test_encode_keeps_int_keys_tuples_and_nan():
    value = {"a": 1.5, "fd_class": {"x": {"fd": {0: 1.0, 2: np.float64(2.5)}}}, "d": (0.1, None), "l": [1, (2, 3)],
             "nan": float("nan")}
    back = decode(json.loads(json.dumps(encode(value))))
    assert back["fd_class"]["x"]["fd"] == {0: 1.0, 2: 2.5} and back["d"] == (0.1, None) and back["l"] == [1, (2, 3)]
    assert np.isnan(back["nan"]) and back["a"] == 1.5


# ------------------------------------------------------------------------------------------------------------
# Several solvers, the convergence search

def test_solvers_and_converged_steps_reuse_their_evaluations(tmp_path, evaluator):
    net, cache = TinyVelocity(), EvalCache(tmp_path)
    solvers = {"euler": SamplerSpec(steps=3), "heun": SamplerSpec(steps=2, method="heun")}
    for reference in (None, "euler"):
        first = evaluate_solvers(net, evaluator, tiny_plan(), solvers, reference=reference, cache=cache)
        calls = net.calls
        again = evaluate_solvers(net, evaluator, tiny_plan(), solvers, reference=reference, cache=cache)
        assert net.calls == calls and again == first
        assert first == evaluate_solvers(net, evaluator, tiny_plan(), solvers, reference=reference)
    assert isinstance(again["heun"]["fd_diff"]["fmnist-eval"], tuple)
    t1, trace1 = converged_steps(net, evaluator, tiny_plan(), start=2, max_steps=8, tol=1e9, cache=cache)
    calls = net.calls
    assert converged_steps(net, evaluator, tiny_plan(), start=2, max_steps=8, tol=1e9, cache=cache) == (t1, trace1)
    assert net.calls == calls


# ------------------------------------------------------------------------------------------------------------
# torchrun: rank 0 reads and writes, every rank gets its verdict

WORLD = 2


def _worker(r: int, port: int, outdir: str) -> None:
    os.environ.update(RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    D.init_distributed("cpu", timeout_s=30)
    # rank 1's cache folder is another, empty one: it never reads or writes it, it follows rank 0
    cache = EvalCache(os.path.join(outdir, "cache" if r == 0 else f"never-{r}"))
    net, ev, plan = TinyVelocity(), tiny_evaluator(), tiny_plan()
    out = {}
    for run in ("miss", "hit"):
        before = net.calls
        m, grid = evaluate_generator(net, ev, plan, cache=cache)
        out[run] = {"metrics": m, "sampled": net.calls > before, "grid": grid.shape[0]}
    D.barrier()
    torch.save(out, os.path.join(outdir, f"rank{r}.pt"))
    D.destroy_distributed()


@pytest.mark.slow
def test_every_rank_follows_rank_0s_verdict(tmp_path):
    res = run_ranks(_worker, tmp_path, WORLD, 90, "cached evaluation")
    for r, o in enumerate(res):
        assert o["miss"]["sampled"] and not o["hit"]["sampled"], r
        assert o["hit"]["metrics"] == res[0]["miss"]["metrics"]
    assert res[0]["hit"]["grid"] == 8 and res[1]["hit"]["grid"] == 0     # the grid is rank 0's
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1 and not (tmp_path / "never-1").exists()
    single = evaluate_generator(TinyVelocity(), tiny_evaluator(), tiny_plan())[0]
    assert res[0]["hit"]["metrics"]["fd_eval"] == pytest.approx(single["fd_eval"], rel=1e-6)


# ------------------------------------------------------------------------------------------------------------
# The merge trainer's evaluations and the demo

@pytest.mark.slow
def test_merge_baselines_are_reused_by_a_second_run(tmp_path):
    from test_merge import feature_fn, real_stats, tiny_checkpoints
    from distreward.merge import CheckpointSet, resolve, run_merge

    paths = tiny_checkpoints(tmp_path)
    ev = tiny_evaluator()

    def cfg(**eval_kw):
        return resolve({"merge": {"init": "uniform"}, "policy": {"init_std": 0.2},
                        "rl": {"iterations": 2, "candidates": 3, "samples": 8, "epochs": 1, "lr": 0.05},
                        "reward": {"reference_size": 24}, "model": {"num_classes": 2, "image_shape": [1, 8, 8]},
                        "sampler": {"steps": 2, "method": "euler", "batch_size": 64},
                        "eval": {"n": 16, "seed": 5, **eval_kw}, "checkpoint": {"every": 2}})

    def run(name, c, cache, **kw):
        return run_merge(c, tmp_path / name, ckpts=CheckpointSet.open(paths), feature_fn=feature_fn, evaluator=ev,
                         real_stats=real_stats(), progress=False, eval_cache=cache, **kw)

    cache = EvalCache(tmp_path / "evals")
    plain = run("plain", cfg(), None)
    first = run("first", cfg(), cache)
    assert cache.misses == 3 and cache.hits == 0                          # last, uniform (= init), merged
    second = run("second", cfg(), cache)
    assert cache.hits == 3 and cache.misses == 3
    for res in (first, second):
        assert res["baselines"] == plain["baselines"] and res["merged"] == plain["merged"]
    run("other_n", cfg(n=12), cache)
    assert cache.misses == 6                                              # another eval.n: every one again
    from test_merge import euler_sampler
    own = EvalCache(tmp_path / "own")
    run("own_sampler", cfg(), own, sample_fn=euler_sampler())             # the caller's sampler: never cached
    assert not (tmp_path / "own").exists()


def test_merge_evaluation_key_names_the_candidate_samplers_code(monkeypatch):
    """The cached merge evaluations depend on merge/candidates.py (shared noise, the merged samples) and on
    merge/inputs.py (the sampler): an edit of either invalidates them."""
    from types import SimpleNamespace
    from omegaconf import OmegaConf
    from distreward.merge import baselines

    monkeypatch.setattr(baselines, "eval_key", lambda *args, **kw: kw["code"])
    sampler = SimpleNamespace(net=nn.Linear(2, 2), ckpts=SimpleNamespace(arch="unet"), device="cpu", sample_key="k")
    cfg = OmegaConf.create({"eval": {"n": 4, "seed": 0}, "model": {"num_classes": 2, "image_shape": [1, 8, 8]}})
    code = baselines.merge_eval_key(sampler, None, cfg)
    assert {"merge/candidates.py", "merge/inputs.py", "sampling", "evaluation"} <= set(code)


@pytest.mark.slow
def test_demo_with_the_cache_writes_the_same_numbers_and_reuses_base_evaluations(tmp_path, monkeypatch):
    from distreward import demo
    from distreward.evaluation import Evaluator as Ev

    monkeypatch.setattr(demo, "BUILTIN_STAGES", [s for s in demo.BUILTIN_STAGES if not s.name.startswith("merge")])
    monkeypatch.setattr(demo.stages, "EXTRA_STAGES", [])
    save_tiny_unet(tmp_path / "base.safetensors", noise=0.05)
    ref = (0.5 * torch.randn((200, 1, 32, 32), generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    ev = Ev(ref, feature_nets=(TinyClassifier(1, num_classes=10), TinyFeatures(2)),
            labels=["fmnist-reward", "fmnist-eval"],
            cache_dir=None, max_real=200, kid_subsets=5, kid_subset_size=20)
    overrides = [f"model.path={tmp_path / 'base.safetensors'}", "rl.iterations=1", "rl.labels_per_iter=2",
                 "rl.group_size=3", "rl.steps=3", "rl.train_steps.window=1", "reward.reference_size=24",
                 "eval.n=20", "eval.steps=3", "eval.every=1", "eval.grid=10", "eval.batch_size=20",
                 "checkpoint.every=1", "demo.crosscheck_steps=2", "evidence.n=30", "evidence.uncertainty=5",
                 "evidence.converged_steps=4", "evidence.curve_n=0"]
    cache = EvalCache(tmp_path / "evals")

    def numbers(run_dir):
        m = json.loads((run_dir / "metrics.json").read_text())
        for v in m.values():
            v.pop("seconds", None)
        return m

    plain = demo.run_demo(tmp_path / "plain", overrides=overrides, progress=False, evaluator=ev, eval_cache=None)
    demo.run_demo(tmp_path / "cached", overrides=overrides, progress=False, evaluator=ev, eval_cache=cache)
    # base; base + distribution at the cross-check steps; in the evidence stage base x 3 solvers and distribution x
    # 2 (served, converged: the training-free solver is the base's control)
    assert cache.misses == 8 and cache.hits == 0
    assert numbers(tmp_path / "cached") == numbers(tmp_path / "plain")
    for png in ("samples_base.png", "samples_distribution.png"):
        assert (tmp_path / "cached" / png).read_bytes() == (tmp_path / "plain" / png).read_bytes(), png
    # a second demo with a changed GRPO setting: the base evaluations are read back, the new model's computed
    changed = overrides + ["rl.lr=0.003"]
    demo.run_demo(tmp_path / "changed", overrides=changed, progress=False, evaluator=ev, eval_cache=cache)
    assert cache.hits == 5 and cache.misses == 11         # every base evaluation read back
    ref = demo.run_demo(tmp_path / "changed_plain", overrides=changed, progress=False, evaluator=ev, eval_cache=None)
    assert numbers(tmp_path / "changed") == numbers(tmp_path / "changed_plain")
    assert ref["base"] == plain["base"] | {"seconds": ref["base"]["seconds"]}
    base_png = "samples_base.png"
    assert (tmp_path / "changed" / base_png).read_bytes() == (tmp_path / "plain" / base_png).read_bytes()
