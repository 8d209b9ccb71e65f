"""FID Inception-v3 against pytorch-fid's outputs (golden fixtures), its weight readers and the registry factory."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from distreward.features import get_feature_network
from distreward.features.inception import (FIDInceptionV3, InceptionFeatures, _tf_layout_names, build_fid_inception,
                                           load_inception)
from distreward.utils.safe_pickle import UnsafePickleError

import _fixtures  # noqa: E402

ATOL = RTOL = 1e-4


def fixtures_dir() -> Path | None:
    p = _fixtures.fixtures_dir()
    return p if p.is_dir() else None


def _key_files() -> list[Path]:
    d = fixtures_dir()
    return sorted(d.glob("fid_inception*.keys.json")) if d else []


def fill_from_keys(rows: list[dict], seed: int) -> dict[str, torch.Tensor]:
    """The fixtures' deterministic fill (fixtures/README.md): one seeded randn draw per key, in list order."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    out = {}
    for row in rows:
        name, shape = row["name"], row["shape"]
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros(shape, dtype=torch.int64)
            continue
        r = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith("running_mean"):
            v = 0.1 * r
        elif name.endswith("running_var"):
            v = 1.0 + 0.1 * r.abs()
        elif name.endswith(".bias"):
            v = 0.1 * r
        elif name.endswith(".weight") and len(shape) >= 2:
            v = r * math.sqrt(2.0 / math.prod(shape[1:]))
        elif name.endswith(".weight") or name.endswith(".gamma"):
            v = 1.0 + 0.1 * r
        else:
            v = r
        out[name] = v
    return out


def check_fill(rows: list[dict], sd: dict[str, torch.Tensor]) -> None:
    for row in rows:
        t = sd[row["name"]]
        assert math.isclose(float(t.double().sum()), row["fill_sum"], rel_tol=1e-9, abs_tol=1e-9), row["name"]
        assert float(t.reshape(-1)[0]) == row["fill_first"], row["name"]


@pytest.fixture(scope="module", params=_key_files() or [None], ids=lambda p: p.stem if p else "none")
def filled(request):
    """(keys json, filled checkpoint-format state_dict, net loaded strictly, io tensors) per fixture set."""
    if request.param is None:
        pytest.skip(_fixtures.missing_reason("fid_inception*"))
    from safetensors.torch import load_file

    meta = json.loads(request.param.read_text())
    sd = fill_from_keys(meta["checkpoint_format"], meta["fill_seed"])
    net = FIDInceptionV3().eval()
    net.load_state_dict(sd, strict=True)
    io_path = request.param.with_name(request.param.name.replace(".keys.json", ".io.safetensors"))
    return meta, sd, net, load_file(io_path)


def test_state_dict_names_shapes_dtypes_in_order(filled):
    meta, _, net, _ = filled
    ours = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in net.state_dict().items()]
    theirs = [(r["name"], r["shape"], r["dtype"]) for r in meta["checkpoint_format"]]
    assert ours == theirs
    unused = set(meta.get("checkpoint_keys_unused_by_pool3_features", []))
    assert unused <= {k for k, _, _ in theirs}


def test_fill_checksums(filled):
    meta, sd, _, _ = filled
    check_fill(meta["checkpoint_format"], sd)


@torch.no_grad()
def test_pool3_matches_pytorch_fid(filled):
    _, _, net, tensors = filled
    outputs = [k for k in tensors if k.startswith("pool_")]
    assert outputs, "no pool_* outputs in the io file"
    for out_key in outputs:
        tag = out_key[len("pool_"):]
        images = tensors[f"images_uint8_{tag}"]
        assert images.dtype == torch.uint8
        feats = net(images.to(torch.float32) / 255)
        assert feats.shape == tensors[out_key].shape
        print(f"fid-inception pool_{tag}: max |ours - pytorch-fid| = {(feats - tensors[out_key]).abs().max():.2e}")
        torch.testing.assert_close(feats, tensors[out_key], atol=ATOL, rtol=RTOL, msg=f"pool_{tag}")
    assert set(tensors) == set(outputs) | {f"images_uint8_{k[len('pool_'):]}" for k in outputs}


