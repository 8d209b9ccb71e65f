"""The small UNet: shapes, parameter count, conditioning, the save/load round trip, and the CPU fast path against a
plain reference computation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from distreward.config import load_config
from distreward.models import load_generator, read_generator_metadata, save_generator
from distreward.models.unet import Attention, ResBlock, UNet, sigma_embedding
from distreward.sampling import FlowVelocity, ode_sample, sigma_schedule
from distreward.sampling.samplers import CPU_CHUNK

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16])


def _randomise(net):
    """The output layers start at zero; give every weight a value so that the tests can see differences."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def test_shapes_and_dtype():
    net = _randomise(UNet(**TINY))
    x = torch.randn(3, 1, 32, 32)
    v = net(x, torch.tensor([0.1, 0.5, 1.0]), torch.tensor([0, 5, 10]))
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert net(x, 0.3, None).shape == x.shape  # scalar sigma, unconditional (null label)


def test_default_config_parameter_count():
    kwargs = load_config("fmnist_base").network.kwargs
    n = sum(p.numel() for p in UNet(**kwargs).parameters())
    assert 0.4e6 <= n <= 1.5e6, n


def test_conditioning_changes_output():
    net = _randomise(UNet(**TINY))
    x = torch.randn(2, 1, 32, 32)
    s = torch.tensor([0.5, 0.5])
    a = net(x, s, torch.tensor([1, 1]))
    assert not torch.allclose(a, net(x, s, torch.tensor([2, 2])))
    assert not torch.allclose(a, net(x, torch.tensor([0.2, 0.2]), torch.tensor([1, 1])))
    assert torch.equal(net(x, s, None), net(x, s, torch.tensor([10, 10])))  # None is the null label


def test_per_sample_independence():
    net = _randomise(UNet(**TINY)).eval()
    x, s, y = torch.randn(4, 1, 32, 32), torch.rand(4), torch.tensor([0, 3, 10, 7])
    full = net(x, s, y)
    assert torch.allclose(full[1:2], net(x[1:2], s[1:2], y[1:2]), atol=1e-5)


def test_bad_labels_and_resolution():
    net = UNet(**TINY)
    with pytest.raises(ValueError, match="null label"):
        net(torch.randn(1, 1, 32, 32), torch.rand(1), torch.tensor([11]))
    with pytest.raises(ValueError, match="divisible"):
        UNet(img_resolution=30, channel_mult=[1, 2, 4])


def test_sigma_embedding_distinguishes_levels():
    e = sigma_embedding(torch.tensor([0.0, 0.001, 0.5, 1.0]), 16)
    assert e.shape == (4, 16)
    assert torch.cdist(e, e).fill_diagonal_(1).min() > 1e-3


