"""The config schema (distreward.schema): bad configs are refused in one line that names the key, the value and what
is allowed, before any work; every shipped preset (with its dry_run / demo block) validates unchanged.

BAD is a table a reader can extend: (command, preset, key=value overrides, regex of the one-line error)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distreward.build import apply_dry_run
from distreward.config import load_config, repo_path
from distreward.schema import ConfigError, defaults, markdown, validate

GRPO, SIT, BASE = "fmnist_grpo_tiny", "sit_xl2_imagenet256", "fmnist_base_tiny"
MERGE, EDM2 = "fmnist_merge_ema", "edm2_xs_img512"

BAD = [
    # misspelt keys: a suggestion, also for a key that lives in another section
    ("finetune", GRPO, ["rl.itrations=3"], r"^unknown config key rl\.itrations \(did you mean rl\.iterations\?\)$"),
    ("finetune", GRPO, ["rl.every=3"],
     r"^unknown config key rl\.every \(did you mean eval\.every or checkpoint\.every\?\)$"),
    ("finetune", GRPO, ["reward.mod=exact"], r"unknown config key reward\.mod .*did you mean reward\.mode\?"),
    ("finetune", GRPO, ["reward.k=3"], r"config key reward\.k is not used for reward\.name=distribution"),
    ("merge", MERGE, ["rl.candidtes=4"], r"^unknown config key rl\.candidtes \(did you mean rl\.candidates\?\)$"),
    ("train-base", BASE, ["train.bach=8"], r"^unknown config key train\.bach \(did you mean train\.batch\?\)$"),
    ("train-base", BASE, ["device=cuda"], r"^unknown config key device \(keys: name, seed, data"),
    ("demo", "fmnist_grpo", ["demo.crosscheck_stepz=3"], r"unknown config key demo\.crosscheck_stepz \(did you mean "
                                                         r"demo\.crosscheck_steps\?\)"),
    # wrong types
    ("finetune", GRPO, ["rl.lr=abc"], r"^config key rl\.lr: value 'abc' is not a float$"),
    ("finetune", GRPO, ["rl.iterations=2.5"], r"^config key rl\.iterations: value 2\.5 is not an int$"),
    ("finetune", GRPO, ["rl.shared_noise=1"], r"^config key rl\.shared_noise: value 1 is not a bool"),
    ("finetune", GRPO, ["rl=5"], r"^config key rl: value 5 is not a section"),
    ("merge", MERGE, ["merge.init=[1,a]"], r"^config key merge\.init\[1\]: value 'a' is not a float$"),
    ("merge", MERGE, ["sampler.steps=[4]"], r"^config key sampler\.steps: value \[4\] is not an int$"),
    ("train-base", BASE, ["train.lr=fast"], r"^config key train\.lr: value 'fast' is not a float$"),
    ("train-base", BASE, ["network.kwargs=3"], r"^config key network\.kwargs: value 3 is not a mapping$"),
    # intervals of 0 (they crashed after work had started)
    ("finetune", GRPO, ["checkpoint.every=0"], r"^checkpoint\.every: 0 is not allowed \(>= 1\)$"),
    ("merge", MERGE, ["checkpoint.every=0"], r"^checkpoint\.every: 0 is not allowed \(>= 1\)$"),
    ("train-base", BASE, ["log_kimg=0"], r"^log_kimg: 0 is not allowed \(> 0\)$"),
    ("train-base", BASE, ["ema.snapshot_kimg=0"], r"^ema\.snapshot_kimg: 0 is not allowed \(> 0\)$"),
    # sizes of 0 (internal torch messages before)
    ("finetune", GRPO, ["eval.n=0"], r"^eval\.n: 0 is not allowed \(>= 1\)$"),
    ("finetune", GRPO, ["rl.batch_size=0"], r"^rl\.batch_size: 0 is not allowed \(>= 1\)$"),
    ("finetune", GRPO, ["model.image_shape=[1,0,32]"], r"^model\.image_shape: \[1, 0, 32\] is not allowed \(each > 0"),
    ("merge", MERGE, ["sampler.batch_size=0"], r"^sampler\.batch_size: 0 is not allowed \(>= 1\)$"),
    ("merge", MERGE, ["rl.samples=0"], r"^rl\.samples: 0 is not allowed \(>= 1\)$"),
    ("train-base", BASE, ["train.batch=0"], r"^train\.batch: 0 is not allowed \(>= 1\)$"),
    # ranges and bad choices
    ("finetune", GRPO, ["rl.group_size=1"],
     r"^rl\.group_size: 1 is not allowed \(>= 2: advantages are relative within a group\)$"),
    ("finetune", GRPO, ["rl.clip_eps=1.5"], r"^rl\.clip_eps: 1\.5 is not allowed \(in \(0, 1\)\)$"),
    ("finetune", GRPO, ["rl.labels=balancd"],
     r"^rl\.labels: 'balancd' is not allowed \(one of: balanced, random; did you mean 'balanced'\?\)$"),
    ("finetune", GRPO, ["reward.name=distributon"], r"^reward\.name: 'distributon' is not allowed \(one of: "
                                                    r"distribution, classifier, knn; did you mean 'distribution'\?\)$"),
    ("finetune", GRPO, ["device=cdua"], r"^device: 'cdua' is not allowed \(a torch device"),
    ("finetune", GRPO, ["rl.train_steps.window=[3,2]"], r"^rl\.train_steps\.window: \[3, 2\] is not allowed"),
    ("merge", MERGE, ["rl.algorithm=ppo2"], r"^rl\.algorithm: 'ppo2' is not allowed \(one of: ppo, reinforce"),
    ("merge", MERGE, ["rl.candidates=1"], r"^rl\.candidates: 1 is not allowed \(>= 2"),
    ("merge", MERGE, ["baselines.ema_grid=[0.1,0.3]"], r"^baselines\.ema_grid: \[0\.1, 0\.3\] is not allowed \(each in "
                                                       r"\(0, 0\.28\)"),
    ("train-base", BASE, ["train.sigma_sampling=cosine"], r"^train\.sigma_sampling: 'cosine' is not allowed \(one of: "
                                                          r"logit_normal, uniform\)$"),
    ("train-base", BASE, ["ema.stds=[]"], r"^ema\.stds: \[\] is not allowed \(at least one value\)$"),
    # checks across keys
    ("finetune", GRPO, ["reward.credit=group"], r"^reward\.credit: 'group' is not allowed .*use reward\.credit=sample"),
    ("finetune", GRPO, ["rl.noise_steps=window", "rl.train_steps.mode=fraction"],
     r"^rl\.noise_steps: 'window' is not allowed \(needs rl\.train_steps\.mode=window"),
    ("merge", MERGE, ["rl.samples=1000"],
     r"^reward\.reference_size: 1000 is not allowed \(0, or larger than rl\.samples"),
    ("train-base", BASE, ["data.limit=16"], r"^train\.batch: 32 is not allowed \(<= data\.limit = 16"),
    # bad dry_run / demo blocks: checked as a partial config, then with the block applied
    ("finetune", SIT, ["dry_run.rl.itrations=1"],
     r"^unknown config key dry_run\.rl\.itrations \(did you mean dry_run\.rl\.iterations\?\)$"),
    ("finetune", SIT, ["dry_run.rl.group_size=1"], r"^dry_run\.rl\.group_size: 1 is not allowed \(>= 2"),
    ("finetune", SIT, ["dry_run.rl.train_steps.window=[2,3]"],
     r"^with its dry_run block applied: rl\.train_steps\.window: \[2, 3\] is not allowed \(selects no step"),
    ("merge", EDM2, ["dry_run.sampler.stps=3"], r"^unknown config key dry_run\.sampler\.stps \(did you mean "
                                                r"dry_run\.sampler\.steps\?\)$"),
    ("merge", EDM2, ["dry_run.dry_run={}"],
     r"^config key dry_run\.dry_run: a dry_run block cannot hold a dry_run block$"),
    ("merge", EDM2, ["dry_run.reward.reference_size=4"], r"^with its dry_run block applied: reward\.reference_size: 4"),
    ("merge", MERGE, ["demo.rl.iterations=0"], r"^demo\.rl\.iterations: 0 is not allowed \(>= 1\)$"),
    ("merge", MERGE, ["demo.rl.samples=5000"], r"^with its demo block applied: reward\.reference_size: 1000 is not"),
]


@pytest.mark.parametrize("command,preset,overrides,message", BAD,
                         ids=[f"{c}:{' '.join(o)}" for c, _, o, _ in BAD])
def test_bad_config_is_refused_in_one_line(command, preset, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(command, load_config(preset, overrides))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# command of every shipped preset; a new preset must be added here
PRESETS = {"fmnist_grpo": "finetune", "fmnist_grpo_fine": "finetune", "fmnist_nft": "finetune", "fmnist_grpo_sample": "finetune",
           "fmnist_grpo_tiny": "finetune", "fmnist_pool": "finetune", "fmnist_pool_tiny": "finetune",
           "fmnist_pathwise": "finetune",
           "sit_xl2_imagenet256": "finetune", "fmnist_merge_ema": "merge", "fmnist_merge_grpo": "merge",
           "edm2_xs_img512": "merge", "fmnist_base": "train-base", "fmnist_base_tiny": "train-base"}


def test_every_preset_is_listed():
    assert sorted(p.stem for p in repo_path("configs").glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates_with_and_without_its_blocks(preset):
    command = PRESETS[preset]
    raw = load_config(preset)
    cfg = validate(command, raw)
    # a valid config keeps its values: what OmegaConf's merge of the defaults and the preset gives
    expected = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(defaults(command)), raw))
    assert OmegaConf.to_container(cfg) == expected
    assert OmegaConf.to_container(validate(command, cfg)) == expected          # validating twice changes nothing
    if "dry_run" in raw:
        dry = validate(command, apply_dry_run(raw))
        assert dry.dry_run_of == preset and "dry_run" not in dry
    if command == "merge" and "demo" in raw:
        validate(command, OmegaConf.merge(raw, raw.demo))


def test_defaults_alone_validate_and_are_the_trainers_defaults():
    from distreward.merge.trainer import DEFAULTS as merge_defaults
    from distreward.rl.settings import DEFAULTS as grpo_defaults
    from distreward.train import DEFAULTS as base_defaults

    for command, trainer_defaults in (("finetune", grpo_defaults), ("merge", merge_defaults),
                                      ("train-base", base_defaults)):
        assert OmegaConf.to_container(validate(command, None)) == trainer_defaults == defaults(command)
    assert grpo_defaults["rl"]["group_size"] == 8 and merge_defaults["sampler"]["method"] == "heun"


def test_types_are_applied_and_free_form_keys_stay_free():
    cfg = validate("merge", {"rl": {"lr": 1}, "model": {"kwargs": {"anything": [1, "x"], "nested": {"k": None}}}})
    assert cfg.rl.lr == 1.0 and isinstance(cfg.rl.lr, float)
    assert OmegaConf.to_container(cfg.model.kwargs) == {"anything": [1, "x"], "nested": {"k": None}}
    assert "vae" not in cfg.model and "schedule" not in cfg.sampler                  # optional keys stay absent
    with pytest.raises(ConfigError, match=r"^unknown config key model\.vae\.pth \(did you mean model\.vae\.path\?\)$"):
        validate("merge", {"model": {"vae": {"pth": "x"}}})
    cfg.extra = 1                                                                    # the trainers add keys


def test_a_reward_object_of_the_caller_frees_the_reward_section():
    cfg = validate("finetune", {"reward": {"name": "brightness", "target": 0.3}}, own_reward=True)
    assert cfg.reward.name == "brightness" and cfg.reward.target == 0.3
    # the section only names the caller's reward (benchmarks/rl_diagnostics.py: a preset's keys with another name)
    cfg = validate("finetune", load_config("fmnist_grpo", ["reward.name=classifier"]), own_reward=True)
    assert cfg.reward.mode == "fast"
    with pytest.raises(ConfigError, match=r"^config key reward\.reference_size: value 'x' is not an int$"):
        validate("finetune", {"reward": {"name": "mine", "reference_size": "x"}}, own_reward=True)
    with pytest.raises(ConfigError, match=r"^reward\.name: 'brightness' is not allowed"):
        validate("finetune", {"reward": {"name": "brightness"}})
    with pytest.raises(ConfigError, match=r"^reward\.credit: 'group'"):     # a known reward keeps its checks
        validate("finetune", {"reward": {"name": "distribution", "credit": "group"}}, own_reward=True)


def test_choices_match_the_code_they_feed():
    from distreward.models import ARCHS
    from distreward.models.vae import CONVENTIONS
    from distreward.reward.reference import CREDITS, MODES
    from distreward.schema import ARCHS as S_ARCHS, REWARD_CREDITS, REWARD_MODES, VAE_CONVENTIONS

    assert set(S_ARCHS) == set(ARCHS) and set(VAE_CONVENTIONS) == set(CONVENTIONS)
    assert tuple(REWARD_MODES) == tuple(MODES) and tuple(REWARD_CREDITS) == tuple(CREDITS)


def test_ema_std_limit_matches_the_power_ema():
    """The schema's EMA std bound is the power EMA's; a std at the bound fails in both places."""
    from distreward.schema.keys import EMA_STD_MAX, check_export_std
    from distreward.train.ema import MAX_SIGMA_REL, sigma_rel_to_gamma

    assert EMA_STD_MAX == MAX_SIGMA_REL
    assert check_export_std(MAX_SIGMA_REL) is not None and check_export_std(0.999 * MAX_SIGMA_REL) is None
    sigma_rel_to_gamma(0.999 * MAX_SIGMA_REL)
    with pytest.raises(ValueError, match=r"\(0, 0\.28\)"):
        sigma_rel_to_gamma(MAX_SIGMA_REL)


def test_trainers_refuse_a_bad_config_before_any_work(tmp_path):
    from distreward.merge import run_merge
    from distreward.rl import finetune
    from distreward.train import train_base

    for name, call in (("grpo", lambda d: finetune({"rl": {"itrations": 3}}, d)),
                       ("merge", lambda d: run_merge({"checkpoint": {"every": 0}}, d)),
                       ("base", lambda d: train_base({"train": {"batch": "x"}}, d))):
        with pytest.raises(ConfigError):
            call(tmp_path / name)
        assert not (tmp_path / name).exists(), name


def test_cli_names_the_key_and_writes_nothing(tmp_path, capsys):
    from distreward.cli import main

    run = tmp_path / "run"
    assert main(["train-base", "--config", BASE, "--run-dir", str(run), "train.bach=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("unknown config key train.bach (did you mean train.batch?)") and "\n" not in err
    assert not run.exists()


def test_docs_table_is_current():
    text = (Path(__file__).resolve().parents[1] / "docs" / "configs.md").read_text()
    assert text == markdown(), "regenerate it: python -m distreward.schema > docs/configs.md"
    for k in ("`rl.group_size`", "`merge.init`", "`ema.export_std`", "`dry_run`", "`model.vae.convention`"):
        assert k in text
