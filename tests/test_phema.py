"""Power-function EMA and post-hoc EMA reconstruction (EDM2), checked on simulated runs."""

import numpy as np
import pytest
import torch

from distreward.models import read_generator_metadata, save_generator
from distreward.models.unet import UNet
from distreward.train.ema import PowerEMA, gamma_to_sigma_rel, power_beta, power_weights, sigma_rel_to_gamma
from distreward.train.phema import (list_snapshots, phema_coefficients, profile_inner, reconstruct, save_phema,
                                    snapshot_extra, snapshot_filename, solve_phema_coefficients)


def test_gamma_sigma_rel_inverse_and_edm2_values():
    for s in (0.01, 0.05, 0.08, 0.1, 0.2, 0.27):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-10)
    # the std of the continuous profile p(tau) = (g+1) tau^g on [0, 1], integrated numerically
    g = sigma_rel_to_gamma(0.05)
    tau = np.linspace(0, 1, 200_001)
    p = (g + 1) * tau ** g
    m = np.trapezoid(tau * p, tau)
    assert np.sqrt(np.trapezoid((tau - m) ** 2 * p, tau)) == pytest.approx(0.05, rel=1e-4)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.3)


def _track(theta, std):
    """Directly tracked power EMA of the rows of theta (theta[k-1] = weights after step k), at every step."""
    g = sigma_rel_to_gamma(std)
    e, out = np.zeros(theta.shape[1]), []
    for t, th in enumerate(theta, start=1):
        b = power_beta(t, g)
        e = b * e + (1 - b) * th
        out.append(e.copy())
    return np.array(out)


@pytest.fixture(scope="module")
def walk():
    rng = np.random.default_rng(0)
    theta = np.cumsum(rng.standard_normal((600, 64)), axis=0)
    return theta, {s: _track(theta, s) for s in (0.05, 0.1)}


def test_power_weights_match_the_recursion(walk):
    theta, ema = walk
    for std in (0.05, 0.1):
        w = power_weights(600, sigma_rel_to_gamma(std))
        assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
        np.testing.assert_allclose(w @ theta, ema[std][-1], rtol=1e-10, atol=1e-9)


def test_profile_inner_against_quadrature():
    ga, gb = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.12)
    ta, tb = 300.0, 1000.0
    tau = np.linspace(0, ta, 400_001)
    num = np.trapezoid((ga + 1) * tau ** ga / ta ** (ga + 1) * (gb + 1) * tau ** gb / tb ** (gb + 1), tau)
    assert profile_inner(ta, ga, tb, gb) == pytest.approx(num, rel=1e-6)
    assert profile_inner(tb, gb, ta, ga) == pytest.approx(num, rel=1e-12)  # symmetric


def _snapshots(walk, every=60):
    theta, ema = walk
    steps = list(range(every, len(theta) + 1, every))
    ts = steps + steps
    stds = [0.05] * len(steps) + [0.1] * len(steps)
    vals = np.array([ema[s][t - 1] for t, s in zip(ts, stds)])
    return ts, stds, vals


@pytest.mark.parametrize("target", [0.07, 0.13, 0.2])
@pytest.mark.parametrize("method", ["continuous", "discrete"])
def test_reconstruction_matches_direct_ema(walk, target, method):
    theta, ema = walk
    ts, stds, vals = _snapshots(walk)
    x = solve_phema_coefficients(ts, stds, len(theta), target, method=method)[:, 0]
    assert x.sum() == pytest.approx(1.0)
    rec = x @ vals
    direct = _track(theta, target)[-1]
    # The error must be small next to what separates the target from the nearest tracked profile.
    nearest = min(np.linalg.norm(direct - ema[s][-1]) for s in (0.05, 0.1))
    assert np.linalg.norm(rec - direct) < 0.05 * nearest


def test_reconstruction_at_an_earlier_step(walk):
    theta, ema = walk
    ts, stds, vals = _snapshots(walk)
    x = solve_phema_coefficients(ts, stds, 300, 0.08, method="discrete")[:, 0]
    direct = _track(theta[:300], 0.08)[-1]
    nearest = min(np.linalg.norm(direct - ema[s][299]) for s in (0.05, 0.1))
    assert np.linalg.norm(x @ vals - direct) < 0.1 * nearest


