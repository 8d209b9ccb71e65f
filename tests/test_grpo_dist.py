"""GRPO with 2 gloo processes on CPU (rl/parallel.py): the same batch, reference set, update and evaluation as one
process with the same total batch and seeds; only rank 0 writes; a 2-process run completes and resumes.

Two processes are spawned once (module fixture, 90 s deadline) and run three tiny trainings; the single-process
counterparts run in the test process.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from distreward.utils.threads import set_threads

from _tiny import TinyFeatures
from _spawn import run_ranks  # noqa: E402

set_threads()

WORLD = 2
DEADLINE_S = 90
SHAPE = (1, 8, 8)
FEAT_DIM = 6


# --------------------------------------------------------------------------------------------- stand-ins

class TinyVelocityNet(nn.Module):
    """net(x, sigma, labels) -> v: two convs conditioned on sigma and the label."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 1, 3, padding=1)
        self.label = nn.Embedding(num_classes + 1, 8)
        self.sigma = nn.Linear(1, 8)

    def forward(self, x, sigma, labels=None):
        h = self.conv0(x) + self.sigma(sigma.view(-1, 1).to(x.dtype))[:, :, None, None]
        if labels is not None:
            h = h + self.label(labels)[:, :, None, None]
        return self.conv1(torch.tanh(h)) - x


def make_net() -> TinyVelocityNet:
    torch.manual_seed(0)
    return TinyVelocityNet()


def real_stats(seed: int):
    from distreward.metrics import GaussianStats

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(FEAT_DIM, 2 * FEAT_DIM)) * 0.1
    return GaussianStats.from_mu_sigma(rng.normal(size=FEAT_DIM) * 0.1, a @ a.T + 1e-3 * np.eye(FEAT_DIM), n=500)


def make_reward():
    """The distribution reward (fast exact mode) over a 40-row reference set of fixed random features."""
    from distreward.reward.reference import ReferenceSet
    from distreward.reward.rewards import DistributionReward

    st = real_stats(3)
    init = np.random.default_rng(4).normal(size=(40, FEAT_DIM)) * 0.1
    return DistributionReward(TinyFeatures(1, FEAT_DIM).eval().requires_grad_(False), ReferenceSet(init, st.mu, st.sigma),
                              mode="fast", credit="sample")


def make_evaluator(real_images: bool):
    """Real features (KID, precision/recall: gathered features) or statistics only (FD: merged sums)."""
    from distreward.evaluation import Evaluator

    nets = (TinyFeatures(1, FEAT_DIM), TinyFeatures(2, FEAT_DIM))
    if real_images:
        g = torch.Generator().manual_seed(11)
        ref = (0.6 * torch.randn((200, *SHAPE), generator=g)).clamp(-1, 1)
        return Evaluator(ref, feature_nets=nets, labels=["fmnist-reward", "fmnist-eval"], cache_dir=None,
                         max_real=200, kid_subsets=5, kid_subset_size=10)
    return Evaluator(None, feature_nets=nets, labels=["fmnist-reward", "fmnist-eval"], cache_dir=None,
                     ref_stats={"fmnist-reward": real_stats(5), "fmnist-eval": real_stats(6)})


# one starting noise per group, and only each group's first sample enters the reference set
GROUPED = {"shared_noise": True, "push": "one_per_group"}
ODE_REFERENCE = {"reference": "ode", "push": "all"}


def tiny_cfg(iterations: int = 1, every: int = 1, **rl):
    """P = 3 groups (ranks hold 1 and 2: uneven), G = 4, two random minibatches that straddle the ranks."""
    return {"name": "dist", "seed": 0, "model": {"num_classes": 3, "image_shape": list(SHAPE)},
            "rl": {"iterations": iterations, "labels_per_iter": 3, "group_size": 4, "steps": 4, "noise_level": 0.8,
                   "train_steps": {"mode": "window", "window": 2}, "minibatches": 2, "lr": 3e-3, "beta": 0.05,
                   "ema_decay": 0.5, "batch_size": 8, **rl},
            "reward": {"name": "distribution"},
            "eval": {"every": every, "n": 10, "steps": 3, "method": "euler", "seed": 5, "grid": 4, "batch_size": 4},
            "checkpoint": {"every": 1}}


