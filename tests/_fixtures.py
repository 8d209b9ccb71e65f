"""The golden fixtures of the official implementations: $DISTREWARD_FIXTURES, else ../shared/fixtures.

Tests discover configurations by glob, so a second fixture set with other configs and seeds runs unchanged.
"""

import json
import os
from pathlib import Path

import pytest


def fixtures_dir() -> Path:
    env = os.environ.get("DISTREWARD_FIXTURES")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixture_configs(prefix: str) -> list:
    """Names of the `<prefix>_*` network fixtures (a skipped param when there are none)."""
    names = sorted(p.name[: -len(".kwargs.json")] for p in fixtures_dir().glob(f"{prefix}_*.kwargs.json"))
    if names:
        return names
    reason = f"no {prefix}_*.kwargs.json fixtures in {fixtures_dir()} (set $DISTREWARD_FIXTURES)"
    return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]


def load_fixture(cfg: str):
    """(constructor kwargs, key rows, state_dict, io tensors) of one network fixture."""
    from safetensors.torch import load_file

    d = fixtures_dir()
    kwargs = json.loads((d / f"{cfg}.kwargs.json").read_text())
    keys = json.loads((d / f"{cfg}.keys.json").read_text())["keys"]
    return kwargs, keys, load_file(str(d / f"{cfg}.state_dict.safetensors")), load_file(str(d / f"{cfg}.io.safetensors"))
