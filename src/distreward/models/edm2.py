"""EDM2: the magnitude-preserving U-Net and its preconditioning (Karras et al. 2024, github.com/NVlabs/edm2).

Parameter names, state_dict order and constructor arguments are those of the official
`training/networks_edm2.py`, so `Precond(**init_kwargs)` takes the kwargs stored in an official snapshot, and
`load_pkl(path)` reads the official `network-snapshot-*.pkl` / `edm2-img512-*.pkl` files through the restricted
unpickler of `distreward.utils.safe_pickle` (nothing in the file is executed).

Convention (EDM): x = y + sigma n; `Precond(x, sigma, class_labels)` returns the denoised D(x; sigma).
`distreward.sampling.EDMVelocity` maps it to the project's flow convention (METHOD.md section 4).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..utils.errors import reading
from ..utils.safe_pickle import PersistentObject, module_state_dict, safe_load

__all__ = ["Precond", "UNet", "Block", "MPConv", "MPFourier", "EDM2_CONFIGS", "edm2_config", "load_pkl",
           "precond_from_record"]

# Named presets of the paper (ImageNet-512 latent models: 64x64x4 latents, 1000 classes). model_channels and
# dropout follow train_edm2.py; parameter counts (measured with `sum(p.numel())`) are in docs/models.md.
_LATENT512 = dict(img_resolution=64, img_channels=4, label_dim=1000)
EDM2_CONFIGS: dict[str, dict] = {
    "XS": dict(_LATENT512, model_channels=128, dropout=0.0),
    "S": dict(_LATENT512, model_channels=192, dropout=0.0),
    "M": dict(_LATENT512, model_channels=256, dropout=0.1),
    "L": dict(_LATENT512, model_channels=320, dropout=0.1),
    "XL": dict(_LATENT512, model_channels=384, dropout=0.1),
    "XXL": dict(_LATENT512, model_channels=448, dropout=0.1),
}


def edm2_config(name: str, **overrides) -> dict:
    """Precond kwargs of a named preset; e.g. edm2_config("S", img_channels=3) for the ImageNet-64 pixel model."""
    key = name.upper().removeprefix("EDM2-").removeprefix("IMG512-")
    if key not in EDM2_CONFIGS:
        raise ValueError(f"unknown EDM2 config {name!r}; known: {', '.join(EDM2_CONFIGS)}")
    return {**EDM2_CONFIGS[key], **overrides}


# --- magnitude-preserving operations ------------------------------------------------------------------------------

def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Unit-magnitude normalisation over `dim` (all but the first by default): x / (eps + |x| / sqrt(numel ratio))."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x: torch.Tensor, f=(1, 1), mode: str = "keep") -> torch.Tensor:
    """Depthwise 2x down/up-sampling with the separable filter f (box filter by default), or identity."""
    if mode == "keep":
        return x
    f = np.float32(f)
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    f = torch.as_tensor(np.outer(f, f)[None, None], dtype=x.dtype, device=x.device)
    c = x.shape[1]
    if mode == "down":
        return nn.functional.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)
    if mode != "up":
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")
    return nn.functional.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (EDM2 Eq. 81)."""
    return nn.functional.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving weighted sum (EDM2 Eq. 88)."""
    return a.lerp(b, t) / np.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation (EDM2 Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([c / np.sqrt(na) * (1 - t) * a, c / np.sqrt(nb) * t * b], dim=dim)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features sqrt(2) cos(2 pi (f x + phi)) (EDM2 Eq. 75); random fixed buffers."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * np.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution / linear layer (EDM2 Eq. 47) with forced weight normalisation (Eq. 66).

    The stored weight is normalised on the fly; in training mode it is also rewritten normalised, as officially.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)
        w = (w * (gain / np.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))


class Block(nn.Module):
    """Encoder/decoder residual block with optional cosine self-attention (EDM2 Figure 21)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter=[1, 1], attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine attention: q, k, v pixel-normalised per head, softmax(q.k / sqrt(c)) v."""
        y = self.attn_qkv(x)
        y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
        q, k, v = normalize(y, dim=2).unbind(3)
        w = torch.einsum("nhcq,nhck->nhqk", q, k / np.sqrt(q.shape[2])).softmax(dim=3)
        y = torch.einsum("nhqk,nhck->nhcq", w, v)
        return self.attn_proj(y.reshape(*x.shape))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads != 0:
            x = mp_sum(x, self.attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    """The EDM2 U-Net: Fourier noise embedding + label embedding, encoder/decoder of `Block`s, gained output."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult=[1, 2, 3, 4], channel_mult_noise=None, channel_mult_emb=None, num_blocks: int = 3,
                 attn_resolutions=[16, 8], label_balance: float = 0.5, concat_balance: float = 0.5,
                 **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down",
                                                      **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc",
                                                            attention=(res in attn_resolutions), **block_kwargs)

        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up",
                                                    **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec",
                                                            attention=(res in attn_resolutions), **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


