"""Run directories (docs/runs.md): a previous run is never reused silently, resume refuses changed settings (unless
allowed and honourable), one live run per directory (the lock), provenance, checkpoint rotation, and a run killed
with SIGKILL resumes bit-identical to an uninterrupted one -- for each trainer (finetune, merge, train-base).

Every behaviour is a table of rows (`pytest.param`) over the trainers' tiny configurations (the stand-ins of
test_grpo.py, test_merge.py, test_train_base.py), behind one adapter per trainer (`Trainer`, `TRAINERS`). To cover
a new trainer, add an adapter to TRAINERS and its rows to the tables; to cover a new behaviour, add a row.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

import test_grpo as G              # noqa: E402  (the stand-ins of the trainers' own tests)
import test_merge as M             # noqa: E402
import test_train_base as B        # noqa: E402
from distreward.merge import CheckpointSet, run_merge                                        # noqa: E402
from _spawn import kill_when                                                                  # noqa: E402
from distreward.rl import finetune                                                           # noqa: E402
from distreward.train import train_base                                                      # noqa: E402
from distreward.utils.checkpoint import CheckpointError, CheckpointWarning, load_checkpoint  # noqa: E402
from distreward.utils.lock import RunLockedError                                              # noqa: E402
from distreward.utils.provenance import PROVENANCE_FILE, read_provenance                      # noqa: E402
from distreward.utils.rundir import ResumeWarning, RunDirError, prepare_run                   # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


# --------------------------------------------------------------------------------------------- one adapter per trainer

@dataclass
class Trainer:
    """A trainer at test size. `cfg(length)`: its tiny config, `length` iterations (steps for train-base);
    `run(run_dir, cfg, slow=0, **kw)`: one call (`slow`: seconds of sleep per iteration, for kills); `state(run_dir)`:
    what must be bit-identical (from the checkpoint); `ckpt`: the checkpoint's path; `counter`: the progress key of
    metrics.jsonl and of the checkpoint."""
    name: str
    cfg: Callable[[int], Any]
    run: Callable[..., Any]
    state: Callable[[Path], dict]
    ckpt: str
    counter: str


def finetune_cfg(length: int):
    cfg = G.tiny_cfg(iterations=length)
    cfg["checkpoint"]["every"] = 1
    return OmegaConf.create(cfg)


def finetune_run(run_dir, cfg, slow: float = 0.0, **kw):
    return finetune(cfg, run_dir, net=G.make_net(), reward=G.BrightnessReward(slow=slow),
                    evaluator=G.StandInEvaluator(), progress=False, **kw)


def finetune_state(run_dir: Path) -> dict:
    st = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    return {"net": st["net"], "ema": st["ema"], "reward": st["reward"], "iteration": st["iteration"],
            "r_mean": [h["r_mean"] for h in st["history"]]}


def merge_cfg(length: int):
    cfg = M.tiny_cfg(iterations=length)
    cfg.checkpoint.every = 1
    return cfg


def merge_inputs(run_dir) -> list[Path]:
    """The tiny checkpoints beside the run directory (written once, shared by the runs of a test)."""
    folder = Path(run_dir).parent / "merge_inputs"
    return sorted(folder.glob("ckpt*.safetensors")) or M.tiny_checkpoints(folder)


def merge_run(run_dir, cfg, slow: float = 0.0, **kw):
    sampler = M.euler_sampler()

    def sample_fn(net, noise, labels):
        time.sleep(slow)
        return sampler(net, noise, labels)

    return run_merge(cfg, run_dir, ckpts=CheckpointSet.open(merge_inputs(run_dir)), sample_fn=sample_fn if slow else sampler,
                     feature_fn=M.feature_fn, evaluator=M.StubEvaluator(), real_stats=M.real_stats(), progress=False, **kw)


def merge_state(run_dir: Path) -> dict:
    st = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    history = [{k: v for k, v in h.items() if not k.startswith("time_")} for h in json.loads(st["history"])]
    return {"policy": st["policy"], "reward": st["reward"], "iteration": st["iteration"], "history": history}


def base_cfg(length: int):
    return B.tiny_cfg(f"train.total_kimg={length * 16 / 1000}")       # steps of 16 images, checkpoints every 2


def base_run(run_dir, cfg, slow: float = 0.0, **kw):
    if slow:            # only in a child process: a sleep per step (the learning rate is read once per step)
        import distreward.train.loop as loop

        lr = loop.learning_rate
        loop.learning_rate = lambda *a, **k: (time.sleep(slow), lr(*a, **k))[1]
    return train_base(cfg, run_dir, progress=False, **kw)


def base_state(run_dir: Path) -> dict:
    st = load_checkpoint(run_dir / "checkpoints" / "training-state.pt")
    return {"net": st["net"], "ema": st["ema"], "optimizer": st["optimizer"]["state"], "step": st["step"]}


TRAINERS = {
    "finetune": Trainer("finetune", finetune_cfg, finetune_run, finetune_state, "checkpoints/last.pt", "iteration"),
    "merge": Trainer("merge", merge_cfg, merge_run, merge_state, "checkpoints/last.pt", "iteration"),
    "train-base": Trainer("train-base", base_cfg, base_run, base_state, "checkpoints/training-state.pt", "step"),
}


def changed(cfg, changes: dict):
    """A copy of `cfg` with dotted keys set."""
    out = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg))
    for k, v in changes.items():
        OmegaConf.update(out, k, v, merge=False)
    return out


def assert_same(a, b, where: str = "") -> None:
    """Exactly equal, recursively (tensors, arrays, numbers, containers)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def logged(run_dir: Path, counter: str) -> list[int]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[counter] for r in recs if counter in r and ("r_mean" in r or "loss" in r)]


