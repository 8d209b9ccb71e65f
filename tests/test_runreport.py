"""report.md of finetune, merge and study run directories (distreward.runreport), on tiny runs: the tables hold the
run's own logged numbers, the curves and sample grids exist and are linked."""

from __future__ import annotations

import json
import re

import pytest

from test_study import tiny  # noqa: F401  (the tiny study's base model, evaluator and overrides)


def links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_finetune_report_tabulates_the_logged_evaluations_with_errors(tiny):
    from distreward.config import load_config
    from distreward.rl import finetune
    from distreward.runreport import run_kind, write_run_report

    tmp_path, ev, overrides = tiny
    run = tmp_path / "ft"
    finetune(load_config("fmnist_grpo", overrides + ["eval.every=1", "eval.uncertainty=5"]), run, evaluator=ev, progress=False)
    assert run_kind(run) == "finetune"
    md = write_run_report(run).read_text()
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/fd_eval" in r]
    assert [r["iteration"] for r in evals] == [0, 1, 2]
    for r in evals:      # each evaluation's row: its logged FDs with their bootstrap errors
        row = next(line for line in md.splitlines() if line.startswith(f"| iteration {r['iteration']} |"))
        assert f"{r['eval/fd_reward']:.3f} ± {r['eval/fd_reward_err']:.3f}" in row
        assert f"{r['eval/fd_eval']:.4f} ± {r['eval/fd_eval_err']:.4f}" in row
    assert "Fine-tuning run `fmnist_grpo`" in md and "2 of 2 iterations logged" in md
    shown = links(md)
    assert "fd_curve.png" in shown and "samples/ema_0000.png" in shown and "samples/ema_0002.png" in shown
    for rel in shown:
        assert (run / rel).stat().st_size > 500, rel


def test_merge_report_has_every_baseline_the_merged_model_and_its_samples(tmp_path):
    from test_merge import StubEvaluator, euler_sampler, feature_fn, real_stats, tiny_checkpoints, tiny_cfg

    from distreward.merge import CheckpointSet, run_merge
    from distreward.runreport import run_kind, write_run_report

    run = tmp_path / "merge"
    res = run_merge(tiny_cfg(iterations=2), run, ckpts=CheckpointSet.open(tiny_checkpoints(tmp_path)),
                    sample_fn=euler_sampler(), feature_fn=feature_fn, evaluator=StubEvaluator(),
                    real_stats=real_stats(), progress=False)
    assert run_kind(run) == "merge"
    md = write_run_report(run).read_text()
    for name in [*res["baselines"], "init", "merged"]:
        r = res["merged"] if name == "merged" else res["init"] if name == "init" else res["baselines"][name]
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert f"{r['fd_reward']:.3f}" in row and f"{r['fd_eval']:.4f}" in row
    assert "No standard errors" in md
    assert ", ".join(f"{w:.3f}" for w in res["merged"]["w"]) in md
    assert {"search_curve.png", "samples_merged.png"} <= set(links(md))
    assert all((run / rel).stat().st_size > 200 for rel in links(md))


def test_coefficients_read_one_line_per_block_group():
    from distreward.runreport import coefficient_lines

    assert coefficient_lines([0.25, 0.75]) == ["0.250, 0.750"]
    assert coefficient_lines([[0.1, 0.9], (0.5, 0.5)]) == ["group 0: 0.100, 0.900", "group 1: 0.500, 0.500"]


def test_a_directory_without_run_files_is_refused_with_the_fix(tmp_path):
    from distreward.runreport import write_run_report

    with pytest.raises(ValueError, match="give the directory of a finetune, merge or study run"):
        write_run_report(tmp_path)


@pytest.mark.slow
def test_study_report_adds_every_arms_curves_and_samples(tiny):
    from distreward.runreport import run_kind, write_run_report
    from distreward.study import run_study

    tmp_path, ev, overrides = tiny
    root = tmp_path / "study"
    run_study("fmnist_grpo", overrides + ["eval.every=1"], seeds=[0], arms=["grpo", "null"], run_dir=root, progress=False,
              evaluator=ev, eval_cache=None)
    assert run_kind(root) == "study"
    md = write_run_report(root).read_text()
    assert md.startswith((root / "study.md").read_text())       # the study's own tables, with their errors
    assert "| grpo/seed0 |" in md and "±" in md
    shown = links(md)
    assert {"study.png", "fd_curve.png", "seed0/grpo/samples/ema_0002.png", "seed0/null/samples/ema_0002.png"} <= set(shown)
    for rel in shown:
        assert (root / rel).stat().st_size > 500, rel
