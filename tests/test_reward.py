"""The subset-replace reference set (exact / fast / linear) and the reward objects (METHOD.md §3, §6)."""

import io

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from distreward.metrics import GaussianStats, frechet_distance
from distreward.reward import (ClassDistributionReward, ClassifierLogProbReward, DistributionReward,
                               KNNRealismReward, ReferenceSet, build_reward, plain_set_rewards)


def mixture(rng, centers, basis, spec, weights, n):
    """n features from a Gaussian mixture whose components share a decaying spectrum `spec` in `basis`."""
    counts = rng.multinomial(n, weights)
    parts = [centers[j] + (rng.standard_normal((c, spec.size)) * np.sqrt(spec)) @ basis
             for j, c in enumerate(counts) if c]
    x = np.concatenate(parts)
    return x[rng.permutation(n)]


def world(d, n, seed=0, gen_weights=(0.55, 0.25, 0.2, 0.0)):
    """Real data: four equal modes. Reference set: mode 0 over-represented, mode 2 under, mode 3 missing."""
    rng = np.random.default_rng(seed)
    spec = 1.0 / np.arange(1, d + 1) ** 1.2
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    centers = rng.standard_normal((4, d)) * 0.6 + 2.0
    real = GaussianStats.from_features(mixture(rng, centers, basis, spec, [0.25] * 4, max(20 * d, 4000)))
    gen = mixture(rng, centers, basis, spec, list(gen_weights), n)
    draw = lambda w, m: mixture(rng, centers, basis, spec, w, m)  # noqa: E731
    return real, gen, draw


def fd_rows(rows, real):
    st = GaussianStats.from_features(rows)
    return frechet_distance(st.mu, st.sigma, real.mu, real.sigma)


def replaced(ref, x):
    """The reference rows with the len(x) oldest replaced by x, recomputed from scratch."""
    rows = ref.rows.copy()
    rows[ref.oldest(len(x))] = x
    return rows


def test_running_stats_equal_recomputation_after_pushes():
    real, gen, draw = world(d=24, n=300)
    ref = ReferenceSet(gen, real.mu, real.sigma, refresh_every=10**9)  # no refresh: the low-rank updates alone
    for size in [1, 7, 64, 299, 300, 450, 3, 128, 5]:
        ref.push(draw([0.1, 0.2, 0.3, 0.4], size))
        want = GaussianStats.from_features(ref.rows)
        np.testing.assert_allclose(ref.mu, want.mu, rtol=1e-9)
        assert np.abs(ref.sigma - want.sigma).max() <= 1e-9 * np.abs(want.sigma).max()
    assert ref.pushed == 1257 and ref.ptr == 1257 % 300
    # the refresh path gives the same statistics
    ref2 = ReferenceSet(gen, real.mu, real.sigma, refresh_every=50)
    ref2.load_state_dict({**ref.state_dict(), "refresh_every": 50})
    ref2.push(ref.rows[:60])
    ref.push(ref.rows[:60].copy())
    np.testing.assert_allclose(ref2.sigma, ref.sigma, rtol=0, atol=1e-12 * np.abs(ref.sigma).max())
    assert ref2.since_refresh == 0


