"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (gzipped IDX files)."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from ..utils.errors import InputFileError, reading
from .common import pad_to, to_float_images

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FMNIST_PAD = 32
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")


def _has_files(d: Path) -> bool:
    return all((d / f).is_file() for pair in _FILES.values() for f in pair)


def find_fmnist_dir() -> Path:
    """$DISTREWARD_FMNIST, else where dpkg says the package put the files, else the package's usual folder."""
    env = os.environ.get("DISTREWARD_FMNIST")
    if env:
        if not _has_files(Path(env)):
            raise FileNotFoundError(f"DISTREWARD_FMNIST={env} does not hold the four Fashion-MNIST IDX .gz files {sorted(f for p in _FILES.values() for f in p)}")
        return Path(env)
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                if line.endswith(_FILES["train"][0]):
                    return Path(line).parent
        except (OSError, subprocess.SubprocessError):
            pass
    if _has_files(_DEFAULT_DIR):
        return _DEFAULT_DIR
    raise FileNotFoundError(
        "Fashion-MNIST not found. Install it with 'apt-get install dataset-fashion-mnist' (or 'make data'), "
        "or set DISTREWARD_FMNIST to a folder holding the four gzipped IDX files.")


def _read_idx(path: Path) -> np.ndarray:
    with reading(path, "gzipped IDX file", "reinstall Fashion-MNIST ('apt-get install --reinstall dataset-fashion-mnist') "
                 "or fix $DISTREWARD_FMNIST"), gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00":
        raise InputFileError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise InputFileError(f"{path}: expected unsigned-byte IDX data, got type code {dtype_code:#x}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise InputFileError(f"{path}: truncated IDX file ({arr.size} bytes for shape {shape})")
    return arr.reshape(shape)


def fmnist_files(split: str = "train") -> list[Path]:
    """The two IDX files (images, labels) of a split, where `load_fmnist` reads them (for provenance)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = find_fmnist_dir()
    return [d / f for f in _FILES[split]]


def load_fmnist(split: str = "train", *, pad: bool = True, as_uint8: bool = False, directory: str | os.PathLike | None = None):
    """Returns (images, labels): float (N, 1, 32, 32) in [-1, 1] (28x28 if pad=False) and int64 labels.

    With as_uint8=True the images are the raw uint8 (N, 28, 28) pixels.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = Path(directory) if directory is not None else find_fmnist_dir()
    img_f, lab_f = _FILES[split]
    images = _read_idx(d / img_f)
    labels = torch.from_numpy(_read_idx(d / lab_f).astype(np.int64))
    if as_uint8:
        return torch.from_numpy(images.copy()), labels
    x = to_float_images(images.copy())
    if pad:
        x = pad_to(x, FMNIST_PAD)
    return x, labels
