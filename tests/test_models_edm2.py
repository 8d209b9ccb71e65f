"""EDM2 against the outputs of the official code (fixtures), official-pickle loading without code execution, sizes."""

from __future__ import annotations

import collections
import copy
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from distreward.models.edm2 import EDM2_CONFIGS, Precond, edm2_config, load_pkl
from distreward.utils.safe_pickle import EasyDict, PersistentObject, UnsafePickleError

ATOL = RTOL = 1e-4


from _fixtures import fixture_configs, load_fixture  # noqa: E402


CONFIGS = fixture_configs("edm2")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_with_unet_output(net: Precond, io: dict):
    """D_x, logvar, the raw U-Net output F_x (forward hook) and the unconditional D_x."""
    captured = []
    hook = net.unet.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        with torch.no_grad():
            out, logvar = net(io["x"], io["sigma"], io["class_labels"], return_logvar=True)
            out_uncond = net(io["x"], io["sigma"], None)
    finally:
        hook.remove()
    return out, logvar, captured[0], out_uncond


@pytest.mark.parametrize("cfg", CONFIGS)
def test_state_dict_layout_matches_official(cfg):
    kwargs, keys, sd, _ = load_fixture(cfg)
    net = Precond(**kwargs)
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
def test_outputs_match_official(cfg):
    kwargs, _, sd, io = load_fixture(cfg)
    net = Precond(**kwargs).eval()
    net.load_state_dict(sd, strict=True)
    out, logvar, F_x, out_uncond = run_with_unet_output(net, io)
    torch.testing.assert_close(F_x, io["F_x"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out, io["out"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out_uncond, io["out_uncond"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logvar, io["logvar"], atol=ATOL, rtol=RTOL)
    assert out.dtype == torch.float32 and logvar.shape == (len(io["x"]), 1, 1, 1)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_eval_forward_leaves_weights_alone_and_training_normalises(cfg):
    kwargs, _, sd, io = load_fixture(cfg)
    net = Precond(**kwargs).eval()
    net.load_state_dict(sd, strict=True)
    with torch.no_grad():
        net(io["x"], io["sigma"], io["class_labels"])
    torch.testing.assert_close(net.unet.out_conv.weight, sd["unet.out_conv.weight"], atol=0, rtol=0)
    net.train()
    with torch.no_grad():
        net(io["x"], io["sigma"], io["class_labels"])  # forced weight normalisation (EDM2 Eq. 66)
    w = net.unet.out_conv.weight.flatten(1)
    norms = w.norm(dim=1) / np.sqrt(w.shape[1])
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-3, rtol=0)


# --- a pickle stream with the structure of an official EDM2 snapshot ----------------------------------------------
# training_loop.py writes dnnlib.EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=net.to(float16));
# every network class is a torch_utils.persistence object: pickled as _reconstruct_persistent_obj(meta) with
# meta = {type, version, module_src, class_name, state}; state is the module __dict__ incl. _init_args/_init_kwargs.

PERSISTENT = {"Precond", "UNet", "Block", "MPConv", "MPFourier"}


def fake_official_modules(monkeypatch):
    """Register stand-in modules under the official global names, only so that pickle can write those names."""
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the official reconstruct function must never be called")

    persistence = types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    torch_utils = types.ModuleType("torch_utils")
    torch_utils.persistence = persistence
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    dnnlib = types.ModuleType("dnnlib")
    dnnlib.util, dnnlib.EasyDict = util, util.EasyDict
    for mod in (torch_utils, persistence, dnnlib, util):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return persistence._reconstruct_persistent_obj, util.EasyDict


class Persistent:
    def __init__(self, reconstruct, class_name, state, module_src):
        self.reconstruct, self.class_name, self.state, self.module_src = reconstruct, class_name, state, module_src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return self.reconstruct, (meta,)


def plain_module(cls, state):
    """A torch.nn container (ModuleDict) whose __dict__ is `state`; pickles as NEWOBJ(cls) + BUILD(state)."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def as_official(module, reconstruct, module_src, init_kwargs=None):
    state = module.__getstate__()  # what pickle stores for an nn.Module: its __dict__
    state["_modules"] = collections.OrderedDict(
        (n, None if m is None else as_official(m, reconstruct, module_src)) for n, m in module._modules.items())
    name = type(module).__name__
    if name in PERSISTENT:
        state["_init_args"], state["_init_kwargs"] = (), dict(init_kwargs or {})
        return Persistent(reconstruct, name, state, module_src)
    return plain_module(type(module), state)


def official_like_pickle(monkeypatch, net, init_kwargs, marker: Path, ema_class=None, extra_state=None) -> bytes:
    reconstruct, EasyDictCls = fake_official_modules(monkeypatch)
    src = f"open({str(marker)!r}, 'w').write('executed')\n"  # would leave a file behind if anything ran it
    ema = as_official(net, reconstruct, src, init_kwargs)
    if ema_class:
        ema.class_name = ema_class
    if extra_state:
        ema.state.update(extra_state)
    data = EasyDictCls(
        encoder=Persistent(reconstruct, "StabilityVAEEncoder",
                           dict(vae_name="stabilityai/sd-vae-ft-mse", scale=np.float32([0.12, 0.1, 0.13, 0.15]),
                                bias=np.float32([-0.7, -0.35, -0.02, 0.33]), batch_size=8, _vae=None,
                                _init_args=(), _init_kwargs={}), src),
        dataset_kwargs=EasyDictCls(class_name="training.dataset.ImageFolderDataset", path="img512-sd.zip",
                                   use_labels=True, cache=True),
        loss_fn=Persistent(reconstruct, "EDM2Loss", dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5, _init_args=(),
                                                          _init_kwargs=dict(P_mean=-0.4, P_std=1.0)), src))
    data["ema"] = ema
    return pickle.dumps(data)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_load_pkl_official_structure(cfg, dtype, tmp_path, monkeypatch):
    kwargs, _, sd, io = load_fixture(cfg)
    ref = Precond(**kwargs).eval()
    ref.load_state_dict(sd, strict=True)
    snapshot = copy.deepcopy(ref).requires_grad_(False).to(dtype)  # the official snapshot stores float16
    marker = tmp_path / "marker"
    blob = official_like_pickle(monkeypatch, snapshot, kwargs, marker)
    for name in (b"torch_utils.persistence", b"_reconstruct_persistent_obj", b"dnnlib.util", b"EasyDict",
                 b"torch.nn.modules.container", b"ModuleDict", b"_rebuild_parameter", b"_load_from_bytes"):
        assert name in blob
    (tmp_path / "network-snapshot.pkl").write_bytes(blob)
    monkeypatch.undo()  # the stand-in modules are gone: loading must not need them

    net = load_pkl(tmp_path / "network-snapshot.pkl")
    assert isinstance(net, Precond) and not net.training and net.init_kwargs == kwargs
    assert not marker.exists()
    loaded = net.state_dict()
    assert list(loaded) == list(ref.state_dict())
    for k, v in sd.items():
        assert loaded[k].dtype == torch.float32
        torch.testing.assert_close(loaded[k], v.to(dtype).float(), atol=0, rtol=0)
    if dtype == torch.float32:
        out, logvar, F_x, out_uncond = run_with_unet_output(net, io)
        torch.testing.assert_close(out, io["out"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(F_x, io["F_x"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(logvar, io["logvar"], atol=ATOL, rtol=RTOL)

    data = load_pkl(tmp_path / "network-snapshot.pkl", return_dict=True)
    assert isinstance(data, EasyDict) and data.ema.img_resolution == kwargs["img_resolution"]
    assert isinstance(data["encoder"], PersistentObject) and data["encoder"].class_name == "StabilityVAEEncoder"
    assert data["encoder"].state["batch_size"] == 8 and data["encoder"].state["scale"].dtype == np.float32
    assert data["loss_fn"].init_kwargs == {"P_mean": -0.4, "P_std": 1.0}
    assert data.dataset_kwargs.class_name == "training.dataset.ImageFolderDataset"
    assert not marker.exists()


def test_load_pkl_refuses_unknown_network_and_foreign_globals(tmp_path, monkeypatch):
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[], channels_per_head=8)
    net = Precond(**kwargs).eval()
    marker = tmp_path / "marker"
    (tmp_path / "edm1.pkl").write_bytes(official_like_pickle(monkeypatch, net, kwargs, marker, ema_class="EDMPrecond"))
    with pytest.raises(ValueError, match="EDMPrecond"):
        load_pkl(tmp_path / "edm1.pkl")

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "evil.pkl").write_bytes(official_like_pickle(monkeypatch, net, kwargs, marker, extra_state={"x": Evil()}))
    with pytest.raises(UnsafePickleError, match=r"system"):
        load_pkl(tmp_path / "evil.pkl")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_pkl(tmp_path / "missing.pkl")


def test_unconditional_and_fp16_flag_on_cpu():
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4], channels_per_head=8, use_fp16=True)
    net = Precond(**kwargs).eval()
    torch.nn.init.constant_(net.unet.out_gain, 0.7)
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    with torch.no_grad():
        d = net(x, sigma, None)
        d32 = net(x, sigma, None, force_fp32=True)
    assert d.dtype == torch.float32 and torch.equal(d, d32)  # fp16 only applies on CUDA, as officially
    # c_skip x dominates at small sigma: D -> x
    with torch.no_grad():
        d_small = net(x, torch.full((3,), 1e-4), None)
    torch.testing.assert_close(d_small, x, atol=1e-3, rtol=0)


# Published sizes (EDM2 paper, Table 2, ImageNet-512 latent models): XS 125M, S 280M, M 498M, L 777M, XL 1119M,
# XXL 1523M; XS and S to one more digit: 124.7M and 280.2M.
@pytest.mark.parametrize("name,millions", [("XS", 124.7), ("S", 280.2), ("M", 498), ("L", 777), ("XL", 1119),
                                           ("XXL", 1523)])
def test_preset_parameter_counts(name, millions):
    with torch.device("meta"):
        net = Precond(**edm2_config(name))
    n = sum(p.numel() for p in net.parameters()) / 1e6
    assert abs(n - millions) < (0.05 if isinstance(millions, float) else 0.5)
    assert set(EDM2_CONFIGS) == {"XS", "S", "M", "L", "XL", "XXL"}
