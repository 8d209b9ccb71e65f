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


# --- the CPU fast path (docs/sampling.md "CPU speed") -----------------------------------------------------------
# `net.fast_cpu` (default True): on the CPU and without gradients, intermediate maps are updated in place (SiLU,
# FiLM, residual adds: an allocation and a pass over memory fewer per op) and attention runs the math of
# scaled_dot_product_attention without its checks for rows of -inf. Same ops in the same order: the velocities are
# bit for bit those of the plain path (tests/test_unet.py), and training (with gradients) runs the plain path.
# `net.nhwc` (default False, opt-in): the full-resolution maps are also kept channels_last (NHWC), where oneDNN's
# 3x3 convolutions with 16-48 channels are up to 1.6x faster (the lower levels stay NCHW: their convolutions are as
# fast either way and torch's GroupNorm is 2-6x slower on NHWC). Another convolution kernel rounds differently and
# the trajectories amplify it: 10-step Euler samples move by 1e-5 to 4e-5, above the 1e-5 bound for a default
# (the float32 sampler itself is 6e-5 from the same computation in float64).

def _nhwc(x: torch.Tensor) -> bool:
    """A CPU map stored channels_last (and not also plainly contiguous, i.e. unambiguously NHWC)."""
    return x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous() and \
        x.is_contiguous(memory_format=torch.channels_last)


def _to_nhwc(t: torch.Tensor) -> torch.Tensor:
    """t with channels_last strides, also where the layout is ambiguous (one channel: a contiguous (B, 1, H, W) map
    or (O, 1, k, k) weight would leave oneDNN on NCHW); a differentiable copy unless t is NHWC already."""
    return t if _nhwc(t) else torch.empty_like(t, memory_format=torch.channels_last).copy_(t)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state_dict) that convolves an NHWC map with a channels_last copy of its weight.

    With the weight in the default layout, torch 2.13's oneDNN convolution converts NHWC maps to NCHW and back;
    a channels_last weight keeps input and output NHWC. The copy of the weight is tiny and differentiable; the stored
    parameter stays contiguous (as safetensors needs).
    """

    def forward(self, x: torch.Tensor, nhwc: bool | None = None) -> torch.Tensor:
        if nhwc if nhwc is not None else _nhwc(x):
            return self._conv_forward(_to_nhwc(x), _to_nhwc(self.weight), self.bias)
        return super().forward(x)


def _upsample2x(h: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling of an NCHW map as one copy of a broadcast view: the values of nn.Upsample (exactly),
    at half its time on the CPU (torch 2.13's kernel writes the output and then clones it)."""
    b, c, height, width = h.shape
    return h[:, :, :, None, :, None].expand(b, c, height, 2, width, 2).reshape(b, c, 2 * height, 2 * width)


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
        self.conv0 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, fast: bool = False) -> torch.Tensor:
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        if not (fast and not torch.is_grad_enabled()):
            h = self.conv0(F.silu(self.norm0(x)))
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
            h = self.conv1(self.dropout(h))
            return h + (x if self.skip is None else self.skip(x))
        # no autograd graph: every intermediate map is fresh, so update it in place
        h = self.conv0(F.silu(self.norm0(x), inplace=True))
        h = self.norm1(h)
        h = F.silu(torch.addcmul(shift, h, scale + 1, out=h), inplace=True)
        h = self.conv1(self.dropout(h))
        return h.add_(x if self.skip is None else self.skip(x))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = Conv2d(channels, 3 * channels, 1)
        self.proj = Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        b, c, h, w = x.shape
        if not (fast and not torch.is_grad_enabled()):
            q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
            y = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            return x + self.proj(y.transpose(-1, -2).reshape(b, c, h, w))
        # scaled_dot_product_attention's math path (scale sqrt(1/sqrt(d)) on q and on k, matmul, softmax, matmul: the
        # same float32 results) without its checks for rows of -inf: at 8x8 pixels half the time
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        s = math.sqrt(1.0 / math.sqrt(c // self.num_heads))
        q, k, v = q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        y = torch.matmul(torch.softmax(torch.matmul(q * s, (k * s).transpose(-2, -1)), dim=-1), v)
        return x + self.proj(y.transpose(-1, -2).reshape(b, c, h, w))  # not in place: the sum takes x's layout


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
        self.fast_cpu = True   # the CPU fast path (in-place ops without gradients, matmul attention); not saved
        self.nhwc = False      # ... and channels_last maps at the full resolution (faster; see the note above)
        self.sigma_dim = model_channels
        self.map_sigma = nn.Sequential(nn.Linear(model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        self.map_label = nn.Embedding(num_classes + 1, emb_channels) if num_classes > 0 else None

        chans = [model_channels * m for m in channel_mult]
        self.conv_in = Conv2d(img_channels, chans[0], 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [chans[0]]
        c, res = chans[0], img_resolution
        for level, cout in enumerate(chans):
            if level > 0:
                self.enc.append(Conv2d(c, c, 3, stride=2, padding=1))  # downsample
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
                self.dec.append(nn.Sequential(Conv2d(c, c, 3, padding=1), nn.Upsample(scale_factor=2, mode="nearest")))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = Conv2d(c, img_channels, 3, padding=1)
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
        fast = self.fast_cpu and x.device.type == "cpu"
        emb = self.embed(sigma, labels)
        top, nhwc = self.img_resolution, fast and self.nhwc
        inplace = fast and not torch.is_grad_enabled()
        h = self.conv_in(x, nhwc=nhwc)
        hs = [h]
        for block in self.enc:
            if isinstance(block, ResBlock):
                h = block(h, emb, fast)
            elif isinstance(block, Attention):
                h = block(h, fast)
            else:  # downsampling: below the full resolution the maps are NCHW
                h = block(h)
                h = h.contiguous() if nhwc else h
            if isinstance(block, Attention):
                hs[-1] = h
            else:
                hs.append(h)
        for block in self.mid:
            h = block(h, emb, fast) if isinstance(block, ResBlock) else block(h, fast)
        for block in self.dec:
            if isinstance(block, ResBlock):
                h = block(torch.cat([h, hs.pop()], dim=1), emb, fast)
            elif isinstance(block, Attention):
                h = block(h, fast)
            else:  # conv, then nearest upsampling; back to NHWC (before upsampling: a quarter of the copy) at the top
                h = block[0](h)
                if nhwc and h.shape[-1] * 2 == top:
                    h = _to_nhwc(h)
                h = _upsample2x(h) if inplace and not _nhwc(h) else block[1](h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=inplace), nhwc=nhwc).contiguous()
