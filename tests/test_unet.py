"""The small UNet: shapes, parameter count, conditioning, and the save/load round trip."""

import pytest
import torch

from distreward.config import load_config
from distreward.models import load_generator, read_generator_metadata, save_generator
from distreward.models.unet import UNet, sigma_embedding

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
