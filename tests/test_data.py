"""Data loading: Fashion-MNIST (shapes, range, labels, padding), image folders, .npz images, and their errors."""

import gzip

import numpy as np
import pytest
import torch

from distreward.data import (FMNIST_PAD, check_images, find_fmnist_dir, load_fmnist, load_image_folder, load_images,
                             load_npz_images, pad_to, to_float_images, to_uint8_images)


@pytest.fixture(scope="module")
def fmnist_test():
    return load_fmnist("test")


def test_fmnist_test_split_shapes_range_labels(fmnist_test):
    x, y = fmnist_test
    assert x.shape == (10000, 1, FMNIST_PAD, FMNIST_PAD) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10


def test_fmnist_padding_is_background_and_matches_raw(fmnist_test):
    x, _ = fmnist_test
    raw, raw_labels = load_fmnist("test", as_uint8=True)
    assert raw.shape == (10000, 28, 28) and raw.dtype == torch.uint8
    assert (x[:, :, :2] == -1).all() and (x[:, :, -2:] == -1).all()
    assert (x[..., :2] == -1).all() and (x[..., -2:] == -1).all()
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], raw.float() / 127.5 - 1)
    unpadded, _ = load_fmnist("test", pad=False)
    assert unpadded.shape == (10000, 1, 28, 28)
    torch.testing.assert_close(to_uint8_images(unpadded)[:, 0], raw)
    assert torch.equal(raw_labels, fmnist_test[1])


def test_fmnist_train_split():
    x, y = load_fmnist("train", as_uint8=True)
    assert x.shape == (60000, 28, 28)
    assert torch.bincount(y, minlength=10).tolist() == [6000] * 10


def test_fmnist_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fmnist("valid")
    monkeypatch.setenv("DISTREWARD_FMNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="DISTREWARD_FMNIST"):
        find_fmnist_dir()


def test_fmnist_rejects_non_idx_file(tmp_path):
    d = find_fmnist_dir()
    for name in ("t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(d / name)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"not an idx file")
    with pytest.raises(ValueError, match="IDX"):
        load_fmnist("test", directory=tmp_path)


def test_pad_and_conversions():
    u8 = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    x = to_float_images(u8)
    assert x.shape == (3, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8_images(x), u8[:, None])
    p = pad_to(x, 32)
    assert p.shape == (3, 1, 32, 32) and torch.equal(p[..., 2:30, 2:30], x)
    hwc = to_float_images(np.zeros((2, 5, 5, 3), np.uint8))
    assert hwc.shape == (2, 3, 5, 5)
    with pytest.raises(TypeError, match="uint8"):
        to_float_images(np.zeros((2, 5, 5), np.float32))
    with pytest.raises(ValueError, match="cannot pad"):
        pad_to(torch.zeros(1, 1, 40, 40), 32)


def test_check_images_errors():
    ok = torch.zeros(2, 1, 32, 32)
    assert check_images(ok, channels=1, size=32) is ok
    with pytest.raises(TypeError, match="uint8"):
        check_images(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        check_images(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="channel"):
        check_images(torch.zeros(2, 3, 32, 32), channels=1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        check_images(torch.full((2, 1, 32, 32), 200.0))
    with pytest.raises(TypeError, match="Tensor"):
        check_images(np.zeros((2, 1, 32, 32)))


def _write_pngs(folder, arrays):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i:03d}.png")


def test_image_folder_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {c: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for c, n in (("b_trouser", 3), ("a_shirt", 2))}
    for c, arr in imgs.items():
        _write_pngs(tmp_path / c, arr)
    x, y = load_image_folder(tmp_path)
    assert x.shape == (5, 1, 28, 28)
    assert y.tolist() == [0, 0, 1, 1, 1]  # classes in sorted order: a_shirt = 0, b_trouser = 1
    torch.testing.assert_close(to_uint8_images(x)[:2, 0], torch.from_numpy(imgs["a_shirt"]))
    x2, y2 = load_images(tmp_path)
    assert torch.equal(x2, x) and torch.equal(y2, y)


def test_image_folder_unlabelled_rgb_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    _write_pngs(tmp_path / "flat", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    x, y = load_image_folder(tmp_path / "flat")
    assert x.shape == (4, 3, 8, 8) and y is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    _write_pngs(tmp_path / "mixed", [np.zeros((8, 8), np.uint8)])
    from PIL import Image

    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "mixed" / "big.png")
    with pytest.raises(ValueError, match="different sizes"):
        load_image_folder(tmp_path / "mixed")


def test_npz_images(tmp_path):
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=imgs, labels=np.arange(6))
    x, y = load_npz_images(tmp_path / "a.npz")
    assert x.shape == (6, 1, 28, 28) and y.tolist() == list(range(6))
    torch.testing.assert_close(to_uint8_images(x)[:, 0], torch.from_numpy(imgs))
    np.savez(tmp_path / "adm.npz", imgs.reshape(6, 28, 28, 1).repeat(3, -1))  # ADM/EDM sample batch: arr_0, NHWC
    x, y = load_images(tmp_path / "adm.npz")
    assert x.shape == (6, 3, 28, 28) and y is None


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_npz_images(tmp_path / "missing.npz")
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(TypeError, match="uint8"):
        load_npz_images(tmp_path / "f.npz")
    np.savez(tmp_path / "k.npz", pictures=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="no image array"):
        load_npz_images(tmp_path / "k.npz")
    np.savez(tmp_path / "l.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.arange(3))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        load_npz_images(tmp_path / "l.npz")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_images(tmp_path / "nothing-here")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported"):
        load_images(tmp_path / "x.txt")
