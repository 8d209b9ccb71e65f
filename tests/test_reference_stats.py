"""Reference statistics readers: EDM2 .pkl (read with the restricted unpickler) and ADM / pytorch-fid .npz."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from distreward.metrics import GaussianStats
from distreward.metrics.reference import load_reference, load_reference_pkl
from distreward.utils.safe_pickle import UnsafePickleError


def _gaussian(rng: np.random.Generator, d: int, n: int = 50):
    f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return f.mean(0), np.cov(f, rowvar=False)


@pytest.fixture
def edm2_pkl(tmp_path):
    """An EDM2 `calculate_metrics.py ref` file: {'num_images', 'fid': {mu, sigma}, 'fd_dinov2': {mu, sigma}}."""
    rng = np.random.default_rng(0)
    stats = {"num_images": 50, "fid": dict(zip(("mu", "sigma"), _gaussian(rng, 6))),
             "fd_dinov2": dict(zip(("mu", "sigma"), _gaussian(rng, 4)))}
    path = tmp_path / "ref.pkl"
    with open(path, "wb") as f:
        pickle.dump(stats, f)
    return path, stats


def test_edm2_pkl_both_metrics(edm2_pkl):
    path, stats = edm2_pkl
    for metric in ("fid", "fd_dinov2"):
        st = load_reference_pkl(path, metric=metric)
        np.testing.assert_array_equal(st.mu, stats[metric]["mu"])
        np.testing.assert_array_equal(st.sigma, stats[metric]["sigma"])
        assert st.n == 50 and st.dim == stats[metric]["mu"].size
        assert load_reference(path, metric=metric).fd(st) == pytest.approx(0.0, abs=1e-8)
    default = load_reference_pkl(path)
    np.testing.assert_array_equal(default.mu, stats["fid"]["mu"])
    np.testing.assert_array_equal(GaussianStats.load(path).sigma, stats["fid"]["sigma"])


def test_edm2_pkl_errors(edm2_pkl, tmp_path):
    path, stats = edm2_pkl
    with pytest.raises(ValueError, match="'kid'.*fd_dinov2.*fid"):
        load_reference_pkl(path, metric="kid")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_reference_pkl(tmp_path / "missing.pkl")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"fid": {"mu": np.zeros(3), "sigma": np.eye(4)}}))
    with pytest.raises(ValueError, match="sigma has shape"):
        load_reference_pkl(bad)
    bad.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected an EDM2 reference dict"):
        load_reference_pkl(bad)


class _Marker:
    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_pkl_with_code_is_refused_and_not_run(tmp_path):
    marker = _Marker()
    marker.path = str(tmp_path / "created_by_pickle")
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"fid": {"mu": marker, "sigma": np.eye(2)}}))
    with pytest.raises(UnsafePickleError, match="makedirs"):
        load_reference(path)
    assert not os.path.exists(marker.path)


def test_adm_npz_and_plain_npz(tmp_path):
    rng = np.random.default_rng(1)
    mu, sigma = _gaussian(rng, 5)
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu.astype(np.float32), sigma=sigma,
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    st = load_reference(adm)
    assert st.mu.dtype == np.float64
    np.testing.assert_allclose(st.mu, mu, rtol=1e-6)
    np.testing.assert_array_equal(st.sigma, sigma)
    with pytest.raises(ValueError, match="ADM reference batch"):
        load_reference(adm, metric="fd_dinov2")
    plain = tmp_path / "dino.npz"
    np.savez(plain, mu=mu, sigma=sigma)
    np.testing.assert_array_equal(load_reference(plain, metric="fd_dinov2").sigma, sigma)
    missing = tmp_path / "nomu.npz"
    np.savez(missing, m=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        load_reference(missing)
    with pytest.raises(ValueError, match="unknown reference format"):
        load_reference(tmp_path / "ref.txt")
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "absent.npz")
