"""The merge trainer's inputs (merge/inputs.py): checkpoint files holding the same weights are used once."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

from distreward.merge.inputs import distinct_inputs, open_checkpoints  # noqa: E402
from distreward.models import save_generator  # noqa: E402

from _unet32 import KW, tiny_unet  # noqa: E402


def test_merge_inputs_with_equal_weights_are_used_once(tmp_path, capsys):
    a, b = tiny_unet(0), tiny_unet(1)
    pa = save_generator(tmp_path / "a.safetensors", a, "unet", KW, extra={"note": "first"})
    pb = save_generator(tmp_path / "b.safetensors", b, "unet", KW)
    pa2 = save_generator(tmp_path / "a_again.safetensors", a, "unet", KW, extra={"note": "other metadata"})
    assert pa.read_bytes() != pa2.read_bytes()                          # the same weights, other files
    near = {k: v.clone() for k, v in a.state_dict().items()}
    first = next(k for k, v in near.items() if v.is_floating_point())
    near[first].view(-1)[0] += 1e-6                                      # one value differs: a distinct input
    pn = save_generator(tmp_path / "near.safetensors", a, "unet", KW, state_dict=near)

    kept = distinct_inputs([pa, pb, pn, pa2])
    assert kept == [pb, pn, pa2]                                         # the last copy keeps its place
    err = capsys.readouterr().err
    assert "a.safetensors dropped" in err and "a_again.safetensors" in err
    cfg = OmegaConf.create({"checkpoints": [str(pa), str(pb), str(pa2), str(pa2)], "snapshots": None})
    ckpts = open_checkpoints(cfg)
    assert ckpts.paths == [pb, pa2]
    # the uniform soup is the mean of the distinct weights
    soup = ckpts.merge(np.full(ckpts.k, 1.0 / ckpts.k))
    want = (load_file(pb)[first].double() + load_file(pa2)[first].double()) / 2
    assert torch.allclose(soup[first].double(), want, atol=1e-7)