# --------------------------------------------------------------------------------------------- a previous run

PREVIOUS_RUN_CASES = [   # (trainer, second call's arguments, refused with (regex) or None: runs from a clean directory)
    pytest.param("finetune", {}, r"holds a previous run .*pass --overwrite to replace it or --resume", id="finetune-refused"),
    pytest.param("finetune", {"overwrite": True}, None, id="finetune-overwrite"),
    pytest.param("finetune", {"overwrite": True, "resume": True}, "either --resume .* or --overwrite", id="finetune-both"),
    pytest.param("merge", {}, "holds a previous run", id="merge-refused"),
    pytest.param("merge", {"overwrite": True}, None, id="merge-overwrite"),
    pytest.param("train-base", {}, r"holds a previous run .*--resume", id="train-base-refused"),
    pytest.param("train-base", {"overwrite": True}, None, id="train-base-overwrite"),
]


@pytest.mark.parametrize("trainer,kwargs,refused", PREVIOUS_RUN_CASES)
def test_a_run_not_resumed_refuses_a_previous_run_unless_overwrite(trainer, kwargs, refused, tmp_path):
    t = TRAINERS[trainer]
    run = tmp_path / "run"
    t.run(run, t.cfg(2))
    (run / "stale.txt").write_text("from before")
    if refused:
        with pytest.raises(RunDirError, match=refused):
            t.run(run, t.cfg(2), **kwargs)
        assert (run / "stale.txt").is_file()                    # nothing touched
        return
    t.run(run, t.cfg(2), **kwargs)
    assert not (run / "stale.txt").exists()                     # a clean directory
    assert logged(run, t.counter) == [1, 2]                     # one run's records
    assert [e["overwrite"] for e in read_provenance(run)] == [True]


