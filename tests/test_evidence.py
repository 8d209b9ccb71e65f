"""The evaluation protocol's evidence: FD standard errors (bootstrap over generated rows), paired differences,
FD-infinity, per-class FD, several solvers on the same noise, NFE arithmetic and the solver convergence search."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from _tiny import TinyFeatures
from distreward.evaluation import (EvalPlan, Evaluator, converged_steps, evaluate_generator, evaluate_solvers,
                                   heun_for_nfe, nfe)
from distreward.evaluation.protocol import Protocol, find_converged_steps
from distreward.metrics import (GaussianStats, density_coverage, fd_bootstrap, fd_infinity_fit, frechet_distance,
                                paired_difference, per_class_fd, per_class_stats)
from distreward.metrics.evidence import bootstrap_counts, bootstrap_fds
from distreward.sampling.analytic import GaussianVelocity
from distreward.sampling.generate import SamplerSpec
from distreward.schema import ConfigError, defaults


def gaussian(d: int, seed: int, scale: float = 1.0):
    """A random covariance with a full-rank floor."""
    a = np.random.default_rng(seed).normal(size=(d, d)) / np.sqrt(d)
    return scale * (a @ a.T) + 0.1 * np.eye(d)


def draw(n: int, mu, sigma, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, mu.size)) @ np.linalg.cholesky(sigma).T + mu


D8 = 8
REAL8 = GaussianStats.from_mu_sigma(np.zeros(D8), gaussian(D8, 1))
FAKE_MU, FAKE_SIGMA = 0.3 * np.ones(D8), gaussian(D8, 2)      # FD > 0: its error shrinks like 1/sqrt(n)


# ------------------------------------------------------------------------------------------ bootstrap

def test_bootstrap_replicates_are_the_fd_of_the_resampled_rows():
    x = draw(300, FAKE_MU, FAKE_SIGMA, 0)
    reps = bootstrap_fds(x, REAL8, 3, seed=5)
    for w, rep in zip(bootstrap_counts(300, 3, 5), reps):
        rows = np.repeat(np.arange(300), w)
        assert rep == pytest.approx(GaussianStats.from_features(x[rows]).fd(REAL8), rel=1e-9)
    fd, se = fd_bootstrap(x, REAL8, 20, seed=5)
    assert fd == GaussianStats.from_features(x).fd(REAL8) and se > 0


def test_bootstrap_error_shrinks_like_one_over_sqrt_n_and_matches_the_spread_of_independent_draws():
    def mean_se(n):
        return np.mean([fd_bootstrap(draw(n, FAKE_MU, FAKE_SIGMA, 10 + s), REAL8, 100, seed=s)[1] for s in range(4)])

    se_small, se_large = mean_se(500), mean_se(4000)
    assert 2.0 < se_small / se_large < 4.0                     # sqrt(8) = 2.83
    spread = np.std([GaussianStats.from_features(draw(1000, FAKE_MU, FAKE_SIGMA, 100 + s)).fd(REAL8)
                     for s in range(80)], ddof=1)
    assert 1 / 1.5 < mean_se(1000) / spread < 1.5


def test_paired_difference_is_tighter_than_unpaired_when_models_share_noise():
    x = draw(1000, FAKE_MU, FAKE_SIGMA, 3)
    y = 1.05 * x + 0.05 * np.random.default_rng(4).normal(size=x.shape)   # a second model on the same noise
    fa, sa = fd_bootstrap(x, REAL8, 100, seed=7)
    fb, sb = fd_bootstrap(y, REAL8, 100, seed=8)
    diff, se = paired_difference(x, y, REAL8, 100, seed=7)
    assert diff == pytest.approx(fa - fb, rel=1e-12)
    assert 0 < se < 0.3 * np.hypot(sa, sb)
    assert paired_difference(x, x, REAL8, 10) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same rows"):
        paired_difference(x, y[:-1], REAL8)


def test_bootstrap_is_fast_at_the_embedded_default_size():
    import time

    d = 192
    real = GaussianStats.from_mu_sigma(np.zeros(d), gaussian(d, 5))
    x = draw(2000, np.full(d, 0.1), gaussian(d, 6), 0)
    t = time.perf_counter()
    fd_bootstrap(x, real, 50)
    assert time.perf_counter() - t < 3.0                      # ~0.3 s on one thread; generous for a loaded machine


# ------------------------------------------------------------------------------------------ FD-infinity

def test_fd_infinity_removes_the_finite_sample_bias_of_gaussians():
    d, n = 64, 4000
    sigma_r = gaussian(d, 1)
    real = GaussianStats.from_mu_sigma(np.zeros(d), sigma_r)
    for s in range(3):                                        # same distribution: FD = 0, FD_N ~ 0.21 from bias
        fit = fd_infinity_fit(draw(n, np.zeros(d), sigma_r, 100 + s), real, seed=s)
        assert fit.fds[-1] > 0.15 and abs(fit.fd_inf) < 0.05 and fit.slope > 0
    mu_g, sigma_g = np.full(d, 0.05), 0.5 * sigma_r + 0.5 * gaussian(d, 2)
    exact = frechet_distance(mu_g, sigma_g, np.zeros(d), sigma_r)
    fits = [fd_infinity_fit(draw(n, mu_g, sigma_g, 200 + s), real, seed=s) for s in range(6)]
    assert np.mean([f.fds[-1] for f in fits]) - exact > 0.15   # FD_N: biased upwards
    assert abs(np.mean([f.fd_inf for f in fits]) - exact) < 0.1
    assert fits[0].ns[-1] == n and len(fits[0].ns) == 15 and fits[0].ns[0] == 400


# ------------------------------------------------------------------------------------------ per class

def test_per_class_fd_is_zero_for_the_real_set_and_large_for_a_missing_class():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 400)
    centres = np.array([[0, 0, 0, 0], [3, 0, 0, 0], [0, 3, 0, 0]], float)
    real = centres[labels] + rng.normal(size=(labels.size, 4))
    stats = per_class_stats(real, labels)
    same = per_class_fd(real, labels, stats)
    assert max(same["fd"].values()) < 1e-8 and same["mean"] < 1e-8
    fake = real.copy()
    fake[labels == 2] = real[labels == 0]                     # class 2 never drawn: the model gives class 0 instead
    out = per_class_fd(fake, labels, stats)
    assert out["worst_class"] == 2 and out["fd"][2] > 10 and out["fd"][0] < 1e-8 and out["fd"][1] < 1e-8
    assert out["worst"] == out["fd"][2] and out["mean"] == pytest.approx(out["fd"][2] / 3)
    raw = per_class_fd(fake, labels, {c: real[labels == c] for c in range(3)})   # real features instead of stats
    assert raw["fd"][2] == pytest.approx(out["fd"][2], rel=1e-9)
    with pytest.raises(ValueError, match="no real statistics"):
        per_class_fd(fake, labels + 1, stats)


# ------------------------------------------------------------------------------------------ generator level

SHAPE = (1, 8, 8)
M, S = 0.2, 0.4


def tiny_evaluator(tmp_path=None, classes: int = 3):
    g = torch.Generator().manual_seed(11)
    ref = (M + S * torch.randn((600, *SHAPE), generator=g)).clamp(-1, 1)
    ref_labels = torch.arange(600) % classes
    return Evaluator(ref, feature_nets=[TinyFeatures(0, dim=6), TinyFeatures(1, dim=5)],
                     labels=["fmnist-reward", "fmnist-eval"], cache_dir=tmp_path, max_real=300, kid_subsets=5,
                     kid_subset_size=50, ref_labels=ref_labels)


@pytest.fixture(scope="module")
def evaluator():
    return tiny_evaluator()


def tiny_plan(**kw) -> EvalPlan:
    return EvalPlan(n=240, seed=3, batch_size=80, num_classes=3, image_shape=SHAPE,
                    sampler=SamplerSpec(steps=4, method="euler"), **kw)


def test_nfe_and_heun_for_nfe():
    assert nfe(SamplerSpec(steps=10, method="euler")) == 10
    assert nfe(SamplerSpec(steps=10, method="heun")) == 19
    assert nfe(SamplerSpec(kind="sit-sde", steps=250, method="heun")) == 250
    for budget in (1, 2, 7, 8, 35):
        spec = heun_for_nfe(budget, SamplerSpec(shift=3.0, cfg_scale=1.5))
        assert spec.method == "heun" and spec.kind == "ode" and spec.shift == 3.0 and spec.cfg_scale == 1.5
        assert nfe(spec) <= budget < nfe(spec) + 2            # the largest Heun not above the budget
    assert heun_for_nfe(35).steps == 18 and heun_for_nfe(8).steps == 4
    with pytest.raises(ValueError):
        heun_for_nfe(0)


def test_default_plan_keeps_the_metrics_and_evidence_adds_keys(evaluator):
    net = GaussianVelocity(M, S)
    base, _ = evaluate_generator(net, evaluator, tiny_plan())
    assert set(base) == {"fd_reward", "fd_eval", "fd", "kid", "kid_std", "precision", "recall", "density", "coverage",
                         "n"}
    more, _ = evaluate_generator(net, evaluator, tiny_plan(uncertainty=20, fd_infinity=True, per_class=True))
    for k, v in base.items():
        assert more[k] == v, k
    assert more["fd_reward_err"] > 0 and more["fd_eval_err"] > 0 and set(more["fd_err"]) == set(evaluator.labels)
    assert np.isfinite(more["fd_reward_inf"]) and np.isfinite(more["fd_eval_inf"])
    pc = more["fd_class"]["fmnist-eval"]
    assert set(pc["fd"]) == {0, 1, 2} and more["fd_eval_class_mean"] == pytest.approx(pc["mean"])
    assert more["fd_eval_class_worst"] == max(pc["fd"].values())


def test_evaluator_keeps_the_real_side_between_sets(evaluator):
    """KID and precision/recall from the evaluator's kept real-side work equal the one-call functions, set after set."""
    from distreward.metrics import kid, precision_recall

    real = evaluator.real_feats[-1]
    for shift in (0.01, 0.2, 0.01):
        feats = [f[:40] + shift for f in evaluator.real_feats]
        m = evaluator.evaluate_features(feats)
        mean, std = kid(real, feats[-1], num_subsets=evaluator.kid_subsets, max_subset_size=evaluator.kid_subset_size,
                        seed=evaluator.seed)
        assert (m["kid"], m["kid_std"]) == pytest.approx((mean * 1e3, std * 1e3), rel=1e-9, abs=1e-12)
        assert {k: m[k] for k in ("precision", "recall")} == precision_recall(real, feats[-1], k=evaluator.k)
        assert {k: m[k] for k in ("density", "coverage")} == density_coverage(evaluator.real_rows(40), feats[-1], k=5)
    assert evaluator.kid_reference() is evaluator.kid_reference()
    assert evaluator.real_radii(evaluator.k) is evaluator.real_radii(evaluator.k)