def snapshot(res) -> dict:
    ref = res["reward"].ref
    return {"rows": ref.rows.copy(), "s1": ref.s1.copy(), "s2": ref.s2.copy(), "shift": ref.shift.copy(),
            "ptr": ref.ptr, "net": {k: v.clone() for k, v in res["net"].state_dict().items()},
            "ema": {k: v.clone() for k, v in res["ema"].state_dict().items()},
            "r_mean": [h["r_mean"] for h in res["history"]], "loss_pg": [h["loss_pg"] for h in res["history"]],
            "evals": res["evals"]}


# --------------------------------------------------------------------------------------------- two processes

def _worker(r: int, port: int, outdir: str) -> None:
    os.environ.update(RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from distreward.rl import finetune
    from distreward.utils import dist as D

    from distreward.rl.parallel import group_rows

    D.init_distributed("cpu", timeout_s=30)
    out = {"world": D.world_size(), "rows": list(group_rows(3, 4))}
    # one iteration, evaluated at 0 and 1 with gathered features
    res = finetune(tiny_cfg(1, every=1), os.path.join(outdir, "one"), net=make_net(), reward=make_reward(),
                   evaluator=make_evaluator(True), progress=False)
    out["one"] = snapshot(res)
    # two iterations straight, and one iteration then --resume to two (statistics-only evaluator)
    res = finetune(tiny_cfg(2, every=2, **GROUPED), os.path.join(outdir, "full"), net=make_net(), reward=make_reward(),
                   evaluator=make_evaluator(False), progress=False)
    out["full"] = snapshot(res)
    finetune(tiny_cfg(1, every=2, **GROUPED), os.path.join(outdir, "cut"), net=make_net(), reward=make_reward(),
             evaluator=make_evaluator(False), progress=False)
    res = finetune(tiny_cfg(2, every=2, **GROUPED), os.path.join(outdir, "cut"), resume=True,
                   allow_changes=["rl.iterations"], net=make_net(), reward=make_reward(),
                   evaluator=make_evaluator(False), progress=False)
    out["resumed"] = snapshot(res)
    # the reference set takes ODE samples of the policy (drawn alike on every rank) instead of the rollouts
    res = finetune(tiny_cfg(2, every=2, **ODE_REFERENCE), os.path.join(outdir, "ode"), net=make_net(),
                   reward=make_reward(), evaluator=make_evaluator(False), progress=False)
    out["ode"] = snapshot(res)
    torch.save(out, os.path.join(outdir, f"rank{r}.pt"))
    D.destroy_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("grpo_dist")
    return outdir, run_ranks(_worker, outdir, WORLD, DEADLINE_S, "GRPO run")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from distreward.rl import finetune

    res = finetune(tiny_cfg(1, every=1), tmp_path_factory.mktemp("grpo_single"), net=make_net(), reward=make_reward(),
                   evaluator=make_evaluator(True), progress=False)
    return snapshot(res)


def test_reference_set_after_an_iteration_equals_the_single_process_one(two_ranks, single):
    _, res = two_ranks
    assert [o["world"] for o in res] == [2, 2]
    assert res[0]["rows"] == list(range(0, 4)) and res[1]["rows"] == list(range(4, 12))   # whole groups, uneven
    for o in res:
        d = o["one"]
        assert d["ptr"] == single["ptr"] != 0                      # the 12 new rows went in, in the same places
        np.testing.assert_allclose(d["rows"], single["rows"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(d["s1"], single["s1"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(d["s2"], single["s2"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(d["r_mean"], single["r_mean"], rtol=1e-5, atol=1e-10)
    # the replicas are identical on both ranks, bit for bit
    assert np.array_equal(res[0]["one"]["rows"], res[1]["one"]["rows"])
    assert np.array_equal(res[0]["one"]["s2"], res[1]["one"]["s2"])


def test_shared_group_noise_and_one_push_per_group_equal_one_process(two_ranks, tmp_path):
    """rl.shared_noise + rl.push=one_per_group across 2 ranks (uneven groups) equal one process: 3 rows per
    iteration enter the reference set, the same rows in the same places."""
    from distreward.rl import finetune

    one = snapshot(finetune(tiny_cfg(2, every=2, **GROUPED), tmp_path, net=make_net(), reward=make_reward(),
                            evaluator=make_evaluator(False), progress=False))
    assert one["ptr"] == 2 * 3
    _, res = two_ranks
    for o in res:
        assert o["full"]["ptr"] == one["ptr"]
        np.testing.assert_allclose(o["full"]["rows"], one["rows"], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(o["full"]["r_mean"], one["r_mean"], rtol=1e-4, atol=1e-9)


def test_ode_reference_pushes_equal_one_process(two_ranks, tmp_path):
    """rl.reference=ode across 2 ranks: every replica takes the same P x G ODE rows as one process."""
    from distreward.rl import finetune

    one = snapshot(finetune(tiny_cfg(2, every=2, **ODE_REFERENCE), tmp_path, net=make_net(), reward=make_reward(),
                            evaluator=make_evaluator(False), progress=False))
    assert one["ptr"] == 2 * 12 % 40
    _, res = two_ranks
    for o in res:
        assert o["ode"]["ptr"] == one["ptr"]
        np.testing.assert_allclose(o["ode"]["rows"], one["rows"], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(o["ode"]["r_mean"], one["r_mean"], rtol=1e-4, atol=1e-9)
    assert np.array_equal(res[0]["ode"]["rows"], res[1]["ode"]["rows"])


def test_sharded_update_equals_the_single_process_update(two_ranks, single):
    _, res = two_ranks
    base = make_net().state_dict()
    for o in res:
        for k, v in o["one"]["net"].items():
            torch.testing.assert_close(v, single["net"][k], rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(o["one"]["loss_pg"], single["loss_pg"], rtol=1e-4, atol=1e-7)
    moved = sum(float((v - base[k]).abs().sum()) for k, v in res[0]["one"]["net"].items())
    assert moved > 1e-3                                              # the update did something
    for k in res[0]["one"]["net"]:                                   # weights in sync on every rank
        assert torch.equal(res[0]["one"]["net"][k], res[1]["one"]["net"][k])


def test_sharded_evaluation_equals_one_process(two_ranks):
    """FD, KID and precision/recall of the base model, sharded over 2 ranks (gathered features), equal the same
    evaluation in one process; the statistics-only evaluator (merged sums) gives FD."""
    from distreward.build import eval_plan
    from distreward.evaluation import evaluate_generator
    from distreward.rl.settings import resolve

    _, res = two_ranks
    plan = eval_plan(resolve(tiny_cfg(1)), noise="batch")
    ref, _ = evaluate_generator(make_net(), make_evaluator(True), plan)
    for o in res:
        e0 = o["one"]["evals"][0]
        assert e0["iteration"] == 0 and e0["n"] == 10
        for key in ("fd_reward", "fd_eval", "kid", "precision", "recall"):
            assert e0[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-9), key
    ref_fd, _ = evaluate_generator(make_net(), make_evaluator(False), plan)
    full0 = res[0]["full"]["evals"][0]
    assert full0["fd_eval"] == pytest.approx(ref_fd["fd_eval"], rel=1e-6) and full0["kid"] is None


def test_two_process_run_completes_resumes_and_only_rank0_writes(two_ranks):
    outdir, res = two_ranks
    full, resumed = res[0]["full"], res[0]["resumed"]
    assert len(full["r_mean"]) == 2 and resumed["r_mean"] == full["r_mean"]
    for k in full["net"]:
        assert torch.equal(full["net"][k], resumed["net"][k]) and torch.equal(full["ema"][k], resumed["ema"][k])
    assert np.array_equal(full["rows"], resumed["rows"])
    assert [e["iteration"] for e in full["evals"]] == [0, 2]
    # one writer: each iteration and evaluation logged once, one checkpoint, one result
    for name, evals in (("full", [0, 2]), ("cut", [0, 1, 2])):     # the cut run ended (and evaluated) at 1
        recs = [json.loads(l) for l in (outdir / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in recs if "r_mean" in r] == [1, 2]
        assert [r["iteration"] for r in recs if "eval/fd_eval" in r] == evals
        assert (outdir / name / "checkpoints" / "last.pt").is_file()
    assert json.loads((outdir / "full" / "result.json").read_text())["history"][1]["r_mean"] == full["r_mean"][1]
    assert (outdir / "full" / "samples" / "ema_0002.png").is_file()


def test_more_processes_than_groups_is_refused():
    from distreward.rl.settings import check_config, resolve

    with pytest.raises(ValueError, match="labels_per_iter.*processes"):
        check_config(resolve(tiny_cfg()), world=4)
