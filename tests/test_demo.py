"""The main job's pipeline at tiny size: stages, report, metrics.json, skipping finished stages, the stage hook."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from _tiny import save_tiny_unet
from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

pytestmark = pytest.mark.slow


class TinyFeatures(nn.Module):
    def __init__(self, seed: int, dim: int = 6):
        super().__init__()
        torch.manual_seed(seed)
        self.dim = dim
        self.conv = nn.Conv2d(1, dim, 5, stride=4, padding=2)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean((2, 3)) + 0.1 * x.flatten(1)[:, 200:200 + self.dim]

    def logits(self, x):
        return self.head(self(x))


@pytest.fixture()
def tiny_setup(tmp_path):
    from distreward.evaluation import Evaluator

    save_tiny_unet(tmp_path / "base.safetensors", noise=0.05)
    g = torch.Generator().manual_seed(3)
    ref = (0.5 * torch.randn((200, 1, 32, 32), generator=g)).clamp(-1, 1)
    ev = Evaluator(ref, feature_nets=(TinyFeatures(1), TinyFeatures(2)), labels=["fmnist-reward", "fmnist-eval"],
                   cache_dir=None, max_real=200, kid_subsets=5, kid_subset_size=20, ref_labels=torch.arange(200) % 10)
    overrides = [f"model.path={tmp_path / 'base.safetensors'}", "rl.iterations=2", "rl.labels_per_iter=2",
                 "rl.group_size=3", "rl.steps=3", "rl.train_steps.window=1", "reward.reference_size=24",
                 "eval.n=20", "eval.steps=3", "eval.every=1", "eval.grid=10", "eval.batch_size=20",
                 "checkpoint.every=1", "demo.crosscheck_steps=2", "evidence.n=30", "evidence.uncertainty=5",
                 "evidence.converged_steps=null", "evidence.search_n=20", "evidence.search_start=1",
                 "evidence.search_max=4", "evidence.curve_n=20", "evidence.curve_nfe=[2,4]",
                 "evidence.report_seed=99", "evidence.validation_seed=7"]
    return tmp_path, ev, overrides


def test_demo_writes_report_and_metrics_and_reuses_stages(tiny_setup, monkeypatch):
    from distreward import demo

    # the merging stages are tested with the merge package (tests/test_merge.py)
    monkeypatch.setattr(demo, "BUILTIN_STAGES", [s for s in demo.BUILTIN_STAGES if not s.name.startswith("merge")])
    monkeypatch.setattr(demo.stages, "EXTRA_STAGES", [])
    tmp_path, ev, overrides = tiny_setup
    run_dir = tmp_path / "demo"
    # shipped fine-tuned models: one fine-tuned from this base (reported beside the demo's), one from another base
    from distreward.models import load_generator, read_generator_metadata, save_generator
    from distreward.utils.hashing import file_sha256
    base_sha = file_sha256(tmp_path / "base.safetensors")
    other = load_generator(save_tiny_unet(tmp_path / "other.safetensors", seed=1))
    for name, sha in (("shipped", base_sha), ("stranger", "0" * 64)):
        save_generator(tmp_path / f"{name}.safetensors", other, "unet", other.generator_meta["kwargs"],
                       extra={"rl": "pathwise", "reward": "distribution", "command": "distreward study ...",
                              "base_sha256": sha})
    monkeypatch.setattr(demo.evidence, "SHIPPED_FILES", (("finetuned", str(tmp_path / "shipped.safetensors")),
                                                         ("stranger", str(tmp_path / "stranger.safetensors"))))
    m = demo.run_demo(run_dir, compare=True, overrides=overrides, progress=False, evaluator=ev)
    assert set(m) == {"base", "distribution", "sample", "crosscheck", "served", "converged", "training_free",
                      "evidence"}
    # a fine-tuned model records the sha256 of the base it started from
    assert read_generator_metadata(run_dir / "distribution" / "model_ema.safetensors")["extra"]["base_sha256"] == base_sha
    assert m["evidence"]["shipped"]["finetuned"]["trainer"] == "pathwise" and "stranger" not in m["evidence"]["shipped"]
    for name in ("base", "distribution", "sample"):
        # a row's metrics: the served sampler on the fresh report seed (n = evidence.n), with standard errors
        assert {"fd_reward", "fd_reward_err", "fd_eval", "fd_eval_err", "precision", "recall",
                "classifier_logp", "validation"} <= set(m[name])
        assert m[name]["classifier_logp"] < 0 and m[name]["n"] == 30 and m[name]["validation"]["n"] == 20
        assert m[name]["fd_eval_err"] > 0 and m[name]["fd_eval"] != m[name]["validation"]["fd_eval"]
    # the metrics.json contract: served / converged / training_free, each {method, steps, nfe, models}
    assert m["served"]["method"] == "euler" and m["served"]["steps"] == 3 and m["served"]["nfe"] == 3
    assert m["training_free"]["method"] == "heun" and m["training_free"]["nfe"] <= 3
    conv = m["converged"]
    assert conv["method"] == "heun" and conv["steps"] == m["evidence"]["converged_search"]["steps"]
    assert conv["nfe"] == 2 * conv["steps"] - 1 and m["evidence"]["converged_search"]["searched"]
    assert set(m["training_free"]["models"]) == {"base"}          # the base's control only
    for sname in ("served", "converged", "training_free"):
        assert set(m[sname]["models"]) <= {"base", "distribution", "sample", "finetuned"}
        assert sname == "training_free" or set(m[sname]["models"]) == {"base", "distribution", "sample", "finetuned"}
        for row in m[sname]["models"].values():
            assert row["fd_reward_err"] > 0 and row["fd_eval_err"] > 0 and "fd_eval_class_worst" in row
    assert m["served"]["models"]["distribution"]["fd_eval"] == m["distribution"]["fd_eval"]
    assert {(r["model"], r["method"]) for r in m["evidence"]["curve"]} == {
        (a, b) for a in ("base", "distribution", "sample", "finetuned") for b in ("euler", "heun")}
    # the plot's points: each model's FD minus the base's at the same solver, with a paired standard error
    curve_base = {(r["method"], r["nfe"]): r for r in m["evidence"]["curve"] if r["model"] == "base"}
    for r in m["evidence"]["curve"]:
        b = curve_base[(r["method"], r["nfe"])]
        assert r["n"] == b["n"] == 20 and r["fd_eval_diff"] == pytest.approx(r["fd_eval"] - b["fd_eval"], abs=1e-12)
        assert (r["fd_eval_diff_err"] == 0) == (r["model"] == "base")
    # the cross-check sampler (2 Euler steps instead of the served 3) gives other numbers for the same models
    cross = m["crosscheck"]
    assert cross["steps"] == 2 and set(cross["models"]) == {"base", "distribution", "sample"}
    assert cross["models"]["base"]["fd_eval"] != m["base"]["validation"]["fd_eval"]
    assert cross["models"]["base"]["n"] == m["base"]["validation"]["n"] == 20
    assert m["sample"]["reward"] == "classifier" and m["distribution"]["reward"] == "distribution"
    report = (run_dir / "report.md").read_text()
    for s in ("| base |", "| distribution |", "| sample |", "fd_curve.png", "samples_base.png", "samples_distribution.png",
              "Cross-check: the same models with the 2-step Euler sampler", "converged solver", "fd_vs_nfe.png",
              "training-free control", "report seed 99", "| finetuned |",
              "**finetuned** is the shipped fine-tuned model of this base (`shipped.safetensors`"):
        assert s in report, s
    for png in ("fd_curve.png", "fd_vs_nfe.png", "samples_base.png", "samples_distribution.png", "samples_sample.png"):
        assert (run_dir / png).stat().st_size > 100
    # the fine-tuning really ran: 2 iterations logged
    recs = [json.loads(l) for l in (run_dir / "distribution" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs if "r_mean" in r] == [1, 2]
    stage = json.loads((run_dir / "distribution" / "stage.json").read_text())
    ref_fd = {r["iteration"]: r["fd_ref"] for r in recs if "r_mean" in r}
    assert {r["iteration"]: r["fd_ref"] for r in stage["fd_ref_curve"]} == ref_fd   # the plot's 3rd panel
    assert "fd_ref_curve" not in json.loads((run_dir / "metrics.json").read_text())["distribution"]

    # a re-run reuses every finished stage; a registered extra stage (the merge hook) adds a row and a section
    def boom(ctx):
        raise AssertionError("finished stages must not run again")

    monkeypatch.setattr(demo, "BUILTIN_STAGES", [demo.Stage(s.name, boom, s.enabled, s.section, s.row)
                                                   for s in demo.BUILTIN_STAGES])
    demo.register_stage(demo.Stage("merge_ema", lambda ctx: {"fd_reward": 1.0, "fd_eval": 2.0, "precision": 0.5,
                                                             "recall": 0.5},
                                   section=lambda r, ctx: "## Merging\n\nmerge section text"))
    m2 = demo.run_demo(run_dir, compare=True, overrides=overrides, progress=False, evaluator=ev)
    assert m2["merge_ema"]["fd_eval"] == 2.0 and m2["distribution"] == m["distribution"]
    report = (run_dir / "report.md").read_text()
    assert "| merge_ema |" in report and "merge section text" in report


def test_stage_list_and_register_stage(monkeypatch):
    from distreward import demo

    monkeypatch.setattr(demo.stages, "EXTRA_STAGES", [])
    assert [s.name for s in demo.BUILTIN_STAGES] == ["base", "distribution", "sample", "crosscheck", "merge_ema",
                                                     "merge_rl", "evidence"]
    assert [s.name for s in demo.BUILTIN_STAGES if not s.row] == ["crosscheck", "evidence"]
    mine = demo.Stage("mine", lambda ctx: {})
    demo.register_stage(mine)
    demo.register_stage(demo.Stage("merge_rl", lambda ctx: {}))    # replaces the built-in stage of that name
    demo.register_stage(mine)                                        # registering again keeps one copy, at the end
    names = [s.name for s in demo.stages.with_extra_stages(demo.BUILTIN_STAGES)]
    assert names == ["base", "distribution", "sample", "crosscheck", "merge_ema", "evidence", "merge_rl", "mine"]
    assert demo.stages.with_extra_stages(demo.BUILTIN_STAGES)[-1] is mine


def test_the_demo_runs_another_distribution_wise_preset_and_its_sample_wise_baseline(tiny_setup, monkeypatch):
    """--config fmnist_pathwise: both fine-tuning stages run the pathwise trainer (the baseline with -log p), the
    report names it; a preset without the distribution-wise reward is refused before any stage runs."""
    from distreward import demo
    from distreward.schema import ConfigError

    keep = ("base", "distribution", "sample")
    monkeypatch.setattr(demo, "BUILTIN_STAGES", [s for s in demo.BUILTIN_STAGES if s.name in keep])
    monkeypatch.setattr(demo.stages, "EXTRA_STAGES", [])
    tmp_path, ev, overrides = tiny_setup
    run_dir = tmp_path / "pathwise"
    m = demo.run_demo(run_dir, preset="fmnist_pathwise", compare=True, progress=False, evaluator=ev,
                      overrides=overrides + ["pathwise.steps=3", "pathwise.k=1", "pathwise.method=euler"])
    assert set(keep) <= set(m) and m["sample"]["reward"] == "classifier"
    for name in ("distribution", "sample"):
        recs = [json.loads(l) for l in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in recs if "loss_pathwise" in r] == [1, 2], name
        assert all(("direction_norm" in r) == (name == "distribution") for r in recs if "loss_pathwise" in r)
    report = (run_dir / "report.md").read_text()
    assert "The pathwise trainer (rl.algorithm pathwise)" in report and "last 1 of them" in report
    with pytest.raises(ConfigError, match="preset 'fmnist_grpo_sample' has reward.name=classifier"):
        demo.run_demo(tmp_path / "refused", preset="fmnist_grpo_sample", overrides=overrides, progress=False,
                      evaluator=ev)
    assert not (tmp_path / "refused").exists()


def test_merge_stages_take_the_reward_statistics_of_the_fmnist_evaluator(tiny_setup):
    """The merge stages reuse the Fashion-MNIST evaluator's train statistics of the reward network (the ones the
    merge would compute) and compute their own for any other evaluator."""
    from distreward import demo
    from distreward.demo.merge import EMA_PRESET, merge_config, reward_real_stats

    tmp_path, ev, overrides = tiny_setup
    ctx = demo.make_context(tmp_path / "ctx", overrides=overrides, progress=False, evaluator=ev)
    cfg = merge_config(EMA_PRESET, ctx)
    assert reward_real_stats(ctx, cfg) is None                 # not the Fashion-MNIST train evaluator
    ev.split = "train"
    mu, sigma = reward_real_stats(ctx, cfg)
    st = ev.real_stats[list(ev.labels).index("fmnist-reward")]
    assert mu is st.mu and sigma is st.sigma
    cfg.reward.real_stats = "my_stats.npz"                     # the reward's own statistics file wins
    assert reward_real_stats(ctx, cfg) is None


def test_finetune_inputs_do_not_list_the_final_ema_twice(tmp_path):
    """A real GRPO run's files: checkpoints/ema_00001, ema_00002 (the final EMA), model.safetensors,
    model_ema.safetensors; the merge_rl stage lists the final EMA once, last."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from _unet32 import MeanPixelReward, grpo_cfg, tiny_unet
    from distreward.demo.merge import finetune_inputs
    from distreward.rl import finetune

    d = tmp_path / "demo" / "distribution"
    finetune(grpo_cfg(inner_epochs=1), d, net=tiny_unet(), reward=MeanPixelReward(), progress=False)
    ck = d / "checkpoints"
    final, ema = load_file(ck / "ema_00002.safetensors"), load_file(d / "model_ema.safetensors")
    assert all(torch.equal(final[k], ema[k]) for k in ema)               # the duplicate the stage used to list
    files = finetune_inputs(SimpleNamespace(run_dir=tmp_path / "demo"))
    assert files == [ck / "ema_00001.safetensors", d / "model.safetensors", d / "model_ema.safetensors"]


def test_merge_ema_searches_per_block_at_the_converged_solver(tiny_setup):
    """merge_ema: per-block coefficients from the best baseline, sampled and selected with Heun at the evidence's
    converged step count (the setting measured to beat the best post-hoc EMA, docs/merge.md)."""
    from distreward import demo
    from distreward.demo.merge import merge_ema_config, merge_rl_config

    tmp_path, ev, overrides = tiny_setup
    ctx = demo.make_context(tmp_path / "ctx", overrides=overrides + ["evidence.converged_steps=12"], progress=False,
                            evaluator=ev)
    cfg = merge_ema_config(ctx)
    assert (cfg.merge.space, cfg.merge.init, cfg.sampler.method, cfg.sampler.steps) == ("blocks", "best", "heun", 12)
    assert cfg.eval.seed == ctx.cfg.eval.seed                 # selected on the validation seed
    rl = merge_rl_config(ctx)                                 # merge_rl keeps the served sampler
    assert (rl.sampler.method, rl.sampler.steps) == (ctx.cfg.eval.method, ctx.cfg.eval.steps)
