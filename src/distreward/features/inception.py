"""FID Inception-v3: the TF-ported network of pytorch-fid (pool3, 2048-d), written out without torchvision.

`FIDInceptionV3` reproduces `pytorch_fid.inception.InceptionV3(output_blocks=[3], resize_input=True,
normalize_input=True, use_fid_inception=True)`: images in [0, 1] are resized to 299x299 (bilinear,
align_corners=False), mapped to [-1, 1] and run through torchvision's Inception3 layout with the FID blocks
(FIDInceptionA/C average-pool without counting padding, FIDInceptionE_1 likewise, FIDInceptionE_2 max-pools).
The state_dict names are torchvision's (`Conv2d_1a_3x3.conv.weight`, ..., `fc.weight` [1008, 2048]), so
`pt_inception-2015-12-05-6726825d.pth` loads strictly, with or without `num_batches_tracked`.

Two weight files are supported (docs/features.md):
- pytorch-fid's `pt_inception-2015-12-05-*.pth`: `torch.load(weights_only=True)`;
- StyleGAN3/EDM2's `inception-2015-12-05.pkl` and StyleGAN2-ADA's `inception-2015-12-05.pt` (a TorchScript
  translation of the same TF graph): their tensors are read as data, without running any pickled or
  TorchScript code, and renamed from the TF layout (`layers.mixed_9.tower.mixed.conv.weight`, `.beta`, `.mean`,
  `.var`; BatchNorm without scale) to torchvision's names.

`load_inception(weights, device)` is the registry factory: its forward takes project images in [-1, 1].
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F

from ..data import as_rgb
from ..utils.errors import reading
from ..utils.safe_pickle import UnsafePickleError, safe_load

PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
PTH_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
PKL_NAME = "inception-2015-12-05.pkl"
PKL_URL = "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl"
FID_SIZE = 299
NUM_CLASSES = 1008
DIM = 2048


# --- layers (torchvision Inception3 names) ---------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as TF) -> ReLU."""

    def __init__(self, cin: int, cout: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    """The FID blocks' average pool: padding is not counted (TF's 'SAME' average)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d, FID variant (FIDInceptionA)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e, FID variant (FIDInceptionC): factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b (FIDInceptionE_1: average pool without padding) and Mixed_7c (FIDInceptionE_2: max pool).

    The max pool in the last block is the TF graph's quirk that pytorch-fid keeps; it changes features a lot.
    """

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


# --- the network --------------------------------------------------------------------------------------------------

def fid_resize(x: torch.Tensor, size: int = FID_SIZE) -> torch.Tensor:
    """pytorch-fid's input resize: bilinear to 299x299, align_corners=False, no antialias (applied at 299 too)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def unit_to_symmetric(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (pytorch-fid's normalize_input: 2x - 1)."""
    return 2 * x - 1


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3. forward: float (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048).

    `logits(x)` gives the 1008-way classifier output (used by the Inception Score, not by FID).
    """

    dim = DIM

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(DIM, NUM_CLASSES)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("FIDInceptionV3 expects float images in [0, 1]; divide uint8 pixels by 255")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 expects (B, 3, H, W) images, got {tuple(x.shape)}")
        return x

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """Features after the global average pool, from images already resized and in [-1, 1]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check(x)
        return self.pool3(unit_to_symmetric(fid_resize(x.to(self.fc.weight.dtype))))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward(x))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict by default; BatchNorm `num_batches_tracked` may be missing (older checkpoints) and is set to 0."""
        state_dict = dict(state_dict)
        for name, _ in self.named_buffers():
            if name.endswith("num_batches_tracked") and name not in state_dict:
                state_dict[name] = torch.zeros((), dtype=torch.long)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class InceptionFeatures(nn.Module):
    """Registry wrapper: project images (B, C, H, W) in [-1, 1] -> FID pool3 features (B, 2048).

    Maps [-1, 1] to the [0, 1] range pytorch-fid takes; 1-channel images are repeated to RGB.
    """

    dim = DIM

    def __init__(self, net: FIDInceptionV3):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = as_rgb(images, name="inception features")
        return self.net((x + 1) / 2)


# --- weight files ---------------------------------------------------------------------------------------------------

def find_weights(weights: str | os.PathLike | None, candidates: list[str], what: str, urls: list[str]) -> Path:
    """The weight file to load: `weights` (a file, or a folder holding one of `candidates`), else
    $DISTREWARD_WEIGHTS/<candidate>. A missing file raises FileNotFoundError saying what to get and where."""
    env = os.environ.get("DISTREWARD_WEIGHTS")
    folder = None
    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_file():
            return p
        if not p.is_dir():
            raise FileNotFoundError(f"{what} weights: {p} does not exist; pass --weights PATH to one of "
                                    f"{', '.join(candidates)} (download: {' or '.join(urls)})")
        folder = p
    elif env:
        folder = Path(env).expanduser()
    if folder is not None:
        for pattern in candidates:
            hits = sorted(folder.glob(pattern))
            if hits:
                return hits[0]
    where = f"in {folder}" if folder is not None else "(DISTREWARD_WEIGHTS is not set)"
    raise FileNotFoundError(
        f"{what} weights not found {where}: need {' or '.join(candidates)}. Download {' or '.join(urls)}, then pass "
        f"--weights PATH (Python: weights=PATH) or put the file in the folder named by $DISTREWARD_WEIGHTS. "
        "Nothing is downloaded at run time.")


def _tf_layout_names() -> dict[str, str]:
    """TF-graph conv names of the StyleGAN/EDM2 TorchScript translation -> torchvision BasicConv2d prefixes.

    In-block paths are written with '_' for '.', so `tower.mixed.conv` and `tower_mixed_conv` both match.
    """
    stem = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
    block_a = {"conv": "branch1x1", "tower_conv": "branch5x5_1", "tower_conv_1": "branch5x5_2",
               "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
               "tower_1_conv_2": "branch3x3dbl_3", "tower_2_conv": "branch_pool"}
    block_b = {"conv": "branch3x3", "tower_conv": "branch3x3dbl_1", "tower_conv_1": "branch3x3dbl_2",
               "tower_conv_2": "branch3x3dbl_3"}
    block_c = {"conv": "branch1x1", "tower_conv": "branch7x7_1", "tower_conv_1": "branch7x7_2",
               "tower_conv_2": "branch7x7_3", "tower_1_conv": "branch7x7dbl_1", "tower_1_conv_1": "branch7x7dbl_2",
               "tower_1_conv_2": "branch7x7dbl_3", "tower_1_conv_3": "branch7x7dbl_4",
               "tower_1_conv_4": "branch7x7dbl_5", "tower_2_conv": "branch_pool"}
    block_d = {"tower_conv": "branch3x3_1", "tower_conv_1": "branch3x3_2", "tower_1_conv": "branch7x7x3_1",
               "tower_1_conv_1": "branch7x7x3_2", "tower_1_conv_2": "branch7x7x3_3",
               "tower_1_conv_3": "branch7x7x3_4"}
    block_e = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
               "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
               "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
               "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
    blocks = {"mixed": ("Mixed_5b", block_a), "mixed_1": ("Mixed_5c", block_a), "mixed_2": ("Mixed_5d", block_a),
              "mixed_3": ("Mixed_6a", block_b), "mixed_4": ("Mixed_6b", block_c), "mixed_5": ("Mixed_6c", block_c),
              "mixed_6": ("Mixed_6d", block_c), "mixed_7": ("Mixed_6e", block_c), "mixed_8": ("Mixed_7a", block_d),
              "mixed_9": ("Mixed_7b", block_e), "mixed_10": ("Mixed_7c", block_e)}
    out = {f"layers.{k}": v for k, v in stem.items()}
    for tf_block, (tv_block, table) in blocks.items():
        for tf_path, tv_name in table.items():
            out[f"layers.{tf_block}.{tf_path}"] = f"{tv_block}.{tv_name}"
    return out


_TF_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "gamma": "bn.weight", "mean": "bn.running_mean",
              "var": "bn.running_var"}


def state_dict_from_tf_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the StyleGAN/EDM2 Inception tensors (`layers.<block>.<path>.{weight,beta,mean,var}`, `output.*`) to
    torchvision names; the BatchNorm scale (absent in the TF graph) is 1."""
    anchors = [k[: -len("layers.conv.weight")] for k in tensors if k.endswith("layers.conv.weight")]
    if len(anchors) != 1:
        raise ValueError("not the StyleGAN/EDM2 Inception layout: expected exactly one 'layers.conv.weight' tensor, "
                         f"found {len(anchors)} among {len(tensors)} tensors (first: {list(tensors)[:5]})")
    prefix = anchors[0]
    table = _tf_layout_names()
    by_flat = {}
    for tf_conv, tv in table.items():
        block, _, path = tf_conv[len("layers."):].partition(".")
        by_flat[(block, path)] = tv
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key in ("output.weight", "output.bias"):
            out["fc." + key.split(".")[1]] = t
            continue
        if not key.startswith("layers."):
            continue
        head, _, param = key.rpartition(".")
        parts = head.split(".")[1:]
        if len(parts) == 1:
            tv = table.get(f"layers.{parts[0]}")
        else:
            tv = by_flat.get((parts[0], "_".join(parts[1:])))
        if tv is None or param not in _TF_PARAMS:
            raise ValueError(f"unexpected tensor '{key}' in the StyleGAN/EDM2 Inception file; cannot map it to "
                             "torchvision names (see docs/features.md for the supported layout)")
        out[f"{tv}.{_TF_PARAMS[param]}"] = t
    for key in list(out):
        if key.endswith("bn.bias"):
            scale = key[: -len("bias")] + "weight"
            out.setdefault(scale, torch.ones_like(out[key]))
    return out