@torch.no_grad()
def test_strict_load_without_num_batches_tracked(filled):
    meta, sd, net, tensors = filled
    sd2 = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(sd2) < len(sd)
    net2 = FIDInceptionV3().eval()
    net2.load_state_dict(sd2, strict=True)
    x = tensors[sorted(k for k in tensors if k.startswith("images_uint8_"))[0]][:1].float() / 255
    torch.testing.assert_close(net2(x), net(x), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        FIDInceptionV3().load_state_dict({k: v for k, v in sd.items() if k != "fc.bias"})


@torch.no_grad()
def test_project_wrapper_range_and_gray(filled):
    _, _, net, _ = filled
    wrapped = InceptionFeatures(net).eval()
    assert wrapped.dim == 2048
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(1, 3, 24, 24, generator=g) * 2 - 1
    gray = torch.rand(1, 1, 24, 24, generator=g) * 2 - 1
    x = torch.cat([rgb, gray.repeat(1, 3, 1, 1)])
    feats = wrapped(x)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, net((x + 1) / 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(wrapped(gray), feats[1:], atol=0, rtol=0)
    with pytest.raises(ValueError, match="expected \\[-1, 1\\]"):
        wrapped(x * 100)
    with pytest.raises(ValueError, match="1- or 3-channel"):
        wrapped(torch.zeros(1, 2, 8, 8))


# --- weight files ---------------------------------------------------------------------------------------------

def test_missing_weights_error_names_file_url_and_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTREWARD_WEIGHTS", str(tmp_path))
    for call in (lambda: load_inception(None), lambda: get_feature_network("inception")):
        with pytest.raises(FileNotFoundError) as e:
            call()
        msg = str(e.value)
        assert "pt_inception-2015-12-05" in msg and "https://" in msg and "--weights" in msg and str(tmp_path) in msg
    monkeypatch.delenv("DISTREWARD_WEIGHTS")
    with pytest.raises(FileNotFoundError, match="DISTREWARD_WEIGHTS"):
        load_inception(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_inception(tmp_path / "nope.pth")


def _assert_same_weights(net: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    got = net.state_dict()
    assert list(got) == list(sd)
    for k, v in got.items():
        torch.testing.assert_close(v, sd[k], atol=0, rtol=0, msg=k)


def test_load_pth_file_and_weights_folder(filled, tmp_path, monkeypatch):
    _, sd, _, _ = filled
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path)
    net = load_inception(path)
    assert isinstance(net, InceptionFeatures) and net.dim == 2048 and not net.training
    _assert_same_weights(net.net, sd)
    monkeypatch.setenv("DISTREWARD_WEIGHTS", str(tmp_path))
    net2 = get_feature_network("inception")
    assert net2.dim == 2048 and not any(p.requires_grad for p in net2.parameters())
    _assert_same_weights(net2.net, sd)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an FID Inception-v3 checkpoint"):
        load_inception(tmp_path / "bad.pth")


# --- StyleGAN/EDM2 layout (TF names), read as data ------------------------------------------------------------------

def _to_tf_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the reader's renaming: torchvision names -> TF layout (`layers.<block>.<path>.{weight,...}`)."""
    inverse = {tv: tf for tf, tv in _tf_layout_names().items()}
    out = {"output.weight": sd["fc.weight"], "output.bias": sd["fc.bias"]}
    for tv, tf in inverse.items():
        block, _, path = tf[len("layers."):].partition(".")
        m = re.fullmatch(r"(tower(?:_\d)?)_(mixed_)?(conv(?:_\d)?)", path)
        if m:  # tower_1_mixed_conv_1 -> tower_1.mixed.conv_1
            path = m.group(1) + (".mixed." if m.group(2) else ".") + m.group(3)
        tf = f"layers.{block}.{path}" if path else f"layers.{block}"
        out[f"{tf}.weight"] = sd[f"{tv}.conv.weight"]
        out[f"{tf}.beta"] = sd[f"{tv}.bn.bias"]
        out[f"{tf}.mean"] = sd[f"{tv}.bn.running_mean"]
        out[f"{tf}.var"] = sd[f"{tv}.bn.running_var"]
    return out


class _Node(torch.nn.Module):
    pass


def _torchscript_bytes(flat: dict[str, torch.Tensor]) -> bytes:
    root = _Node()
    for name, t in flat.items():
        *path, leaf = name.split(".")
        m = root
        for p in path:
            if not hasattr(m, p):
                m.add_module(p, _Node())
            m = getattr(m, p)
        m.register_buffer(leaf, t.clone())
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(root), buf)
    return buf.getvalue()


class _PersistentStub:
    """Pickles as an NVlabs persistence record: torch_utils.persistence._reconstruct_persistent_obj(meta)."""

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


def _persistence_pickle(state: dict, monkeypatch) -> bytes:
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    meta = dict(type="class", version=6, class_name="InceptionV3", state=state,
                module_src="raise SystemExit('embedded source must never run')\n")
    return pickle.dumps(_PersistentStub(meta), protocol=4)


@pytest.fixture(scope="module")
def tf_expected(filled):
    """The filled weights with BatchNorm scale 1: the TF graph has none, so the StyleGAN/EDM2 files carry none."""
    _, sd, _, _ = filled
    return {k: (torch.ones_like(v) if k.endswith("bn.weight") else v) for k, v in sd.items()}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save, used only to write test files
@pytest.mark.parametrize("variant", ["torchscript_pt", "pkl_embedding_torchscript", "pkl_module_state"])
def test_stylegan_edm2_layout_files(tf_expected, variant, tmp_path, monkeypatch):
    sd1 = tf_expected
    tf = _to_tf_layout(sd1)
    assert len(tf) == 2 + 4 * 94  # output.{weight,bias} + weight/beta/mean/var of each conv
    if variant == "torchscript_pt":
        path = tmp_path / "inception-2015-12-05.pt"
        path.write_bytes(_torchscript_bytes(tf))
    else:
        if variant == "pkl_embedding_torchscript":
            state = {"training": False, "_scripted": _torchscript_bytes(tf)}
        else:  # nn.Module-like __dict__: nested _modules / _parameters / _buffers
            state = {"training": False, "_parameters": {}, "_buffers": {}, "_modules": {}}
            for name, t in tf.items():
                *path_, leaf = name.split(".")
                node = state
                for p in path_:
                    node = node["_modules"].setdefault(p, {"_parameters": {}, "_buffers": {}, "_modules": {}})
                node["_buffers" if leaf in ("mean", "var") else "_parameters"][leaf] = t
        path = tmp_path / "inception-2015-12-05.pkl"
        path.write_bytes(_persistence_pickle(state, monkeypatch))
    _assert_same_weights(build_fid_inception(path), sd1)


def test_stylegan_pkl_with_foreign_global_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(pickle.dumps({"net": Evil()}))
    with pytest.raises(UnsafePickleError, match="getcwd"):
        build_fid_inception(path)
