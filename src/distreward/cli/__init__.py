"""The `distreward` command: a thin layer over the Python API.

Each subcommand lives in distreward/cli/<module>.py with `add_arguments(parser)` and `run(args) -> int | None`;
modules are imported only when their command runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distreward.utils.threads import set_threads

# command -> (module under distreward.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train-features": ("train_features", "train the Fashion-MNIST feature networks (fmnist-reward / fmnist-eval)"),
    "stats": ("stats", "reference statistics (mu, sigma) of a dataset or image folder"),
    "evaluate": ("evaluate", "FD on both feature networks, KID, precision, recall of an image set"),
    "train-base": ("train_base", "flow-matching training of a base generator with power-function EMA snapshots"),
    "phema": ("phema", "post-hoc EMA reconstruction from snapshots to any EMA length"),
    "sample": ("sample", "draw images from a generator with an ODE/SDE sampler"),
    "finetune": ("finetune", "GRPO fine-tuning with a distribution-wise (or sample-wise) reward"),
    "merge": ("merge", "RL over merging coefficients of checkpoints / EMA snapshots"),
    "demo": ("demo", "the main job on the embedded default (Fashion-MNIST): fine-tune, evaluate, report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distreward", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.import_module('distreward').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--threads", type=int, default=None,
                       help="torch and BLAS threads (default: $DISTREWARD_THREADS, else all cores)")
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 0
    # Only the named command's module is imported.
    module = importlib.import_module(f"distreward.cli.{COMMANDS[argv[0]][0]}")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    module.add_arguments(sub.choices[argv[0]])
    args = parser.parse_args(argv)

    set_threads(args.threads)
    try:
        rc = module.run(args)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as e:
        if getattr(args, "debug", False) or __import__("os").environ.get("DISTREWARD_DEBUG"):
            raise
        print(f"distreward {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
