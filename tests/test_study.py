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
        # every row but the base's carries its paired change vs the base
        for name, r in rows.items():
            if name != "base":
                g, se = r["gain"]["fd_eval"]
                assert g == pytest.approx(r["fd_eval"] / rows["base"]["fd_eval"] - 1) and se > 0
                assert r["gain"]["fd_eval_test"] is None     # the tiny evaluator is not Fashion-MNIST's
        assert "gain" not in rows["base"] and "fd_eval_test" not in rows["base"]
    target = res["target"]
    assert target["arm"] == "grpo" and target["solver"] == "converged" and target["met"] is False
    met = {c["criterion"]: c["met"] for c in target["criteria"]}
    assert met["n >= 2000 on the report seed"] is False and met["at least 3 training seeds"] is False
    assert met["every seed below every pretrain seed (held-out FD)"] is None
    assert met["held-out FD against Fashion-MNIST test below the base's"] is None
    assert met["every seed below every null seed (held-out FD)"] == separation(res["summary"]["converged"],
                                                                              "grpo", "null")
    root = tmp_path / "study"
    assert json.loads((root / "study.json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    md = (root / "study.md").read_text()
    assert "| distill |" in md and "| null/seed1 |" in md and "Training-free control" in md
    assert "## Target: grpo at the converged solver" in md and "held-out vs base (paired)" in md
    g, se = res["rows"]["served"]["null/seed1"]["gain"]["fd_eval"]
    assert f"| {100 * g:+.1f}% ± {100 * se:.1f}% |" in md
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


def test_without_a_run_dir_the_study_writes_under_its_default_run_dir(tiny, monkeypatch):
    """run_study's folder without run_dir is default_run_dir of the config (the CLI reports from it)."""
    from distreward.config import load_config
    from distreward.study import default_run_dir, run_study
    from distreward.utils.errors import InputError

    tmp_path, ev, overrides = tiny
    monkeypatch.chdir(tmp_path)
    root = default_run_dir(load_config("fmnist_grpo", overrides + ["name=mine"]))
    assert root.name == "study_mine"
    with pytest.raises(InputError, match=str(root / "seed0" / "grpo" / "result.json")):
        run_study("fmnist_grpo", overrides + ["name=mine"], seeds=[0], arms=["pretrain"], progress=False,
                  evaluator=ev, eval_cache=None)
    assert not root.exists()


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


def test_paired_gains_of_hand_made_rows():
    """The change of FD vs the base on the same noise and labels, with the std of the replicate-by-replicate
    differences over the base's FD as its standard error."""
    from distreward.study import paired_gains
    from distreward.report import change_with_error

    base = {"fd_eval": 0.2, "fd_eval_err": 0.01, "fd_eval_boot": [0.19, 0.21, 0.2], "fd_reward": 4.0,
            "fd_reward_err": 0.2, "fd_reward_boot": [3.8, 4.2, 4.0], "fd_eval_test": 0.25, "fd_eval_test_err": 0.01,
            "n": 3}
    model = {"fd_eval": 0.15, "fd_eval_err": 0.01, "fd_eval_boot": [0.14, 0.17, 0.15], "fd_reward": 3.0,
             "fd_reward_err": 0.1, "fd_reward_boot": [2.9, 3.0, 3.1], "fd_eval_test": 0.2, "fd_eval_test_err": 0.01,
             "n": 3}
    guided = {"fd_eval": 0.18, "fd_eval_err": 0.01, "fd_eval_boot": [0.17, 0.19, 0.18], "n": 3}
    g = paired_gains({"base": base, "grpo/seed0": model, "guided": guided})
    assert set(g) == {"grpo/seed0", "guided"}
    # differences -0.05, -0.04, -0.05: std (ddof 1) sqrt(1/3) / 100; over the base's 0.2
    assert g["grpo/seed0"]["fd_eval"] == pytest.approx([-0.25, (1 / 3) ** 0.5 / 100 / 0.2])
    # differences -0.9, -1.2, -0.9: std sqrt(0.03); over the base's 4.0
    assert g["grpo/seed0"]["fd_reward"] == pytest.approx([-0.25, 0.03 ** 0.5 / 4])
    assert g["grpo/seed0"]["fd_eval_test"] == pytest.approx(0.2 / 0.25 - 1)
    # a constant shift on every replicate: the shared noise cancels, no paired error left
    assert g["guided"]["fd_eval"] == pytest.approx([-0.1, 0.0], abs=1e-12)
    assert g["guided"]["fd_reward"] is None and g["guided"]["fd_eval_test"] is None
    assert paired_gains({"grpo/seed0": model}) == {}
    assert change_with_error(g["grpo/seed0"]["fd_eval"]) == "-25.0% ± 2.9%" and change_with_error(None) == "–"


def target_inputs():
    """Converged-solver rows and summary of a study whose grpo arm meets every criterion of the target."""
    gains = [[-0.2, 0.02], [-0.25, 0.03], [-0.18, 0.05]]      # mean -21%; g + 2 se: -16%, -19%, -8%
    rows = {"base": {"fd_eval": 0.2, "fd_reward": 3.0, "recall": 0.8, "fd_eval_test": 0.25},
            "guided": {"fd_eval": 0.17, "recall": 0.79},
            **{f"grpo/seed{s}": {"gain": {"fd_eval": g}} for s, g in enumerate(gains)}}
    summary = {"grpo": {"fd_eval": {"mean": 0.158, "seeds": [0.16, 0.15, 0.164]}, "recall": {"mean": 0.8},
                        "fd_reward": {"mean": 2.5}, "fd_eval_test": {"mean": 0.2}},
               "null": {"fd_eval": {"seeds": [0.2, 0.3, 0.25]}}, "distill": {"fd_eval": {"seeds": [0.17, 0.18]}},
               "pretrain": {"fd_eval": {"seeds": [0.165, 0.2, 0.21]}}}
    return rows, summary


CRITERIA = ("mean over seeds", "two paired", "training seeds", "null seed", "distill seed", "pretrain seed",
            "recall", "reward-feature", "Fashion-MNIST test", "n >=")


def edit_target(rows, summary, change):
    """One change to the hand-made study (what test_the_target_says_yes_no_or_not_measured varies)."""
    if change == "worse mean":
        for s in range(3):
            rows[f"grpo/seed{s}"]["gain"]["fd_eval"] = [-0.1, 0.01]
    elif change == "noisy seed":
        rows["grpo/seed2"]["gain"]["fd_eval"] = [-0.18, 0.1]
    elif change == "seed without replicates":
        rows["grpo/seed1"]["gain"]["fd_eval"] = None
    elif change == "two seeds":
        del rows["grpo/seed2"]
    elif change == "a null seed below":
        summary["null"]["fd_eval"]["seeds"][0] = 0.15
    elif change == "no pretrain arm":
        del summary["pretrain"]
    elif change == "no guided row":
        del rows["guided"]
    elif change == "lower recall":
        summary["grpo"]["recall"]["mean"] = 0.78
    elif change == "no test split":
        del rows["base"]["fd_eval_test"], summary["grpo"]["fd_eval_test"]
    elif change == "reward FD above":
        summary["grpo"]["fd_reward"]["mean"] = 3.1


@pytest.mark.parametrize("change, n, expected", [
    (None, 2000, {}),
    (None, 1999, {"n >=": False}),
    ("worse mean", 2000, {"mean over seeds": False}),          # -10% on every seed, each well beyond 2 se
    ("noisy seed", 2000, {"two paired": False}),               # -18% + 2 x 10% > 0
    ("seed without replicates", 2000, {"mean over seeds": None, "two paired": None}),
    ("two seeds", 2000, {"training seeds": False}),
    ("a null seed below", 2000, {"null seed": False}),
    ("no pretrain arm", 2000, {"pretrain seed": None}),
    ("no guided row", 2000, {"recall": None}),
    ("lower recall", 2000, {"recall": False}),
    ("no test split", 2000, {"Fashion-MNIST test": None}),
    ("reward FD above", 2000, {"reward-feature": False})])
def test_the_target_says_yes_no_or_not_measured(change, n, expected):
    from distreward.study import target_check
    from distreward.studyreport import target_lines

    rows, summary = target_inputs()
    edit_target(rows, summary, change)
    t = target_check(rows, summary, "grpo", [0, 1, 2], n)
    assert [c["criterion"] for c in t["criteria"]] == [c["criterion"] for c in
                                                       target_check(*target_inputs(), "grpo", [0, 1, 2], 2000)["criteria"]]
    met = {}
    for c in t["criteria"]:
        key = [k for k in CRITERIA if k in c["criterion"]]
        assert len(key) == 1, c["criterion"]
        met[key[0]] = c["met"]
    assert met == {k: expected.get(k, True) for k in CRITERIA}
    assert t["met"] == (False if False in expected.values() else None if expected else True)
    assert t["arm"] == "grpo" and t["solver"] == "converged"
    md = "\n".join(target_lines(t, {"method": "heun", "steps": 16}))
    answer = {True: "yes", False: "no", None: "not measured"}
    assert md.startswith(f"## Target: grpo at the converged solver (heun 16 steps), no guidance: {answer[t['met']]}")
    assert all(f": **{answer[c['met']]}** (" in line for c, line in zip(t["criteria"], md.splitlines()[2:]))
    # beside the target, not in it: the guided base's held-out FD (0.17) against the arm's mean (0.158)
    beyond = None if change == "no guided row" else True
    assert t["beyond"]["met"] is beyond and f"Beyond the target: held-out FD at or below the guided" in md
    assert md.rstrip().endswith(f"**{answer[beyond]}** ({t['beyond']['detail']})")


def test_beyond_the_target_compares_the_mean_held_out_fd_with_the_guided_bases():
    from distreward.study import target_check

    rows, summary = target_inputs()
    summary["grpo"]["fd_eval"]["mean"] = 0.171          # above the guided base's 0.17: the target still holds
    t = target_check(rows, summary, "grpo", [0, 1, 2], 2000)
    assert t["met"] is True and t["beyond"]["met"] is False and "0.171 vs guided 0.17" in t["beyond"]["detail"]


def test_the_target_of_an_arm_the_study_lacks_is_not_measured():
    from distreward.study import target_check

    rows, summary = target_inputs()
    t = target_check({"base": rows["base"]}, {}, "nft", [0, 1, 2], 2000)
    assert [c["met"] for c in t["criteria"]][:-1] == [None] * 9 and t["criteria"][-1]["met"] is True
    assert t["met"] is None


def test_the_test_split_figures_need_the_fmnist_train_evaluator(tiny, monkeypatch):
    """evidence.test_split gives FD against Fashion-MNIST test (keys fd_*_test) only for the Fashion-MNIST
    train evaluator."""
    from distreward.evaluation import protocol
    from distreward.sampling.generate import SamplerSpec

    _, ev, _ = tiny
    proto = protocol.Protocol.of({"uncertainty": 4}, SamplerSpec(), 20)
    assert proto.test_split and proto.test_figures(ev) is None           # not the Fashion-MNIST evaluator
    monkeypatch.setattr(protocol.Evaluator, "for_fmnist", classmethod(lambda cls, device, split: ev))
    ev.split = "train"
    assert protocol.Protocol.of({"test_split": False}, SamplerSpec(), 20).test_figures(ev) is None
    images = (0.5 * torch.randn((20, 1, 32, 32), generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    figs = proto.test_figures(ev).fn(images)
    plain = ev.evaluate(images)
    assert set(figs) == {f"{k}_test{e}" for k in ("fd_reward", "fd_eval") for e in ("", "_err")}
    assert figs["fd_eval_test"] == pytest.approx(plain["fd_eval"]) and figs["fd_reward_test_err"] > 0