def test_push_replaces_the_oldest_rows():
    real, gen, draw = world(d=8, n=10)
    ref = ReferenceSet(gen, real.mu, real.sigma)
    new = draw([1, 0, 0, 0], 4)
    ref.push(new)
    np.testing.assert_array_equal(ref.rows[:4], new)
    np.testing.assert_array_equal(ref.rows[4:], gen[4:])
    np.testing.assert_array_equal(ref.oldest(3), [4, 5, 6])
    ref.push(draw([1, 0, 0, 0], 8))  # wraps around
    np.testing.assert_array_equal(ref.oldest(2), [2, 3])


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_sample_rewards_are_fd_before_minus_after(mode):
    real, gen, draw = world(d=16, n=200)
    ref = ReferenceSet(gen, real.mu, real.sigma)
    ref.push(draw([0.25] * 4, 37))  # the oldest row is now row 37
    x = draw([0.1, 0.1, 0.1, 0.7], 6)
    groups = np.array([0, 0, 1, 1, 2, 2])
    r = ref.rewards(x, groups=groups, mode=mode, credit="sample")
    before = fd_rows(ref.rows, real)
    assert ref.fd() == pytest.approx(before, rel=1e-10)
    want = np.array([before - fd_rows(replaced(ref, x[i:i + 1]), real) for i in range(len(x))])
    np.testing.assert_allclose(r, want, rtol=1e-7, atol=1e-9 * before)
    assert len(np.unique(r)) == len(r)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_group_rewards_are_fd_before_minus_after(mode):
    real, gen, draw = world(d=16, n=200)
    ref = ReferenceSet(gen, real.mu, real.sigma)
    ref.push(draw([0.25] * 4, 11))
    x = draw([0.2, 0.2, 0.2, 0.4], 9)
    groups = np.array([5, 5, 5, 2, 2, 2, 2, 9, 5])  # sizes 4, 4 and 1, in any order
    r = ref.rewards(x, groups=groups, mode=mode, credit="group")
    before = fd_rows(ref.rows, real)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        want = before - fd_rows(replaced(ref, x[members]), real)
        np.testing.assert_allclose(r[members], want, rtol=1e-7, atol=1e-9 * before)
    # groups=None: the whole batch is one group
    whole = ref.rewards(x[:5], mode=mode, credit="group")
    assert np.allclose(whole, before - fd_rows(replaced(ref, x[:5]), real), rtol=1e-7)


def test_linear_ranks_like_exact_on_a_realistic_case():
    real, gen, draw = world(d=64, n=2000, seed=1)
    ref = ReferenceSet(gen, real.mu, real.sigma)
    cands = np.concatenate([draw([0.55, 0.25, 0.2, 0.0], 30), draw([1, 0, 0, 0], 10), draw([0, 0, 1, 0], 10),
                            draw([0, 0, 0, 1], 10)])
    exact = ref.rewards(cands, mode="exact")
    linear = ref.rewards(cands, mode="linear")
    assert spearmanr(linear, exact).statistic >= 0.99
    fast = ref.rewards(cands, mode="fast")
    assert np.abs(fast - exact).max() <= 1e-8 * np.abs(exact).max()


@pytest.mark.parametrize("mode", ["exact", "fast", "linear"])
@pytest.mark.parametrize("credit", ["sample", "group"])
def test_overrepresented_mode_scores_below_missing_mode(mode, credit):
    real, gen, draw = world(d=32, n=1000, seed=2)
    ref = ReferenceSet(gen, real.mu, real.sigma)
    over, missing = draw([1, 0, 0, 0], 8), draw([0, 0, 0, 1], 8)
    groups = np.repeat([0, 1], 8)
    r = ref.rewards(np.concatenate([over, missing]), groups=groups, mode=mode, credit=credit)
    assert r[:8].max() < r[8:].min()


@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("n", [400, 40])  # N > d and N < d (singular generated covariance)
def test_fast_equals_brute_force(k, n):
    d = 48
    real, gen, draw = world(d=d, n=n, seed=3)
    ref = ReferenceSet(gen, real.mu, real.sigma)
    x = draw([0.2, 0.3, 0.1, 0.4], 3 * k)
    groups = np.repeat(np.arange(3), k)
    exact = ref.rewards(x, groups=groups, mode="exact", credit="group")
    fast = ref.rewards(x, groups=groups, mode="fast", credit="group")
    tol = 1e-8 if n > d else 1e-6  # brute force itself is only accurate to about 1e-8 when N < d
    assert np.abs(fast - exact).max() <= tol * np.abs(exact).max()


def test_singular_reference_set_gives_finite_rewards():
    real, gen, draw = world(d=64, n=20, seed=4)
    ref = ReferenceSet(gen, real.mu, real.sigma)
    x = np.concatenate([draw([0.25] * 4, 6), gen[:2]])  # includes exact copies of reference rows
    for mode in ("exact", "fast", "linear"):
        for credit in ("sample", "group"):
            r = ref.rewards(x, groups=np.repeat([0, 1], 4), mode=mode, credit=credit)
            assert np.isfinite(r).all(), (mode, credit)
    assert np.isfinite(ref.fd())