def test_existing_profile_is_reproduced_exactly(walk):
    ts, stds, _ = _snapshots(walk)
    x = solve_phema_coefficients(ts, stds, 600, 0.1)[:, 0]
    expect = np.zeros(len(ts))
    expect[ts.index(600, len(ts) // 2)] = 1.0  # the std-0.1 snapshot at the last step
    np.testing.assert_allclose(x, expect, atol=1e-6)


def test_power_ema_module_tracks_weights():
    net = torch.nn.Linear(3, 2)
    ema = PowerEMA(net, [0.05, 0.1])
    history = []
    for t in range(1, 31):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape))
        history.append(torch.cat([p.detach().flatten() for p in net.parameters()]).double().numpy())
        ema.update(net, t)
    for std, e in zip(ema.stds, ema.emas):
        got = torch.cat([p.flatten() for p in e.parameters()]).double().numpy()
        np.testing.assert_allclose(got, power_weights(30, sigma_rel_to_gamma(std)) @ np.array(history), rtol=1e-5, atol=1e-5)
    sd = ema.state_dict()
    other = PowerEMA(torch.nn.Linear(3, 2), [0.05, 0.1])
    other.load_state_dict(sd)
    assert torch.equal(other.emas[1].weight, ema.emas[1].weight)
    with pytest.raises(ValueError, match="ema.stds"):
        PowerEMA(net, [0.05]).load_state_dict(sd)


KW = dict(model_channels=4, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])


def _write_fake_run(folder, walk):
    """Snapshot files whose every parameter follows the simulated EMA values, plus the direct target."""
    ts, stds, vals = _snapshots(walk, every=120)
    net = UNet(**KW)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    for t, s, v in zip(ts, stds, vals):
        sd = {k: torch.full(shape, float(v[0]), dtype=torch.float32) for k, shape in shapes.items()}
        save_generator(folder / snapshot_filename(s, t), net, "unet", KW, extra=snapshot_extra(s, t, batch=32), state_dict=sd)
    return ts


def test_snapshot_files_metadata_and_reconstruction(tmp_path, walk):
    theta, _ = walk
    _write_fake_run(tmp_path, walk)
    save_generator(tmp_path / "other.safetensors", UNet(**KW), "unet", KW)  # a generator, not a snapshot: skipped
    snaps = list_snapshots(tmp_path)
    assert len(snaps) == 10 and {s.std for s in snaps} == {0.05, 0.1}
    assert snaps[-1].step == 600 and snaps[-1].kimg == pytest.approx(600 * 32 / 1000) and snaps[-1].batch == 32
    meta = read_generator_metadata(snaps[0].path)["extra"]["phema"]
    assert meta["gamma"] == pytest.approx(sigma_rel_to_gamma(meta["std"]))

    used, x = phema_coefficients(snaps, 0.08)
    sd, info = reconstruct(snaps, 0.08)
    want = float(x @ np.array([_track(theta, s.std)[s.step - 1][0] for s in used]))
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert float(next(iter(sd.values())).flatten()[0]) == pytest.approx(want, rel=1e-6, abs=1e-5)
    assert info["phema"]["std"] == 0.08 and len(info["phema"]["coefficients"]) == 10

    out = save_phema(tmp_path / "out" / "ema.safetensors", snaps, 0.08)
    assert read_generator_metadata(out)["extra"]["phema_reconstruction"]["std"] == 0.08
    assert len(list_snapshots(tmp_path)) == 10  # the output is not mistaken for a snapshot

    used_early, _ = phema_coefficients(snaps, 0.08, step=300)
    assert max(s.step for s in used_early) <= 300
    with pytest.raises(ValueError, match="no snapshot at or before"):
        phema_coefficients(snaps, 0.08, step=10)


def test_missing_snapshots_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="snapshots"):
        list_snapshots(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        list_snapshots(tmp_path / "nope")
