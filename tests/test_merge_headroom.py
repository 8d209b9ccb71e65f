"""The richer merging spaces of distreward.merge.headroom: block assignments, noise-level switching, anchors."""

from __future__ import annotations

import numpy as np
import torch

from distreward.merge import CheckpointSet, headroom
from distreward.models import build_network, save_generator
from test_merge import TINY, tiny_checkpoints

def test_block_weights_take_each_group_from_its_anchor(tmp_path):
    paths = []
    for i in range(3):      # anchor files whose every float tensor holds the anchor's index
        net = build_network("unet", TINY)
        with torch.no_grad():
            for t in net.parameters():
                t.fill_(float(i))
        paths.append(save_generator(tmp_path / f"anchor{i}.safetensors", net, "unet", TINY))
    cs = CheckpointSet.open(paths)
    anchor_w = {name: np.eye(3)[i] for i, name in enumerate(["a", "b", "c"])}
    w = headroom.block_weights(anchor_w, {"input": "c", "middle": "a", "output": "b"})
    assert w.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    mixed, groups = cs.merge(w), cs.block_groups()
    want = [2.0, 0.0, 1.0]
    for name in groups:
        assert torch.all(mixed[name] == want[groups[name]]), name


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


def test_anchors_of_checkpoints_are_the_first_the_last_and_the_uniform_soup(tmp_path):
    paths = tiny_checkpoints(tmp_path, k=4)
    ckpts, anchor_w = headroom.anchors(checkpoints=paths)
    assert ckpts.k == 4 and list(anchor_w) == ["first", "last", "uniform"]
    assert anchor_w["first"].tolist() == [1, 0, 0, 0] and anchor_w["last"].tolist() == [0, 0, 0, 1]
    assert anchor_w["uniform"].tolist() == [0.25] * 4
