"""Per-block merging coefficients (merge.space: blocks): the block groups, the merge, and a run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distreward.merge import GROUPS, CheckpointSet, block_groups, run_merge
from distreward.models import build_network, load_generator
from test_merge import TINY, StubEvaluator, euler_sampler, feature_fn, real_stats, tiny_checkpoints, tiny_cfg

NETWORKS = {
    "unet": TINY,
    "edm2": {"img_resolution": 8, "img_channels": 4, "label_dim": 10, "model_channels": 16, "channel_mult": [1, 2],
             "num_blocks": 1, "attn_resolutions": [4], "channels_per_head": 16},
    "sit": {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 3, "num_heads": 2,
            "num_classes": 10, "learn_sigma": True},
}


@pytest.mark.parametrize("arch", sorted(NETWORKS))
def test_every_tensor_falls_in_one_of_the_three_block_groups(arch):
    names = list(build_network(arch, NETWORKS[arch]).state_dict())
    groups = block_groups(names, arch, NETWORKS[arch])
    assert set(groups) == set(names)
    assert sorted(set(groups.values())) == [0, 1, 2]
    first = {GROUPS[g]: min(i for i, n in enumerate(names) if groups[n] == g) for g in range(3)}
    assert first["middle"] < max(i for i, n in enumerate(names) if groups[n] == 2)   # middle before the last output
    if arch == "sit":   # three blocks: one per group, the embedders with the first, the final layer with the last
        assert [groups[f"blocks.{i}.attn.qkv.weight"] for i in range(3)] == [0, 1, 2]
        assert groups["x_embedder.proj.weight"] == 0 and groups["final_layer.linear.weight"] == 2
    if arch == "edm2":
        assert groups["unet.dec.4x4_in0.conv_res0.weight"] == 1 and groups["unet.dec.4x4_block0.conv_res0.weight"] == 2
        assert groups["unet.enc.8x8_conv.weight"] == 0 and groups["unet.out_conv.weight"] == 2


def test_tensors_outside_the_groups_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="in no block group.*merge.space=global"):
        block_groups(["conv_in.weight", "mid.0.weight", "dec.0.weight", "head.weight"], "unet")
    with pytest.raises(ValueError, match="no tensors in the block group.*middle"):
        block_groups(["conv_in.weight", "dec.0.weight"], "unet")
    with pytest.raises(ValueError, match="know the architectures"):
        block_groups(["a.weight"], "vit")


def test_equal_rows_merge_like_one_global_vector(tmp_path):
    cs = CheckpointSet.open(tiny_checkpoints(tmp_path))
    w = np.array([0.5, -0.2, 0.7])
    glob, blocks = cs.merge(w), cs.merge(np.tile(w, (3, 1)))
    assert glob.keys() == blocks.keys()
    for name in glob:
        assert torch.equal(glob[name], blocks[name]), name


def test_each_block_group_takes_its_own_row(tmp_path):
    paths = tiny_checkpoints(tmp_path)
    cs = CheckpointSet.open(paths)
    sds = [load_file(str(p)) for p in paths]
    w = np.array([[0.0, 0.0, 1.0],      # input blocks from the third checkpoint
                  [1.0, 0.0, 0.0],      # middle from the first
                  [0.25, 0.75, 0.0]])   # output: a mix of the first two
    merged, groups = cs.merge(w), cs.block_groups()
    for name, t in merged.items():
        expect = sum(float(wk) * sd[name].double() for wk, sd in zip(w[groups[name]], sds)).float()
        torch.testing.assert_close(t, expect, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"shape \[2, 3\].*\(3, 3\)"):
        cs.merge(np.ones((2, 3)))


def test_a_per_block_run_searches_one_row_per_group_and_resumes(tmp_path):
    paths = tiny_checkpoints(tmp_path)
    kw = dict(ckpts=CheckpointSet.open(paths), sample_fn=euler_sampler(), feature_fn=feature_fn,
              evaluator=StubEvaluator(), real_stats=real_stats(), progress=False)

    def cfg(iterations=4):
        c = tiny_cfg(iterations=iterations)
        c.merge.space = "blocks"
        return c

    full = run_merge(cfg(), tmp_path / "full", **kw)
    run_merge(cfg(2), tmp_path / "split", **kw)
    resumed = run_merge(cfg(), tmp_path / "split", resume=True, allow_changes=["rl.iterations"], **kw)
    assert resumed["merged"]["w"] == full["merged"]["w"]
    w = np.array(full["merged"]["w"])
    assert w.shape == (3, 3)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)        # each row projected onto sum(w) = 1
    assert not np.allclose(w[0], w[1]) and not np.allclose(w[1], w[2])   # the rows moved apart
    assert full["init"]["w"] == pytest.approx([1 / 3] * 3)        # the start: the uniform soup in every group
    coef = json.loads((tmp_path / "full" / "coefficients.json").read_text())
    assert coef["space"] == "blocks" and np.array(coef["std"]).shape == (3, 3)
    net = load_generator(tmp_path / "full" / "merged.safetensors")
    ref = CheckpointSet.open(paths).merge(coef["weights"])
    for name, t in net.state_dict().items():
        assert torch.equal(t, ref[name])
    with pytest.raises(ValueError, match="merge.space: blocks -> global"):
        run_merge(tiny_cfg(iterations=6), tmp_path / "full", resume=True, allow_changes=["rl.iterations"], **kw)
