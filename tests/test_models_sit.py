"""SiT against the outputs of the official code (fixtures), checkpoint loading, preset sizes."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from distreward.models.sit import SIT_CONFIGS, SiT, get_2d_sincos_pos_embed, load_sit, sit_config

ATOL = RTOL = 1e-4


from _fixtures import fixture_configs, fixtures_dir, load_fixture  # noqa: E402


CONFIGS = fixture_configs("sit")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_state_dict_layout_matches_official(cfg):
    kwargs, keys, sd, _ = load_fixture(cfg)
    net = SiT(**kwargs)
    ours = net.state_dict()
    assert [k["name"] for k in keys] == list(ours)
    params = dict(net.named_parameters())
    for k in keys:
        assert list(ours[k["name"]].shape) == k["shape"], k["name"]
        assert str(ours[k["name"]].dtype).removeprefix("torch.") == k["dtype"]
        kind = "buffer" if k["name"] not in params else \
            "parameter" if params[k["name"]].requires_grad else "parameter(requires_grad=False)"
        assert kind == k["kind"], k["name"]
    net.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_sincos_table_matches_official(cfg):
    kwargs, _, sd, _ = load_fixture(cfg)
    grid = kwargs["input_size"] // kwargs["patch_size"]
    table = torch.from_numpy(get_2d_sincos_pos_embed(kwargs["hidden_size"], grid)).float()[None]
    torch.testing.assert_close(table, sd["pos_embed"], atol=1e-6, rtol=0)
    torch.testing.assert_close(SiT(**kwargs).pos_embed.data, sd["pos_embed"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_and_cfg_match_official(cfg):
    kwargs, _, sd, io = load_fixture(cfg)
    net = SiT(**kwargs).eval()
    net.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = net(io["x"], io["t"], io["y"])
        out_cfg = net.forward_with_cfg(io["x_cfg"], io["t_cfg"], io["y_cfg"], float(io["cfg_scale"]))
    assert out.shape == io["out"].shape and out.shape[1] == kwargs["in_channels"]
    torch.testing.assert_close(out, io["out"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out_cfg, io["out_cfg"], atol=ATOL, rtol=RTOL)
    # the null label is a real embedding row: changing it to a class changes the output
    null = io["y"] == net.null_label
    if kwargs["class_dropout_prob"] > 0 and null.any():
        with torch.no_grad():
            changed = net(io["x"], io["t"], torch.where(null, 0, io["y"]))
        assert not torch.allclose(changed[null], out[null], atol=1e-3)
        torch.testing.assert_close(changed[~null], out[~null])


@pytest.mark.parametrize("cfg", CONFIGS)
def test_load_sit_formats_and_inference(cfg, tmp_path):
    kwargs, _, sd, io = load_fixture(cfg)
    heads = kwargs["num_heads"]
    expect = {k: kwargs[k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                     "num_classes", "learn_sigma", "mlp_ratio")}
    if kwargs["class_dropout_prob"] == 0:  # no null row: the class count cannot be told from the table alone
        expect["num_classes"] -= 1

    # plain state_dict (as the released SiT-XL-2-256x256.pt)
    torch.save(sd, tmp_path / "plain.pt")
    net = load_sit(tmp_path / "plain.pt", num_heads=heads)
    assert not net.training
    assert {k: net.sit_kwargs[k] for k in expect} == expect and net.sit_kwargs["num_heads"] == heads
    with torch.no_grad():
        torch.testing.assert_close(net(io["x"], io["t"], io["y"]), io["out"], atol=ATOL, rtol=RTOL)

    # train.py checkpoint: the ema weights are preferred over the raw model
    model_sd = {k: v + 1.0 if v.is_floating_point() and k != "pos_embed" else v for k, v in sd.items()}
    ckpt = {"model": model_sd, "ema": sd, "opt": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(model="SiT-XL/2", image_size=256)}
    torch.save(ckpt, tmp_path / "0010000.pt")
    net = load_sit(tmp_path / "0010000.pt", num_heads=heads)
    with torch.no_grad():
        torch.testing.assert_close(net(io["x"], io["t"], io["y"]), io["out"], atol=ATOL, rtol=RTOL)

    # .safetensors
    net = load_sit(fixtures_dir() / f"{cfg}.state_dict.safetensors", num_heads=heads)
    with torch.no_grad():
        torch.testing.assert_close(net(io["x"], io["t"], io["y"]), io["out"], atol=ATOL, rtol=RTOL)


def test_load_sit_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sit(tmp_path / "missing.pt")
    net = SiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=3)
    save_file(net.state_dict(), str(tmp_path / "small.safetensors"))
    with pytest.raises(ValueError, match="does not match config"):
        load_sit(tmp_path / "small.safetensors", config="SiT-XL/2")
    sd = net.state_dict()
    del sd["final_layer.linear.weight"]
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="final_layer.linear.weight"):
        load_sit(tmp_path / "broken.safetensors", num_heads=2)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state_dict"):
        load_sit(tmp_path / "list.pt")


def test_load_sit_heads_from_named_config(tmp_path):
    kw = sit_config("SiT-S/8", input_size=16, num_classes=5, in_channels=3)
    net = SiT(**kw)
    save_file(net.state_dict(), str(tmp_path / "s8.safetensors"))
    loaded = load_sit(tmp_path / "s8.safetensors", config="SiT-S/8")
    assert loaded.sit_kwargs["num_heads"] == 6 and loaded.blocks[0].attn.num_heads == 6
    assert load_sit(tmp_path / "s8.safetensors").sit_kwargs["num_heads"] == 6  # preset width -> preset heads
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 5])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), net.eval()(x, t, y))


# Published sizes: DiT/SiT paper tables (S 33M, B 130M, L 458M, XL 675M; XL/2 exactly 675,129,632),
# ImageNet-256 latent setting (input 32x32x4, 1000 classes, learn_sigma); the patch size barely changes the count.
@pytest.mark.parametrize("name,millions", [("SiT-S/2", 33), ("SiT-B/2", 130), ("SiT-L/2", 458), ("SiT-XL/2", 675),
                                           ("SiT-XL/4", 675), ("SiT-S/8", 33)])
def test_preset_parameter_counts(name, millions):
    with torch.device("meta"):
        net = SiT(**sit_config(name, input_size=32, num_classes=1000))
    n = sum(p.numel() for p in net.parameters())
    assert abs(n / 1e6 - millions) < 1.0  # the papers round to the million (B/2 is 130.5M)
    if name == "SiT-XL/2":
        assert n == 675_129_632
    assert len(SIT_CONFIGS) == 12
