"""A small class-conditional UNet: the embedded default generator (Fashion-MNIST, 32x32, 1 channel).

It predicts the flow velocity directly in the SD3 convention (METHOD.md §4):
x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0, sigma in [0, 1] (1 = noise).
`net(x, sigma, labels) -> v`; labels == num_classes (or labels=None) is the null label used by label dropout
and classifier-free guidance. The constructor takes plain JSON-able kwargs so that
`distreward.models.save_generator(path, net, "unet", kwargs)` can rebuild it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _groups(channels: int) -> int:
    """GroupNorm groups: about 4 channels per group, at most 32 groups, dividing the channel count."""
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return g


# Sinusoidal embedding of the noise level: sin/cos of sigma * scale at geometrically spaced frequencies.
def sigma_embedding(sigma: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = (sigma.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, FiLM by the embedding (scale, shift), GroupNorm -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm0 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        return h + (x if self.skip is None else self.skip(x))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        y = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(y.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Class-conditional UNet predicting the flow velocity v = eps - x0.

    model_channels * channel_mult[i] channels at resolution img_resolution / 2**i, num_blocks residual blocks per
    level (num_blocks + 1 on the way up), self-attention at the resolutions in attn_resolutions.
    """

    def __init__(self, img_resolution: int = 32, img_channels: int = 1, num_classes: int = 10,
                 model_channels: int = 16, channel_mult: list[int] | tuple[int, ...] = (1, 2, 4), num_blocks: int = 2,
                 attn_resolutions: list[int] | tuple[int, ...] = (8,), num_heads: int = 1, emb_channels: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2**{len(channel_mult) - 1} "
                             f"(one halving per level after the first of channel_mult={list(channel_mult)})")
        self.img_resolution, self.img_channels, self.num_classes = img_resolution, img_channels, num_classes
        emb_channels = emb_channels or 4 * model_channels
        self.null_label = num_classes
        self.sigma_dim = model_channels
        self.map_sigma = nn.Sequential(nn.Linear(model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        self.map_label = nn.Embedding(num_classes + 1, emb_channels) if num_classes > 0 else None

        chans = [model_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(img_channels, chans[0], 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [chans[0]]
        c, res = chans[0], img_resolution
        for level, cout in enumerate(chans):
            if level > 0:
                self.enc.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # downsample
                res //= 2
                skips.append(c)
            for _ in range(num_blocks):
                self.enc.append(ResBlock(c, cout, emb_channels, dropout))
                c = cout
                if res in attn_resolutions:
                    self.enc.append(Attention(c, num_heads))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_channels, dropout), Attention(c, num_heads), ResBlock(c, c, emb_channels, dropout)])
        self.dec = nn.ModuleList()
        for level, cout in reversed(list(enumerate(chans))):
            for _ in range(num_blocks + 1):
                self.dec.append(ResBlock(c + skips.pop(), cout, emb_channels, dropout))
                c = cout
                if res in attn_resolutions:
                    self.dec.append(Attention(c, num_heads))
            if level > 0:
                # conv at the low resolution, then nearest upsampling: a quarter of the cost of conv-after-upsample
                self.dec.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.Upsample(scale_factor=2, mode="nearest")))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = nn.Conv2d(c, img_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def embed(self, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.map_sigma(sigma_embedding(sigma, self.sigma_dim))
        if self.map_label is not None:
            if labels is None:
                labels = torch.full((sigma.shape[0],), self.null_label, dtype=torch.long, device=sigma.device)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma.reshape(b)
        if labels is not None:
            labels = labels.to(device=x.device, dtype=torch.long).reshape(b)
            if labels.numel() and (labels.min() < 0 or labels.max() > self.null_label):
                raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} is the null label); "
                                 f"got [{labels.min().item()}, {labels.max().item()}]")
        emb = self.embed(sigma, labels)
        h = self.conv_in(x)
        hs = [h]
        for block in self.enc:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            if isinstance(block, Attention):
                hs[-1] = h
            else:
                hs.append(h)
        for block in self.mid:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        for block in self.dec:
            if isinstance(block, ResBlock):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))
