"""Every preset runs end to end at a tiny size with random weights (`--dry-run`), and the preset plumbing of
distreward.build: generators from official checkpoints, decoding before clamping, feature networks and real
statistics by name/file, the evaluator from eval.features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from distreward.build import (apply_dry_run, build_evaluator, build_generator, feature_network, load_dry_run_config,
                              make_decoder, real_stats_for)
from distreward.cli import main as cli_main
from distreward.config import load_config, repo_path
from distreward.metrics import GaussianStats
from distreward.models import load_generator, read_generator_metadata
from distreward.models.sit import SiT
from distreward.schema import ConfigError, validate
from distreward.sampling import velocity_model
from distreward.utils.checkpoint import load_checkpoint
from distreward.utils.threads import set_threads

set_threads()


def test_sit_preset_dry_run_finetune(tmp_path, monkeypatch):
    """SiT-XL/2 preset: random tiny SiT on 4x8x8 latents, random AutoencoderKL (64 px), random features and
    statistics; the reference set is built from decoded samples; one GRPO iteration, evaluated with the served 10-step Euler ODE (what the reference set holds)."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["finetune", "--config", "sit_xl2_imagenet256", "--dry-run", "--no-progress"]) == 0
    run = tmp_path / "runs" / "sit_xl2_imagenet256_dry_run"
    meta = read_generator_metadata(run / "model_ema.safetensors")
    assert meta["arch"] == "sit" and meta["kwargs"]["hidden_size"] == 32 and meta["kwargs"]["input_size"] == 8
    feats = np.load(run / "base_reference_features.npy")
    assert feats.shape == (16, 8) and np.isfinite(feats).all() and feats.std(0).min() > 0
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    it = [r for r in recs if "r_mean" in r]
    assert len(it) == 1 and np.isfinite(it[0]["fd_ref"]) and it[0]["r_std"] > 0
    evals = [r for r in recs if "eval/fd_reward" in r]
    assert [r["iteration"] for r in evals] == [0, 1] and all(np.isfinite(r["eval/fd_reward"]) for r in evals)
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["iteration"] == 1 and ck["reward"]["reference_set"]["rows"].shape == (16, 8)
    assert (run / "samples" / "ema_0001.png").is_file()
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.dry_run_of == "sit_xl2_imagenet256" and "dry_run" not in saved and saved.model.arch == "sit"


def test_edm2_preset_dry_run_merge(tmp_path, monkeypatch):
    """EDM2-XS preset: 3 random EDM2 checkpoints, EDM's rho schedule with Heun, random VAE decoding, one iteration."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["merge", "--config", "edm2_xs_img512", "--dry-run", "--no-progress"]) == 0
    run = tmp_path / "runs" / "edm2_xs_img512_dry_run"
    coef = json.loads((run / "coefficients.json").read_text())
    assert len(coef["weights"]) == 3 and coef["iterations"] == 1 and sum(coef["weights"]) == pytest.approx(1.0)
    res = json.loads((run / "result.json").read_text())
    fds = [res["baselines"]["last"]["fd_reward"], res["baselines"]["uniform"]["fd_reward"]]
    assert all(np.isfinite(fds)) and fds[0] != fds[1]                # the random inputs really differ
    merged = load_generator(run / "merged.safetensors")
    assert type(merged).__name__ == "Precond" and merged.img_channels == 4


PRESETS = sorted(p.stem for p in repo_path("configs").glob("*.yaml"))
FAST = ("fmnist_grpo_tiny", "fmnist_base_tiny")          # the others' dry runs: the same code, marked slow
PAPER = ("sit_xl2_imagenet256", "edm2_xs_img512")         # run by the tests above
LAST_FILE = {"finetune": "result.json", "merge": "result.json", "train-base": "model.safetensors"}


def command_of(preset: str) -> str:
    """The run command whose schema takes the preset."""
    for command in ("finetune", "merge", "train-base"):
        try:
            validate(command, load_config(preset))
            return command
        except ConfigError:
            pass
    raise AssertionError(f"{preset}: no run command takes it")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_a_dry_run_block_its_command_accepts(preset):
    command = command_of(preset)
    cfg = validate(command, load_dry_run_config(preset))
    assert cfg.dry_run_of == preset and cfg.name == f"{preset}_dry_run"


@pytest.mark.parametrize("preset", [pytest.param(p, marks=() if p in FAST else pytest.mark.slow)
                                    for p in PRESETS if p not in PAPER])
def test_every_preset_dry_runs(preset, tmp_path, monkeypatch):
    """One iteration of tiny random networks, in seconds, from the preset's name alone."""
    command = command_of(preset)
    monkeypatch.chdir(tmp_path)
    assert cli_main([command, "--config", preset, "--dry-run", "--no-progress"]) == 0
    run = tmp_path / "runs" / f"{preset}_dry_run"
    assert (run / LAST_FILE[command]).is_file() and OmegaConf.load(run / "config.yaml").dry_run_of == preset


