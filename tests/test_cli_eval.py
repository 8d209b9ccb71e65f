"""The image-level evaluator and the `stats` / `evaluate` commands, end to end on small Fashion-MNIST subsets."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import distreward.evaluation.evaluator as evaluation
from distreward.cli import main
from distreward.data import load_fmnist, to_uint8_images
from distreward.evaluation import Evaluator, perturb_images
from distreward.metrics import GaussianStats, frechet_distance
from distreward.utils.cache import cache_root, set_cache_root

SMALL = dict(max_real=2000, kid_subsets=10, kid_subset_size=500)


@pytest.fixture(scope="module")
def data():
    train, _ = load_fmnist("train")
    test, _ = load_fmnist("test")
    return train[:2000].clone(), test[:1000].clone()


@pytest.fixture(scope="module")
def evaluator(data, tmp_path_factory):
    return Evaluator(data[0], cache_dir=tmp_path_factory.mktemp("cache"), **SMALL)


def test_real_images_score_well_degraded_ones_badly(data, evaluator):
    _, test = data
    clean = evaluator.evaluate(test)
    assert set(clean) >= {"fd_reward", "fd_eval", "kid", "kid_std", "precision", "recall", "n"}
    assert clean["n"] == 1000
    assert clean["precision"] > 0.5 and clean["recall"] > 0.5
    for kind in ("blur", "noise"):
        bad = evaluator.evaluate(perturb_images(test, kind))
        assert bad["fd_reward"] > 5 * clean["fd_reward"], kind
        assert bad["fd_eval"] > 5 * clean["fd_eval"], kind
        assert bad["kid"] > clean["kid"] + 3 * clean["kid_std"], kind
        assert bad["precision"] < clean["precision"] or bad["recall"] < clean["recall"], kind


def test_evaluate_matches_direct_computation(data, evaluator):
    train, test = data
    m = evaluator.evaluate(test[:500])
    for i, key in enumerate(("fd_reward", "fd_eval")):
        net = evaluator.nets[i]
        real = GaussianStats.from_features(net(train).double().numpy())
        fake = GaussianStats.from_features(net(test[:500]).double().numpy())
        assert m[key] == pytest.approx(frechet_distance(fake.mu, fake.sigma, real.mu, real.sigma), rel=1e-6)
    assert evaluator.labels == ["fmnist-reward", "fmnist-eval"]


def test_real_features_are_cached(data, tmp_path, monkeypatch):
    train, test = data
    first = Evaluator(train[:600], cache_dir=tmp_path, **SMALL)
    files = sorted(tmp_path.glob("real-features-*.npz"))
    assert len(files) == 2

    def refuse(*a, **k):
        raise AssertionError("reference features were recomputed instead of read from the cache")

    monkeypatch.setattr(evaluation, "compute_features", refuse)
    second = Evaluator(train[:600], cache_dir=tmp_path, **SMALL)
    for a, b in zip(first.real_stats, second.real_stats):
        np.testing.assert_array_equal(a.sigma, b.sigma)
    np.testing.assert_array_equal(first.real_feats[-1], second.real_feats[-1])
    with pytest.raises(AssertionError, match="recomputed"):  # other reference images: another key
        Evaluator(train[:601], cache_dir=tmp_path, **SMALL)


def test_stats_only_reference(data, evaluator):
    train, test = data
    held_out = evaluator.nets[1]
    st = GaussianStats.from_features(held_out(train).double().numpy())
    ev = Evaluator(None, ref_stats={"fmnist-eval": st}, cache_dir=None)
    m = ev.evaluate(test[:300])
    assert m["fd_reward"] is None and m["kid"] is None and m["precision"] is None
    assert m["fd_eval"] == pytest.approx(evaluator.evaluate(test[:300])["fd_eval"], rel=1e-6)
    with pytest.raises(ValueError, match="another feature network"):
        Evaluator(None, ref_stats={"fmnist-reward": st}, cache_dir=None)
    with pytest.raises(ValueError, match="reference images"):
        Evaluator(None, cache_dir=None)


def test_evaluator_input_errors(evaluator):
    with pytest.raises(TypeError, match="uint8"):
        evaluator.evaluate(torch.zeros(4, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        evaluator.evaluate(torch.full((4, 1, 32, 32), 255.0))
    with pytest.raises(ValueError, match="pad_to"):
        evaluator.evaluate(torch.zeros(4, 1, 28, 28))
    with pytest.raises(ValueError, match="blur"):
        perturb_images(torch.zeros(1, 1, 32, 32), "jpeg")


def test_perturbations(data):
    x = data[1][:8]
    blurred = perturb_images(x, "blur", 1.5)
    assert blurred.shape == x.shape
    assert blurred.mean().item() == pytest.approx(x.mean().item(), abs=0.02)  # blur preserves mass
    grad = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()
    assert grad(blurred) < 0.7 * grad(x)
    noised = perturb_images(x, "noise", 0.3, seed=1)
    assert noised.min() >= -1 and noised.max() <= 1
    assert torch.equal(noised, perturb_images(x, "noise", 0.3, seed=1))


# ---------------------------------------------------------------------------------------------- CLI

def _save_images_npz(path, images):
    np.savez(path, images=to_uint8_images(images)[:, 0, 2:30, 2:30].numpy())  # 28x28, as users have them
    return path


def test_cli_stats_then_evaluate_with_stats_only(tmp_path, data, capsys):
    out = tmp_path / "eval-stats.npz"
    assert main(["stats", "fmnist-test", "--features", "fmnist-eval", "--max-images", "400", "-o", str(out)]) == 0
    with np.load(out) as z:
        assert z["mu"].shape == (128,) and z["sigma"].shape == (128, 128) and int(z["n"]) == 400
        assert str(z["features"]) == "fmnist-eval"
    imgs = _save_images_npz(tmp_path / "imgs.npz", data[0][:300])
    res = tmp_path / "m.json"
    assert main(["evaluate", str(imgs), "--ref", str(out), "--json", str(res), "--no-cache"]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "fd fmnist-eval" in printed
    m = json.loads(res.read_text())
    assert m["fd_reward"] is None and m["kid"] is None and m["fd_eval"] > 0 and m["n"] == 300


def test_cli_evaluate_images_reference_and_perturb(tmp_path, capsys):
    common = ["fmnist-test", "--ref", "fmnist-train", "--max-images", "400", "--max-ref", "1000", "--max-real", "1000",
              "--kid-subsets", "5", "--cache-dir", str(tmp_path / "cache")]
    assert main(["evaluate", *common, "--json", str(tmp_path / "clean.json")]) == 0
    assert main(["evaluate", *common, "--perturb", "noise", "--json", str(tmp_path / "noise.json")]) == 0
    clean, noise = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("clean", "noise"))
    for key in ("fd_reward", "fd_eval", "kid", "precision", "recall"):
        assert clean[key] is not None and np.isfinite(clean[key])
    assert noise["fd_eval"] > 5 * clean["fd_eval"] and noise["perturb"] == "noise"
    # the record holds what it takes to repeat it: the subsets' sizes and the seed that drew them
    assert {k: clean[k] for k in ("max_images", "max_ref", "max_real", "seed", "kid_subsets")} == \
        {"max_images": 400, "max_ref": 1000, "max_real": 1000, "seed": 0, "kid_subsets": 5}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("evaluate: fmnist-test (400 images) against fmnist-train")
    assert lines[1].startswith("  metrics: fd fmnist-reward ") and "kid_x1e3 " in lines[1]
    assert list((tmp_path / "cache").glob("real-features-*.npz"))          # --cache-dir holds the reference features


def test_cli_errors(tmp_path, capsys):
    def fails(argv, match):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert match in err, err

    fails(["evaluate", str(tmp_path / "missing.npz"), "--ref", "fmnist-test"], "missing.npz")
    (tmp_path / "empty").mkdir()
    fails(["evaluate", str(tmp_path / "empty"), "--ref", "fmnist-test"], "no images")
    fails(["stats", str(tmp_path / "empty"), "-o", str(tmp_path / "s.npz")], "no images")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "seven.npz", mu=rng.standard_normal(7), sigma=np.eye(7))
    np.savez(tmp_path / "few.npz", images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8))
    fails(["evaluate", str(tmp_path / "few.npz"), "--ref", str(tmp_path / "seven.npz")], "7-d statistics")
    np.savez(tmp_path / "rgb.npz", images=rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8))
    fails(["evaluate", str(tmp_path / "rgb.npz"), "--ref", "fmnist-test"], "grayscale")
    np.savez(tmp_path / "float.npz", images=rng.random((10, 28, 28)))
    fails(["evaluate", str(tmp_path / "float.npz"), "--ref", "fmnist-test"], "uint8")
    fails(["stats", "fmnist-test", "-o", str(tmp_path / "s.txt")], ".npz")


@pytest.mark.slow
def test_fmnist_test_vs_full_train_reference(tmp_path):
    """The README's check at reduced size: the full train set as reference, 2000 test images."""
    ev = Evaluator.for_fmnist(cache_dir=tmp_path, max_real=2000, kid_subsets=10)
    test, _ = load_fmnist("test")
    clean = ev.evaluate(test[:2000])
    blurred = ev.evaluate(perturb_images(test[:2000], "blur"))
    assert blurred["fd_eval"] > 10 * clean["fd_eval"] and blurred["fd_reward"] > 10 * clean["fd_reward"]
    assert clean["precision"] > 0.6 and clean["recall"] > 0.6


