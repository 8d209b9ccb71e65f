"""The richer merging spaces of benchmarks/merge_headroom.py: block mixing and noise-level switching."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from distreward.merge import block_groups
from distreward.models import build_network

_spec = importlib.util.spec_from_file_location("merge_headroom",
                                               Path(__file__).parents[1] / "benchmarks" / "merge_headroom.py")
headroom = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(headroom)

KWARGS = {"img_resolution": 8, "img_channels": 1, "num_classes": 2, "model_channels": 4, "channel_mult": [1, 2],
          "num_blocks": 1, "attn_resolutions": [4], "num_heads": 1}


def test_block_mix_takes_each_group_from_its_anchor():
    sds = {name: {k: torch.full_like(v, i, dtype=torch.float32) for k, v in
                  build_network("unet", KWARGS).state_dict().items()} for i, name in enumerate(["a", "b", "c"])}
    groups = block_groups(sds["a"], "unet")
    mixed = headroom.block_mix(sds, {"input": "c", "middle": "a", "output": "b"}, groups)
    want = [2.0, 0.0, 1.0]
    assert mixed.keys() == sds["a"].keys()
    for name, t in mixed.items():
        assert torch.all(t == want[groups[name]]), name


def test_switch_uses_the_high_model_above_the_edge_per_sample():
    def const(value):
        return lambda x, sigma, labels=None: torch.full_like(x, value)

    sw = headroom.Switch(const(1.0), const(-1.0), edge=0.5)
    x = torch.zeros(4, 1, 2, 2)
    sigma = torch.tensor([0.9, 0.5, 0.2, 0.7])
    out = sw(x, sigma, torch.tensor([0, 1, 0, 1]))
    assert out[:, 0, 0, 0].tolist() == [1.0, -1.0, -1.0, 1.0]        # sigma = edge belongs to the low model
    assert torch.all(sw(x, torch.full((4,), 0.8)) == 1.0)
    assert torch.all(sw(x, torch.full((4,), 0.1)) == -1.0)