def test_dry_run_needs_a_block():
    with pytest.raises(ValueError, match="no 'dry_run' block"):
        apply_dry_run(OmegaConf.create({"name": "x"}))


class _RampCodec:
    """decode() returns values past both ends of [-1, 1] and records what it was given."""

    def decode(self, z):
        self.seen = z.clone()
        return 3 * z


def test_latents_are_decoded_before_clamping():
    z = torch.linspace(-2, 2, 16).reshape(1, 1, 4, 4)
    codec = _RampCodec()
    x = make_decoder(codec)(z)
    assert torch.equal(codec.seen, z)                                # latents reach the VAE unclamped
    assert float(x.min()) == -1 and float(x.max()) == 1 and torch.equal(x, (3 * z).clamp(-1, 1))
    assert torch.equal(make_decoder(None)(z), z.clamp(-1, 1))        # pixel models: clamp only


def test_generator_from_an_official_sit_checkpoint(tmp_path):
    torch.manual_seed(0)
    kw = dict(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    ref = SiT(**kw)
    torch.save({"ema": ref.state_dict()}, tmp_path / "sit.pt")          # a train.py-style checkpoint
    cfg = OmegaConf.create({"arch": "sit", "checkpoint": str(tmp_path / "sit.pt"), "config": None})
    net = build_generator(cfg)
    for k, v in ref.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)
    assert net.generator_meta["arch"] == "sit"
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    v = velocity_model(net, "sit")(x, t, torch.tensor([1, 2]))
    assert torch.allclose(v, -ref(x, 1 - t, torch.tensor([1, 2]))[:, :4], atol=1e-6)
    with pytest.raises(FileNotFoundError, match="model.checkpoint"):
        build_generator(OmegaConf.create({"arch": "sit", "checkpoint": str(tmp_path / "missing.pt")}))


def test_features_and_real_statistics_by_name_and_file(tmp_path):
    net = feature_network("random", dim=5)
    assert net.dim == 5 and net(torch.zeros(2, 3, 16, 16)).shape == (2, 5)
    st = GaussianStats.from_features(np.random.default_rng(0).normal(size=(50, 5)))
    st.save(tmp_path / "ref.npz")
    back = real_stats_for("random", tmp_path / "ref.npz", 5)
    np.testing.assert_allclose(back.mu, st.mu)
    with pytest.raises(ValueError, match="dimension 5.*7-d.*distreward stats DATA --features inception"):
        real_stats_for("inception", tmp_path / "ref.npz", 7)
    assert real_stats_for("inception", tmp_path / "ref.npz", None).dim == 5      # a feature function of unknown dim
    with pytest.raises(ValueError, match="no real statistics"):
        real_stats_for("inception", None, 2048)
    cfg = OmegaConf.create({"eval": {"features": ["random"], "real_stats": {"random": str(tmp_path / "ref.npz")}}})
    ev = build_evaluator(cfg, reuse={"random": net})
    assert ev.labels == ["random"] and ev.nets[0] is net
    np.testing.assert_allclose(ev.real_stats[0].sigma, st.sigma)


def test_overrides_win_over_the_dry_run_block():
    cfg = load_dry_run_config("sit_xl2_imagenet256", ["rl.iterations=3", "reward.reference_size=20"])
    assert cfg.rl.iterations == 3 and cfg.reward.reference_size == 20
    assert cfg.model.checkpoint is None and cfg.model.image_shape == [4, 8, 8] and cfg.device == "cpu"
    assert cfg.name == "sit_xl2_imagenet256_dry_run" and "dry_run" not in cfg


def test_edm2_preset_dry_run_merge_with_per_block_coefficients(tmp_path, monkeypatch):
    """The EDM2 network's tensors fall in the three block groups: a per-block merge runs on the preset's dry run."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["merge", "--config", "edm2_xs_img512", "--dry-run", "--no-progress", "merge.space=blocks"]) == 0
    run = tmp_path / "runs" / "edm2_xs_img512_dry_run"
    coef = json.loads((run / "coefficients.json").read_text())
    w = np.array(coef["weights"])
    assert coef["space"] == "blocks" and w.shape == (3, 3)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    merged = load_generator(run / "merged.safetensors")
    assert np.array(merged.generator_meta["extra"]["merge_weights"]).shape == (3, 3)
