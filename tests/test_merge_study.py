"""`distreward merge-study` at tiny size: every searcher x seed taken through the budget points as one resumed run,
the baselines written as generator files, the report rows on one noise, the summary and the verdicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _tiny import TinyClassifier, save_tiny_unet
from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

pytestmark = pytest.mark.slow

EVIDENCE = {"validation_seed": 3, "report_seed": 5, "n": 30, "uncertainty": 5, "converged_steps": 2}
OVERRIDES = ["rl.candidates=3", "rl.samples=4", "rl.epochs=1", "reward.reference_size=8", "eval.n=8", "eval.seed=7",
             "sampler.steps=2", "sampler.method=euler", "sampler.batch_size=8", "policy.init_std=0.2",
             "checkpoint.every=1"]


def features(images):
    proj = torch.Generator().manual_seed(0)
    w = torch.randn(images[0].numel(), 6, generator=proj) / images[0].numel() ** 0.5
    return (images.reshape(images.shape[0], -1) @ w).double().numpy()


@pytest.fixture()
def tiny(tmp_path):
    from distreward.evaluation import Evaluator

    inputs = [save_tiny_unet(tmp_path / f"ckpt{i}.safetensors", noise=0.3, seed=i) for i in range(3)]
    ref = (0.5 * torch.randn((200, 1, 32, 32), generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    ev = Evaluator(ref, feature_nets=(TinyClassifier(1, num_classes=10), TinyClassifier(2, num_classes=10)),
                   labels=["fmnist-reward", "fmnist-eval"], cache_dir=None, max_real=200, kid_subsets=5,
                   kid_subset_size=20, ref_labels=torch.arange(200) % 10)
    f = features(ref)
    parts = {"feature_fn": features, "real_stats": (f.mean(0), np.cov(f, rowvar=False))}
    return tmp_path, inputs, ev, parts


def study(tiny, **kw):
    from distreward.merge.study import run_merge_study

    tmp_path, inputs, ev, parts = tiny
    args = dict(checkpoints=[str(p) for p in inputs], searchers=["ppo", "random"], seeds=[0, 1], points=[1, 2],
                size="preset", run_dir=tmp_path / "study", evidence=EVIDENCE, solvers=("converged", "served"),
                progress=False, evaluator=ev, eval_cache=None, parts=parts)
    return run_merge_study("fmnist_merge_grpo", OVERRIDES, **{**args, **kw})


def test_merge_study_curves_baselines_report(tiny):
    from distreward.merge import run_merge
    from distreward.merge.study import study_config
    from distreward.models import load_generator
    from distreward.evaluation.protocol import evaluate_models

    tmp_path, inputs, ev, parts = tiny
    res = study(tiny)
    runs = {f"{s}/seed{x}" for s in ("ppo", "random") for x in (0, 1)}
    assert set(res["curves"]) == runs
    for name, rows in res["curves"].items():
        assert [r["iterations"] for r in rows] == [1, 2]
        assert [r["images"] for r in rows] == [1 * 3 * 4, 2 * 3 * 4]
        assert all(abs(sum(r["w"]) - 1) < 1e-9 for r in rows)

    # the run taken to 2 iterations through the point at 1 is the run of 2 iterations made at once
    cfg = study_config("fmnist_merge_grpo", OVERRIDES, size="preset", checkpoints=[str(p) for p in inputs])
    cfg.rl.algorithm, cfg.seed, cfg.rl.iterations = "ppo", 1, 2
    straight = run_merge(cfg, tmp_path / "straight", evaluator=ev, progress=False, **parts)
    assert straight["merged"]["w"] == res["curves"]["ppo/seed1"][-1]["w"]
    assert straight["merged"]["fd_eval"] == res["curves"]["ppo/seed1"][-1]["fd_eval"]

    # report: baselines (no snapshots: no best post-hoc EMA) and every run, both solvers, one noise and labels
    for sname in ("converged", "served"):
        rows = res["rows"][sname]
        assert set(rows) == runs | {"last", "uniform"}
        assert all(r["n"] == 30 and r["fd_eval_err"] > 0 for r in rows.values())
    assert res["solvers"]["converged"] == {"method": "heun", "steps": 2}
    # the `last` baseline's file is the last input's weights: the same numbers as the input evaluated directly
    direct = evaluate_models({"x": load_generator(inputs[-1])}, ev, report_plan(res, ev), {"converged": heun(2)})
    assert direct["converged"]["x"]["fd_eval"] == res["rows"]["converged"]["last"]["fd_eval"]

    for sname in ("converged", "served"):
        rows, summ = res["rows"][sname], res["summary"][sname]
        for s in ("ppo", "random"):
            vals = [rows[f"{s}/seed{x}"]["fd_eval"] for x in (0, 1)]
            assert summ[s]["fd_eval"]["mean"] == pytest.approx(np.mean(vals))
            boots = np.mean([rows[f"{s}/seed{x}"]["fd_eval_boot"] for x in (0, 1)], axis=0)
            for b, v in res["verdicts"][sname][s].items():
                assert v["margin"] == pytest.approx(rows[b]["fd_eval"] - np.mean(vals))
                paired = np.std(np.asarray(rows[b]["fd_eval_boot"]) - boots, ddof=1)
                assert v["err"] == pytest.approx(np.hypot(paired, np.std(vals, ddof=1) / 2 ** 0.5))
                assert v["beats"] == (v["margin"] > v["err"])
    root = tmp_path / "study"
    assert json.loads((root / "merge_study.json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    md = (root / "merge_study.md").read_text()
    assert "| **ppo** |" in md and "Budget curve" in md and "beats last?" in md
    assert (root / "merge_study.png").stat().st_size > 1000

    # a second call reuses every finished point and gives the same numbers
    before = (root / "ppo" / "seed0" / "result.json").stat().st_mtime_ns
    again = study(tiny)
    assert again["rows"] == res["rows"] and again["curves"] == res["curves"]
    assert (root / "ppo" / "seed0" / "result.json").stat().st_mtime_ns == before

    # other settings: the run starts over (no stale point kept)
    with pytest.raises(ValueError, match="already ran to 2 iterations"):
        study(tiny, points=[1])                  # its final models would be the 2-iteration ones
    import distreward.merge.study as ms
    other = ms.run_merge_study("fmnist_merge_grpo", OVERRIDES + ["policy.init_std=0.3"],
                               checkpoints=[str(p) for p in inputs], searchers=["ppo"], seeds=[0], points=[1],
                               size="preset", run_dir=root, evidence=EVIDENCE, progress=False, evaluator=ev,
                               eval_cache=None, parts=parts)
    assert other["curves"]["ppo/seed0"][0]["w"] != res["curves"]["ppo/seed0"][0]["w"]


def test_merge_study_refuses_bad_requests(tiny):
    with pytest.raises(ValueError, match="searcher"):
        study(tiny, searchers=["nelder-mead"])
    with pytest.raises(ValueError, match="budget points"):
        study(tiny, points=[0, 2])
    with pytest.raises(ValueError, match="solvers"):
        study(tiny, solvers=("exact",))



def test_merge_study_refuses_edm2_pickles(tmp_path):
    from distreward.merge.study import run_merge_study

    with pytest.raises(ValueError, match="EDM2 pickles or latent models"):
        run_merge_study("edm2_xs_img512", run_dir=tmp_path / "edm2")
    assert not (tmp_path / "edm2").exists()


def heun(steps):
    from distreward.sampling.generate import SamplerSpec

    return SamplerSpec(kind="ode", steps=steps, method="heun", shift=1.0)


def report_plan(res, ev):
    from distreward.evaluation.generator import EvalPlan
    from distreward.evaluation.protocol import Protocol
    from distreward.sampling.generate import SamplerSpec

    served = SamplerSpec(kind="ode", steps=2, method="euler", shift=1.0)
    proto = Protocol.of(EVIDENCE, served, 8)
    return proto.report_plan(EvalPlan(n=30, seed=3, batch_size=8, grid=0, num_classes=10, image_shape=(1, 32, 32),
                                      sampler=served, noise="seed"), ev)

