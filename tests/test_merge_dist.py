"""The merge trainer with 2 gloo processes on CPU: the same policy, reference set and evaluations as one process
with the same config and seed; the replicas agree bit for bit; only rank 0 writes; a 2-process run resumes.

P = 3 candidates x n = 6 samples in sampler batches of 4: 6 work units, so the ranks hold 3 each and candidate 1
straddles them; the 20 reference rows (5 batches) and the 10 evaluation samples (3 batches, the last partial)
split unevenly. Two processes are spawned once (module fixture); the single-process runs happen in this process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from distreward.evaluation import Evaluator
from distreward.merge import CheckpointSet, MergeRL, resolve, run_merge
from distreward.merge.inputs import make_ode_sampler
from distreward.merge.baselines import evaluate_weights
from distreward.metrics import GaussianStats
from distreward.models import build_network, save_generator
from distreward.utils import dist as D
from distreward.utils.checkpoint import load_checkpoint
from distreward.utils.threads import set_threads

from _tiny import TinyFeatures
from _spawn import run_ranks  # noqa: E402

set_threads()

WORLD = 2
DEADLINE_S = 90
SHAPE = (1, 8, 8)
FEAT_DIM = 6
TINY = {"img_resolution": 8, "img_channels": 1, "num_classes": 2, "model_channels": 4, "channel_mult": [1, 2],
        "num_blocks": 1, "attn_resolutions": [], "num_heads": 1}
_PROJ = torch.randn(64, FEAT_DIM, generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------------------------- stand-ins

def write_checkpoints(folder: Path, k: int = 3) -> list[Path]:
    paths = []
    for i in range(k):
        torch.manual_seed(i)
        net = build_network("unet", TINY)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.1)
        paths.append(save_generator(folder / f"ckpt{i}.safetensors", net, "unet", TINY))
    return paths


def feature_fn(images):
    return torch.tanh(images.reshape(images.shape[0], -1) @ _PROJ).double().numpy()


def real_stats():
    f = np.random.default_rng(0).normal(size=(200, FEAT_DIM)) * 0.3
    return f.mean(0), np.cov(f, rowvar=False)


def make_evaluator(real_images: bool):
    """Real images (KID, precision/recall: gathered features) or statistics only (FD: merged sums)."""
    nets, labels = (TinyFeatures(1, FEAT_DIM), TinyFeatures(2, FEAT_DIM)), ["fmnist-reward", "fmnist-eval"]
    if real_images:
        ref = (0.6 * torch.randn((200, *SHAPE), generator=torch.Generator().manual_seed(11))).clamp(-1, 1)
        return Evaluator(ref, feature_nets=nets, labels=labels, cache_dir=None, max_real=200, kid_subsets=5,
                         kid_subset_size=10)
    rng = np.random.default_rng(5)
    stats = {name: GaussianStats.from_features(rng.normal(size=(300, FEAT_DIM)) * 0.2) for name in labels}
    return Evaluator(None, feature_nets=nets, labels=labels, cache_dir=None, ref_stats=stats)


def tiny_cfg(iterations: int = 2):
    return resolve({"seed": 0, "merge": {"init": "uniform"}, "policy": {"init_std": 0.2},
                           "rl": {"iterations": iterations, "candidates": 3, "samples": 6, "epochs": 2, "lr": 0.05},
                           "reward": {"reference_size": 20}, "model": {"num_classes": 2, "image_shape": list(SHAPE)},
                           "sampler": {"batch_size": 4}, "eval": {"n": 10, "seed": 5}, "checkpoint": {"every": 1}})


def parts(folder: Path, real_images: bool = True) -> dict:
    return {"ckpts": CheckpointSet.open(sorted(folder.glob("ckpt*.safetensors"))),
            "sample_fn": make_ode_sampler("unet", 2, "euler", 1.0, 4), "feature_fn": feature_fn,
            "evaluator": make_evaluator(real_images), "real_stats": real_stats(), "progress": False}


def two_steps(folder: Path) -> dict:
    """MergeRL driven directly: the reference set from the initial mean, then two iterations."""
    p = parts(folder)
    rl = MergeRL(tiny_cfg(), p["ckpts"], [1 / 3] * 3, sample_fn=p["sample_fn"], feature_fn=feature_fn,
                 real_mu=p["real_stats"][0], real_sigma=p["real_stats"][1])
    rl.init_reference()
    first = rl.reward.rows.copy()
    history = [rl.step(), rl.step()]
    return {"first_rows": first, "rows": rl.reward.rows.copy(), "ptr": rl.reward.ptr,
            "mean": rl.policy.mean.detach().clone(), "log_std": rl.policy.log_std.detach().clone(),
            "r": [h["r_mean"] for h in history], "r_max": [h["r_max"] for h in history], "w": rl.mean_weights()}


def reference_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["reward"]


# --------------------------------------------------------------------------------------------- two processes

def _worker(r: int, port: int, outdir: str) -> None:
    os.environ.update(RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    D.init_distributed("cpu", timeout_s=30)
    root = Path(outdir)
    out = {"world": D.world_size(), "direct": two_steps(root)}
    out["two"] = run_merge(tiny_cfg(2), root / "two", **parts(root))
    run_merge(tiny_cfg(1), root / "cut", **parts(root, real_images=False))
    out["resumed"] = run_merge(tiny_cfg(2), root / "cut", resume=True, allow_changes=["rl.iterations"],
                               **parts(root, real_images=False))
    torch.save(out, root / f"rank{r}.pt")
    D.destroy_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("merge_dist")
    write_checkpoints(outdir)
    return outdir, run_ranks(_worker, outdir, WORLD, DEADLINE_S, "merge run")


@pytest.fixture(scope="module")
def single(two_ranks, tmp_path_factory):
    outdir, _ = two_ranks
    run = tmp_path_factory.mktemp("merge_single")
    return {"direct": two_steps(outdir), "two": run_merge(tiny_cfg(2), run / "two", **parts(outdir)), "dir": run}


# --------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("items,rows,block,world", [(3, 6, 4, 2), (1, 10, 4, 2), (2, 5, 5, 4), (4, 3, 2, 3), (1, 0, 4, 2)])
def test_shard_blocks_cover_every_row_once_in_order_without_splitting_a_block(items, rows, block, world):
    got = [(c, i) for r in range(world) for c, rr in D.shard_blocks(items, rows, block, rank_=r, world=world) for i in rr]
    assert got == [(c, i) for c in range(items) for i in range(rows)]
    for r in range(world):
        pieces = D.shard_blocks(items, rows, block, rank_=r, world=world)
        assert len({c for c, _ in pieces}) == len(pieces)                      # at most one piece per item
        assert all(rr.start % block == 0 for _, rr in pieces[1:])              # blocks start on batch boundaries
    with pytest.raises(ValueError, match="block size"):
        D.shard_blocks(2, 4, 0)


def test_policy_and_reference_set_after_two_iterations_equal_one_process(two_ranks, single):
    _, res = two_ranks
    ref = single["direct"]
    assert [o["world"] for o in res] == [2, 2]
    assert ref["ptr"] == 12 and not np.allclose(ref["rows"], ref["first_rows"])    # two pushes of 6 rows went in
    for o in res:
        d = o["direct"]
        # float32 features: batches and thread counts differ between the runs, so equal up to float32 rounding
        np.testing.assert_allclose(d["first_rows"], ref["first_rows"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d["rows"], ref["rows"], rtol=1e-5, atol=1e-6)
        assert d["ptr"] == ref["ptr"]
        np.testing.assert_allclose(d["r"], ref["r"], rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(d["r_max"], ref["r_max"], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(d["mean"], ref["mean"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d["log_std"], ref["log_std"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(ref["w"], [1 / 3] * 3)                               # the policy moved
    # the replicas are identical, bit for bit
    a, b = res[0]["direct"], res[1]["direct"]
    assert np.array_equal(a["rows"], b["rows"]) and torch.equal(a["mean"], b["mean"]) and torch.equal(a["log_std"], b["log_std"])


def test_run_merge_equals_one_process_and_only_rank0_writes(two_ranks, single):
    outdir, res = two_ranks
    one = single["two"]
    for o in res:
        two = o["two"]
        np.testing.assert_allclose(two["merged"]["w"], one["merged"]["w"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([h["r_mean"] for h in two["history"]], [h["r_mean"] for h in one["history"]],
                                   rtol=1e-4, atol=1e-9)
        # sharded evaluations (gathered features) of the baselines and the merged model
        for name in ("last", "uniform"):
            assert two["baselines"][name]["n"] == 10
            for key in ("fd_reward", "fd_eval", "kid", "precision", "recall"):
                assert two["baselines"][name][key] == pytest.approx(one["baselines"][name][key], rel=1e-5, abs=1e-9)
        for key in ("fd_reward", "fd_eval", "kid", "precision", "recall"):
            assert two["merged"][key] == pytest.approx(one["merged"][key], rel=1e-5, abs=1e-9), key
    assert res[0]["two"]["merged"] == res[1]["two"]["merged"]
    # rank 0's checkpoint holds the single-process reference set
    a, b = reference_state(outdir / "two"), reference_state(single["dir"] / "two")
    assert a["ptr"] == b["ptr"]
    np.testing.assert_allclose(a["rows"], b["rows"], rtol=1e-5, atol=1e-6)
    # one writer: each iteration logged once, one set of outputs
    for name in ("two", "cut"):
        recs = [json.loads(x) for x in (outdir / name / "metrics.jsonl").read_text().splitlines()]
        assert [x["iteration"] for x in recs] == [1, 2]
        for f in ("config.yaml", "baselines.json", "coefficients.json", "merged.safetensors", "result.json"):
            assert (outdir / name / f).is_file(), f
    coef = json.loads((outdir / "two" / "coefficients.json").read_text())
    assert coef["weights"] == res[0]["two"]["merged"]["w"]


def test_two_process_run_resumes_to_the_same_result(two_ranks, single):
    outdir, res = two_ranks
    for o in res:
        full, resumed = o["two"], o["resumed"]
        assert resumed["merged"]["w"] == full["merged"]["w"]
        assert [h["r_mean"] for h in resumed["history"]] == [h["r_mean"] for h in full["history"]]
    # the statistics-only evaluator (merged float64 sums) gives the one-process FD of the merged model
    p = parts(outdir, real_images=False)
    probe = MergeRL(tiny_cfg(), p["ckpts"], [1 / 3] * 3, sample_fn=p["sample_fn"], feature_fn=feature_fn,
                    real_mu=p["real_stats"][0], real_sigma=p["real_stats"][1])
    ref = evaluate_weights(probe.sampler, res[0]["resumed"]["merged"]["w"], p["evaluator"], tiny_cfg())
    got = res[0]["resumed"]["merged"]
    assert got["n"] == 10 and got["kid"] is None
    assert got["fd_reward"] == pytest.approx(ref["fd_reward"], rel=1e-6)
    assert got["fd_eval"] == pytest.approx(ref["fd_eval"], rel=1e-6)
