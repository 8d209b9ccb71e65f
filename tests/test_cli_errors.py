"""Bad input on the command line: one error line naming the file, exit code 2, no traceback, nothing left behind.

CASES is the table (bad input x command). A row is (id, command line, the name the error line must contain).
In a command line `{tmp}` is the folder of bad files made by `bad_files` and `{out}` the row's output location,
which must not exist afterwards (no half-written run directory or file). To add a case: add the file to
`bad_files` if it is a new kind of bad file, then a row. The commands run in-process (`distreward.cli.main`);
two rows also run as real processes (END_TO_END).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distreward.cli.finetune as cli_finetune
import distreward.cli.merge as cli_merge
from distreward.cli import build_parser, main, split_overrides, subparser
from distreward.config import repo_path
from distreward.utils import progress as P
from distreward.utils.errors import InputFileError

SNAPSHOTS = repo_path("weights", "fmnist-base-snapshots")
BASE = repo_path("weights", "fmnist-base.safetensors")
FEATURES = repo_path("weights", "fmnist-reward.safetensors")


class Planted:
    """A pickle whose loading would run a shell command (it must be refused, never executed)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    return bad_files(tmp_path_factory.mktemp("bad"))


def bad_files(d: Path) -> Path:
    """Every kind of bad file the table uses, in one folder."""
    (d / "empty.safetensors").write_bytes(b"")
    (d / "text.safetensors").write_text("this is a text file, not tensors\n")
    data = BASE.read_bytes()
    (d / "trunc.safetensors").write_bytes(data[:len(data) // 2])
    (d / "evil.pkl").write_bytes(pickle.dumps({"fid": Planted(d / "PWNED")}))
    rng = np.random.default_rng(0)
    np.savez(d / "seven.npz", mu=rng.standard_normal(7), sigma=np.eye(7))
    np.savez(d / "few.npz", images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8))
    (d / "text.npz").write_text("not a zip archive\n")
    (d / "bad.yaml").write_text("rl: {iterations: 3\nreward: [\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "nodry.yaml").write_text("name: nodry\nrl: {iterations: 2}\n")
    (d / "emptydir").mkdir()
    (d / "images").mkdir()
    (d / "images" / "broken.png").write_text("not a png")
    snaps = sorted(SNAPSHOTS.glob("*.safetensors"))
    (d / "snap_a.safetensors").write_bytes(snaps[0].read_bytes())
    (d / "snap_b.safetensors").write_bytes(snaps[1].read_bytes())
    return d


def _(s: str) -> list[str]:
    return s.split()


CASES = [
    # missing / empty / truncated / text files where a generator .safetensors is expected
    ("missing-model/sample", _("sample --model {tmp}/missing.safetensors -o {out}/grid.png"), "missing.safetensors"),
    ("empty-model/sample", _("sample --model {tmp}/empty.safetensors -o {out}/grid.png"), "empty.safetensors"),
    ("truncated-model/sample", _("sample --model {tmp}/trunc.safetensors -o {out}/x.npz"), "trunc.safetensors"),
    ("text-model/sample", _("sample --model {tmp}/text.safetensors -o {out}/grid.png"), "text.safetensors"),
    ("text-model/finetune", _("finetune --config fmnist_grpo_tiny model.path={tmp}/text.safetensors --run-dir {out}"),
     "text.safetensors"),
    ("truncated-checkpoint/merge", _("merge --checkpoints {tmp}/snap_a.safetensors {tmp}/trunc.safetensors "
                                     "--run-dir {out}"), "trunc.safetensors"),
    ("empty-checkpoint/merge", _("merge --checkpoints {tmp}/empty.safetensors {tmp}/snap_a.safetensors "
                                 "--run-dir {out}"), "empty.safetensors"),
    # feature-network weights
    ("text-features/stats", _("stats fmnist-test --features {tmp}/text.safetensors -o {out}/s.npz"), "text.safetensors"),
    ("empty-features/evaluate", _("evaluate fmnist-test --features {tmp}/empty.safetensors --no-cache --json {out}/m.json"),
     "empty.safetensors"),
    # images and statistics
    ("text-npz/stats", _("stats {tmp}/text.npz -o {out}/s.npz"), "text.npz"),
    ("text-npz-ref/evaluate", _("evaluate {tmp}/few.npz --ref {tmp}/text.npz --no-cache --json {out}/m.json"), "text.npz"),
    ("broken-image/stats", _("stats {tmp}/images -o {out}/s.npz"), "broken.png"),
    ("empty-folder/stats", _("stats {tmp}/emptydir -o {out}/s.npz"), "emptydir"),
    ("wrong-dim-stats/evaluate", _("evaluate {tmp}/few.npz --ref {tmp}/seven.npz --no-cache --json {out}/m.json"),
     "seven.npz"),
    ("wrong-dim-stats/merge", _("merge --checkpoints {tmp}/snap_a.safetensors {tmp}/snap_b.safetensors "
                                "reward.real_stats={tmp}/seven.npz --run-dir {out}"), "seven.npz"),
    ("text-data/train-base", _("train-base --config fmnist_base_tiny data.images={tmp}/text.npz --run-dir {out}"),
     "text.npz"),
    # pickles: refused, never executed
    ("planted-pickle-stats/merge", _("merge --checkpoints {tmp}/snap_a.safetensors {tmp}/snap_b.safetensors "
                                     "reward.real_stats={tmp}/evil.pkl --run-dir {out}"), "evil.pkl"),
    ("planted-pickle-edm2/merge", _("merge --config edm2_xs_img512 --checkpoints {tmp}/evil.pkl device=cpu "
                                    "--run-dir {out}"), "evil.pkl"),
    # configs and the command line
    ("bad-yaml/finetune", _("finetune --config {tmp}/bad.yaml --run-dir {out}"), "bad.yaml"),
    ("bad-yaml/train-base", _("train-base --config {tmp}/bad.yaml --run-dir {out}"), "bad.yaml"),
    ("list-yaml/merge", _("merge --config {tmp}/list.yaml --run-dir {out}"), "list.yaml"),
    ("unknown-preset/merge", _("merge --config no_such_preset --run-dir {out}"), "no_such_preset"),
    ("override-without-equals/finetune", _("finetune rl.iterations 3 --run-dir {out}"), "rl.iterations"),
    ("bad-override-value/finetune", _("finetune rl.iterations=[1 --run-dir {out}"), "rl.iterations"),
    ("unknown-option/stats", _("stats fmnist-test --no-such-option -o {out}/s.npz"), "--no-such-option"),
    ("bad-thread-count/stats", _("stats fmnist-test --threads 0 -o {out}/s.npz"), "thread count"),
    # overrides among the options are never taken for paths: the error names the real missing file
    ("overrides-among-options/merge", _("merge --checkpoints {tmp}/missing.safetensors {tmp}/snap_a.safetensors "
                                        "rl.iterations=3 --run-dir {out} seed=2"), "missing.safetensors"),
    ("overrides-among-options/finetune", _("finetune rl.iterations=2 --run-dir {out} seed=3 "
                                           "model.path={tmp}/missing.safetensors"), "missing.safetensors"),
]
CASES += [
    # option values: one line naming the option, never "range() arg 3 must not be zero"
    ("negative-count/sample", _(f"sample --model {BASE} -n -3 -o {{out}}/g.png"), "-n/--num"),
    ("zero-batch/sample", _(f"sample --model {BASE} --batch-size 0 -o {{out}}/g.png"), "--batch-size"),
    ("zero-batch/evaluate", _("evaluate {tmp}/few.npz --batch-size 0 --no-cache --json {out}/m.json"), "--batch-size"),
    ("negative-grid-n/phema", _(f"phema --snapshots {SNAPSHOTS} --std 0.1 --grid {{out}}/g.png --grid-n -2"), "--grid-n"),
    ("unknown-device/sample", _(f"sample --model {BASE} --device gpu -o {{out}}/g.png"), "--device gpu"),
    ("threads-before-the-command/stats", _("--threads 0 stats fmnist-test -o {out}/s.npz"), "thread count"),
    # what a file or a preset is, when it is not what the command takes
    ("feature-network-as-model/sample", _(f"sample --model {FEATURES} -o {{out}}/g.png"), "is a feature network"),
    ("train-base-preset/finetune", _("finetune --config fmnist_base --run-dir {out}"), "is a train-base preset"),
    ("finetune-preset/merge", _("merge --config fmnist_grpo_tiny --run-dir {out}"), "is a finetune preset"),
    ("merge-preset/train-base", _("train-base --config fmnist_merge_ema --run-dir {out}"), "is a merge preset"),
    ("no-dry-run-block/finetune", _("finetune --config {tmp}/nodry.yaml --dry-run --run-dir {out}"), "no 'dry_run' block"),
    ("allow-change-without-resume/merge", _("merge --allow-change rl.iterations --run-dir {out}"), "--allow-change"),
    ("train-base-preset/study", _("study --config fmnist_base --run-dir {out}"), "is a train-base preset"),
    ("network-keyword/train-base", _("train-base --config fmnist_base_tiny network.kwargs.bogus=1 --run-dir {out}"),
     "unexpected keyword argument 'bogus'"),
    ("network-keyword/finetune", _("finetune --config fmnist_grpo_tiny --dry-run model.kwargs.bogus=1 --run-dir {out}"),
     "model.kwargs"),
]
if not torch.cuda.is_available():
    CASES += [("no-cuda/sample", _(f"sample --model {BASE} --device cuda -o {{out}}/g.png"), "--device cuda"),
              ("no-cuda/finetune", _("finetune --config fmnist_grpo_tiny device=cuda --run-dir {out}"), "device=cuda")]
END_TO_END = ["planted-pickle-stats/merge", "overrides-among-options/finetune", "negative-count/sample"]


def expand(argv: list[str], tmp: Path, out: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)).replace("{out}", str(out)) for a in argv]


