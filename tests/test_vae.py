"""LatentCodec on a small randomly initialised AutoencoderKL saved to a temporary folder (no download)."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from distreward.models.vae import LatentCodec, find_vae_dir  # noqa: E402

# A 4-level encoder (3 down-samplings: 8x), 4 latent channels, as the Stable Diffusion VAEs, at a tiny width.
TINY = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=32)

# The latent conventions (SiT: x 0.18215; EDM2: per-channel whitening), written out here
# independently of the module's constants.
RAW_MEAN = torch.tensor([5.81, 3.25, 0.12, -2.15])
RAW_STD = torch.tensor([4.17, 4.62, 3.71, 3.28])


def expected_affine(convention):
    if convention == "sit":
        return torch.full((4,), 0.18215), torch.zeros(4)
    scale = 0.5 / RAW_STD
    return scale, 0.0 - RAW_MEAN * scale


def per_channel(v):
    return v.reshape(1, -1, 1, 1)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**TINY)
    with torch.no_grad():  # a non-zero posterior log-variance, so that sampling visibly differs from the mean
        vae.quant_conv.bias[4:] += 1.0
    path = tmp_path_factory.mktemp("vae") / "sd-vae-tiny"
    vae.save_pretrained(str(path))
    return path


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 32, 32, generator=g) * 2 - 1


def raw_posterior(codec, vae_pixels):
    d = codec.vae.encode(vae_pixels).latent_dist
    return d.mean, d.std


def test_shapes_and_range(vae_dir, images):
    codec = LatentCodec.load(vae_dir, "sit", batch_size=2)
    assert codec.factor == 8 and codec.latent_shape((3, 256, 256)) == (4, 32, 32)
    z = codec.encode(images)
    assert z.shape == (3, 4, 4, 4) and z.dtype == torch.float32
    x = codec.decode(z * 50)  # far outside the data: the output is still clamped to [-1, 1]
    assert x.shape == images.shape and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(images[:, :, :20, :20])
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        codec.decode(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("convention", ["sit", "edm2"])
def test_encode_mean_is_the_affine_map_of_the_posterior_mean(vae_dir, images, convention):
    codec = LatentCodec.load(vae_dir, convention)
    vae_pixels = images if convention == "sit" else (images + 1) / 2   # SiT feeds [-1,1], EDM2 feeds [0,1]
    mean, _ = raw_posterior(codec, vae_pixels)
    scale, bias = expected_affine(convention)
    got = codec.encode(images, sample=False)
    torch.testing.assert_close(got, mean * per_channel(scale) + per_channel(bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("convention", ["sit", "edm2"])
def test_encode_sample_draws_from_the_posterior(vae_dir, images, convention):
    codec = LatentCodec.load(vae_dir, convention, batch_size=2)
    vae_pixels = images if convention == "sit" else (images + 1) / 2
    mean, std = raw_posterior(codec, vae_pixels)
    scale, bias = expected_affine(convention)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    expected = (mean + std * noise) * per_channel(scale) + per_channel(bias)
    got = codec.encode(images, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, codec.encode(images, sample=False))
    # the noise is drawn for the whole input at once: the batch size does not change the result
    one_by_one = LatentCodec.load(vae_dir, convention, batch_size=1)
    torch.testing.assert_close(one_by_one.encode(images, generator=torch.Generator().manual_seed(7)), got,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("convention", ["sit", "edm2"])
def test_decode_inverts_the_affine_map_exactly(vae_dir, images, convention):
    codec = LatentCodec.load(vae_dir, convention)
    vae_pixels = images if convention == "sit" else (images + 1) / 2
    mean, _ = raw_posterior(codec, vae_pixels)
    seen = []
    decode = codec.vae.decode

    def spy(z, *a, **k):
        seen.append(z.clone())
        return decode(z, *a, **k)

    codec.vae.decode = spy
    codec.decode(codec.encode(images, sample=False))
    torch.testing.assert_close(torch.cat(seen), mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("convention,lo", [("sit", -1.0), ("edm2", 0.0)])
def test_pixel_range_conversions(vae_dir, images, convention, lo):
    codec = LatentCodec.load(vae_dir, convention)
    seen = []
    encode = codec.vae.encode

    def spy(x, *a, **k):
        seen.append(x.clone())
        return encode(x, *a, **k)

    codec.vae.encode = spy
    codec.encode(images, sample=False)
    torch.testing.assert_close(seen[0], images if lo == -1 else (images + 1) / 2)

    # decoder outputs are read in the VAE's range [lo, 1], clamped, and mapped to [-1, 1]
    ramp = torch.linspace(lo - 0.5, 1.5, 3 * 32 * 32).reshape(1, 3, 32, 32)
    codec.vae.decode = lambda z, *a, **k: type("Out", (), {"sample": ramp.expand(z.shape[0], -1, -1, -1)})()
    out = codec.decode(torch.zeros(2, 4, 4, 4))
    expected = ramp.clamp(lo, 1) * 2 - 1 if lo == 0 else ramp.clamp(-1, 1)
    torch.testing.assert_close(out, expected.expand(2, -1, -1, -1))


def test_dtype_and_device(vae_dir, images):
    ref = LatentCodec.load(vae_dir, "edm2")
    low = LatentCodec.load(vae_dir, "edm2", dtype=torch.bfloat16)
    assert low.vae_dtype == torch.bfloat16
    z = low.encode(images, sample=False)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, ref.encode(images, sample=False), rtol=0.05, atol=0.05)
    assert low.decode(z).dtype == torch.float32
    assert ref.to("cpu").device == torch.device("cpu")


def test_missing_folder_and_files_give_clear_errors(tmp_path, vae_dir):
    with pytest.raises(FileNotFoundError, match="config.json.*sd-vae-ft-mse"):
        LatentCodec.load(tmp_path / "nowhere", "edm2")
    with pytest.raises(FileNotFoundError, match="sd-vae-ft-ema"):
        LatentCodec.load(tmp_path / "nowhere", "sit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LatentCodec.load(tmp_path / "empty", "sit")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(FileNotFoundError, match="no weights.*diffusion_pytorch_model.safetensors"):
        LatentCodec.load(tmp_path / "noweights", "sit")
    with pytest.raises(ValueError, match="unknown latent convention"):
        LatentCodec.load(vae_dir, "sd3")


def test_hugging_face_cache_layout(tmp_path, vae_dir):
    snap = tmp_path / "models--stabilityai--sd-vae-ft-ema" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in vae_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    assert find_vae_dir(tmp_path / "models--stabilityai--sd-vae-ft-ema") == snap
    assert LatentCodec.load(tmp_path / "models--stabilityai--sd-vae-ft-ema", "sit").latent_channels == 4