def test_state_dict_round_trip_gives_identical_rewards():
    real, gen, draw = world(d=16, n=120)
    ref = ReferenceSet(gen, real.mu, real.sigma)
    ref.push(draw([0.5, 0.5, 0, 0], 50))
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    other = ReferenceSet(draw([0.25] * 4, 120), real.mu * 0, real.sigma * 2)
    other.load_state_dict(sd)
    x, nxt = draw([0.25] * 4, 8), draw([0, 0, 1, 0], 30)
    groups = np.repeat([0, 1], 4)
    for mode in ("exact", "fast", "linear"):
        np.testing.assert_array_equal(other.rewards(x, groups, mode=mode), ref.rewards(x, groups, mode=mode))
    ref.push(nxt)
    other.push(nxt)
    np.testing.assert_array_equal(other.rows, ref.rows)
    np.testing.assert_array_equal(other.rewards(x, groups, credit="group"), ref.rewards(x, groups, credit="group"))
    assert other.ptr == ref.ptr and other.pushed == ref.pushed


def test_bad_input_is_refused_with_a_clear_message():
    real, gen, _ = world(d=8, n=30)
    ref = ReferenceSet(gen, real.mu, real.sigma)
    with pytest.raises(ValueError, match="dimension"):
        ref.rewards(np.zeros((2, 9)))
    with pytest.raises(ValueError, match="NaN"):
        ref.rewards(np.full((2, 8), np.nan))
    with pytest.raises(ValueError, match="groups"):
        ref.rewards(gen[:3], groups=np.array([0, 1]))
    with pytest.raises(ValueError, match="mode"):
        ref.rewards(gen[:3], mode="approx")
    with pytest.raises(ValueError, match="at most N"):
        ref.rewards(np.concatenate([gen, gen]), credit="group")
    with pytest.raises(ValueError, match="real statistics"):
        ReferenceSet(gen, real.mu[:4], real.sigma)


def brute_fd(rows, real):
    """FD of explicit rows against the real statistics, from np.mean / np.cov (no sums, no low-rank updates)."""
    return frechet_distance(rows.mean(0), np.cov(rows, rowvar=False), real.mu, real.sigma)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_set_rewards_equal_brute_force_of_the_replaced_set(mode):
    """r_c = FD(G) - FD(G - S + X_c), S the n oldest rows, checked against an independent ring of rows in age
    order (oldest first): pushes append and keep the most recent N, whatever their size (also > N)."""
    real, gen, draw = world(d=16, n=150)
    ref = ReferenceSet(gen, real.mu, real.sigma, refresh_every=100)   # refreshes happen between the checks
    ring = gen.copy()
    rng = np.random.default_rng(5)
    for step, (m, push) in enumerate([(6, "best"), (12, 40), (3, 400), (6, "best"), (20, 150), (9, "best")]):
        cands = [draw(list(rng.dirichlet(np.ones(4))), m) for _ in range(5)]
        fd0 = brute_fd(ring, real)
        want = np.array([fd0 - brute_fd(np.concatenate([c, ring[m:]]), real) for c in cands])
        got = ref.set_rewards(cands, mode=mode)
        assert got.shape == (5,) and got.dtype == np.float64
        assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max(), step
        assert ref.fd() == pytest.approx(fd0, rel=1e-9)
        new = cands[int(np.argmax(got))] if push == "best" else draw([0.25] * 4, push)
        ref.push(new)
        ring = np.concatenate([ring, new])[-ref.n:]
        np.testing.assert_array_equal(ref.rows[ref.oldest(ref.n)], ring)   # same rows in the same age order
    assert ref.pushed == 6 + 40 + 400 + 6 + 150 + 9