# TorchScript archives (`torch.jit.save`) hold `<root>/data.pkl` (the module tree) and `<root>/data/<k>` (raw storage
# bytes). They are read here as data: classes named `__torch__.*` become plain records, only tensor rebuilding runs.
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class ScriptRecord:
    """A TorchScript object read as data: `state` is its attribute dict (submodules, tensors, flags)."""

    qualified_name = "__torch__"

    def __init__(self, *args):
        self.state: dict[str, Any] = {}

    def __setstate__(self, state):
        self.state = dict(state) if isinstance(state, dict) else {"__state__": state}


def _list_builder(*args):
    return list(args[0]) if args else []


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str, source: str):
        super().__init__(file)
        self._archive, self._root, self._source = archive, root, source
        self._records: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            if key not in self._records:
                self._records[key] = type(name, (ScriptRecord,), {"qualified_name": key})
            return self._records[key]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_flat_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                       "build_tensorlist", "build_strlist"):
            return _list_builder
        raise pickle.UnpicklingError(f"{self._source}: the TorchScript archive names '{module}.{name}', which is not "
                                     "read as data here; use pytorch-fid's .pth weights instead")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._source}: unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"{self._source}: unknown storage type {dtype!r}")
        data = bytearray(self._archive.read(f"{self._root}/data/{key}"))
        flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return flat[:numel]


