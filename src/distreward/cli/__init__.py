"""The `distreward` command: a thin layer over the Python API.

Each subcommand lives in distreward/cli/<module>.py with `add_arguments(parser)` and `run(args) -> int | None`;
modules are imported only when their command runs, so `--help` stays fast.

Errors: bad input (a missing, empty, truncated or wrong-format file, a refused pickle, a bad config or override, a
bad option) ends the command with one line on stderr, `distreward CMD: error: <file>: <problem>; <fix>`, and exit
code 2, without a traceback (`--debug` or DISTREWARD_DEBUG=1 adds it); an output folder this invocation created is
removed again unless it already holds saved progress. Any other exception is a bug: it keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import re
import shutil
import sys
import traceback
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from distreward.utils import progress as progress_mod
from distreward.utils.threads import set_threads

# command -> (module under distreward.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train-features": ("train_features", "train the Fashion-MNIST feature networks (fmnist-reward / fmnist-eval)"),
    "stats": ("stats", "reference statistics (mu, sigma) of a dataset or image folder"),
    "evaluate": ("evaluate", "FD on both feature networks, KID, precision, recall, density, coverage of an image set"),
    "train-base": ("train_base", "flow-matching training of a base generator with power-function EMA snapshots"),
    "phema": ("phema", "post-hoc EMA reconstruction from snapshots to any EMA length"),
    "sample": ("sample", "draw images from a generator with an ODE/SDE sampler"),
    "finetune": ("finetune", "RL fine-tuning (GRPO or the forward-process trainer, rl.algorithm) with a "
                             "distribution-wise (or sample-wise) reward"),
    "merge": ("merge", "RL over merging coefficients of checkpoints / EMA snapshots"),
    "demo": ("demo", "the main job on the embedded default (Fashion-MNIST): fine-tune, evaluate, report"),
    "study": ("study", "a fine-tuning config against its controls (permuted-reward null, distillation) over seeds"),
    "merge-study": ("merge_study", "every merge searcher at the same image budget over seeds, against the merge "
                                   "baselines"),
}

# Exceptions that mean bad input or a bad environment (exit code 2, one line); anything else is a bug.
INPUT_ERRORS = (ValueError, TypeError, OSError, pickle.UnpicklingError, OmegaConfBaseException, ImportError)

# A command-line token `key=value` whose key is a dotted config name is an override, wherever it stands.
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*=")


class UsageError(Exception):
    """A bad command line (unknown option, missing value, a stray word): one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="distreward", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.import_module('distreward').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--threads", type=int, default=None,
                       help="torch and BLAS threads (default: $DISTREWARD_THREADS, else all cores)")
        p.add_argument("--no-progress", action="store_true",
                       help="no progress bars or periodic progress lines (one line per phase stays)")
        p.add_argument("--debug", action="store_true",
                       help="show the traceback of an error (also DISTREWARD_DEBUG=1)")
        p.set_defaults(_module=module)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    debug = "--debug" in argv or os.environ.get("DISTREWARD_DEBUG", "") not in ("", "0")
    where = f"distreward {command}" if command else "distreward"
    saved = progress_mod.settings()
    _NEW_OUTPUTS.clear()
    try:
        parser = build_parser()
        if command is None:
            parser.parse_args(argv or ["--help"])
            return 0
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
        set_threads(args.threads)
        progress_mod.configure(enabled=not args.no_progress)
        rc = module.run(args)
        return int(rc or 0)
    except UsageError as e:
        print(f"{where}: error: {e}; see '{where} --help'", file=sys.stderr)
        return 2
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
        _NEW_OUTPUTS.clear()


if __name__ == "__main__":
    sys.exit(main())
