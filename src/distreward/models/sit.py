"""SiT: Scalable Interpolant Transformers (Ma et al. 2024), the network of github.com/willisma/SiT.

Parameter names and the state_dict order are those of the official `models.py` (which builds on timm's
`PatchEmbed`, `Attention` and `Mlp`; they are written out here with the same parameter names), so the official
`SiT-XL-2-256x256.pt` and train.py checkpoints load strictly: `load_sit(path)`.

Convention (SiT's own): x_t = t x1 + (1 - t) x0 with t from 0 (noise) to 1 (data); the network predicts the
velocity u = x1 - x0. `distreward.sampling.SiTVelocity` maps it to the project's flow convention.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..utils.errors import reading

__all__ = ["SiT", "SIT_CONFIGS", "sit_config", "load_sit", "sit_kwargs_from_state_dict", "get_2d_sincos_pos_embed"]

# Named presets of the official release: depth, width, patch, heads (input_size / classes stay at their defaults).
SIT_CONFIGS: dict[str, dict] = {}
for _name, _depth, _hidden, _heads in (("XL", 28, 1152, 16), ("L", 24, 1024, 16), ("B", 12, 768, 12), ("S", 12, 384, 6)):
    for _patch in (2, 4, 8):
        SIT_CONFIGS[f"SiT-{_name}/{_patch}"] = dict(depth=_depth, hidden_size=_hidden, patch_size=_patch, num_heads=_heads)


def sit_config(name: str, **overrides) -> dict:
    """Constructor kwargs of a named preset, e.g. sit_config("SiT-XL/2", input_size=32, num_classes=1000)."""
    if name not in SIT_CONFIGS:
        raise ValueError(f"unknown SiT config {name!r}; known: {', '.join(SIT_CONFIGS)}")
    return {**SIT_CONFIGS[name], **overrides}


# --- building blocks ---------------------------------------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (1 + scale) + shift, per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (N, T, D); timm's parameter names (`proj`)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"SiT input is {tuple(x.shape[-2:])}, the network was built for {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm names: qkv, proj)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (timm names: fc1, fc2)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of scalar times: [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class embedding; row `num_classes` is the null label used by classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null label, at random (training) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (shift, scale, gate for attention and MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --- fixed 2-D sin-cos position table (MAE / DiT) -----------------------------------------------------------------

def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin(p w_i), cos(p w_i)], w_i = 10000^(-i / (embed_dim/2)); float64 (M, embed_dim)."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size^2, embed_dim): first half encodes the column (w) coordinate, second half the row (h)."""
    if embed_dim % 4:
        raise ValueError(f"the sin-cos position table needs a hidden size divisible by 4, got {embed_dim}")
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, grid_w),
                           get_1d_sincos_pos_embed(embed_dim // 2, grid_h)], axis=1)


# --- the network --------------------------------------------------------------------------------------------------

class SiT(nn.Module):
    """SiT with the official constructor arguments; `forward(x, t, y)` returns the velocity u (C channels)."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if self.pos_embed.device.type != "meta":
            self.initialize_weights()

    @property
    def null_label(self) -> int:
        """The label index that selects the unconditional (CFG) embedding."""
        return self.num_classes

    def initialize_weights(self) -> None:
        """The official init: xavier linears, fixed sin-cos positions, adaLN-Zero (zero gates and output)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                     self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) tokens -> (N, C, H, W) image."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), t (N,) in [0, 1] (1 = data), y (N,) int64 labels (`null_label` for unconditional)."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        x = self.unpatchify(self.final_layer(x, c))
        if self.learn_sigma:
            x = x.chunk(2, dim=1)[0]
        return x

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """The official batched CFG forward: the first half of x is repeated, y = [labels, null labels].

        Official quirk, kept for parity: guidance u_uncond + s (u_cond - u_uncond) is applied to the first 3
        channels only; the remaining channels pass through unguided.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        guided, rest = out[:, :3], out[:, 3:]
        cond, uncond = torch.split(guided, len(guided) // 2, dim=0)
        half_guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_guided, half_guided], dim=0), rest], dim=1)


# --- checkpoints --------------------------------------------------------------------------------------------------

def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A plain state_dict (official release), a train.py dict (prefer `ema`), or a .safetensors file."""
    fix = "give the official SiT-XL-2-256x256.pt, a SiT train.py checkpoint or a .safetensors state dict (model.checkpoint)"
    with reading(path, "SiT checkpoint", fix):
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its argparse args
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a state_dict or a dict with 'ema'/'model', got {type(ckpt).__name__}")
    for key in ("ema", "model", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    prefixes = ("module.", "_orig_mod.")
    return {next((k[len(p):] for p in prefixes if k.startswith(p)), k): v for k, v in ckpt.items()}


def sit_kwargs_from_state_dict(sd: dict[str, torch.Tensor], config: str | None = None,
                               num_heads: int | None = None) -> dict:
    """Constructor kwargs inferred from tensor shapes; heads from `num_heads`, else `config`, else the preset of
    that width (1152 -> 16, 1024 -> 16, 768 -> 12, 384 -> 6), else hidden_size // 64."""
    need = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
            "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not a SiT state_dict: missing {', '.join(missing)}")
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    num_patches = sd["pos_embed"].shape[1]
    grid = math.isqrt(num_patches)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels) or grid * grid != num_patches:
        raise ValueError(f"inconsistent SiT shapes: {out_channels} output channels for {in_channels} inputs, "
                         f"{num_patches} patches")
    kwargs = dict(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
                  mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden, class_dropout_prob=0.1,
                  num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
                  learn_sigma=out_channels == 2 * in_channels)
    if config is not None:
        preset = sit_config(config)
        clash = {k: (preset[k], kwargs[k]) for k in ("depth", "hidden_size", "patch_size") if preset[k] != kwargs[k]}
        if clash:
            raise ValueError(f"checkpoint does not match config {config!r}: " +
                             ", ".join(f"{k} is {v[1]}, config says {v[0]}" for k, v in clash.items()) +
                             "; pass the right config or config=None to infer it")
        kwargs["num_heads"] = preset["num_heads"]
    else:
        by_width = {c["hidden_size"]: c["num_heads"] for c in SIT_CONFIGS.values()}
        kwargs["num_heads"] = by_width.get(hidden, max(1, hidden // 64))
    if num_heads is not None:
        kwargs["num_heads"] = int(num_heads)
    if hidden % kwargs["num_heads"]:
        raise ValueError(f"hidden size {hidden} is not divisible by num_heads={kwargs['num_heads']}")
    return kwargs


def load_sit(path: str | os.PathLike, config: str | None = None, device: str | torch.device = "cpu",
             num_heads: int | None = None) -> SiT:
    """Load an official SiT checkpoint strictly (shapes -> kwargs; heads from `config` or `num_heads`); eval mode.

    The head count is not visible in the weights, so a wrong guess gives a network that loads but computes
    something else: name the config (e.g. "SiT-XL/2") or pass num_heads for non-preset widths.

    Accepts the released `SiT-XL-2-256x256.pt`, train.py checkpoints ({"ema", "model", "opt", "args"}; ema is
    used) and .safetensors state dicts. `net.sit_kwargs` holds the kwargs it was built with.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SiT checkpoint {path} not found; check model.checkpoint (docs/scale.md lists where "
                                "to get the official files)")
    sd = _read_checkpoint(path)
    kwargs = sit_kwargs_from_state_dict(sd, config, num_heads)
    with torch.device("meta"):
        net = SiT(**kwargs)
    net.load_state_dict(sd, strict=True, assign=True)
    net.sit_kwargs = kwargs
    return net.float().eval().to(device)
