"""The distillation control (distreward.rl.distill): its target velocity, the teacher's trajectories against the
plain ODE sampler on the fine grid, that training lowers the loss, resume, and the one-process refusal; a tiny UNet
(8x8, a few thousand parameters) so that every test runs in seconds."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

from distreward.models import build_network, load_generator, read_generator_metadata, save_generator
from distreward.rl import distill
from distreward.rl.distill import distill_loss, substeps, target_velocity, teacher_steps_of, teacher_trajectory
from distreward.rl.run import check_single_process
from distreward.rl.settings import resolve
from distreward.sampling import FlowVelocity, euler_step, ode_sample, sigma_schedule, sigma_vector
from distreward.utils.checkpoint import load_checkpoint

SHAPE = (1, 8, 8)
TINY = {"img_resolution": 8, "img_channels": 1, "num_classes": 3, "model_channels": 4, "channel_mult": [1, 2],
        "num_blocks": 1, "attn_resolutions": [], "num_heads": 1}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny UNet generator file with random weights of std 1: a curved velocity field, so that the 4-step Euler
    sampler misses the teacher's trajectories (a fresh UNet's output layer is zero: v = 0 everywhere)."""
    torch.manual_seed(0)
    net = build_network("unet", TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 1.0)
    return save_generator(tmp_path_factory.mktemp("base") / "base.safetensors", net, "unet", TINY)


def tiny_cfg(**rl):
    return {"name": "distill-test", "seed": 0, "model": {"num_classes": 3, "image_shape": list(SHAPE)},
            "rl": {"iterations": 4, "labels_per_iter": 2, "group_size": 3, "steps": 4, "shift": 2.0,
                   "train_steps": {"mode": "window", "window": 3}, "minibatches": 2, "lr": 3e-3, "ema_decay": 0.5,
                   "batch_size": 4, **rl},
            "eval": {"every": 0, "n": 6, "steps": 4, "method": "euler", "seed": 5, "grid": 6, "batch_size": 6},
            "checkpoint": {"every": 1}, "distill": {"teacher_steps": 10, "teacher_method": "heun"}}


class StandInEvaluator:
    def evaluate(self, images):
        return {"fd_reward": float(images.mean() ** 2), "fd_eval": float(images.std()), "n": images.shape[0]}


def batch(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *SHAPE), generator=g), torch.randint(0, 3, (n,), generator=g)


def fine_grid(sigmas: torch.Tensor, m: int) -> torch.Tensor:
    """Every interval of `sigmas` cut into m equal parts in sigma, written out here independently of the trainer."""
    s = sigmas.double()
    points = [float(s[k] + (s[k + 1] - s[k]) * i / m) for k in range(len(s) - 1) for i in range(m)]
    return torch.tensor(points + [float(s[-1])], dtype=torch.float64).float()


# --------------------------------------------------------------------------------------------- the equations

def test_target_velocity_euler_step_lands_on_the_teachers_next_state(base):
    model = FlowVelocity(load_generator(base))
    noise, labels = batch()
    sig = sigma_schedule(4, shift=2.0)
    xs = teacher_trajectory(model, noise, labels, sig, 3, "heun")
    assert xs.shape == (5, 6, *SHAPE) and torch.equal(xs[0], noise)
    s = sig.tolist()
    for k in range(4):
        v_star = target_velocity(xs[k], xs[k + 1], s[k], s[k + 1])
        # a net whose output is v*_k: its Euler step on the served grid lands on the teacher's x_{k+1}
        assert torch.allclose(euler_step(xs[k], v_star, s[k], s[k + 1]), xs[k + 1], rtol=0, atol=1e-6)
        assert torch.allclose(v_star, (xs[k + 1] - xs[k]) / (s[k + 1] - s[k]), rtol=1e-5, atol=1e-5)
    # with teacher_steps = T and Euler, the teacher is the served Euler sampler: v*_k is its own velocity at x_k
    xs1 = teacher_trajectory(model, noise, labels, sig, substeps(4, 4), "euler")
    with torch.no_grad():
        for k in range(4):
            v = model(xs1[k], sigma_vector(s[k], xs1[k]), labels)
            assert torch.allclose(target_velocity(xs1[k], xs1[k + 1], s[k], s[k + 1]), v, rtol=1e-4, atol=1e-5)
    # the loss: mean over dimensions of the squared error, per sample
    v, t = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE)
    assert torch.allclose(distill_loss(v, t), torch.tensor([float(((v[i] - t[i]) ** 2).mean()) for i in range(3)]))


@pytest.mark.parametrize("method,teacher_steps", [("heun", 10), ("euler", 7)])
def test_teacher_trajectory_is_the_ode_sampler_on_the_fine_grid(base, method, teacher_steps):
    model = FlowVelocity(load_generator(base))
    noise, labels = batch()
    sig = sigma_schedule(4, shift=2.0)
    m = substeps(teacher_steps, 4)
    assert m == math.ceil(teacher_steps / 4)
    fine = fine_grid(sig, m)
    xs = teacher_trajectory(model, noise, labels, sig, m, method)
    assert torch.equal(xs[-1], ode_sample(model, noise, labels, fine, method=method))
    for k in range(1, 4):       # every kept state is the sampler stopped at the served point s_k
        assert torch.equal(xs[k], ode_sample(model, noise, labels, fine[:k * m + 1], method=method))
    # in chunks of 4 and 2 rows (rl.batch_size): the same up to float rounding (convolutions of another batch size)
    assert torch.allclose(teacher_trajectory(model, noise, labels, sig, m, method, batch_size=4), xs, rtol=0, atol=1e-5)


