"""User data: an image folder (optionally with class subfolders) or an .npz of uint8 images + labels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..utils.errors import InputFileError, InputTypeError, reading
from .common import to_float_images
from .fmnist import load_fmnist

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def load_image_folder(path: str | os.PathLike, *, channels: int | None = None):
    """(images float (N,C,H,W) in [-1,1], labels int64 or None). Class subfolders give labels in sorted order."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; check the path")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputFileError(f"image folder {root} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    classes = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
    labelled = bool(classes) and all(p.parent != root for p in files)
    mode = {1: "L", 3: "RGB", None: None}[channels]
    arrays = []
    for p in files:
        with reading(p, "image", f"remove or replace it, or point to another folder than {root}"), Image.open(p) as im:
            if mode is None:
                mode = "L" if im.mode in ("L", "1", "I;16") else "RGB"
            arrays.append(np.asarray(im.convert(mode)))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise InputFileError(f"images in {root} have different sizes {sorted(shapes)[:4]}; resize them to one size first")
    x = to_float_images(np.stack(arrays))
    labels = None
    if labelled:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[p.parent.relative_to(root).parts[0]] for p in files], dtype=torch.int64)
    return x, labels


def load_npz_images(path: str | os.PathLike):
    """An .npz with uint8 images under 'images' (or 'arr_0', as ADM/EDM sample batches) and optional 'labels'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; check the path (an .npz of uint8 images)")
    fix = "give an .npz of uint8 images under 'images' (as 'distreward sample -o X.npz' writes), or an image folder"
    with reading(path, "image .npz", fix), np.load(path, allow_pickle=False) as z:
        key = next((k for k in ("images", "arr_0", "x") if k in z.files), None)
        if key is None:
            raise InputFileError(f"{path}: no image array (expected key 'images' or 'arr_0'; found {z.files}); {fix}")
        imgs = z[key]
        labels = next((z[k] for k in ("labels", "arr_1", "y") if k in z.files), None)
    if imgs.dtype != np.uint8:
        raise InputTypeError(f"{path}:{key} has dtype {imgs.dtype}; store uint8 pixels (0..255)")
    x = to_float_images(imgs)
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels).astype(np.int64))
        if labels.shape[0] != x.shape[0]:
            raise InputFileError(f"{path}: {x.shape[0]} images but {labels.shape[0]} labels")
    return x, labels


def load_images(spec: str | os.PathLike):
    """`fmnist-train`, `fmnist-test`, an .npz file, or an image folder -> (images, labels or None)."""
    s = str(spec)
    if s in ("fmnist-train", "fmnist-test", "fmnist:train", "fmnist:test"):
        return load_fmnist(s.split("-")[-1].split(":")[-1])
    p = Path(s)
    if p.suffix == ".npz":
        return load_npz_images(p)
    if p.is_dir():
        return load_image_folder(p)
    if not p.exists():
        raise FileNotFoundError(f"{s}: no such file or folder (expected fmnist-train, fmnist-test, an .npz or an image folder)")
    raise InputFileError(f"{s}: unsupported input (expected fmnist-train, fmnist-test, an .npz or an image folder)")
