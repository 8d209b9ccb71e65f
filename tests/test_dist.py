"""distreward.utils.dist: two gloo processes on CPU (spawned, with a deadline), and the single-process fallbacks."""

import os
import time

import numpy as np
import pytest
import torch

from distreward.metrics import GaussianStats, merge_gaussian_stats
from distreward.utils import dist as D
from _spawn import run_ranks  # noqa: E402

WORLD = 2
DEADLINE_S = 60          # the whole 2-process run; a hang fails the test instead of blocking the suite
COLLECTIVE_TIMEOUT_S = 30


def features():
    """37 feature rows with distinct means and scales per dimension (a large mean tests the float64 sums)."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(37, 6)) * np.arange(1, 7) + 100.0 * np.arange(6)


SPLIT = 15               # rank 0 holds rows [0, 15), rank 1 rows [15, 37): unequal parts


def _worker(r: int, port: int, outdir: str) -> None:
    os.environ.update(RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = D.init_distributed("cpu", timeout_s=COLLECTIVE_TIMEOUT_S)
    out = {"device": str(device), "rank": D.rank(), "world": D.world_size(), "is_main": D.is_main()}

    f = features()
    part = f[:SPLIT] if r == 0 else f[SPLIT:]
    local = GaussianStats.from_features(part)
    merged = merge_gaussian_stats(local)
    out.update(n=merged.n, s1=merged.s1, s2=merged.s2, local_n=local.n)

    # variable row counts (3 and 5), rows tagged with (rank, index)
    k = 3 if r == 0 else 5
    rows = torch.stack([torch.full((k,), float(r)), torch.arange(k, dtype=torch.float64)], 1)
    out["gathered"] = D.all_gather_rows(rows)
    out["gathered_np"] = D.all_gather_rows(rows.numpy() * 2)
    out["gathered_empty"] = D.all_gather_rows(torch.arange(2 * r, dtype=torch.int64).reshape(r, 2))
    # shards of 11 items, gathered back in rank order
    idx = D.shard_indices(11)
    out["shard"] = list(idx)
    out["reassembled"] = D.all_gather_rows(torch.arange(11)[idx.start:idx.stop])
    try:
        D.all_gather_rows(torch.zeros(2, 3 + r))
        out["shape_error"] = None
    except ValueError as e:
        out["shape_error"] = str(e)
    try:
        D.all_gather_rows(torch.zeros(2, 3, dtype=torch.float32 if r == 0 else torch.float64))
        out["dtype_error"] = None
    except ValueError as e:
        out["dtype_error"] = str(e)

    out["sum"] = D.all_reduce_sum_(torch.tensor([r + 1.0, 10.0 * r]))
    out["broadcast"] = D.broadcast_object({"from": r, "list": [r] * 3})
    out["seed"] = D.seed_for_rank(5)

    @D.main_only
    def write(name):
        with open(os.path.join(outdir, name), "w") as fh:
            fh.write(str(D.rank()))
        return "written"

    out["main_only"] = write("main_only.txt")
    with D.main_first() as first:
        path = os.path.join(outdir, "cache.txt")
        if first:
            time.sleep(0.2)          # the other rank must wait for this file, not race it
            with open(path, "w") as fh:
                fh.write("made by rank 0")
        with open(path) as fh:
            out["cache"] = fh.read()
    D.barrier()
    torch.save(out, os.path.join(outdir, f"rank{r}.pt"))
    D.destroy_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    return outdir, run_ranks(_worker, outdir, WORLD, DEADLINE_S, "gloo run")


def test_ranks_and_backend(two_ranks):
    _, res = two_ranks
    assert [o["rank"] for o in res] == [0, 1] and all(o["world"] == WORLD for o in res)
    assert [o["is_main"] for o in res] == [True, False]
    assert all(o["device"] == "cpu" for o in res)


def test_merged_stats_equal_single_process_stats(two_ranks):
    _, res = two_ranks
    ref = GaussianStats.from_features(features())
    assert res[0]["local_n"] == SPLIT and res[1]["local_n"] == 37 - SPLIT
    for o in res:
        merged = GaussianStats(6)
        merged.n, merged.s1, merged.s2 = o["n"], o["s1"], o["s2"]
        assert merged.n == ref.n
        np.testing.assert_allclose(merged.s1, ref.s1, rtol=1e-12)
        np.testing.assert_allclose(merged.s2, ref.s2, rtol=1e-12)
        np.testing.assert_allclose(merged.mu, ref.mu, rtol=1e-12)
        # Sigma = (S2 - N mu mu^T)/(N-1) cancels: its error is relative to the second moment, not to Sigma
        second_moment = np.abs(ref.s2).max() / ref.n
        np.testing.assert_allclose(merged.sigma, ref.sigma, rtol=0, atol=1e-12 * second_moment)


def test_all_gather_rows_order_and_content(two_ranks):
    _, res = two_ranks
    expected = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [1, 3], [1, 4]], dtype=torch.float64)
    for o in res:
        assert torch.equal(o["gathered"], expected)
        assert isinstance(o["gathered_np"], np.ndarray)
        np.testing.assert_array_equal(o["gathered_np"], expected.numpy() * 2)
        assert torch.equal(o["gathered_empty"], torch.tensor([[0, 1]]))    # rank 0 sent no rows
        assert "different trailing shapes" in o["shape_error"] and "(3,)" in o["shape_error"]
        assert "torch.float32" in o["dtype_error"] and "torch.float64" in o["dtype_error"]


def test_shards_cover_everything_once(two_ranks):
    _, res = two_ranks
    assert res[0]["shard"] + res[1]["shard"] == list(range(11))
    for o in res:
        assert torch.equal(o["reassembled"], torch.arange(11))


def test_reduce_broadcast_seed_and_main_only(two_ranks):
    outdir, res = two_ranks
    for o in res:
        assert o["sum"].tolist() == [3.0, 10.0]
        assert o["broadcast"] == {"from": 0, "list": [0, 0, 0]}
        assert o["cache"] == "made by rank 0"
    assert [o["seed"] for o in res] == [10, 11]
    assert [o["main_only"] for o in res] == ["written", None]
    assert (outdir / "main_only.txt").read_text() == "0"


# --- single process ------------------------------------------------------------------------------------------------

@pytest.fixture
def single(monkeypatch):
    for v in D.ENV_VARS:
        monkeypatch.delenv(v, raising=False)


def test_single_process_fallbacks(single):
    assert D.init_distributed("cpu") == torch.device("cpu")
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_main()
    D.barrier()
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    assert D.all_gather_rows(t) is t
    a = np.ones((2, 3))
    assert D.all_gather_rows(a) is a
    obj = {"x": 1}
    assert D.broadcast_object(obj) is obj
    st = GaussianStats.from_features(features())
    merged = merge_gaussian_stats(st)
    assert merged is not st and merged.n == st.n
    np.testing.assert_array_equal(merged.s2, st.s2)
    assert D.shard_indices(7) == range(7) and D.shard_rows([1, 2, 3]) == [1, 2, 3]
    assert D.seed_for_rank(5) == 5
    assert D.main_only(lambda: 42)() == 42
    with D.main_first() as first:
        assert first


def test_merge_refuses_stats_without_sums(single):
    st = GaussianStats.from_mu_sigma(np.zeros(3), np.eye(3), n=10)
    assert not st.has_sums and GaussianStats.from_features(features()).has_sums
    with pytest.raises(ValueError, match="sums are unknown"):
        merge_gaussian_stats(st)


@pytest.mark.parametrize("n", [0, 1, 5, 16, 101])
@pytest.mark.parametrize("w", [1, 2, 3, 8])
def test_shard_indices_partition(n, w):
    shards = [D.shard_indices(n, rank_=r, world=w) for r in range(w)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="outside a world"):
        D.shard_indices(n, rank_=w, world=w)


def test_incomplete_torchrun_environment(single, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="MASTER_ADDR.*torchrun"):
        D.init_distributed("cpu")
