"""Base training: the loss goes down, a killed run resumes to the same result, snapshots carry their metadata."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distreward.config import load_config
from distreward.models import load_generator, read_generator_metadata
from distreward.train import DEFAULTS, learning_rate, list_snapshots, sample_sigma, train_base
from distreward.train.flow import drop_labels, flow_interpolate, flow_target

TINY = ["data.limit=64", "train.batch=16", "train.total_kimg=0.096", "train.lr_rampup_kimg=0.032", "ema.snapshot_kimg=0.032",
        "checkpoint_kimg=0.032", "log_kimg=0.016"]  # 6 steps of 16 images; snapshots and checkpoints every 2 steps


def tiny_cfg(*extra):
    return load_config("fmnist_base_tiny", [*TINY, *extra], defaults=DEFAULTS)


def _records(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _state(run):
    return torch.load(Path(run) / "checkpoints/training-state.pt", weights_only=True)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from distreward.utils.threads import set_threads

    set_threads()  # $DISTREWARD_THREADS, as the CLI does: oversubscribed OpenMP threads are 10-20x slower here
    run = tmp_path_factory.mktemp("full")
    summary = train_base(tiny_cfg(), run, progress=False)
    summary["threads"] = torch.get_num_threads()
    return run, summary


def test_flow_equations():
    x0, eps = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xs = flow_interpolate(x0, eps, sigma)
    assert torch.equal(xs[0], x0[0]) and torch.equal(xs[3], eps[3])
    # v is the derivative of x_sigma in sigma
    h = 1e-3
    fd = (flow_interpolate(x0, eps, sigma + h) - flow_interpolate(x0, eps, sigma - h)) / (2 * h)
    assert torch.allclose(fd, flow_target(x0, eps), atol=1e-3)
    s = sample_sigma(20000, "logit_normal", generator=torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() < 1 and abs(float(s.median()) - 0.5) < 0.02
    assert abs(float(sample_sigma(20000, "uniform").mean()) - 0.5) < 0.02
    with pytest.raises(ValueError, match="sigma_sampling"):
        sample_sigma(3, "cosine")
    y = drop_labels(torch.zeros(20000, dtype=torch.long), 0.1, 10, torch.Generator().manual_seed(0))
    assert abs(float((y == 10).float().mean()) - 0.1) < 0.01 and set(y.tolist()) == {0, 10}


def test_learning_rate_schedule():
    assert learning_rate(0.0, 1e-3, rampup_kimg=10) == 0.0
    assert learning_rate(5.0, 1e-3, rampup_kimg=10) == pytest.approx(5e-4)
    assert learning_rate(50.0, 1e-3, rampup_kimg=10) == pytest.approx(1e-3)
    assert learning_rate(400.0, 1e-3, rampup_kimg=10, decay_kimg=100) == pytest.approx(5e-4)


def test_training_reduces_loss(full_run):
    run, summary = full_run
    recs = _records(run)
    assert [r["step"] for r in recs] == list(range(1, 7)) and summary["step"] == 6
    assert recs[0]["lr"] < recs[-1]["lr"]  # warm-up
    # The flow loss on a fixed batch with fixed noise, before and after training.
    from distreward.models import build_network
    from distreward.train.flow import flow_loss
    from distreward.train.loop import _load_images  # the data the run used, cached in this process

    x0, y = (t[:64] for t in _load_images("fmnist-train"))
    g = torch.Generator().manual_seed(123)
    eps, sigma = torch.randn(x0.shape, generator=g), sample_sigma(64, generator=g)
    kwargs = read_generator_metadata(run / "model.safetensors")["kwargs"]

    def loss(state):
        net = build_network("unet", kwargs)
        net.load_state_dict(state)
        with torch.no_grad():
            return float(flow_loss(net(flow_interpolate(x0, eps, sigma), sigma, y), flow_target(x0, eps)).mean())

    torch.manual_seed(0)
    before, after = loss(build_network("unet", kwargs).state_dict()), loss(_state(run)["net"])
    assert after < 0.85 * before, (before, after)


def test_snapshots_and_export(full_run):
    run, _ = full_run
    snaps = list_snapshots(run)
    assert [(s.step, s.std) for s in snaps] == [(t, s) for t in (2, 4, 6) for s in (0.05, 0.1)]
    extra = read_generator_metadata(snaps[-1].path)["extra"]
    assert extra["phema"]["step"] == 6 and extra["phema"]["kimg"] == pytest.approx(0.096)
    assert extra["phema"]["std"] == 0.1 and extra["config"] == "fmnist_base_tiny"
    # The last std-0.1 snapshot is the EMA held in the training state.
    state = _state(run)
    last = load_file(str(snaps[-1].path))
    for k, v in state["ema"][f"{0.1:.6f}"].items():
        assert torch.equal(last[k], v)
    model = load_generator(run / "model.safetensors")
    assert read_generator_metadata(run / "model.safetensors")["extra"]["phema_reconstruction"]["std"] == 0.08
    assert model(torch.zeros(1, 1, 32, 32), torch.ones(1), torch.tensor([3])).shape == (1, 1, 32, 32)


def test_resume_after_kill_equals_uninterrupted(full_run, tmp_path):
    run_full, _ = full_run
    run = tmp_path / "killed"
    # A kill after step 3: the last checkpoint is at step 2, metrics.jsonl already holds step 3.
    s = train_base(tiny_cfg(), run, progress=False, stop_after_step=3)
    assert s["step"] == 3 and not (run / "model.safetensors").exists()
    assert _state(run)["step"] == 2
    s = train_base(tiny_cfg(), run, progress=False, resume=True)
    assert s["step"] == 6 and s["steps_this_session"] == 4
    a, b = _state(run_full), _state(run)
    for part in ("net",):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    for std in a["ema"]:
        for k in a["ema"][std]:
            assert torch.equal(a["ema"][std][k], b["ema"][std][k]), (std, k)
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    for name in ("model.safetensors", "snapshots/phema-0000004-0.050.safetensors"):
        fa, fb = load_file(str(run_full / name)), load_file(str(run / name))
        assert all(torch.equal(fa[k], fb[k]) for k in fa)
    ra, rb = _records(run_full), _records(run)
    assert [(r["step"], r["loss"]) for r in ra] == [(r["step"], r["loss"]) for r in rb]


@pytest.mark.slow
def test_a_compiled_run_trains_the_same_network_to_float_rounding(full_run, tmp_path):
    """train.compile: the same parameters, data and updates as the eager run, within float rounding; resuming may
    switch it (train.compile is a changeable key)."""
    run_full, _ = full_run
    run = tmp_path / "compiled"
    train_base(tiny_cfg("train.compile=true"), run, progress=False, stop_after_step=4)
    train_base(tiny_cfg("train.compile=false"), run, progress=False, resume=True, allow_changes=["train.compile"])
    a, b = _state(run_full)["net"], _state(run)["net"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    ra, rb = _records(run_full), _records(run)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_run_dir_guards(tmp_path, full_run):
    run_full, _ = full_run
    with pytest.raises(FileNotFoundError, match="--resume"):
        train_base(tiny_cfg(), tmp_path / "empty", progress=False, resume=True)
    with pytest.raises(ValueError, match="--resume"):
        train_base(tiny_cfg(), run_full, progress=False)
    with pytest.raises(ValueError, match="train.batch"):
        train_base(tiny_cfg("train.batch=8"), run_full, progress=False, resume=True)


def test_cli_train_phema_sample(tmp_path):
    from distreward.cli import main

    run = tmp_path / "cli"
    assert main(["train-base", "--config", "fmnist_base_tiny", "--run-dir", str(run), "--no-progress", *TINY,
                 "train.total_kimg=0.064"]) == 0  # 4 steps
    assert len(list_snapshots(run)) == 4
    out = tmp_path / "ema.safetensors"
    assert main(["phema", "--snapshots", str(run), "--std", "0.15", "-o", str(out)]) == 0
    assert read_generator_metadata(out)["extra"]["phema_reconstruction"]["std"] == 0.15
    npz = tmp_path / "s.npz"
    assert main(["sample", "--model", str(out), "-n", "12", "--steps", "2", "-o", str(npz)]) == 0
    import numpy as np

    data = np.load(npz)
    assert data["images"].shape == (12, 32, 32, 1) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [i % 10 for i in range(12)]
    assert main(["sample", "--model", str(out), "-n", "4", "--steps", "2", "--sampler", "heun", "--cfg", "2",
                 "-o", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 100
    assert main(["phema", "--snapshots", str(run), "--std", "0.5", "-o", str(out)]) == 2  # clear error, no crash


@pytest.mark.slow
def test_sigkill_and_resume_subprocess(tmp_path, full_run):
    """A real SIGKILL at an arbitrary moment, then --resume: the same weights as the uninterrupted run."""
    _, summary = full_run  # sets the thread count
    longer = "train.total_kimg=0.48"  # 30 steps, so that the kill lands mid-run
    ref = tmp_path / "ref"
    train_base(tiny_cfg(longer), ref, progress=False)
    run = tmp_path / "sigkill"
    cmd = [sys.executable, "-c", "import sys; from distreward.cli import main; sys.exit(main())", "train-base",
           "--config", "fmnist_base_tiny", "--run-dir", str(run), "--no-progress",
           "--threads", str(summary["threads"]), *TINY, longer]  # the reference run's thread count: the same sums
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "checkpoints/training-state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip(f"the training process ended (rc {proc.returncode}) before it could be killed")
    killed_at = _state(run)["step"]
    subprocess.run(cmd + ["--resume"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    a, b = _state(ref), _state(run)
    assert killed_at < 30 and b["step"] == 30
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert all(torch.equal(a["ema"][s][k], b["ema"][s][k]) for s in a["ema"] for k in a["ema"][s])