def test_save_load_round_trip(tmp_path):
    net = _randomise(UNet(**TINY))
    path = save_generator(tmp_path / "g.safetensors", net, "unet", TINY, extra={"note": "x"})
    back = load_generator(path)
    assert isinstance(back, UNet) and not back.training
    for (k, a), (k2, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x, s, y = torch.randn(2, 1, 32, 32), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(net.eval()(x, s, y), back(x, s, y))
    assert read_generator_metadata(path)["extra"] == {"note": "x"}


# --- the CPU fast path (docs/sampling.md "CPU speed") against a plain reference ----------------------------------

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "fmnist-base.safetensors"


def reference_forward(net, x, sigma, labels):
    """The UNet's forward written out with plain functional ops on its parameters: NCHW maps, a new tensor per op,
    scaled_dot_product_attention, F.interpolate (the computation before the CPU fast path)."""
    def gn(m, h):
        return F.group_norm(h, m.num_groups, m.weight, m.bias, m.eps)

    def conv(m, h):
        return F.conv2d(h, m.weight, m.bias, m.stride, m.padding)

    def block(blk, h, emb):
        if isinstance(blk, ResBlock):
            y = conv(blk.conv0, F.silu(gn(blk.norm0, h)))
            scale, shift = F.linear(emb, blk.affine.weight, blk.affine.bias)[:, :, None, None].chunk(2, dim=1)
            y = conv(blk.conv1, F.silu(torch.addcmul(shift, gn(blk.norm1, y), scale + 1)))
            return y + (h if blk.skip is None else conv(blk.skip, h))
        if isinstance(blk, Attention):
            b, c, hh, ww = h.shape
            q, k, v = conv(blk.qkv, gn(blk.norm, h)).reshape(b, 3, blk.num_heads, c // blk.num_heads, hh * ww).unbind(1)
            y = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            return h + conv(blk.proj, y.transpose(-1, -2).reshape(b, c, hh, ww))
        if isinstance(blk, nn.Sequential):  # conv, then nearest 2x upsampling
            return F.interpolate(conv(blk[0], h), scale_factor=2, mode="nearest")
        return conv(blk, h)  # downsampling

    b = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(b) if torch.as_tensor(sigma).ndim == 0 else sigma
    lin0, lin1 = net.map_sigma[0], net.map_sigma[2]
    emb = F.linear(F.silu(F.linear(sigma_embedding(sigma, net.sigma_dim), lin0.weight, lin0.bias)), lin1.weight, lin1.bias)
    labels = torch.full((b,), net.null_label) if labels is None else labels
    emb = F.silu(emb + F.embedding(labels, net.map_label.weight))
    h = conv(net.conv_in, x)
    hs = [h]
    for blk in net.enc:
        h = block(blk, h, emb)
        if isinstance(blk, Attention):
            hs[-1] = h
        else:
            hs.append(h)
    for blk in net.mid:
        h = block(blk, h, emb)
    for blk in net.dec:
        h = block(blk, torch.cat([h, hs.pop()], dim=1) if isinstance(blk, ResBlock) else h, emb)
    return conv(net.conv_out, F.silu(gn(net.norm_out, h)))


def _fmnist_unet():
    return _randomise(UNet(**load_config("fmnist_base").network.kwargs)).eval()


@pytest.mark.parametrize("make", [lambda: _randomise(UNet(**TINY)).eval(), _fmnist_unet])
def test_fast_path_equals_the_plain_reference(make):
    net = make()
    assert net.fast_cpu and not net.nhwc  # the defaults
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 1, 32, 32, generator=g), torch.tensor([0, 3, 10, 7, 9])
    for sigma in (torch.rand(5, generator=g), torch.tensor(0.6).expand(5)):  # per-sample, and broadcast as samplers do
        with torch.no_grad():
            ref = reference_forward(net, x, sigma, y)
            fast = net(x, sigma, y)
            net.fast_cpu = False
            plain = net(x, sigma, y)
            net.fast_cpu = True
        assert fast.is_contiguous() and np.max(np.abs((fast - ref).numpy())) < 1e-5
        assert np.max(np.abs((plain - ref).numpy())) < 1e-5


def _reference_euler(net, noise, labels, sigmas):
    x = noise.clone()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            x = x + (s_next - s) * reference_forward(net, x, torch.full((x.shape[0],), s), labels)
    return x


@pytest.mark.parametrize("name,tol", [("fmnist-base-2k.safetensors", 1e-5), ("fmnist-base.safetensors", 3e-5)])
def test_fast_ode_sampler_matches_the_plain_reference_on_the_shipped_network(name, tol):
    """Same weights, same noise, 10 Euler steps, a few batches (larger than the CPU chunk, so the chunked sampler
    runs): max |difference| within float32 rounding of a plain eager computation (1e-5 on the 2,000-step base; the
    longer-trained plateau base's larger weights round to 1.3e-5)."""
    path = SHIPPED.parent / name
    if not path.is_file():
        pytest.skip(f"{path} (a shipped network) is missing")
    net = load_generator(path)
    model, sigmas = FlowVelocity(net), sigma_schedule(10)
    for seed, n in [(0, CPU_CHUNK + 2), (1, 24)]:
        noise = torch.randn((n, 1, 32, 32), generator=torch.Generator().manual_seed(seed))
        labels = torch.arange(n) % (net.num_classes + 1)  # every class and the null label
        fast = ode_sample(model, noise, labels, sigmas)
        assert np.max(np.abs((fast - _reference_euler(net, noise, labels, sigmas)).numpy())) < tol


def test_training_path_gradients_equal_the_reference():
    net = _randomise(UNet(**TINY)).train()
    x, s, y = torch.randn(3, 1, 32, 32), torch.rand(3), torch.tensor([1, 4, 10])
    net(x, s, y).square().sum().backward()
    fast_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    reference_forward(net, x, s, y).square().sum().backward()
    for (name, p), g in zip(net.named_parameters(), fast_grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_opt_in_nhwc_path_is_close_and_keeps_the_weights_contiguous(tmp_path):
    net = _fmnist_unet()
    net.nhwc = True
    g = torch.Generator().manual_seed(3)
    x, s, y = torch.randn(4, 1, 32, 32, generator=g), torch.rand(4, generator=g), torch.tensor([0, 5, 10, 2])
    with torch.no_grad():
        v = net(x, s, y)
        assert v.is_contiguous() and (v - reference_forward(net, x, s, y)).abs().max() < 1e-4
    net(x, s, y).square().sum().backward()  # with gradients too
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    reference_forward(net, x, s, y).square().sum().backward()
    for g_nhwc, p in zip(grads, net.parameters()):
        torch.testing.assert_close(g_nhwc, p.grad, rtol=1e-4, atol=1e-5)
    assert all(p.is_contiguous() for p in net.parameters())
    save_generator(tmp_path / "g.safetensors", net, "unet", {})
