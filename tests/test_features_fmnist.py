"""The embedded Fashion-MNIST feature networks: shipped weights, interface, errors, training and file round trip."""

import numpy as np
import pytest
import torch

from distreward.data import load_fmnist
from distreward.features import compute_features, get_feature_network
from distreward.features.fmnist import (ROLES, augment, build_classifier, classifier_accuracy, load_fmnist_classifier,
                                        read_classifier_metadata, save_classifier, shipped_weights,
                                        train_feature_network)

ACCURACY_BAR = 0.88


@pytest.fixture(scope="module")
def test_set():
    return load_fmnist("test")


@pytest.mark.parametrize("role", ["reward", "eval"])
def test_shipped_weights_classify_test_set(role, test_set):
    name = ROLES[role]["name"]
    path = shipped_weights(role)
    assert path.is_file() and path.stat().st_size < 2_000_000
    net = get_feature_network(name)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x, y = test_set
    acc = classifier_accuracy(net, x, y)
    assert acc >= ACCURACY_BAR
    meta = read_classifier_metadata(path)
    assert meta["arch"] == ROLES[role]["arch"] and meta["kwargs"] == ROLES[role]["kwargs"]
    assert meta["test_accuracy"] == pytest.approx(acc, abs=2e-4)  # the recorded figure is the true one


def test_networks_differ_and_features_are_full_rank(test_set):
    x = test_set[0][:1000]
    reward, held_out = get_feature_network("fmnist-reward"), get_feature_network("fmnist-eval")
    assert type(reward) is not type(held_out)
    assert 128 <= reward.dim <= 512 and 128 <= held_out.dim <= 512
    for net in (reward, held_out):
        f = compute_features(net, x, batch_size=300)
        assert f.shape == (1000, net.dim) and f.dtype == np.float64 and np.isfinite(f).all()
        assert net(x[:4]).dtype == torch.float32
        assert net.logits(x[:4]).shape == (4, 10)
        assert np.linalg.matrix_rank(np.cov(f, rowvar=False)) == net.dim


def test_features_separate_classes(test_set):
    """Penultimate features carry the class: nearest class mean classifies well."""
    x, y = test_set
    net = get_feature_network("fmnist-eval")
    f = compute_features(net, x[:2000])
    means = np.stack([f[y[:2000].numpy() == c].mean(0) for c in range(10)])
    pred = ((f[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y[:2000].numpy()).mean() > 0.8


def test_input_errors():
    net = get_feature_network("fmnist-reward")
    with pytest.raises(ValueError, match="pad_to"):
        net(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        net(torch.zeros(2, 3, 32, 32))
    with pytest.raises(TypeError, match="to_float_images"):
        net(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-features"):
        load_fmnist_classifier(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="train-features"):
        get_feature_network("fmnist-eval", weights=tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="arch"):
        load_fmnist_classifier(tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="unknown feature network"):
        get_feature_network("no-such-net")
    with pytest.raises(ValueError, match="architecture"):
        build_classifier("resnet-9000")


def test_augment_keeps_shape_and_background():
    g = torch.Generator().manual_seed(0)
    blank = torch.full((16, 1, 32, 32), -1.0)
    assert torch.equal(augment(blank, g), blank)
    x = -torch.ones(64, 1, 32, 32)
    x[:, :, 10:20, 12:16] = 1.0
    out = augment(x, g)
    assert out.shape == x.shape
    assert torch.equal(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # the object is shifted/flipped, never cropped
    assert not torch.equal(out, x)


def test_train_save_load_roundtrip(tmp_path, test_set):
    kwargs = {"widths": [8, 8, 16], "dim": 32}
    net, info = train_feature_network("pool-cnn", seed=3, epochs=1, kwargs=kwargs, batch_size=64,
                                      max_train=1024, max_test=500, progress=False, log=None)
    assert info["train_images"] == 1024 and info["test_images"] == 500 and 0.0 <= info["test_accuracy"] <= 1.0
    assert info["test_accuracy"] > 0.2  # 16 steps already beat chance (0.1)
    path = save_classifier(tmp_path / "net.safetensors", net, "pool-cnn", kwargs, info)
    back = get_feature_network(path)
    assert back.dim == 32 and read_classifier_metadata(path)["seed"] == 3
    x = test_set[0][:32]
    torch.testing.assert_close(back(x), net(x))
    again, _ = train_feature_network("pool-cnn", seed=3, epochs=1, kwargs=kwargs, batch_size=64,
                                     max_train=1024, max_test=500, progress=False, log=None)
    torch.testing.assert_close(again(x), net(x))  # a seed reproduces the network