def test_evaluator_adds_density_and_coverage_only_with_real_features(evaluator):
    """On a seeded subset of as many real rows as generated ones (Naeem et al. compare equal sizes)."""
    from distreward.evaluation.evaluator import sample_rows

    feats = [f[:40] + 0.01 for f in evaluator.real_feats]
    m = evaluator.evaluate_features(feats)
    real = evaluator.real_feats[-1]
    rows = sample_rows(real.shape[0], 40, evaluator.seed)
    assert rows is not None and len(rows) == 40
    assert {k: m[k] for k in ("density", "coverage")} == density_coverage(real[rows], feats[-1], k=5)
    assert m["coverage"] > 0
    stats = {label: GaussianStats.from_features(f) for label, f in zip(evaluator.labels, evaluator.real_feats)}
    stats_only = Evaluator(ref_stats=stats, feature_nets=evaluator.nets, labels=evaluator.labels, cache_dir=None)
    m = stats_only.evaluate_features(feats)
    assert m["density"] is None and m["coverage"] is None and m["fd_eval"] is not None


def test_evaluator_caches_per_class_real_statistics(tmp_path):
    first = tiny_evaluator(tmp_path)
    again = tiny_evaluator(tmp_path)                          # read from the cache file
    for a, b in zip(first.real_class_stats, again.real_class_stats):
        assert sorted(a) == [0, 1, 2] and all(np.array_equal(a[c].s2, b[c].s2) and a[c].n == b[c].n for c in a)
    assert sum(st.n for st in first.real_class_stats[0].values()) == 600
    other = tiny_evaluator(tmp_path, classes=2)               # other labels: recomputed, not the cached classes
    assert sorted(other.real_class_stats[0]) == [0, 1]
    np.testing.assert_array_equal(other.real_stats[1].s2, first.real_stats[1].s2)