def test_overwrite_empties_only_run_directories_and_keeps_inputs(tmp_path):
    t = TRAINERS["merge"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("not a run")
    with pytest.raises(RunDirError, match="holds no run"):
        t.run(other, t.cfg(1), overwrite=True)
    assert (other / "mine.txt").is_file()
    run = tmp_path / "run"
    (run / "dry_run_inputs").mkdir(parents=True)                # written by merge_parts before run_merge
    (run / "dry_run_inputs" / "x.safetensors").write_bytes(b"input")
    t.run(run, t.cfg(1))                                        # inputs alone are not a previous run
    t.run(run, t.cfg(1), overwrite=True)
    assert (run / "dry_run_inputs" / "x.safetensors").read_bytes() == b"input"


# --------------------------------------------------------------------------------------------- resume with changes

RESUME_CASES = [   # (trainer, changed settings, allow_changes, refused naming these (every changed key) or None: applied)
    pytest.param("finetune", {"rl.lr": 0.01, "eval.n": 6}, [], ["rl.lr: 0.003 -> 0.01", "eval.n: 12 -> 6"],
                 id="finetune-changed"),
    pytest.param("finetune", {"rl.lr": 0.01}, ["rl.lr"], ["rl.lr", "cannot be changed on resume", "rl.iterations"],
                 id="finetune-not-changeable"),
    pytest.param("finetune", {"rl.iterations": 3}, [], ["rl.iterations: 2 -> 3"], id="finetune-not-allowed"),
    pytest.param("finetune", {"rl.iterations": 1}, ["rl.iterations"], ["can only be raised"], id="finetune-lowered"),
    pytest.param("finetune", {"rl.iterations": 4}, ["rl.iterations"], None, id="finetune-more-iterations"),
    pytest.param("finetune", {"rl.iterations": 4, "eval.every": 1}, ["rl.iterations", "eval.every"], None,
                 id="finetune-two-changes"),
    pytest.param("merge", {"rl.lr": 0.1, "policy.init_std": 0.3}, [], ["rl.lr: 0.05 -> 0.1", "policy.init_std: 0.2 -> 0.3"],
                 id="merge-changed"),
    pytest.param("merge", {"rl.iterations": 4}, ["rl.iterations"], None, id="merge-more-iterations"),
    pytest.param("train-base", {"train.batch": 8, "train.lr": 1e-3}, [], ["train.batch: 16 -> 8", "train.lr: 0.002 -> 0.001"],
                 id="train-base-changed"),
    pytest.param("train-base", {"train.total_kimg": 0.064}, ["train.total_kimg"], None, id="train-base-more-steps"),
]


@pytest.mark.parametrize("trainer,changes,allow,refused", RESUME_CASES)
def test_resume_refuses_changed_settings_unless_allowed_and_honourable(trainer, changes, allow, refused, tmp_path):
    t = TRAINERS[trainer]
    run = tmp_path / "run"
    t.run(run, t.cfg(2))
    saved = (run / "config.yaml").read_text()
    new = changed(t.cfg(2), changes)
    if refused:
        with pytest.raises(RunDirError) as e:
            t.run(run, new, resume=True, allow_changes=allow)
        for s in refused:
            assert s in str(e.value), (s, str(e.value))
        assert "\n" not in str(e.value)                           # one line
        assert (run / "config.yaml").read_text() == saved         # nothing rewritten
        assert len(read_provenance(run)) == 1
        return
    t.run(run, new, resume=True, allow_changes=allow)
    entry = read_provenance(run)[-1]
    assert {c["key"] for c in entry["changes"]} == set(changes) and entry["resume"]
    saved = OmegaConf.load(run / "config.yaml")
    assert all(OmegaConf.select(saved, k) == v for k, v in changes.items())     # config.yaml: the new values
    # applied: the run went on to the new length and equals an uninterrupted run with the new settings
    t.run(tmp_path / "straight", new)
    assert_same(t.state(tmp_path / "straight"), t.state(run))
    assert logged(run, t.counter) == logged(tmp_path / "straight", t.counter)


def test_resume_refuses_a_changed_input_file_and_warns_about_threads(tmp_path):
    t = TRAINERS["merge"]
    run = tmp_path / "run"
    t.run(run, t.cfg(2))
    # another thread count: a warning (results then differ at ~1e-6), the resume goes on
    history = read_provenance(run)
    history[-1]["threads"] = torch.get_num_threads() + 1
    (run / PROVENANCE_FILE).write_text(json.dumps(history))
    with pytest.warns(ResumeWarning, match=r"1e-6.*--threads"):
        t.run(run, t.cfg(2), resume=True)
    # an input whose content changed since the run started: refused, naming it
    M.tiny_checkpoints(tmp_path / "merge_inputs", seed=5)
    with pytest.raises(RunDirError, match=r"input file\(s\) changed since the run started: .*ckpt0.safetensors"):
        t.run(run, t.cfg(2), resume=True)


# --------------------------------------------------------------------------------------------- checkpoint rotation

def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def garbage(p: Path) -> None:
    p.write_bytes(b"not a checkpoint at all")


DAMAGE_CASES = [   # (trainer, what happens to the last checkpoint (and to .prev), refused with (regex) or None)
    pytest.param("finetune", {"last": truncate}, None, id="finetune-truncated"),
    pytest.param("finetune", {"last": garbage}, None, id="finetune-garbage"),
    pytest.param("finetune", {"last": Path.unlink}, None, id="finetune-missing"),
    pytest.param("finetune", {"last": truncate, "prev": garbage}, r"last\.pt is damaged .*last\.pt\.prev is damaged too",
                 id="finetune-both-damaged"),
    pytest.param("merge", {"last": truncate}, None, id="merge-truncated"),
    pytest.param("train-base", {"last": truncate}, None, id="train-base-truncated"),
    pytest.param("train-base", {"last": garbage, "prev": truncate}, r"training-state\.pt is damaged .*\.prev",
                 id="train-base-both-damaged"),
]


@pytest.mark.parametrize("trainer,damage,refused", DAMAGE_CASES)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(trainer, damage, refused, tmp_path):
    t = TRAINERS[trainer]
    length = 4
    t.run(tmp_path / "straight", t.cfg(length))
    run = tmp_path / "run"
    t.run(run, t.cfg(length))
    last = run / t.ckpt
    prev = last.with_name(last.name + ".prev")
    assert prev.is_file() and load_checkpoint(prev)[t.counter] < length       # rotated: the one before
    for which, fn in damage.items():
        fn(last if which == "last" else prev)
    if refused:
        with pytest.raises(CheckpointError, match=refused):
            t.run(run, t.cfg(length), resume=True)
        return
    with pytest.warns(CheckpointWarning, match="resuming from the previous checkpoint"):
        t.run(run, t.cfg(length), resume=True)
    assert_same(t.state(tmp_path / "straight"), t.state(run))
    assert logged(run, t.counter) == list(range(1, length + 1))
    if damage["last"] is not Path.unlink:
        assert last.with_name(last.name + ".damaged").is_file()              # kept aside, out of the rotation


# --------------------------------------------------------------------------------------------- the lock

HOLD = textwrap.dedent("""
    import sys, time
    from distreward.utils.rundir import prepare_run
    run = prepare_run(sys.argv[1], {}, command="holder", resume=True)
    print("locked", flush=True)
    time.sleep(120)
""")
TRY = textwrap.dedent("""
    import sys
    from distreward.utils.lock import RunLockedError
    from distreward.utils.rundir import prepare_run
    try:
        prepare_run(sys.argv[1], {}, command="second", resume=True)
    except RunLockedError as e:
        print(e)
        sys.exit(3)
""")


def test_a_second_live_run_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = subprocess.run([sys.executable, "-c", TRY, str(run)], capture_output=True, text=True, timeout=120)
        assert other.returncode == 3 and f"pid {holder.pid}" in other.stdout, other
        with pytest.raises(RunLockedError, match=f"in use by a live run: pid {holder.pid}"):
            TRAINERS["finetune"].run(run, TRAINERS["finetune"].cfg(1), resume=True)
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL): its lock is free and taken over, and provenance says so
    r = prepare_run(run, {}, command="after", resume=True)
    assert r.lock.took_over["pid"] == holder.pid and read_provenance(run)[-1]["took_over_lock_of"] == holder.pid
    r.close()
    assert (run / ".lock").read_text() == ""                    # released
    # a lock file naming a dead process (no flock held) is taken over as well
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "command_line": "distreward finetune"}))
    with prepare_run(run, {}, command="after", resume=True) as r:
        assert r.lock.took_over["pid"] == dead.pid