def _rebuild_flat_tensor(flat, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(flat, torch.Tensor):
        raise pickle.UnpicklingError("tensor without storage in TorchScript archive")
    return flat.as_strided(tuple(size), tuple(stride), int(offset)).clone()


def read_torchscript_tensors(data: bytes, source: str = "<archive>") -> dict[str, torch.Tensor]:
    """All tensors of a TorchScript archive by module path (e.g. `layers.conv.weight`), without running its code."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise ValueError(f"{source}: not a TorchScript archive (no <root>/data.pkl)")
    root = pkls[0].split("/")[0]
    obj = _TorchScriptUnpickler(io.BytesIO(archive.read(pkls[0])), archive, root, source).load()
    out: dict[str, torch.Tensor] = {}
    _collect_tensors(obj, "", out, set())
    return out


def _collect_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    """Walk a data-only object tree (records, dicts, lists) and collect its tensors by dotted path.
    Module internals (`_parameters`, `_buffers`, `_modules`) add no path component; embedded TorchScript
    archives (bytes) are opened and walked too."""
    if id(obj) in seen:
        return
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj.detach()
        return
    if isinstance(obj, (bytes, bytearray)):
        if bytes(obj[:4]) == b"PK\x03\x04":
            for k, v in read_torchscript_tensors(bytes(obj)).items():
                out[prefix + k] = v
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and k in ("_parameters", "_buffers", "_modules"):
                _collect_tensors(v, prefix, out, seen)
            elif isinstance(k, str):
                _collect_tensors(v, f"{prefix}{k}.", out, seen)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _collect_tensors(v, f"{prefix}{i}.", out, seen)
    elif isinstance(getattr(obj, "state", None), dict):
        _collect_tensors(obj.state, prefix, out, seen)


def read_stylegan_inception(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """torchvision-named state_dict from StyleGAN3/EDM2's `inception-2015-12-05.pkl` or StyleGAN2-ADA's `.pt`.

    The .pkl is read with `distreward.utils.safe_pickle.safe_load` (no code from it runs); a TorchScript archive,
    whether the file itself or bytes inside the pickle, is parsed as data (its TorchScript code is ignored).
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:4] == b"PK\x03\x04":
        tensors = read_torchscript_tensors(data, str(path))
    else:
        try:
            obj = safe_load(data)
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e} For FID, pytorch-fid's {PTH_NAME} holds the same network: "
                                    f"{PTH_URL}") from None
        tensors = {}
        _collect_tensors(obj, "", tensors, set())
    if not tensors:
        raise ValueError(f"{path}: no tensors found; expected StyleGAN3/EDM2's {PKL_NAME} or pytorch-fid's {PTH_NAME}")
    return state_dict_from_tf_layout({k: v.float() for k, v in tensors.items()})