def check_error(rc: int, err: str, name: str, out: Path, tmp: Path) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], err     # one error line, last (phase lines may precede it)
    assert errors[0].startswith("distreward ") and name in errors[0], errors[0]
    assert not out.exists(), f"left behind: {sorted(str(p) for p in out.rglob('*'))}"
    assert not (tmp / "PWNED").exists(), "a pickle was executed"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, bad, tmp_path, monkeypatch, capsys):
    _id, argv, name = case
    monkeypatch.chdir(tmp_path)                 # runs/ and caches land in the test's folder
    out = tmp_path / "out"
    rc = main(expand(argv, bad, out))
    check_error(rc, capsys.readouterr().err, name, out, bad)


@pytest.mark.parametrize("case_id", END_TO_END)
def test_bad_input_end_to_end(case_id, bad, tmp_path):
    """The same rows in a real process: stderr holds no traceback, the exit code is 2."""
    _id, argv, name = next(c for c in CASES if c[0] == case_id)
    out = tmp_path / "out"
    env = {**os.environ, "DISTREWARD_THREADS": "1"}
    env.pop("DISTREWARD_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "distreward.cli", *expand(argv, bad, out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    check_error(r.returncode, r.stderr, name, out, bad)


def test_debug_shows_the_traceback(bad, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sample", "--model", str(bad / "text.safetensors"), "-o", str(out / "g.png"), "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and "header" in err and err.strip().splitlines()[-1].startswith("distreward")


def test_unreadable_checkpoint_on_resume(bad, tmp_path, monkeypatch, capsys):
    """--resume on a run whose checkpoints (and their previous copies) are not torch files: one line naming it; the
    run directory is left as it was."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    argv = ["train-base", "--config", "fmnist_base_tiny", "--run-dir", str(run), "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    (run / "model.safetensors").unlink()           # a run stopped before its end (a finished one is not resumed)
    damaged = [p for p in run.rglob("*") if p.is_file() and (p.suffix in (".pt", ".prev") or ".pt" in p.name)]
    assert damaged, sorted(run.rglob("*"))
    for p in damaged:
        p.write_text("not a torch file\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    rc = main(argv + ["--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("distreward train-base: error:") and any(p.name in line for p in damaged), line
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert set(after) - set(before) <= {p for p in after if p.name == "provenance.json"}
    assert all(after[p] == before[p] for p in before if p in after and p.suffix != ".json")


# ------------------------------------------------------------------------------------ the command line


def test_overrides_are_split_wherever_they_stand():
    parser = build_parser()
    p = subparser(parser, "merge")
    cli_merge.add_arguments(p)
    rest, overrides = split_overrides(["--checkpoints", "a.safetensors", "b.safetensors", "rl.iterations=3",
                                       "--run-dir", "x=y", "seed=2", "./odd=name.safetensors"], p)
    assert overrides == ["rl.iterations=3", "seed=2"]                  # the run dir 'x=y' is --run-dir's value
    assert rest == ["--checkpoints", "a.safetensors", "b.safetensors", "--run-dir", "x=y", "./odd=name.safetensors"]


def test_run_options_reach_the_trainer(tmp_path, monkeypatch, capsys):
    """finetune / merge get the overrides from anywhere on the line, and overwrite= / allow_changes=."""
    seen = {}

    def fake_finetune(cfg, run_dir, **kw):
        seen["finetune"] = (cfg, run_dir, kw)
        return {"final": {}}

    def fake_merge(cfg, run_dir, **kw):
        seen["merge"] = (cfg, run_dir, kw)
        return {"baselines": {}, "init": {}, "merged": {}, "model": "m"}

    monkeypatch.setattr(cli_finetune, "finetune", fake_finetune)
    monkeypatch.setattr(cli_merge, "run_merge", fake_merge)
    for module in (cli_finetune, cli_merge):              # the stand-ins write no run to report on
        monkeypatch.setattr(module, "write_run_report", lambda run_dir: run_dir, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "rl.iterations=2", "--run-dir", "x", "seed=3", "--resume", "--allow-change",
                 "rl.iterations", "--allow-change", "eval.every", "--no-progress"]) == 0
    cfg, run_dir, kw = seen["finetune"]
    assert cfg.rl.iterations == 2 and cfg.seed == 3 and str(run_dir) == "x"
    assert kw == {"resume": True, "overwrite": False, "allow_changes": ("rl.iterations", "eval.every"), "progress": False}
    assert main(["merge", "--checkpoints", "a.safetensors", "b.safetensors", "rl.iterations=3", "--overwrite",
                 "--run-dir", "m"]) == 0
    cfg, run_dir, kw = seen["merge"]
    assert list(cfg.merge.checkpoints) == ["a.safetensors", "b.safetensors"] and cfg.rl.iterations == 3
    assert kw["overwrite"] is True and kw["resume"] is False and kw["allow_changes"] == ()
    assert main(["merge", "--resume", "--overwrite", "--run-dir", "m"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_a_failed_run_keeps_saved_progress(tmp_path, monkeypatch, capsys):
    """A run directory the failed command created is removed, unless it already holds a checkpoint."""
    def failing(cfg, run_dir, **kw):
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text("seed: 0\n")
        if cfg.seed == 1:
            (run_dir / "checkpoints").mkdir()
            (run_dir / "checkpoints" / "last.pt").write_bytes(b"state")
        raise InputFileError(f"{tmp_path / 'late.npz'}: damaged; fix it")

    monkeypatch.setattr(cli_finetune, "finetune", failing)
    for seed, kept in ((0, False), (1, True)):
        out = tmp_path / f"run{seed}"
        assert main(["finetune", "--run-dir", str(out), f"seed={seed}"]) == 2
        assert "late.npz" in capsys.readouterr().err and out.exists() == kept


@pytest.mark.parametrize("command", ["train-features", "stats", "evaluate", "train-base", "phema", "sample",
                                     "finetune", "merge", "demo"])
def test_every_command_has_the_common_options(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--no-progress" in text and "--debug" in text and "--threads" in text
    if command in ("finetune", "merge", "train-base"):
        assert "--overwrite" in text and "--allow-change" in text


# ------------------------------------------------------------------------------------ progress in a log


def test_progress_prints_plain_periodic_lines_when_not_a_terminal(capsys):
    old = P.configure(enabled=True, interval=1e-9)
    try:
        for _ in P.progress(range(3), desc="work", unit="batch"):
            pass
        bar = P.progress(total=4, desc="manual", initial=1)
        bar.update(1)
        bar.set_postfix(r="0.5")
        bar.update(2)
        bar.close()
        P.phase("phase: starting")
        P.configure(enabled=False)
        for _ in P.progress(range(3), desc="silent"):
            pass
        P.phase("phase: still shown")
    finally:
        P.configure(**old)
    err = capsys.readouterr().err
    assert "\r" not in err                                            # no carriage-return bars in a log
    lines = err.splitlines()
    assert "work: 1/3 batch (33%)" in lines[0] and "elapsed" in lines[0]
    assert any(line.startswith("work: 3/3 batch (100%)") for line in lines)
    assert any(line.startswith("manual: 4/4 it (100%)") and "r=0.5" in line for line in lines)
    assert "phase: starting" in lines and "phase: still shown" in lines
    assert not any("silent" in line for line in lines)


def test_progress_is_quiet_for_short_loops(capsys):
    for _ in P.progress(range(100), desc="fast"):
        pass
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------ bugs, Ctrl-C, common options


def test_a_bare_value_error_is_a_bug_and_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the package's bad-input errors become one line; a ValueError from deep inside propagates."""
    def buggy(cfg, run_dir, **kw):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(cli_finetune, "finetune", buggy)
    with pytest.raises(ValueError, match="broadcast"):
        main(["finetune", "--run-dir", str(tmp_path / "run")])


@pytest.mark.parametrize("command,counter", [("finetune", "iteration"), ("merge", "iteration")])
def test_ctrl_c_names_the_iteration_and_the_resume(command, counter, tmp_path, monkeypatch, capsys):
    """Ctrl-C during a run: one line with the iteration its log reached and --resume, exit code 130; the run
    directory (it holds a checkpoint) stays. Interrupted before any checkpoint: nothing to resume, nothing left."""
    def interrupted(cfg, run_dir, **kw):
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.seed == 1:
            (run_dir / "checkpoints").mkdir()
            (run_dir / "checkpoints" / "last.pt").write_bytes(b"state")
            (run_dir / "metrics.jsonl").write_text("".join(f'{{"{counter}": {i}, "loss": 0.5}}\n' for i in (1, 2, 3)))
        raise KeyboardInterrupt

    module = cli_finetune if command == "finetune" else cli_merge
    monkeypatch.setattr(module, "finetune" if command == "finetune" else "run_merge", interrupted)
    for seed, kept in ((1, True), (0, False)):
        run = tmp_path / f"run{seed}"
        assert main([command, "--run-dir", str(run), f"seed={seed}"]) == 130
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and err.count("interrupted") == 1, err
        if kept:
            assert last.startswith(f"distreward {command}: interrupted at {counter} 3; run the same command with "
                                   "--resume"), last
        else:
            assert last.startswith(f"distreward {command}: interrupted before the first checkpoint"), last
        assert run.exists() == kept


def test_common_options_may_stand_before_the_command(tmp_path, capsys):
    """`distreward --threads 1 --no-progress stats ...` is `distreward stats --threads 1 --no-progress ...`; more
    threads than cores runs with one warning line."""
    from distreward.utils.threads import available_cores

    out = tmp_path / "s.npz"
    many = str(available_cores() + 1)
    assert main(["--threads", many, "--no-progress", "--cache-dir", str(tmp_path / "cache"), "stats", "fmnist-test",
                 "--features", "fmnist-eval", "--max-images", "20", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert out.is_file() and f"warning: {many} threads on {available_cores()} available core(s)" in err
    with pytest.raises(SystemExit):
        main(["--debug", "sample", "--help"])
    assert "--cache-dir" in capsys.readouterr().out
    assert main(["--threads", "1"]) == 2 and "give a command" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_in_a_real_process(tmp_path):
    """SIGINT to a real train-base run once it has a checkpoint: exit code 130, one line naming the step, no
    traceback; the run directory keeps its checkpoint."""
    import signal
    import time

    run = tmp_path / "run"
    env = {**os.environ, "DISTREWARD_THREADS": "1"}
    # -X faulthandler: a child that does not answer gets SIGABRT and writes every thread's stack to stderr
    argv = [sys.executable, "-X", "faulthandler", "-m", "distreward.cli", "train-base", "--config", "fmnist_base_tiny",
            "--run-dir", str(run), "train.total_kimg=20", "checkpoint_kimg=0.032", "--no-progress"]
    # SIGINT back to its default in the child: a shell's background job (`cmd &`) ignores SIGINT, its children inherit
    # that, and Python then keeps it ignored instead of raising KeyboardInterrupt
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def stacks(what: str) -> str:
        proc.send_signal(signal.SIGABRT)
        return f"{what}; the child's stacks:\n" + proc.communicate(timeout=60)[1]

    t0 = time.monotonic()
    while not list(run.glob("checkpoints/*.pt")) and proc.poll() is None and time.monotonic() < t0 + 240:
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.communicate()[1]}"
    assert list(run.glob("checkpoints/*.pt")), stacks(f"no checkpoint after {time.monotonic() - t0:.0f} s")
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(stacks("no exit within 120 s of SIGINT"))
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted at step" in err.strip().splitlines()[-1] and "--resume" in err
    assert list(run.glob("checkpoints/*.pt"))                   # the run directory and its checkpoint stay