def test_set_rewards_agree_with_group_credit_and_refuse_bad_sets():
    real, gen, draw = world(d=8, n=60)
    ref = ReferenceSet(gen, real.mu, real.sigma)
    cands = [draw([0.25] * 4, 4) for _ in range(3)]
    grouped = ref.rewards(np.concatenate(cands), np.repeat([0, 1, 2], 4), mode="exact", credit="group")
    np.testing.assert_array_equal(ref.set_rewards(cands), grouped[::4])
    with pytest.raises(ValueError, match="same number of samples"):
        ref.set_rewards([cands[0], cands[1][:3]])
    with pytest.raises(ValueError, match="1 to N samples"):
        ref.set_rewards([draw([0.25] * 4, 61)])
    with pytest.raises(ValueError, match="no candidate sets"):
        ref.set_rewards([])


def test_plain_set_rewards_are_minus_the_set_fd():
    real, _, draw = world(d=8, n=60)
    cands = [draw([0.25] * 4, 30) for _ in range(3)]
    want = np.array([-brute_fd(c, real) for c in cands])
    np.testing.assert_allclose(plain_set_rewards(cands, real.mu, real.sigma), want, rtol=1e-9)


# ----- reward objects, with a small random feature network ---------------------------------------------------

class TinyNet(torch.nn.Module):
    """A random stand-in for the Fashion-MNIST feature nets: net(images) -> (B, dim), .logits -> (B, 10)."""

    def __init__(self, dim=12, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.dim = dim
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.SiLU(),
                                        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, dim))
        self.head = torch.nn.Linear(dim, 10)

    def forward(self, x):
        return self.body(x)

    def logits(self, x):
        return self.head(torch.tanh(self.body(x)))


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def feats(net, x):
    with torch.no_grad():
        return net(x).double().numpy()


def test_distribution_reward_scores_features_and_pushes_them():
    net = TinyNet()
    real = GaussianStats.from_features(feats(net, images(400, 1)))
    ref = ReferenceSet(feats(net, images(100, 2)), real.mu, real.sigma)
    reward = DistributionReward(net, ref, mode="fast", credit="sample")
    x, groups = images(6, 3), np.array([0, 0, 0, 1, 1, 1])
    r = reward(x, torch.zeros(6, dtype=torch.long), groups=groups)
    assert r.dtype == torch.float32 and r.shape == (6,)
    np.testing.assert_allclose(r.numpy(), ref.rewards(feats(net, x), groups, mode="exact"), rtol=1e-5, atol=1e-9)
    reward.after_step(x, None)
    np.testing.assert_allclose(ref.rows[:6], feats(net, x), rtol=1e-6)
    assert ref.ptr == 6
    grouped = DistributionReward(net, ref, credit="group")(x, None, groups=groups)
    assert len(torch.unique(grouped)) == 2


def test_per_class_reward_scores_each_sample_against_its_own_class():
    """reward.per_class: class c's samples are scored (and pushed) by class c's set against class c's statistics;
    the classes' sets are those of build_reward with per_class and the initial rows' labels."""
    net = TinyNet()
    init, init_labels = feats(net, images(60, 2)), np.arange(60) % 3
    class_stats = {c: GaussianStats.from_features(feats(net, images(300, 10 + c)) + 0.2 * c) for c in range(3)}
    reward = build_reward({"name": "distribution", "per_class": True}, feature_net=net, init_features=init,
                          class_stats=class_stats, init_labels=torch.from_numpy(init_labels))
    assert isinstance(reward, ClassDistributionReward) and sorted(reward.sets) == [0, 1, 2]
    x, labels = images(7, 3), torch.tensor([2, 0, 1, 2, 2, 0, 1])
    r = reward(x, labels, groups=np.arange(7))
    for c in range(3):
        alone = ReferenceSet(init[init_labels == c], class_stats[c].mu, class_stats[c].sigma)
        idx = (labels == c).numpy()
        np.testing.assert_allclose(r.numpy()[idx], alone.rewards(feats(net, x)[idx], mode="exact"), rtol=1e-5,
                                   atol=1e-9)
    before = {c: s.fd() for c, s in reward.sets.items()}
    assert reward.fd() == pytest.approx(np.mean(list(before.values())))
    state = reward.state_dict()
    calls = []
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    reward.after_step(x, labels)                    # the batch just scored: its features are reused
    hook.remove()
    assert calls == []
    assert [reward.sets[c].ptr for c in range(3)] == [2, 2, 3]
    np.testing.assert_allclose(reward.sets[2].rows[:3], feats(net, x)[[0, 3, 4]], rtol=1e-6)
    reward.load_state_dict(state)
    assert {c: s.fd() for c, s in reward.sets.items()} == pytest.approx(before)
    with pytest.raises(ValueError, match="class labels"):
        reward(x, None)
    with pytest.raises(ValueError, match="class.*3"):
        reward(x, torch.tensor([3, 0, 1, 2, 2, 0, 1]))
    with pytest.raises(ValueError, match="per-class statistics"):
        build_reward({"name": "distribution", "per_class": True}, feature_net=net, init_features=init)