def test_evaluate_solvers_uses_the_same_noise_for_every_solver(evaluator):
    net = GaussianVelocity(M, S)
    euler = SamplerSpec(steps=4, method="euler")
    res = evaluate_solvers(net, evaluator, tiny_plan(uncertainty=20), {"a": euler, "b": euler,
                                                                        "heun": heun_for_nfe(7)}, reference="a")
    diff_keys = {"fd_diff", "fd_reward_diff", "fd_reward_diff_err", "fd_eval_diff", "fd_eval_diff_err"}
    a = {k: v for k, v in res["a"].items() if k not in diff_keys}
    b = {k: v for k, v in res["b"].items() if k not in diff_keys}
    assert a == b and a["nfe"] == 4 and res["heun"]["nfe"] == 7
    assert res["b"]["fd_reward_diff"] == 0.0 and res["b"]["fd_reward_diff_err"] == 0.0
    assert res["heun"]["fd_reward"] != res["a"]["fd_reward"]
    assert res["heun"]["fd_reward_diff"] == pytest.approx(res["heun"]["fd_reward"] - res["a"]["fd_reward"])
    assert res["heun"]["fd_reward_diff_err"] > 0


def test_rows_of_one_plan_pair_through_their_bootstrap_replicates(evaluator):
    """protocol.paired_difference from two rows' replicates = the paired bootstrap of their features."""
    from distreward.evaluation.protocol import paired_difference as rows_difference, relative_gain

    net = GaussianVelocity(M, S)
    res = evaluate_solvers(net, evaluator, tiny_plan(uncertainty=20),
                           {"a": SamplerSpec(steps=4, method="euler"), "heun": heun_for_nfe(7)}, reference="a")
    a, h = res["a"], res["heun"]
    assert len(a["fd_reward_boot"]) == 20 and np.std(a["fd_reward_boot"], ddof=1) == pytest.approx(a["fd_reward_err"])
    diff, err = rows_difference(h, a, "fd_reward")
    assert diff == pytest.approx(h["fd_reward_diff"]) and err == pytest.approx(h["fd_reward_diff_err"])
    assert err < np.hypot(a["fd_reward_err"], h["fd_reward_err"])     # the shared noise cancels
    assert relative_gain(h, a, "fd_reward") == pytest.approx((h["fd_reward"] / a["fd_reward"] - 1, err / a["fd_reward"]))
    bare = [{k: v for k, v in r.items() if not k.endswith("_boot")} for r in (h, a)]
    assert rows_difference(*bare, "fd_reward") is None          # without replicates: independent errors
    ratio = h["fd_reward"] / a["fd_reward"]
    assert relative_gain(*bare, "fd_reward")[1] == pytest.approx(
        ratio * np.hypot(h["fd_reward_err"] / h["fd_reward"], a["fd_reward_err"] / a["fd_reward"]))


