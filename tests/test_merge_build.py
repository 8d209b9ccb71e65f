"""run_merge builds every part it is not given from the config, through one builder (merge.inputs.merge_parts):
the sampler's guidance (model.cfg_scale) and latent decoding (model.vae), and the reward's feature weights
(reward.weights). Each run is compared with the same run given that part built by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distreward.build import build_codec
from distreward.features import register_features
from distreward.merge import CheckpointSet, resolve, run_merge
from distreward.merge.inputs import ode_sampler
from distreward.sampling import sigma_schedule
from test_merge import StubEvaluator, feature_fn, real_stats, tiny_checkpoints, tiny_cfg


class Recorder:
    """A feature function that keeps every image batch it is given (what the run sampled), features as test_merge's."""

    def __init__(self):
        self.images = []

    def __call__(self, images):
        self.images.append(images.clone())
        return feature_fn(images[:, :1, :8, :8])


class CropEvaluator(StubEvaluator):
    """test_merge's stub evaluator on the first channel's top-left 8 x 8 pixels (any image size)."""

    def evaluate(self, images):
        return super().evaluate(images[:, :1, :8, :8])


def run(tmp_path, name, cfg, **parts):
    kw = {"evaluator": CropEvaluator(), "real_stats": real_stats(), "progress": False, **parts}
    return run_merge(cfg, tmp_path / name, **kw)


def sampled(tmp_path, name, cfg, **parts) -> list[torch.Tensor]:
    rec = Recorder()
    run(tmp_path, name, cfg, feature_fn=rec, **parts)
    return rec.images


STEPS = 4


def with_model(iterations=1, **model):
    """test_merge's tiny config with a 4-step Heun sampler and these model keys."""
    cfg = tiny_cfg(iterations=iterations)
    cfg.sampler.steps = STEPS
    for k, v in model.items():
        cfg.model[k] = v
    return resolve(cfg)


def test_run_merge_samples_with_the_configs_guidance(tmp_path):
    ckpts = CheckpointSet.open(tiny_checkpoints(tmp_path))
    guided = with_model(cfg_scale=3.0)
    by_hand = ode_sampler("unet", sigma_schedule(STEPS), method="heun", batch_size=500, cfg_scale=3.0, null_label=2)
    built = sampled(tmp_path, "built", guided, ckpts=ckpts)
    given = sampled(tmp_path, "given", guided, ckpts=ckpts, sample_fn=by_hand)
    plain = sampled(tmp_path, "plain", with_model(), ckpts=ckpts)
    assert len(built) == len(given) == len(plain)
    assert all(torch.equal(a, b) for a, b in zip(built, given))
    assert not torch.equal(built[0], plain[0])                   # guidance changes the samples


VAE = {"config": {"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4}}
LATENT = {"img_resolution": 8, "img_channels": 4, "num_classes": 2, "model_channels": 4, "channel_mult": [1, 2],
          "num_blocks": 1, "attn_resolutions": [], "num_heads": 1}


def test_run_merge_decodes_a_latent_model_with_the_configs_vae(tmp_path):
    pytest.importorskip("diffusers")
    ckpts = CheckpointSet.open(tiny_checkpoints(tmp_path, k=2, kwargs=LATENT))
    cfg = with_model(image_shape=[4, 8, 8], vae=VAE)
    codec = build_codec(cfg.model, "cpu", seed=int(cfg.seed))
    by_hand = ode_sampler("unet", sigma_schedule(STEPS), method="heun", batch_size=500, decode=codec.decode)
    built = sampled(tmp_path, "built", cfg, ckpts=ckpts)
    given = sampled(tmp_path, "given", cfg, ckpts=ckpts, sample_fn=by_hand)
    assert built[0].shape[1:] == (3, 16, 16)                     # decoded RGB, twice the latent's size
    assert float(built[0].abs().max()) <= 1.0
    assert all(torch.equal(a, b) for a, b in zip(built, given))


class ScaledFeatures(torch.nn.Module):
    """Test features whose scale comes from the weight file (tensor "scale")."""

    def __init__(self, scale: float):
        super().__init__()
        self.dim, self.scale = 6, torch.nn.Parameter(torch.tensor(float(scale)), requires_grad=False)

    def forward(self, images):
        return self.scale * torch.from_numpy(feature_fn(images)).float()


def scaled_features(weights, device):
    return ScaledFeatures(1.0 if weights is None else float(load_file(str(weights))["scale"]))


register_features("test-scaled", scaled_features)


def test_run_merge_loads_the_reward_network_from_reward_weights(tmp_path):
    ckpts = CheckpointSet.open(tiny_checkpoints(tmp_path))
    weights = tmp_path / "scale3.safetensors"
    save_file({"scale": torch.tensor(3.0)}, str(weights))

    def cfg(**reward):
        c = with_model(iterations=2)
        c.reward.features = "test-scaled"
        for k, v in reward.items():
            c.reward[k] = v
        return resolve(c)

    def rewards(res):
        return [h["r_mean"] for h in res["history"]]

    from_file = run(tmp_path, "file", cfg(weights=str(weights)), ckpts=ckpts)
    by_hand = run(tmp_path, "hand", cfg(), ckpts=ckpts, feature_fn=lambda im: 3.0 * feature_fn(im))
    default = run(tmp_path, "default", cfg(), ckpts=ckpts)
    assert np.allclose(rewards(from_file), rewards(by_hand), rtol=1e-5)
    assert not np.allclose(rewards(from_file), rewards(default), rtol=1e-3)