def test_teacher_steps_default_to_the_converged_steps_then_32():
    cfg = tiny_cfg()
    cfg["distill"] = {}
    assert teacher_steps_of(resolve(cfg)) == 32
    assert teacher_steps_of(resolve({**cfg, "evidence": {"converged_steps": 24}})) == 24
    cfg["distill"] = {"teacher_steps": 12}
    assert teacher_steps_of(resolve({**cfg, "evidence": {"converged_steps": 24}})) == 12
    assert substeps(32, 10) == 4 and substeps(4, 10) == 1


# --------------------------------------------------------------------------------------------- the loop

def heldout_loss(net, base, steps=(0, 1, 2)) -> float:
    """The distillation loss of `net` on a batch the run never drew (the teacher: the base file's network)."""
    teacher = FlowVelocity(load_generator(base))
    noise, labels = batch(12, seed=99)
    sig = sigma_schedule(4, shift=2.0)
    xs = teacher_trajectory(teacher, noise, labels, sig, substeps(10, 4), "heun")
    s, model = sig.tolist(), FlowVelocity(net)
    with torch.no_grad():
        return sum(float(distill_loss(model(xs[k], sigma_vector(s[k], xs[k]), labels),
                                      target_velocity(xs[k], xs[k + 1], s[k], s[k + 1])).mean()) for k in steps) / len(steps)


def test_distill_lowers_the_loss_logs_and_writes_the_models(tmp_path, base):
    cfg = tiny_cfg(iterations=4, lr=3e-3, ema_decay=0.3)
    cfg["eval"]["every"] = 2
    cfg["model"]["path"] = str(base)
    res = distill(cfg, tmp_path / "run", evaluator=StandInEvaluator(), progress=False)
    before, after = heldout_loss(load_generator(base), base), heldout_loss(res["net"], base)
    assert after < 0.7 * before, (before, after)
    assert heldout_loss(res["ema"], base) < 0.8 * before
    assert res["history"][-1]["loss_distill"] < res["history"][0]["loss_distill"]
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in recs if "loss_distill" in r]
    assert [r["iteration"] for r in its] == [1, 2, 3, 4]
    for key in ("loss_distill", "grad_norm", "time_teacher", "time_update"):
        assert all(math.isfinite(r[key]) for r in its), key
    assert [e["iteration"] for e in res["evals"]] == [0, 2, 4] and res["final"]["iteration"] == 4
    assert res["final_images"] is not None and res["final_images"].shape[0] == 6
    for name in ("model_ema.safetensors", "model.safetensors"):
        meta = read_generator_metadata(tmp_path / "run" / name)
        assert meta["arch"] == "unet" and meta["extra"]["rl"] == "distill" and meta["extra"]["teacher_steps"] == 10
    loaded = load_generator(tmp_path / "run" / "model_ema.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), res["ema"].state_dict().values()))
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 4


def test_resume_from_2_to_4_equals_4_straight(tmp_path, base):
    cfg = tiny_cfg(iterations=4, shared_noise=True, train_steps={"mode": "fraction", "fraction": 0.6})
    cfg["eval"]["every"] = 2
    full = distill(cfg, tmp_path / "full", net=load_generator(base), evaluator=StandInEvaluator(),
                   progress=False)
    short = {**cfg, "rl": {**cfg["rl"], "iterations": 2}}
    distill(short, tmp_path / "cut", net=load_generator(base), evaluator=StandInEvaluator(), progress=False)
    with pytest.raises(ValueError, match="rl.iterations"):        # a longer run is a change to allow
        distill(cfg, tmp_path / "cut", resume=True, net=load_generator(base),
                evaluator=StandInEvaluator(), progress=False)
    resumed = distill(cfg, tmp_path / "cut", resume=True, allow_changes=["rl.iterations"],
                      net=load_generator(base), evaluator=StandInEvaluator(), progress=False)
    for key in ("net", "ema"):
        a, b = full[key].state_dict(), resumed[key].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    strip = lambda h: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in h]  # noqa: E731
    assert strip(full["history"]) == strip(resumed["history"])
    assert full["evals"] == resumed["evals"]
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "loss_distill" in r] == [1, 2, 3, 4]


def test_distill_refuses_several_processes(tmp_path, monkeypatch, base):
    check_single_process(1)
    with pytest.raises(ValueError, match="one process"):
        check_single_process(2)
    monkeypatch.setenv("WORLD_SIZE", "2")              # as torchrun --nproc_per_node=2 sets it
    with pytest.raises(ValueError, match="one process.*torchrun"):
        distill(tiny_cfg(), tmp_path / "run", net=load_generator(base), progress=False)
    assert not (tmp_path / "run").exists()              # refused before any work