# --------------------------------------------------------------------------------------------- provenance

def test_provenance_records_each_invocation(tmp_path):
    t = TRAINERS["finetune"]
    run = tmp_path / "run"
    t.run(run, t.cfg(2))
    t.run(run, changed(t.cfg(2), {"rl.iterations": 3}), resume=True, allow_changes=["rl.iterations"])
    first, second = read_provenance(run)
    for e in (first, second):
        assert e["command"] == "finetune" and e["argv"] == sys.argv and e["threads"] == torch.get_num_threads()
        assert e["torch"] == torch.__version__ and e["numpy"] == np.__version__ and e["device"] == "cpu"
        assert e["package_version"] == __import__("distreward").__version__
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert first["git"]["commit"] == head
    base = REPO / "weights" / "fmnist-base.safetensors"         # model.path (a default of the GRPO config)
    assert first["inputs"][str(base)] == hashlib.sha256(base.read_bytes()).hexdigest()
    assert (first["resume"], second["resume"]) == (False, True)
    assert second["changes"] == [{"key": "rl.iterations", "from": 2, "to": 3}]


# --------------------------------------------------------------------------------------------- SIGKILL and resume

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import test_rundir as T
    t = T.TRAINERS[sys.argv[2]]
    t.run(sys.argv[3], t.cfg(int(sys.argv[4])), slow=float(sys.argv[5]))
