"""Frechet distance, Gaussian statistics, KID, precision/recall and density/coverage against independent
computations."""

import itertools

import numpy as np
import pytest

from distreward.metrics import (GaussianStats, density_coverage, frechet_distance, frechet_distance_sqrtm, kid,
                                precision_recall, sqrtm_psd)
from distreward.metrics.prdc import knn_radii


def _features(rng, n, d, shift=0.0, scale=1.0):
    """Correlated Gaussian features; the mixing matrix depends on d only, so equal arguments = same distribution."""
    mix = np.random.default_rng(1000 + d).standard_normal((d, d)) / np.sqrt(d)
    return scale * rng.standard_normal((n, d)) @ mix + shift


def _fd_nuclear(x1, x2):
    """FD of two feature sets from the nuclear norm of X1c X2c^T: tr sqrt(S2^1/2 S1 S2^1/2) with no matrix root."""
    n1, n2 = len(x1), len(x2)
    x1c, x2c = x1 - x1.mean(0), x2 - x2.mean(0)
    tr = np.linalg.svd(x1c @ x2c.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    diff = x1.mean(0) - x2.mean(0)
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr


# ------------------------------------------------------------------------------------ Frechet distance

@pytest.mark.parametrize("d,seed", [(8, 0), (64, 1), (200, 2)])
def test_frechet_matches_sqrtm_on_random_covariances(d, seed):
    rng = np.random.default_rng(seed)
    a = GaussianStats.from_features(_features(rng, 4 * d, d))
    b = GaussianStats.from_features(_features(rng, 3 * d, d, shift=0.3, scale=1.5))
    ref = frechet_distance_sqrtm(a.mu, a.sigma, b.mu, b.sigma)
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    cached = frechet_distance(a.mu, a.sigma, b.mu, b.sigma, sigma2_half=sqrtm_psd(b.sigma))
    assert ref > 0
    assert abs(ours - ref) / ref < 1e-6
    assert abs(cached - ref) / ref < 1e-6


@pytest.mark.parametrize("n1,n2", [(20, 30), (200, 25), (15, 300)])
def test_frechet_rank_deficient_covariances(n1, n2):
    rng = np.random.default_rng(n1 + n2)
    d = 40
    x1, x2 = _features(rng, n1, d), _features(rng, n2, d, shift=0.5)
    a, b = GaussianStats.from_features(x1), GaussianStats.from_features(x2)
    assert min(np.linalg.matrix_rank(a.sigma), np.linalg.matrix_rank(b.sigma)) < d
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert abs(ours - frechet_distance_sqrtm(a.mu, a.sigma, b.mu, b.sigma)) / ours < 1e-6
    assert abs(ours - _fd_nuclear(x1, x2)) / ours < 1e-6
    cached = frechet_distance(a.mu, a.sigma, b.mu, b.sigma, sigma2_half=sqrtm_psd(b.sigma))
    assert abs(cached - ours) / ours < 1e-6


@pytest.mark.parametrize("n,d", [(500, 16), (10, 32), (300, 128)])
def test_frechet_identical_inputs_is_zero_never_negative_or_nan(n, d):
    rng = np.random.default_rng(d)
    st = GaussianStats.from_features(_features(rng, n, d) * 10)
    for fd in (frechet_distance(st.mu, st.sigma, st.mu, st.sigma),
               frechet_distance(st.mu, st.sigma, st.mu, st.sigma, sigma2_half=sqrtm_psd(st.sigma))):
        assert np.isfinite(fd) and fd >= 0.0
        assert fd < 1e-6 * np.trace(st.sigma)


def test_frechet_zero_covariance_and_pure_mean_shift():
    mu = np.arange(5.0)
    zero = np.zeros((5, 5))
    assert frechet_distance(mu, zero, mu + 2.0, zero) == pytest.approx(5 * 4.0)
    eye = np.eye(5)
    assert frechet_distance(mu, eye, mu, 4 * eye) == pytest.approx(5 * (1 + 4 - 2 * 2))


def test_frechet_errors():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.array([[np.nan, 0], [0, 1]]), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------------------ Gaussian statistics

def test_stats_streaming_equals_batch_and_numpy():
    rng = np.random.default_rng(0)
    x = _features(rng, 1000, 12, shift=3.0)
    st = GaussianStats(12)
    for chunk in np.array_split(x, 7):
        st.update(chunk)
    assert st.n == 1000
    np.testing.assert_allclose(st.mu, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    batch = GaussianStats.from_features(x)
    np.testing.assert_allclose(st.s2, batch.s2, rtol=1e-12)


def test_stats_merge_equals_all():
    rng = np.random.default_rng(1)
    x = _features(rng, 600, 6)
    parts = [GaussianStats.from_features(p) for p in np.array_split(x, 3)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    whole = GaussianStats.from_features(x)
    assert merged.n == whole.n
    np.testing.assert_allclose(merged.sigma, whole.sigma, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="dimension"):
        merged.merge(GaussianStats(7))


def test_stats_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    st = GaussianStats.from_features(_features(rng, 200, 9))
    path = st.save(tmp_path / "ref.npz")
    back = GaussianStats.load(path)
    assert back.n == 200
    np.testing.assert_allclose(back.mu, st.mu)
    np.testing.assert_allclose(back.sigma, st.sigma)
    back.update(_features(rng, 10, 9))  # the sums survived: still streamable
    assert back.n == 210


def test_stats_load_pytorch_fid_style_npz(tmp_path):
    rng = np.random.default_rng(3)
    x = _features(rng, 300, 10)
    np.savez(tmp_path / "fid.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    st = GaussianStats.load(tmp_path / "fid.npz")
    other = GaussianStats.from_features(_features(rng, 300, 10, shift=1.0))
    assert other.fd(st) == pytest.approx(frechet_distance_sqrtm(other.mu, other.sigma, x.mean(0), np.cov(x, rowvar=False)), rel=1e-6)
    with pytest.raises(ValueError, match="mu, sigma"):
        GaussianStats.from_features(x).merge(st)


def test_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="distreward stats"):
        GaussianStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        GaussianStats.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="dimension"):
        GaussianStats(4).update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        GaussianStats.from_features(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        GaussianStats.from_features(np.zeros((1, 2))).sigma


# ------------------------------------------------------------------------------------ KID

def _mmd2_brute(x, y):
    k = lambda a, b: (a @ b / len(a) + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_brute_force_on_one_full_subset():
    rng = np.random.default_rng(4)
    x, y = _features(rng, 15, 4), _features(rng, 15, 4, shift=0.5)
    mean, std = kid(x, y, num_subsets=1, max_subset_size=15)
    assert mean == pytest.approx(_mmd2_brute(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_same_distribution_near_zero_shifted_positive():
    rng = np.random.default_rng(5)
    a, b = _features(rng, 1000, 16), _features(rng, 1000, 16)
    same, same_std = kid(a, b, num_subsets=20, max_subset_size=300)
    shifted, _ = kid(a, _features(rng, 1000, 16, shift=0.5), num_subsets=20, max_subset_size=300)
    assert abs(same) < 3 * same_std + 1e-4
    assert shifted > 0.05 and shifted > 20 * abs(same)


def _kid_by_definition(a, b, num_subsets, max_subset_size, seed):
    """The estimator written out: the subsets drawn as kid() draws them, MMD^2 of each from its three kernels."""
    from distreward.metrics.kid import mmd2_unbiased, polynomial_kernel

    m = min(len(a), len(b), max_subset_size)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        values.append(mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)))
    return float(np.mean(values)), float(np.std(values))


@pytest.mark.parametrize("n_real,n_fake,size", [(400, 100, 1000), (400, 100, 60), (80, 300, 1000), (300, 300, 300)])
def test_kid_reference_kept_between_sets_equals_the_estimator(n_real, n_fake, size):
    """Whole generated set per subset (the row-mean shortcut) or not, one reference scoring several sets: the
    per-subset definition's values up to float64 rounding."""
    from distreward.metrics import KIDReference

    rng = np.random.default_rng(6)
    real = _features(rng, n_real, 8)
    ref = KIDReference(real, num_subsets=7, max_subset_size=size, seed=2)
    for shift in (0.0, 0.3, 0.0):
        fake = _features(rng, n_fake, 8, shift=shift)
        expected = _kid_by_definition(real, fake, 7, size, 2)
        assert ref(fake) == pytest.approx(expected, rel=1e-9, abs=1e-13)
        assert kid(real, fake, num_subsets=7, max_subset_size=size, seed=2) == pytest.approx(expected, rel=1e-9, abs=1e-13)


def test_kid_errors():
    with pytest.raises(ValueError, match="dimensions"):
        kid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        kid(np.zeros((1, 3)), np.zeros((5, 3)))


# ------------------------------------------------------------------------------------ precision / recall

def test_knn_radii_match_brute_force_and_chunking():
    rng = np.random.default_rng(6)
    x = _features(rng, 83, 5)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    expected = np.sort(d2, axis=1)[:, 2]
    np.testing.assert_allclose(knn_radii(x, k=3, batch=10), expected, rtol=1e-9, atol=1e-12)
    y = _features(rng, 61, 5, shift=0.3)
    assert precision_recall(x, y, k=3, batch=7) == precision_recall(x, y, k=3, batch=1000)


def test_precision_recall_same_distribution_high():
    rng = np.random.default_rng(7)
    pr = precision_recall(_features(rng, 2000, 8), _features(rng, 2000, 8), k=3)
    assert pr["precision"] > 0.6 and pr["recall"] > 0.6


def test_precision_recall_collapsed_and_disjoint():
    rng = np.random.default_rng(8)
    real = _features(rng, 2000, 8)
    collapsed = real[:5].repeat(200, axis=0) + 1e-3 * rng.standard_normal((1000, 8))
    pr = precision_recall(real, collapsed, k=3)
    assert pr["precision"] > 0.95
    assert pr["recall"] < 0.05
    far = precision_recall(real, _features(rng, 500, 8, shift=50.0), k=3)
    assert far == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_errors():
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    with pytest.raises(ValueError, match="dimensions"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))


# ------------------------------------------------------------------------------------ density / coverage

def _density_coverage_brute(real, fake, k):
    """Density and coverage from the full fake x real and real x real distance matrices."""
    rr = np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1))
    np.fill_diagonal(rr, np.inf)
    radius = np.sort(rr, axis=1)[:, k - 1]
    inside = np.sqrt(((fake[:, None] - real[None]) ** 2).sum(-1)) <= radius[None, :]
    return {"density": inside.sum() / (k * len(fake)), "coverage": inside.any(axis=0).mean()}


@pytest.mark.parametrize("k", [1, 5])
def test_density_coverage_match_brute_force_and_chunking(k):
    rng = np.random.default_rng(10)
    real, fake = _features(rng, 47, 4), _features(rng, 31, 4, shift=0.4, scale=1.3)
    expected = _density_coverage_brute(real, fake, k)
    chunked = density_coverage(real, fake, k=k, batch=6)
    assert chunked == pytest.approx(expected, rel=1e-12)
    assert chunked == density_coverage(real, fake, k=k, batch=1000)


def test_density_coverage_identical_and_same_distribution():
    rng = np.random.default_rng(11)
    real = _features(rng, 1000, 8)
    same = density_coverage(real, real)
    assert same["coverage"] == 1.0
    assert same["density"] == pytest.approx(6 / 5, abs=0.01)      # each ball holds its centre and its 5 neighbours
    fresh = density_coverage(real, _features(rng, 1000, 8))
    assert 0.9 < fresh["density"] < 1.1 and fresh["coverage"] > 0.9


def test_density_coverage_collapsed_onto_dense_real_points():
    rng = np.random.default_rng(12)
    real = _features(rng, 2000, 8)
    dense = np.argsort(knn_radii(real, k=5))[:5]
    collapsed = real[dense].repeat(200, axis=0) + 1e-3 * rng.standard_normal((1000, 8))
    dc = density_coverage(real, collapsed)
    assert dc["density"] > 1.5
    assert dc["coverage"] < 0.05


def test_density_coverage_drop_with_a_shift():
    rng = np.random.default_rng(13)
    real = _features(rng, 1000, 8)
    base = density_coverage(real, _features(rng, 1000, 8))
    shifted = density_coverage(real, _features(rng, 1000, 8, shift=1.0))
    assert shifted["density"] < 0.5 * base["density"] and shifted["coverage"] < 0.5 * base["coverage"]
    assert density_coverage(real, _features(rng, 500, 8, shift=50.0)) == {"density": 0.0, "coverage": 0.0}


def test_density_coverage_errors():
    with pytest.raises(ValueError, match="more than k=5 real samples, got 5"):
        density_coverage(np.zeros((5, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="dimensions"):
        density_coverage(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="no fake samples"):
        density_coverage(np.random.default_rng(0).standard_normal((10, 2)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="k must be"):
        density_coverage(np.zeros((10, 2)), np.zeros((10, 2)), k=0)
