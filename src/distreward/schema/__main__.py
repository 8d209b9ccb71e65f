"""`python -m distreward.schema [COMMAND ...]`: the key tables of the commands' configs (docs/configs.md)."""

import sys

from . import COMMANDS, markdown

commands = sys.argv[1:] or ["finetune", "merge", "train-base"]
unknown = [c for c in commands if c not in COMMANDS]
if unknown:
    sys.exit(f"unknown command {unknown[0]!r}; commands: {', '.join(COMMANDS)}")
print(markdown(commands), end="")
