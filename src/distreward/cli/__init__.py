"""The `distreward` command: a thin layer over the Python API.

Each subcommand lives in distreward/cli/<module>.py with `add_arguments(parser)` and `run(args) -> int | None`;
modules are imported only when their command runs, so `--help` stays fast. The common options (--threads,
--cache-dir, --no-progress, --debug) may stand before or after the command's name.

Errors: bad input (a missing, empty, truncated or wrong-format file, a refused pickle, a bad config or override, a
bad option value) ends the command with one line on stderr, `distreward CMD: error: <file>: <problem>; <fix>`, and
exit code 2, without a traceback (`--debug` or DISTREWARD_DEBUG=1 adds it); an output folder this invocation
created is removed again unless it already holds saved progress. Bad input is what the package raises as such
(`InputError` and its kinds, `ConfigError`, `CheckpointError`), a file the system cannot open (`OSError`), a refused
pickle, an OmegaConf error in an override and a missing optional package. Any other exception, a bare ValueError or
TypeError included, is a bug: it keeps its traceback. Ctrl-C ends a command with one line (for a run: the iteration
it reached and `--resume`) and exit code 130.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import re
import shutil
import sys
import traceback
from pathlib import Path

import torch
from omegaconf.errors import OmegaConfBaseException

from distreward.schema import ConfigError
from distreward.utils import progress as progress_mod
from distreward.utils.cache import set_cache_root
from distreward.utils.checkpoint import CheckpointError
from distreward.utils.errors import InputError, OptionError
from distreward.utils.threads import available_cores, set_threads

# command -> (module under distreward.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train-features": ("train_features", "train the Fashion-MNIST feature networks (fmnist-reward / fmnist-eval)"),
    "stats": ("stats", "reference statistics (mu, sigma) of a dataset or image folder"),
    "evaluate": ("evaluate", "FD on both feature networks, KID, precision, recall, density, coverage of an image set"),
    "train-base": ("train_base", "flow-matching training of a base generator with power-function EMA snapshots"),
    "phema": ("phema", "post-hoc EMA reconstruction from snapshots to any EMA length"),
    "sample": ("sample", "draw images from a generator with an ODE/SDE sampler"),
    "finetune": ("finetune", "RL fine-tuning (rl.algorithm: grpo, nft, pool, pathwise) with a "
                             "distribution-wise (or sample-wise) reward"),
    "merge": ("merge", "RL over merging coefficients of checkpoints / EMA snapshots"),
    "demo": ("demo", "the main job on the embedded default (Fashion-MNIST): fine-tune, evaluate, report"),
    "study": ("study", "a fine-tuning config against its controls (permuted-reward null, distillation) over seeds"),
    "merge-study": ("merge_study", "every merge searcher at the same image budget over seeds, against the merge "
                                   "baselines"),
}

# Exceptions that mean bad input or a bad environment (exit code 2, one line); anything else is a bug.
INPUT_ERRORS = (InputError, ConfigError, CheckpointError, OSError, pickle.UnpicklingError, OmegaConfBaseException,
                ImportError)
# The options every command takes, also accepted before the command's name (those of them that take a value).
COMMON_FLAGS = ("--no-progress", "--debug")
COMMON_VALUED = ("--threads", "--cache-dir")

# A command-line token `key=value` whose key is a dotted config name is an override, wherever it stands.
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*=")


class UsageError(Exception):
    """A bad command line (unknown option, missing value, a stray word): one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def add_common_options(p: argparse.ArgumentParser, default=None) -> None:
    """--threads, --cache-dir, --no-progress, --debug (`default`: SUPPRESS on the top-level parser, for --help)."""
    p.add_argument("--threads", type=int, default=default,
                   help="torch and BLAS threads (default: $DISTREWARD_THREADS, else all cores)")
    p.add_argument("--cache-dir", default=default, metavar="DIR",
                   help="cache folder for real-data features and evaluations (default: $DISTREWARD_CACHE, else "
                        "$XDG_CACHE_HOME/distreward, else ~/.cache/distreward)")
    p.add_argument("--no-progress", action="store_true", default=default,
                   help="no progress bars or periodic progress lines (one line per phase stays)")
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the traceback of an error (also DISTREWARD_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="distreward", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.import_module('distreward').__version__}")
    add_common_options(parser, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_common_options(p)
        p.set_defaults(_module=module)
    return parser


def hoist_common_options(argv: list[str]) -> list[str]:
    """`--threads 1 sample ...` -> `sample --threads 1 ...`: common options before the command's name move after it."""
    i = 0
    while i < len(argv) and argv[i] not in COMMANDS:
        name = argv[i].split("=", 1)[0]
        if argv[i] in COMMON_FLAGS or (name in COMMON_VALUED and "=" in argv[i]):
            i += 1
        elif name in COMMON_VALUED:
            i += 2
        else:
            return argv
    if i >= len(argv) or i == 0:
        return argv
    return [argv[i], *argv[:i], *argv[i + 1:]]


def count(minimum: int = 1):
    """An argparse type: an integer >= `minimum` (a bad value is a one-line usage error naming the option)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
        return n
    return parse


def check_device(device: str, option: str = "--device") -> str:
    """A torch device this machine has: `cuda` without CUDA, or a name torch does not know, is an OptionError.
    `option`: how the user gave it, "--device" or "device=" (a config key)."""
    sep = " " if option.startswith("--") else ""
    try:
        kind = torch.device(str(device)).type
    except RuntimeError:
        raise OptionError(f"{option}{sep}{device}: not a device; use {option}{sep}cpu or {option}{sep}cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise OptionError(f"{option}{sep}{device}: CUDA is not available here ({why}); use {option}{sep}cpu")
    return str(device)


def warn_threads(where: str, n: int) -> None:
    """More threads than cores oversubscribes them (often slower); said once, the run goes on."""
    cores = available_cores()
    if n > cores:
        print(f"{where}: warning: {n} threads on {cores} available core(s) oversubscribes them and is usually slower; "
              f"use --threads {cores} or fewer", file=sys.stderr)


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def split_overrides(tokens: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(the other tokens, the key=value overrides in order). A token is an override when its key is a dotted name
    and it is not the value of an option that takes exactly one (`--run-dir a=b` stays the run directory); so
    `--checkpoints a.safetensors b.safetensors rl.iterations=3` gives two checkpoints and one override."""
    one_value = {s for a in parser._actions if a.option_strings and a.nargs in (None, "?", 1) for s in a.option_strings}
    rest, overrides, after_dashes = [], [], False
    for i, tok in enumerate(tokens):
        if after_dashes or tok == "--":
            after_dashes = True
            rest.append(tok)
        elif OVERRIDE.match(tok) and not (i > 0 and tokens[i - 1] in one_value):
            overrides.append(tok)
        else:
            rest.append(tok)
    return rest, overrides


# ------------------------------------------------------------------------------------------------ outputs

_NEW_OUTPUTS: list[Path] = []
RUN_DIR: list[Path] = []            # the run directory of this invocation (named in the Ctrl-C line)


def new_output(path: str | os.PathLike) -> Path:
    """Register the output folder of this invocation: if it does not exist yet and the command fails before saving
    any progress, it is removed again (no half-written run directory is left behind)."""
    path = Path(path)
    if not path.exists():
        _NEW_OUTPUTS.append(path)
    return path


def holds_progress(folder: Path) -> bool:
    """True when a failed run already saved something worth keeping: a checkpoint (*.pt), a snapshot, a finished
    demo stage (stage.json)."""
    for sub in ("checkpoints", "snapshots"):
        if (folder / sub).is_dir() and any(p.is_file() for p in (folder / sub).rglob("*")):
            return True
    return any(folder.rglob("*.pt")) or any(folder.rglob("stage.json"))


def remove_new_outputs() -> None:
    while _NEW_OUTPUTS:
        path = _NEW_OUTPUTS.pop()
        if path.is_dir() and not holds_progress(path):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ summaries

FIGURES = ("fd_reward", "fd_eval", "precision", "recall", "density", "coverage")


def figures(m: dict, keys=FIGURES) -> str:
    """'fd_reward 35.1, fd_eval 1.619, ...' (4 significant digits; '± err' where the row has `<key>_err`)."""
    return ", ".join(f"{k} {m[k]:.4g}" + (f" ± {m[k + '_err']:.2g}" if m.get(k + "_err") is not None else "")
                     for k in keys if m.get(k) is not None)


def print_summary(command: str, head: str, rows=(), keys=FIGURES) -> None:
    """Every command's end summary on stdout, one format: `CMD: <head>`, then one line per model `  name: key value,
    ...` (the full record is in the run directory's result files or the --json file)."""
    print(f"{command}: {head}")
    for name, m in rows:
        print(f"  {name}: {figures(m, keys) or '-'}")


# ------------------------------------------------------------------------------------------------ main

def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text or type(e).__name__


def is_input_error(e: BaseException) -> bool:
    if isinstance(e, ImportError):      # a missing optional package; our own modules missing is a bug
        return not (e.name or "").startswith("distreward")
    return isinstance(e, INPUT_ERRORS)


def interrupted(run_dir: Path | None) -> str:
    """What Ctrl-C stopped: for a run, the iteration (or step) its log reached and how to continue."""
    if run_dir is None:
        return "interrupted"
    if not holds_progress(run_dir):
        return f"interrupted before the first checkpoint in {run_dir}; nothing to resume: run the same command again"
    last = last_record(run_dir / "metrics.jsonl")
    key = next((k for k in ("iteration", "step") if k in last), None)
    where = f" at {key} {last[key]}" if key else ""
    return f"interrupted{where}; run the same command with --resume to continue from its last checkpoint"


def last_record(path: Path) -> dict:
    try:
        lines = path.read_text().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    argv = hoist_common_options(list(sys.argv[1:] if argv is None else argv))
    command = argv[0] if argv and argv[0] in COMMANDS else None
    debug = "--debug" in argv or os.environ.get("DISTREWARD_DEBUG", "") not in ("", "0")
    where = f"distreward {command}" if command else "distreward"
    saved, cache = progress_mod.settings(), []
    _NEW_OUTPUTS.clear()
    RUN_DIR.clear()
    try:
        parser = build_parser()
        if command is None:
            parser.parse_args(argv or ["--help"])       # --help, --version, or an unknown word: said there
            raise UsageError(f"give a command ({', '.join(COMMANDS)})")
        # Only the named command's module is imported.
        module = importlib.import_module(f"distreward.cli.{COMMANDS[command][0]}")
        p = subparser(parser, command)
        module.add_arguments(p)
        rest, overrides = argv[1:], []
        if any(a.dest == "overrides" for a in p._actions):
            rest, overrides = split_overrides(argv[1:], p)
        args = parser.parse_args([command, *rest])
        if overrides or hasattr(args, "overrides"):
            stray = list(getattr(args, "overrides", None) or [])
            if stray:
                raise UsageError(f"{stray[0]!r} is neither an option nor a key=value override (e.g. rl.iterations=10)")
            args.overrides = overrides
        warn_threads(where, set_threads(args.threads))
        if args.cache_dir is not None:
            cache.append(set_cache_root(args.cache_dir))
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        progress_mod.configure(enabled=not args.no_progress)
        rc = module.run(args)
        return int(rc or 0)
    except UsageError as e:
        print(f"{where}: error: {e}; see '{where} --help'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        remove_new_outputs()
        print(f"{where}: {interrupted(RUN_DIR[-1] if RUN_DIR else None)}", file=sys.stderr)
        return 130
    except Exception as e:
        remove_new_outputs()
        if not is_input_error(e):
            raise                       # a bug: keep the traceback
        if debug:
            traceback.print_exception(e)
            original = getattr(e, "original", None)
            if original is not None:
                print("caused by:", file=sys.stderr)
                traceback.print_exception(original)
        print(f"{where}: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        progress_mod.configure(**saved)
        if cache:
            set_cache_root(cache[0])
        _NEW_OUTPUTS.clear()


if __name__ == "__main__":
    sys.exit(main())