def test_converged_steps_stops_when_doubling_no_longer_changes_fd(evaluator):
    net = GaussianVelocity(M, S)                              # exact velocity: only discretisation error is left
    steps, trace = converged_steps(net, evaluator, tiny_plan(uncertainty=30), method="euler", start=1, max_steps=64)
    assert steps is not None and steps == trace[-2]["steps"] and trace[-1]["steps"] == 2 * steps
    assert [r["steps"] for r in trace] == [2 ** i for i in range(len(trace))] and len(trace) >= 3
    assert trace[0]["fd_reward_change"] is None and not trace[0]["converged"]
    last = trace[-1]
    assert last["converged"] and all(last[f"{k}_change"] <= last[f"{k}_err"] for k in ("fd_reward", "fd_eval"))
    for row in trace[1:-1]:                                   # before: some network moved by more than its error
        assert not row["converged"]
        assert any(row[f"{k}_change"] > row[f"{k}_err"] for k in ("fd_reward", "fd_eval"))
    assert trace[0]["fd_reward"] > 10 * trace[-1]["fd_reward"]   # one Euler step: every sample at the mean
    assert trace[1]["nfe"] == 2
    none, short = converged_steps(net, evaluator, tiny_plan(), method="heun", start=1, max_steps=4, tol=0.0)
    assert none is None and [r["steps"] for r in short] == [1, 2, 4] and short[0]["fd_reward_err"] is None


