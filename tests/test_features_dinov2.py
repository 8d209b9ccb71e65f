"""DINOv2 ViT/14 against the official hub models' outputs (golden fixtures), the project wrapper and the loader."""

from __future__ import annotations

import gc
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distreward.features import get_feature_network
from distreward.features.dinov2 import DinoV2, DinoV2Features, load_dinov2

import _fixtures  # noqa: E402

ATOL = RTOL = 1e-4
SLOW_PARAMS = 100_000_000  # ViT-L (304M) fills ~1.2 GB and takes ~12 s on one core: slow


def fixtures_dir() -> Path | None:
    p = _fixtures.fixtures_dir()
    return p if p.is_dir() else None


def _cases():
    d = fixtures_dir()
    if d is None:
        return [pytest.param(None, marks=pytest.mark.skip(reason=_fixtures.missing_reason("dinov2_*")))]
    cases = []
    for path in sorted(d.glob("dinov2_vit*14.keys.json")):
        rows = json.loads(path.read_text())["keys"]
        n = sum(math.prod(r["shape"]) for r in rows)
        cases.append(pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if n > SLOW_PARAMS else []))
    return cases or [pytest.param(None, marks=pytest.mark.skip(reason=f"no dinov2_*.keys.json in {d}"))]


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
            r.mul_(0.1)
        elif name.endswith("running_var"):
            r = r.abs_().mul_(0.1).add_(1.0)
        elif name.endswith(".bias"):
            r.mul_(0.1)
        elif name.endswith(".weight") and len(shape) >= 2:
            r.mul_(math.sqrt(2.0 / math.prod(shape[1:])))
        elif name.endswith(".weight") or name.endswith(".gamma"):
            r.mul_(0.1).add_(1.0)
        out[name] = r  # in place: no second copy of the ~1.2 GB ViT-L fill
    return out


@torch.no_grad()
@pytest.mark.parametrize("keys_path", _cases())
def test_dinov2_matches_official(keys_path):
    meta = json.loads(keys_path.read_text())
    rows = meta["keys"]
    size = re.fullmatch(r"dinov2_vit(\w)14", keys_path.name.split(".")[0]).group(1)
    with torch.device("meta"):
        net = DinoV2(size)
    ours = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in net.state_dict().items()]
    assert ours == [(r["name"], r["shape"], r["dtype"]) for r in rows]

    sd = fill_from_keys(rows, meta["fill_seed"])
    for row in rows:
        t = sd[row["name"]]
        assert math.isclose(float(t.sum(dtype=torch.float64)), row["fill_sum"], rel_tol=1e-9, abs_tol=1e-9), row["name"]
        assert float(t.reshape(-1)[0]) == row["fill_first"], row["name"]
    net.load_state_dict(sd, strict=True, assign=True)  # the filled tensors become the parameters: no copy
    del sd
    net.eval()

    from safetensors.torch import load_file

    io = load_file(keys_path.with_name(keys_path.name.replace(".keys.json", ".io.safetensors")))
    out = net.forward_features(io["x"])
    expected = {"cls": out["x_norm_clstoken"], "patchtokens": out["x_norm_patchtokens"]}
    assert set(io) == {"x"} | set(expected), f"unexpected io tensors {sorted(io)}"
    for name, got in expected.items():
        assert got.shape == io[name].shape, name
        print(f"{keys_path.stem} {name}: max |ours - official| = {(got - io[name]).abs().max():.2e}")
        torch.testing.assert_close(got, io[name], atol=ATOL, rtol=RTOL, msg=name)
    torch.testing.assert_close(net(io["x"]), io["cls"], atol=ATOL, rtol=RTOL)
    del net, out, expected
    gc.collect()


# --- wrapper and loader (random weights; small ViT-S) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def vits():
    torch.manual_seed(0)
    net = DinoV2("s").eval()
    with torch.no_grad():  # make LayerScale and pos_embed matter
        for blk in net.blocks:
            blk.ls1.gamma.uniform_(0.5, 1.5)
            blk.ls2.gamma.uniform_(0.5, 1.5)
        net.pos_embed.normal_()
        net.cls_token.normal_()
    return net


@torch.no_grad()
def test_wrapper_preprocessing_edm2(vits):
    wrapped = DinoV2Features(vits).eval()
    assert wrapped.dim == 384
    g = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    x = u8.float() / 127.5 - 1
    feats = wrapped(x)
    assert feats.shape == (2, 384) and feats.dtype == torch.float32
    # EDM2's DINOv2Detector (resize_mode='torch') on the uint8 pixels
    y = F.interpolate(u8.to(torch.float32), size=(224, 224), mode="bicubic", antialias=True) / 255
    y = (y - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(feats, vits(y), atol=1e-4, rtol=1e-4)
    gray = x[:1, :1]
    torch.testing.assert_close(wrapped(gray), wrapped(gray.repeat(1, 3, 1, 1)), atol=0, rtol=0)
    with pytest.raises(ValueError, match="multiples of 14"):
        vits(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="expected \\[-1, 1\\]"):
        wrapped(x * 255)


def test_missing_weights_error_names_file_url_and_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTREWARD_WEIGHTS", str(tmp_path))
    for call in (lambda: load_dinov2(None), lambda: get_feature_network("dinov2")):
        with pytest.raises(FileNotFoundError) as e:
            call()
        msg = str(e.value)
        assert "dinov2_vitl14_pretrain.pth" in msg and "https://dl.fbaipublicfiles.com/" in msg and "--weights" in msg
    monkeypatch.delenv("DISTREWARD_WEIGHTS")
    with pytest.raises(FileNotFoundError, match="DISTREWARD_WEIGHTS"):
        load_dinov2(None)


def test_load_pth_strict(vits, tmp_path, monkeypatch):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(vits.state_dict(), path)
    net = load_dinov2(path, size="s")
    assert net.dim == 384 and not net.training and not any(p.requires_grad for p in net.parameters())
    for k, v in net.net.state_dict().items():
        torch.testing.assert_close(v, vits.state_dict()[k], atol=0, rtol=0, msg=k)
    monkeypatch.setenv("DISTREWARD_WEIGHTS", str(tmp_path))
    assert load_dinov2(None, size="s").dim == 384
    with pytest.raises(ValueError, match="not a DINOv2 ViT-L/14 checkpoint"):
        load_dinov2(path)  # ViT-S weights for the default ViT-L
    sd = vits.state_dict()
    sd.pop("mask_token")
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="mask_token"):
        load_dinov2(tmp_path / "partial.pth", size="s")