def test_stats_default_file_is_keyed_by_the_number_of_images(tmp_path, monkeypatch, capsys):
    """Without -o, statistics of another number of images go to another file instead of replacing the first."""
    monkeypatch.chdir(tmp_path)
    for n in (40, 60):
        assert main(["stats", "fmnist-test", "--features", "fmnist-eval", "--max-images", str(n), "--no-progress"]) == 0
    files = sorted((tmp_path / "runs" / "stats").glob("*.npz"))
    assert [f.name for f in files] == ["fmnist-test-fmnist-eval-40.npz", "fmnist-test-fmnist-eval-60.npz"]
    assert [int(np.load(f)["n"]) for f in files] == [40, 60]


def test_the_cache_folder_is_one_per_user(tmp_path, monkeypatch):
    """--cache-dir (set_cache_root), else $DISTREWARD_CACHE, else $XDG_CACHE_HOME/distreward, else
    ~/.cache/distreward: never the folder a command runs in; the evaluator's default is that folder."""
    assert cache_root() == Path(os.environ["DISTREWARD_CACHE"])            # the suite's own (tests/conftest.py)
    assert not str(cache_root()).startswith(str(Path.home() / ".cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTREWARD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "distreward"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "distreward"
    old = set_cache_root(tmp_path / "chosen")
    try:
        assert cache_root() == tmp_path / "chosen"
        assert Evaluator(None, ref_stats={"fmnist-eval": GaussianStats.from_features(np.eye(3, 128))},
                         feature_nets=["fmnist-eval"]).cache_dir == tmp_path / "chosen"
    finally:
        set_cache_root(old)