def test_protocol_keeps_validation_and_report_evaluations_apart(evaluator):
    plan = tiny_plan(fd_infinity=True, per_class=True)
    proto = Protocol.of({"validation_seed": 11, "report_seed": 22, "n": 300, "search_n": 120, "uncertainty": 7},
                        plan.sampler, plan.n)
    valid, report = proto.validation_plan(plan), proto.report_plan(plan, evaluator)
    assert (valid.seed, valid.n, valid.uncertainty, valid.fd_infinity, valid.per_class) == (11, 120, 7, False, False)
    assert (report.seed, report.n, report.uncertainty) == (22, 300, 7)
    assert proto.validation_plan(plan, n=50).n == 50 and proto.validation_plan(plan, n=50).seed == 11
    for p in (valid, report):                       # only what is evaluated changes, never how it is sampled
        assert (p.sampler, p.batch_size, p.num_classes, p.image_shape) == \
            (plan.sampler, plan.batch_size, plan.num_classes, plan.image_shape)
    net = GaussianVelocity(M, S)
    found = find_converged_steps(net, evaluator, plan, replace(proto, search_start=1, search_max=8))
    direct = converged_steps(net, evaluator, valid, "heun", 1, 8)
    assert found["searched"] and found["trace"] == direct[1]    # the search sees the validation seed only
    assert find_converged_steps(net, evaluator, plan, replace(proto, converged_steps=5)) == \
        {"steps": 5, "searched": False, "trace": []}


def test_protocol_settings_come_from_the_schema():
    """Keys left out take the Evidence schema's defaults; n falls back to the evaluation's own; a mistyped key or a
    disallowed value is refused before any evaluation."""
    served = SamplerSpec(kind="ode", steps=4, method="euler")
    ev = defaults("finetune")["evidence"]
    proto = Protocol.of({"report_seed": 9}, served, 123)
    assert (proto.report_seed, proto.validation_seed, proto.search_n, proto.curve_nfe) == \
        (9, ev["validation_seed"], ev["search_n"], tuple(ev["curve_nfe"]))
    assert ev["n"] is None and proto.n == 123 and Protocol.of({"n": 40}, served, 123).n == 40
    assert Protocol.of(None, served, 7) == Protocol.of({}, served, 7)
    with pytest.raises(ConfigError, match="evidence.report_sed"):
        Protocol.of({"report_sed": 9}, served, 7)
    with pytest.raises(ConfigError, match="evidence.uncertainty"):
        Protocol.of({"uncertainty": 1}, served, 7)


# ------------------------------------------------------------------------------------------ two processes

def stats_only(evaluator) -> Evaluator:
    """The tiny evaluator's real statistics without real images (FD from merged sums, no KID)."""
    return Evaluator(None, feature_nets=evaluator.nets, labels=evaluator.labels, cache_dir=None,
                     ref_stats=dict(zip(evaluator.labels, evaluator.real_stats)))


def _worker(r: int, port: int, outdir: str) -> None:
    import os

    os.environ.update(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from distreward.utils import dist as D

    D.init_distributed("cpu", timeout_s=30)
    ev = tiny_evaluator()
    plan = tiny_plan(uncertainty=10, fd_infinity=True, per_class=True)
    out = {"full": evaluate_generator(GaussianVelocity(M, S), ev, plan)[0]}
    out["stats"] = evaluate_generator(GaussianVelocity(M, S), stats_only(ev), replace(plan, per_class=False))[0]
    torch.save(out, os.path.join(outdir, f"rank{r}.pt"))
    D.destroy_distributed()


def test_evidence_under_two_processes_equals_one_process(evaluator, tmp_path):
    from _spawn import run_ranks

    plan = tiny_plan(uncertainty=10, fd_infinity=True, per_class=True)
    one = evaluate_generator(GaussianVelocity(M, S), evaluator, plan)[0]
    one_stats = evaluate_generator(GaussianVelocity(M, S), stats_only(evaluator), replace(plan, per_class=False))[0]
    assert one_stats["kid"] is None and one_stats["fd_eval_err"] == pytest.approx(one["fd_eval_err"], rel=1e-9)
    for res in run_ranks(_worker, tmp_path, 2, 120, "evaluation"):
        for got, ref in ((res["full"], one), (res["stats"], one_stats)):
            for key in ("fd_reward", "fd_eval", "fd_reward_err", "fd_eval_err", "fd_reward_inf", "fd_eval_inf"):
                assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-12), key
        assert res["full"]["fd_eval_class_mean"] == pytest.approx(one["fd_eval_class_mean"], rel=1e-6)