def test_push_features_pushes_rows_and_forgets_the_scored_batch():
    net = TinyNet()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    real = GaussianStats.from_features(feats(net, images(400, 1)))
    ref = ReferenceSet(feats(net, images(100, 2)), real.mu, real.sigma)
    reward = DistributionReward(net, ref)
    x = images(4, 3)
    calls.clear()
    reward(x, None)
    reward(x, None)
    assert len(calls) == 1                      # the features of the scored batch are cached
    f = feats(net, images(5, 4))
    calls.clear()
    reward.push_features(f)
    np.testing.assert_array_equal(ref.rows[:5], f)
    assert ref.ptr == 5 and ref.pushed == 5
    reward(x, None)
    assert len(calls) == 1                      # the cache was dropped: the batch is featurised again


def test_classifier_reward_is_log_probability_of_the_label():
    net = TinyNet()
    reward = ClassifierLogProbReward(net)
    x = images(5, 4)
    all_labels = torch.stack([reward(x, torch.full((5,), c)) for c in range(10)], 1)
    np.testing.assert_allclose(all_labels.double().exp().sum(1).numpy(), 1.0, rtol=1e-5)
    assert (all_labels <= 0).all()
    labels = torch.tensor([3, 1, 4, 1, 5])
    want = torch.log_softmax(net.logits(x), 1)[torch.arange(5), labels]
    np.testing.assert_allclose(reward(x, labels).numpy(), want.detach().numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        reward(x, None)
    with pytest.raises(TypeError, match="logits"):
        ClassifierLogProbReward(torch.nn.Linear(3, 3))


def test_knn_reward_is_minus_distance_to_kth_nearest_real_feature():
    net = TinyNet()
    real_images, x = images(50, 5), images(4, 6)
    real = feats(net, real_images)
    for k, reduce in [(1, "kth"), (3, "kth"), (3, "mean")]:
        r = KNNRealismReward(net, real, k=k, reduce=reduce)(x, None).double().numpy()
        dist = np.sort(np.linalg.norm(feats(net, x)[:, None] - real[None], axis=2), axis=1)[:, :k]
        want = -(dist[:, -1] if reduce == "kth" else dist.mean(1))
        np.testing.assert_allclose(r, want, rtol=1e-4, atol=1e-5)
    own = KNNRealismReward(net, real, k=1)(real_images[:3], None)
    assert own.abs().max() < 1e-3  # a real image is its own nearest neighbour


def test_build_reward_from_config(tmp_path):
    net = TinyNet()
    real_feats = feats(net, images(300, 7))
    real = GaussianStats.from_features(real_feats)
    init = feats(net, images(60, 8))
    real.save(tmp_path / "real.npz")
    np.save(tmp_path / "init.npy", init)
    r = build_reward({"name": "distribution", "mode": "linear", "credit": "group", "scale": 60,
                      "real_stats": str(tmp_path / "real.npz"), "init_features": str(tmp_path / "init.npy")},
                     device="cpu", feature_net=net)
    assert isinstance(r, DistributionReward) and r.mode == "linear" and r.credit == "group" and r.ref.n == 60
    np.testing.assert_allclose(r.ref.real_mu, real.mu)
    r2 = build_reward({"name": "distribution"}, device="cpu", feature_net=net, real_stats=real, init_features=init)
    assert r2.mode == "fast" and r2.credit == "sample"
    assert isinstance(build_reward({"name": "classifier"}, device="cpu", feature_net=net), ClassifierLogProbReward)
    knn = build_reward({"name": "knn", "k": 5, "reduce": "mean"}, device="cpu", feature_net=net, real_features=real_feats)
    assert isinstance(knn, KNNRealismReward) and knn.k == 5
    with pytest.raises(ValueError, match="unknown reward"):
        build_reward({"name": "clip"}, device="cpu", feature_net=net)
    with pytest.raises(ValueError, match="unknown keys"):
        build_reward({"name": "classifier", "mode": "fast"}, device="cpu", feature_net=net)
    with pytest.raises(ValueError, match="initial reference set"):
        build_reward({"name": "distribution"}, device="cpu", feature_net=net, real_stats=real)
    with pytest.raises(ValueError, match="mode"):
        build_reward({"name": "distribution", "mode": "slow"}, device="cpu", feature_net=net, real_stats=real,
                     init_features=init)


def interface_rewards():
    """One reward of each kind, built alike for two uses (the parts, then the whole)."""
    net = TinyNet()
    real = GaussianStats.from_features(feats(net, images(300, 1)))
    init, init_labels = feats(net, images(60, 2)), torch.arange(60) % 3
    class_stats = {c: GaussianStats.from_features(feats(net, images(300, 10 + c)) + 0.2 * c) for c in range(3)}
    return {"distribution": lambda: DistributionReward(net, ReferenceSet(init, real.mu, real.sigma)),
            "per_class": lambda: build_reward({"name": "distribution", "per_class": True}, feature_net=net,
                                              init_features=init, class_stats=class_stats, init_labels=init_labels),
            "classifier": lambda: ClassifierLogProbReward(net),
            "knn": lambda: KNNRealismReward(net, feats(net, images(50, 5)), k=2)}


@pytest.mark.parametrize("kind", ["distribution", "per_class", "classifier", "knn"])
def test_the_interface_parts_make_the_reward_and_its_step(kind):
    """features -> score_features is reward(images, ...), and push_features of those features is after_step; only
    the rewards with a reference set keep state."""
    make = interface_rewards()[kind]
    x, labels, groups = images(6, 3), torch.tensor([0, 1, 2, 2, 1, 0]), np.array([0, 0, 0, 1, 1, 1])
    parts, whole = make(), make()
    f = parts.features(x)
    r = parts.score_features(f, labels, groups)
    assert r.dtype == torch.float32 and r.shape == (6,)
    torch.testing.assert_close(r, whole(x, labels, groups), rtol=0, atol=0)
    parts.push_features(f, labels)
    whole.after_step(x, labels)
    assert repr(parts.state_dict()) == repr(whole.state_dict())
    assert parts.keeps_state == (kind in ("distribution", "per_class")) == (parts.fd() is not None)
    if parts.keeps_state:                             # the pushed rows moved the reference set
        assert repr(parts.state_dict()) != repr(make().state_dict())


def test_per_class_sets_keep_the_configs_refresh_period():
    net = TinyNet()
    init = feats(net, images(30, 2))
    stats = {c: GaussianStats.from_features(feats(net, images(200, 10 + c))) for c in range(3)}
    reward = build_reward({"name": "distribution", "per_class": True, "refresh_every": 7}, feature_net=net,
                          init_features=init, class_stats=stats, init_labels=torch.arange(30) % 3)
    assert [s.refresh_every for s in reward.sets.values()] == [7, 7, 7]
    plain = build_reward({"name": "distribution", "refresh_every": 7}, feature_net=net, init_features=init,
                         real_stats=stats[0])
    assert plain.ref.refresh_every == 7
