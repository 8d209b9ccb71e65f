"""DINOv2 ViT/14 (S, B, L, g) as the official hub backbones, written out; FD-DINOv2 uses the ViT-L CLS token.

`DinoV2(size)` reproduces `dinov2_vit{s,b,l,g}14(pretrained=False)` of facebookresearch/dinov2 (img_size 518,
patch 14, LayerScale init 1.0, qkv bias, exact GELU, LayerNorm eps 1e-6, no register tokens): same state_dict
names (`cls_token`, `pos_embed`, `mask_token`, `patch_embed.proj.*`, `blocks.N.{norm1,attn,ls1,norm2,mlp,ls2}.*`,
`norm.*`), the same bicubic pos_embed interpolation with the official +0.1 offset, and the CLS token after the
final LayerNorm. Its forward takes images already normalised with the ImageNet mean/std.

`load_dinov2(weights, device)` is the registry factory: its forward takes project images in [-1, 1] and applies
EDM2's / dgm-eval's preprocessing (bicubic antialiased resize to 224, ImageNet mean/std), returning (B, 1024).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
import torch.nn.functional as F

from ..data import as_rgb
from ..models.sit import Attention
from ..utils.errors import reading
from .inception import find_weights, load_strict

PATCH = 14
IMG_SIZE = 518
EVAL_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATE_OFFSET = 0.1

# size -> (embed_dim, depth, heads, ffn): the hub builders' settings
CONFIGS = {
    "s": (384, 12, 6, "mlp"),
    "b": (768, 12, 12, "mlp"),
    "l": (1024, 24, 16, "mlp"),
    "g": (1536, 40, 24, "swiglu"),
}
URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s}14/dinov2_vit{s}14_pretrain.pth"


def weight_file(size: str) -> str:
    return f"dinov2_vit{size}14_pretrain.pth"


# --- layers ------------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """14x14 non-overlapping patches -> tokens (B, N, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """ViT-g's feed-forward: w3(silu(x1) * x2) with [x1, x2] = w12(x); hidden width 2/3 of 4D, rounded up to 8."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel residual-branch gain `gamma` (CaiT's LayerScale)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, heads: int, ffn: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = (SwiGLU if ffn == "swiglu" else Mlp)(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# --- the network ----------------------------------------------------------------------------------------------------

def interpolate_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Official DINOv2 position-embedding resize: the M x M patch grid is resized bicubically (float32, no antialias)
    by scale_factor ((rows + 0.1) / M, (cols + 0.1) / M) -- the offset quirk, not size=(rows, cols) -- and the CLS
    position is kept. Returns (1, 1 + rows*cols, D)."""
    n = pos_embed.shape[1] - 1
    if n == rows * cols and rows == cols:
        return pos_embed
    m = int(math.sqrt(n))
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    pe = pos_embed.float()
    dim = pe.shape[-1]
    grid = pe[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = (float(rows + INTERPOLATE_OFFSET) / m, float(cols + INTERPOLATE_OFFSET) / m)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(grid.shape[-2:]) != (rows, cols):
        raise ValueError(f"pos_embed interpolation gave a {tuple(grid.shape[-2:])} grid for {rows}x{cols} patches")
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([pe[:, :1], grid], dim=1).to(pos_embed.dtype)


class DinoV2(nn.Module):
    """DINOv2 ViT/14 backbone. forward: normalised images (B, 3, H, W), H and W multiples of 14 -> CLS (B, D)."""

    def __init__(self, size: str = "l"):
        super().__init__()
        if size not in CONFIGS:
            raise ValueError(f"unknown DINOv2 size {size!r}; use one of {', '.join(CONFIGS)}")
        dim, depth, heads, ffn = CONFIGS[size]
        self.size, self.dim = size, dim
        grid = IMG_SIZE // PATCH
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # in the checkpoint; unused without masks
        self.patch_embed = PatchEmbed(dim)
        self.blocks = nn.ModuleList([Block(dim, heads, ffn) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Official names: x_norm_clstoken (B, D), x_norm_patchtokens (B, N, D)."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2] % PATCH or x.shape[-1] % PATCH:
            raise ValueError(f"DinoV2 expects (B, 3, H, W) with H, W multiples of {PATCH}, got {tuple(x.shape)}; "
                             f"resize to {EVAL_SIZE}x{EVAL_SIZE} (load_dinov2 does it)")
        rows, cols = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + interpolate_pos_embed(self.pos_embed, rows, cols)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return {"x_norm_clstoken": tokens[:, 0], "x_norm_patchtokens": tokens[:, 1:]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["x_norm_clstoken"]


def dinov2_preprocess(x: torch.Tensor, size: int = EVAL_SIZE) -> torch.Tensor:
    """EDM2's DINOv2 detector ('torch' resize mode, ~dgm-eval): pixels in [0, 255] -> bicubic antialiased resize
    to size x size -> /255 -> (x - ImageNet mean) / ImageNet std."""
    x = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    return (x / 255 - mean) / std


class DinoV2Features(nn.Module):
    """Registry wrapper: project images (B, C, H, W) in [-1, 1] -> DINOv2 CLS features (B, D).

    [-1, 1] -> [0, 255] pixels (not rounded: quantise first with distreward.data.to_uint8_images to match features
    of saved PNGs bit for bit), then `dinov2_preprocess`; 1-channel images are repeated to RGB.
    """

    def __init__(self, net: DinoV2):
        super().__init__()
        self.net = net
        self.dim = net.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = as_rgb(images, name="dinov2 features")
        return self.net(dinov2_preprocess((x + 1) * 127.5).to(self.net.norm.weight.dtype))


def build_dinov2(weights: str | os.PathLike, size: str = "l", device: str | torch.device = "cpu") -> DinoV2:
    """DinoV2(size) with an official `dinov2_vit{size}14_pretrain.pth` (torch.load weights_only, strict)."""
    with reading(weights, "DINOv2 checkpoint", f"give the official {weight_file(size)}"):
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{weights}: expected a state_dict, got {type(sd).__name__}")
    return load_strict(lambda: DinoV2(size), sd, device,
                       lambda why: f"{weights}: not a DINOv2 ViT-{size.upper()}/14 checkpoint ({why}); "
                                   f"expected {weight_file(size)}")


def load_dinov2(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                size: str = "l") -> DinoV2Features:
    """Registry factory `dinov2`: project images in [-1, 1] -> ViT-L/14 CLS features (B, 1024) (FD-DINOv2)."""
    path = find_weights(weights, [weight_file(size)], f"DINOv2 ViT-{size.upper()}/14", [URL.format(s=size)])
    return DinoV2Features(build_dinov2(path, size, device)).eval().requires_grad_(False).to(device)