""")

KILL_CASES = [   # (trainer, length, seconds per iteration in the child, killed once the checkpoint reaches)
    pytest.param("finetune", 8, 0.4, 2, id="finetune"),
    pytest.param("merge", 8, 0.1, 2, id="merge"),
    pytest.param("train-base", 12, 0.3, 4, id="train-base"),
]


@pytest.mark.slow
@pytest.mark.parametrize("trainer,length,slow,kill_at", KILL_CASES)
def test_sigkill_mid_run_then_resume_is_bit_identical(trainer, length, slow, kill_at, tmp_path):
    t = TRAINERS[trainer]
    t.run(tmp_path / "straight", t.cfg(length))
    run = tmp_path / "killed"
    env = {**os.environ, "DISTREWARD_THREADS": str(torch.get_num_threads())}     # the same sums as this process
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(TESTS), trainer, str(run), str(length), str(slow)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when(child, run / t.ckpt, t.counter, kill_at, 240)
    assert kill_at <= load_checkpoint(run / t.ckpt)[t.counter] < length
    t.run(run, t.cfg(length), resume=True)                      # takes over the dead child's lock
    assert_same(t.state(tmp_path / "straight"), t.state(run))
    assert logged(run, t.counter) == logged(tmp_path / "straight", t.counter)   # no record twice, none missing


# --------------------------------------------------------------------------------------------- demo stages

def test_demo_stages_are_reused_only_with_the_same_key(tmp_path, monkeypatch):
    from distreward.demo.stages import DemoContext, Stage, run_stages

    ctx = DemoContext(run_dir=tmp_path, cfg=None, sample_cfg=None, compare=False, progress=False)
    calls = []
    setting = {"n": 1}
    crash = {"on": False}

    def fn(c):
        calls.append(c.clean)
        if crash["on"]:
            raise KeyboardInterrupt("killed")
        return {"value": setting["n"]}

    stage = Stage("one", fn, key=lambda c: {"n": setting["n"]})
    run_stages(ctx, [stage])                                    # first run: from a clean directory
    run_stages(ctx, [stage])                                    # same key: reused, not run
    assert calls == [True] and ctx.results["one"] == {"value": 1, "seconds": ctx.results["one"]["seconds"]}
    setting["n"] = 2                                            # the key changed: run again, clean
    run_stages(ctx, [stage])
    assert calls == [True, True] and ctx.results["one"]["value"] == 2
    setting["n"], crash["on"] = 3, True                         # killed mid-stage ...
    with pytest.raises(KeyboardInterrupt):
        run_stages(ctx, [stage])
    crash["on"] = False                                         # ... and run again with the same key: resumed
    run_stages(ctx, [stage])
    assert calls == [True, True, True, False] and ctx.results["one"]["value"] == 3
    ctx.fresh = True                                            # --fresh: everything again, clean
    run_stages(ctx, [stage])
    assert calls[-1] is True and len(calls) == 5


def test_a_key_the_saved_run_lacks_is_no_change_at_its_default(tmp_path):
    """A run saved before a key existed (e.g. one added to the schema since) resumes when the key is at its
    default; any other value of that key is a change and refused by name."""
    from distreward.utils.rundir import check_changes

    defaults = {"rl": {"lr": 1e-4, "algorithm": "grpo"}, "nft": {"beta": 1.0}}
    old = {"rl": {"lr": 1e-4}}
    assert check_changes(tmp_path, old, {"rl": {"lr": 1e-4, "algorithm": "grpo"}, "nft": {"beta": 1.0}}, [], {},
                         defaults) == []
    with pytest.raises(RunDirError, match=r"rl.algorithm: \(absent\) -> nft"):
        check_changes(tmp_path, old, {"rl": {"lr": 1e-4, "algorithm": "nft"}}, [], {}, defaults)
    with pytest.raises(RunDirError, match="rl.algorithm"):           # without the defaults every new key is a change
        check_changes(tmp_path, old, {"rl": {"lr": 1e-4, "algorithm": "grpo"}}, [], {})
    with pytest.raises(RunDirError, match="nft.beta"):               # a default of another type is not the default
        check_changes(tmp_path, old, {"rl": {"lr": 1e-4}, "nft": {"beta": 1}}, [], {}, defaults)
    t = TRAINERS["finetune"]
    run = tmp_path / "run"
    t.run(run, t.cfg(2))
    saved = OmegaConf.load(run / "config.yaml")
    del saved.rl["algorithm"]                                          # as written before rl.algorithm existed
    del saved["nft"]
    OmegaConf.save(saved, run / "config.yaml")
    t.run(run, t.cfg(3), resume=True, allow_changes=["rl.iterations"])
    assert {c["key"] for c in read_provenance(run)[-1]["changes"]} == {"rl.iterations"}


# --------------------------------------------------------------------------------------------- the command line

def run_cli(line: str, run: Path, capsys) -> tuple[int, str]:
    """One `distreward` invocation in-process: (exit code, stdout + stderr)."""
    from distreward.cli import main

    rc = main([a.replace("{run}", str(run)) for a in line.split()] + ["--no-progress"])
    out = capsys.readouterr()
    return rc, out.out + out.err


BASE_DRY = "train-base --config fmnist_base_tiny --dry-run --run-dir {run}"
STOPPED = "(the model file made older than the log)"
CLI_CASES = [   # (the command lines in order, each with its exit code and a text its output holds; provenance entries)
    pytest.param([(BASE_DRY, 0, "step 2 of 2"),
                  ("train-base --run-dir {run} --resume train.total_kimg=0.128 --allow-change train.total_kimg", 0,
                   "step 4 of 4")], 2, id="resume-takes-the-runs-own-config"),
    pytest.param([(BASE_DRY, 0, "step 2 of 2"), ("train-base --run-dir {run} --resume train.lr=0.1", 2,
                                                  "differs from the saved run's in 1 setting(s): train.lr")], 1,
                 id="resume-compares-only-the-overrides-given"),
    pytest.param([(BASE_DRY, 0, "step 2 of 2"), ("train-base --run-dir {run} --resume", 0, "already finished")], 1,
                 id="train-base-resume-a-finished-run"),
    pytest.param([("finetune --config fmnist_grpo_tiny --dry-run --run-dir {run}", 0, "final: fd_reward"),
                  ("finetune --run-dir {run} --resume", 0, "already finished")], 1, id="finetune-resume-a-finished-run"),
    pytest.param([(BASE_DRY, 0, "step 2 of 2"),
                  ("train-base --run-dir {run} --resume train.total_kimg=0.128 --allow-change train.total_kimg", 0,
                   "step 4 of 4"), ("train-base --run-dir {run} --resume", 0, "already finished")], 2,
                 id="a-lengthened-run-that-finished-is-finished"),
    pytest.param([(BASE_DRY, 0, "step 2 of 2"),
                  ("train-base --run-dir {run} --resume train.total_kimg=0.128 --allow-change train.total_kimg", 0,
                   "step 4 of 4"), (STOPPED, 0, ""), ("train-base --run-dir {run} --resume", 0, "step 4 of 4")], 3,
                 id="a-lengthened-run-stopped-before-its-new-end-resumes"),
    pytest.param([(BASE_DRY, 0, "step 2 of 2"), (BASE_DRY, 0, "replacing the earlier dry run")], 1,
                 id="a-dry-run-replaces-its-own-folder"),
    pytest.param([("train-base --config fmnist_base_tiny --run-dir {run} data.limit=64 train.total_kimg=0.064", 0,
                   "step 2 of 2"), (BASE_DRY, 2, "holds a previous run")], 1, id="a-dry-run-never-replaces-another-run"),
]


@pytest.mark.parametrize("steps,entries", CLI_CASES)
def test_run_commands_on_the_command_line(steps, entries, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    for line, rc, text in steps:
        if line == STOPPED:       # a lengthened run stopped before its new end: it logged after its old model file
            t = (run / "metrics.jsonl").stat().st_mtime_ns - 10**9
            os.utime(run / "model.safetensors", ns=(t, t))
            continue
        got, printed = run_cli(line, run, capsys)
        assert got == rc and text in printed, (line, printed)
        assert "Traceback" not in printed
    assert len(read_provenance(run)) == entries          # a refused or finished resume runs nothing


def test_the_thread_warning_counts_the_threads_that_trained(tmp_path):
    """A resume is compared with the threads of the invocation that wrote the checkpoint, not with a later one that
    stopped before saving anything."""
    t = TRAINERS["merge"]
    run = tmp_path / "run"
    t.run(run, t.cfg(2))
    n = torch.get_num_threads()
    history = read_provenance(run)
    later = {**history[-1], "threads": n + 3, "started": "2999-01-01T00:00:00+00:00"}   # after the checkpoint
    (run / PROVENANCE_FILE).write_text(json.dumps(history + [later]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        t.run(run, t.cfg(2), resume=True)                        # trained with n threads: no warning
    history = read_provenance(run)
    for entry in history:                                        # the invocations that trained: another count
        entry["threads"] = entry["threads"] if entry["started"].startswith("2999") else n + 1
    (run / PROVENANCE_FILE).write_text(json.dumps(history))
    with pytest.warns(ResumeWarning, match=f"trained with {n + 1}"):
        t.run(run, t.cfg(2), resume=True)