def read_inception_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """torchvision-named Inception state_dict from a pytorch-fid .pth (weights_only) or a StyleGAN/EDM2 .pkl/.pt."""
    path = Path(path)
    with reading(path, "Inception weight file", f"give pytorch-fid's {PTH_NAME} ({PTH_URL}) or {PKL_NAME}"):
        with open(path, "rb") as f:
            head = f.read(4)
        if path.suffix == ".pkl" or (path.suffix == ".pt" and head == b"PK\x03\x04" and _is_torchscript(path)):
            return read_stylegan_inception(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(sd).__name__}")
    return sd


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def load_error_summary(e: Exception, limit: int = 400) -> str:
    """load_state_dict's message (missing / unexpected keys, shape mismatches) on one line, shortened."""
    text = " ".join(str(e).split()).replace("Error(s) in loading state_dict for ", "")
    return text if len(text) <= limit else text[:limit] + " ..."


def load_strict(make: Callable[[], nn.Module], sd: dict, device, wrong: Callable[[str], str]) -> nn.Module:
    """make() built on the meta device, the state dict `sd` loaded strictly in its place (no second copy of the
    weights), in float32 eval mode without gradients on `device`; `wrong(summary)` words the error for a file
    that does not fit."""
    with torch.device("meta"):
        net = make()
    try:
        net.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(wrong(load_error_summary(e))) from None
    return net.float().eval().requires_grad_(False).to(device)


def build_fid_inception(weights: str | os.PathLike, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """FIDInceptionV3 with weights from `weights` (strict load), in eval mode on `device`."""
    return load_strict(FIDInceptionV3, read_inception_weights(weights), device,
                       lambda why: f"{weights}: not an FID Inception-v3 checkpoint ({why}); expected "
                                   f"pytorch-fid's {PTH_NAME} or StyleGAN3/EDM2's {PKL_NAME}")


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Registry factory `inception`: project images in [-1, 1] -> FID pool3 features (B, 2048)."""
    path = find_weights(weights, ["pt_inception-2015-12-05-*.pth", PKL_NAME, "inception-2015-12-05.pt"],
                        "FID Inception-v3", [PTH_URL, PKL_URL])
    return InceptionFeatures(build_fid_inception(path, device)).eval().requires_grad_(False).to(device)
