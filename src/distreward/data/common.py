"""The project's image range and the checks every entry point applies."""

from __future__ import annotations

import numpy as np
import torch

IMAGE_RANGE = (-1.0, 1.0)


def to_float_images(u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) / (B, H, W, C) / (B, C, H, W) -> float32 (B, C, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(u8) if not isinstance(u8, torch.Tensor) else u8)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {x.dtype}; convert floats in [0,1] with (x*255).round().to(torch.uint8)")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    elif x.ndim != 4:
        raise ValueError(f"expected images of shape (B,H,W), (B,H,W,C) or (B,C,H,W); got {tuple(x.shape)}")
    return x.float().div(127.5).sub(1.0).contiguous()


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """float (B, C, H, W) in [-1, 1] -> uint8 (B, C, H, W), rounding and clipping."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pad_to(x: torch.Tensor, size: int, value: float = -1.0) -> torch.Tensor:
    """Centre-pad (B, C, H, W) images with background `value` to size x size."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top), value=value)


def check_images(x, *, channels: int | None = None, size: int | None = None, name: str = "images") -> torch.Tensor:
    """Validate float images in the project's range; a clear error names what is wrong and how to fix it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        raise TypeError(f"{name}: got uint8 pixels; convert with distreward.data.to_float_images (range [-1, 1])")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected float images in [-1, 1], got dtype {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected shape (B, C, H, W), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        raise ValueError(f"{name}: expected {size}x{size} images, got {x.shape[-2]}x{x.shape[-1]}; pad with distreward.data.pad_to")
    if x.numel() and (x.min() < -1.5 or x.max() > 1.5):
        raise ValueError(f"{name}: values span [{x.min().item():.3g}, {x.max().item():.3g}], expected [-1, 1]; "
                         "uint8 pixels map by x/127.5-1, [0,1] floats by 2x-1")
    return x


def as_rgb(x: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Checked images with 3 channels: grayscale is repeated (ImageNet feature networks take RGB)."""
    x = check_images(x, name=name)
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"{name}: need 1- or 3-channel images, got {x.shape[1]} channels")
    return x