# --- preconditioning (EDM, Karras et al. 2022, Table 1) -----------------------------------------------------------

def edm_c_skip(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)."""
    return sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)


def edm_c_out(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)."""
    return sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()


def edm_c_in(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """c_in = 1 / sqrt(sigma^2 + sigma_data^2)."""
    return 1 / (sigma_data ** 2 + sigma ** 2).sqrt()


def edm_c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """c_noise = ln(sigma) / 4."""
    return sigma.flatten().log() / 4


class Precond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, labels), plus the learned uncertainty u(sigma) (EDM2 Eq. 21).

    Runs in float32; with use_fp16 the U-Net runs in float16 on CUDA (as officially; never on CPU).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, **unet_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, return_logvar: bool = False, **unet_kwargs):
        """x (N, C, H, W), sigma (N,) or scalar, class_labels one-hot (N, label_dim) or None (unconditional)."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        use_half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if use_half else torch.float32

        x_in = (edm_c_in(sigma, self.sigma_data) * x).to(dtype)
        c_noise = edm_c_noise(sigma)
        F_x = self.unet(x_in, c_noise, class_labels, **unet_kwargs)
        D_x = edm_c_skip(sigma, self.sigma_data) * x + edm_c_out(sigma, self.sigma_data) * F_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x


# --- official snapshots ------------------------------------------------------------------------------------------

def precond_from_record(record) -> Precond:
    """Build our Precond from an official persistence record (init args/kwargs + pickled module state)."""
    with torch.device("meta"):
        net = Precond(*record.init_args, **record.init_kwargs)
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in module_state_dict(record).items()}
    net.load_state_dict(sd, strict=True, assign=True)
    net.init_kwargs = dict(record.init_kwargs)
    return net.eval()


def load_pkl(path: str | os.PathLike, device: str | torch.device = "cpu", return_dict: bool = False):
    """Load an official EDM2 network pickle without executing it; returns the `ema` Precond in eval mode (float32).

    return_dict=True returns the whole pickled dict (`ema` as our Precond; `encoder`, `loss_fn` as
    `PersistentObject` records, `dataset_kwargs` as a dict). `net.init_kwargs` holds the official kwargs.
    """
    path = Path(path)
    with reading(path, "EDM2 network pickle", "give an official EDM2 network-snapshot-*.pkl / edm2-img512-*.pkl"):
        data = safe_load(path, persistent_classes={"Precond": precond_from_record})
    if isinstance(data, Precond):
        data = {"ema": data}
    if not isinstance(data, dict) or "ema" not in data:
        raise ValueError(f"{path}: expected an EDM2 snapshot (a dict with 'ema'), got {type(data).__name__}"
                         + (f" with keys {sorted(data)}" if isinstance(data, dict) else ""))
    ema = data["ema"]
    if isinstance(ema, PersistentObject):
        raise ValueError(f"{path}: 'ema' is a {ema.class_name!r} network; only EDM2 'Precond' networks are supported "
                         "(EDM1 pickles use other classes)")
    data["ema"] = ema.to(device).eval()
    return data if return_dict else data["ema"]
