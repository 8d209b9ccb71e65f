"""`distreward study` at tiny size: the arms (GRPO, permuted-reward null, distillation control; continued
training, guidance distillation and the guided base) over seeds, the equal-wall-time budget, the evidence protocol's
rows, the summary over seeds, and the null control's rewards."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny import TinyClassifier, save_tiny_unet
from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)


@pytest.fixture()
def tiny(tmp_path):
    from distreward.evaluation import Evaluator

    save_tiny_unet(tmp_path / "base.safetensors", noise=0.3)
    ref = (0.5 * torch.randn((200, 1, 32, 32), generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    ev = Evaluator(ref, feature_nets=(TinyClassifier(1, num_classes=10), TinyClassifier(2, num_classes=10)),
                   labels=["fmnist-reward", "fmnist-eval"], cache_dir=None, max_real=200, kid_subsets=5,
                   kid_subset_size=20, ref_labels=torch.arange(200) % 10)
    overrides = [f"model.path={tmp_path / 'base.safetensors'}", "rl.iterations=2", "rl.labels_per_iter=2",
                 "rl.group_size=3", "rl.steps=3", "rl.train_steps.window=1", "reward.reference_size=24",
                 "eval.n=20", "eval.steps=3", "eval.every=0", "eval.grid=10", "eval.batch_size=20",
                 "checkpoint.every=1", "evidence.n=30", "evidence.uncertainty=5", "evidence.converged_steps=2",
                 "evidence.report_seed=5", "distill.teacher_steps=6"]
    return tmp_path, ev, overrides


@pytest.mark.slow
def test_study_runs_every_arm_and_seed_and_summarizes(tiny):
    from distreward.study import run_study, separation

    tmp_path, ev, overrides = tiny
    res = run_study("fmnist_grpo", overrides, seeds=[0, 1], arms=["grpo", "null", "distill"],
                    run_dir=tmp_path / "study", progress=False, evaluator=ev, eval_cache=None)
    names = {f"{a}/seed{s}" for a in ("grpo", "null", "distill") for s in (0, 1)}
    assert set(res["rows"]["served"]) == set(res["rows"]["converged"]) == names | {"base"}
    assert set(res["rows"]["training_free"]) == {"base"}
    assert res["solvers"]["converged"] == {"method": "heun", "steps": 2, "nfe": 3}
    assert res["solvers"]["training_free"]["nfe"] <= res["solvers"]["served"]["nfe"] == 3
    for sname in ("served", "converged"):
        rows = res["rows"][sname]
        assert all(r["fd_eval_err"] > 0 and r["n"] == 30 for r in rows.values())
        # seeds and arms train different models: no two rows alike
        assert len({round(r["fd_eval"], 12) for r in rows.values()}) == len(rows)
        s = res["summary"][sname]
        for arm in ("grpo", "null", "distill"):
            vals = [rows[f"{arm}/seed{i}"]["fd_eval"] for i in (0, 1)]
            assert s[arm]["fd_eval"]["seeds"] == vals
            assert min(vals) < s[arm]["fd_eval"]["mean"] < max(vals) and s[arm]["fd_eval"]["std"] > 0
        assert not (separation(s, "grpo", "null") and separation(s, "null", "grpo"))   # never both ways
    root = tmp_path / "study"
    assert json.loads((root / "study.json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    md = (root / "study.md").read_text()
    assert "| distill |" in md and "| null/seed1 |" in md and "Training-free control" in md
    assert (root / "study.png").stat().st_size > 1000
    cfg = (root / "seed1" / "null" / "config.yaml").read_text()
    assert "null_control: permute" in cfg and "seed: 1" in cfg
    assert (root / "seed0" / "distill" / "model_ema.safetensors").is_file()

    # a second call reuses the finished runs (resume of the same settings) and gives the same rows
    res2 = run_study("fmnist_grpo", overrides, seeds=[0, 1], arms=["grpo", "null", "distill"],
                     run_dir=root, progress=False, evaluator=ev, eval_cache=None)
    assert res2["rows"] == res["rows"]


@pytest.mark.slow
def test_null_control_permutes_the_real_rewards(tiny, monkeypatch):
    """rl.null_control=permute: the advantages see the same rewards (scale, spread), on other samples."""
    from distreward.rl import context, finetune

    tmp_path, ev, overrides = tiny
    from distreward.config import load_config

    seen = {}
    real_adv = context.group_advantages

    def spy(r, groups, **kw):
        seen.setdefault(tag, []).append(r.clone())
        return real_adv(r, groups, **kw)

    monkeypatch.setattr(context, "group_advantages", spy)
    for tag in ("real", "null"):
        cfg = load_config("fmnist_grpo", overrides + ["rl.iterations=1"]
                          + (["rl.null_control=permute"] if tag == "null" else []))
        finetune(cfg, tmp_path / tag, evaluator=ev, progress=False)
    real, null = seen["real"][0], seen["null"][0]
    assert torch.equal(real.sort().values, null.sort().values)     # the same rewards...
    assert not torch.equal(real, null)                              # ...given to other samples


def test_seed_summary_of_hand_computed_values():
    from distreward.report import seed_summary

    rows = {"a/seed0": {"fd_eval": 1.0}, "a/seed1": {"fd_eval": 2.0}, "a/seed2": {"fd_eval": 4.0},
            "b/seed0": {"fd_eval": 0.5}, "b/seed1": {"fd_eval": None}}
    s = seed_summary(rows, ["a", "b", "c"], [0, 1, 2], ["fd_eval", "recall"])
    # mean 7/3; deviations -4/3, -1/3, 5/3: squares 42/9 over n - 1 = 2 -> variance 7/3
    assert s["a"]["fd_eval"]["mean"] == pytest.approx(7 / 3)
    assert s["a"]["fd_eval"]["std"] == pytest.approx((7 / 3) ** 0.5)
    assert s["a"]["fd_eval"]["seeds"] == [1.0, 2.0, 4.0]
    assert s["b"] == {"fd_eval": {"mean": 0.5, "std": None, "seeds": [0.5]}}     # one seed: no spread
    assert s["c"] == {} and "recall" not in s["a"]


@pytest.mark.parametrize("a, b, expected", [([0.1, 0.2], [0.3, 0.25], True),     # every a below every b
                                             ([0.1, 0.3], [0.25, 0.4], False),   # overlapping seeds
                                             ([0.2, 0.1], [0.2, 0.3], False),    # a tie is no separation
                                             ([0.3, 0.4], [0.1, 0.2], False),
                                             ([0.1], None, None)])               # an arm without seeds
def test_separation_of_hand_made_seeds(a, b, expected):
    from distreward.study import separation

    summary = {"a": {"fd_eval": {"seeds": a}}}
    if b is not None:
        summary["b"] = {"fd_eval": {"seeds": b}}
    assert separation(summary, "a", "b") is expected


@pytest.mark.slow
def test_study_with_the_wall_time_matched_arms_and_the_guided_base(tiny):
    """pretrain and guidance-distill train for the iterations whose measured seconds match the fine-tune's logged
    training seconds (recorded in budget.json, reused by a second call); guided is the base sampled with guidance."""
    from distreward.study import run_study, training_seconds
    from test_pretrain import write_images

    tmp_path, ev, overrides = tiny
    write_images(tmp_path / "train.npz", 40, (1, 32, 32), 10)
    overrides = overrides + [f"pretrain.images={tmp_path / 'train.npz'}", "pretrain.batch=4", "pretrain.steps=1",
                             "guidance.scale=2.0"]
    arms = ["pretrain", "guided", "guidance-distill", "grpo"]
    root = tmp_path / "study"
    res = run_study("fmnist_grpo", overrides, seeds=[0], arms=arms, run_dir=root, progress=False, evaluator=ev,
                    eval_cache=None)
    for sname in ("served", "converged"):
        rows = res["rows"][sname]
        assert set(rows) == {"base", "guided", "grpo/seed0", "pretrain/seed0", "guidance-distill/seed0"}
        assert rows["guided"]["fd_eval"] != rows["base"]["fd_eval"] and rows["guided"]["n"] == 30
        assert set(res["summary"][sname]) == {"grpo", "pretrain", "guidance-distill"}
    fine_tune = json.loads((root / "seed0" / "grpo" / "result.json").read_text())["history"]
    for arm in ("pretrain", "guidance-distill"):
        budget = json.loads((root / "seed0" / arm / "budget.json").read_text())
        history = json.loads((root / "seed0" / arm / "result.json").read_text())["history"]
        assert budget == res["budgets"][f"{arm}/seed0"] and budget["reference"] == "grpo/seed0"
        assert budget["reference_seconds"] == pytest.approx(training_seconds(fine_tune))
        assert budget["seconds_per_iteration"] == pytest.approx(training_seconds(history[:3]) / 3)
        assert len(history) == budget["iterations"] == max(3, round(budget["reference_seconds"]
                                                                    / budget["seconds_per_iteration"]))
    md = (root / "study.md").read_text()
    assert all(f"| {a} |" in md for a in arms) and "Equal wall time: pretrain/seed0 ran" in md
    assert "Every grpo seed below every pretrain seed" in md

    # a second call reuses the recorded budgets and the finished runs
    res2 = run_study("fmnist_grpo", overrides, seeds=[0], arms=arms, run_dir=root, progress=False, evaluator=ev,
                     eval_cache=None)
    assert res2["rows"] == res["rows"] and res2["budgets"] == res["budgets"]


def test_a_wall_time_matched_arm_needs_the_fine_tune(tiny):
    from distreward.study import run_study
    from distreward.utils.errors import InputError

    tmp_path, ev, overrides = tiny
    with pytest.raises(InputError, match=r"grpo/result.json: missing; the pretrain arm runs at the wall time of the "
                                         r"grpo arm .* add grpo to the arms, or set pretrain.match_wall_time=false"):
        run_study("fmnist_grpo", overrides, seeds=[0], arms=["pretrain"], run_dir=tmp_path / "study",
                  progress=False, evaluator=ev, eval_cache=None)


def test_equal_wall_time_iterations():
    """The fine-tune's logged training seconds over the probe's seconds per iteration; never below the probe."""
    from distreward.study import matched_iterations, training_seconds

    probe = [{"time_data": 0.5, "time_update": 1.5, "loss": 9.0}, {"time_data": 0.5, "time_update": 0.5}]
    assert training_seconds(probe) == 3.0
    assert matched_iterations(30.0, probe) == 20
    assert matched_iterations(31.0, probe) == 21
    assert matched_iterations(1.0, probe) == 2


@pytest.mark.parametrize("arm", ["grpo", "nft", "pathwise"])
def test_a_trainer_arm_runs_that_trainer_on_the_configs_budget(arm):
    from distreward.config import load_config
    from distreward.rl.settings import resolve
    from distreward.study import arm_config

    cfg = resolve(load_config("fmnist_grpo", []))
    c = arm_config(cfg, arm, seed=3)
    assert c.rl.algorithm == arm and c.seed == 3 and c.rl.iterations == cfg.rl.iterations
    assert c.rl.shared_noise == (bool(cfg.rl.shared_noise) and arm == "grpo")
    assert cfg.seed != 3 and cfg.rl.algorithm == "grpo"      # the study's config is left as it was
