"""Golden fixtures: outputs of the unmodified official SiT, EDM2, Inception and DINOv2 code, for the agreement tests.

Where they are: the folder named by $DISTREWARD_FIXTURES. Only when that variable is unset, the tests look in
`../shared/fixtures` next to the checkout (where CI lays them out).
When the folder, or the files a test needs, are missing, that test is skipped with a reason that names the folder
and the variable; a missing fixture never fails a test.

Tests discover configurations by glob, so a second fixture set with other configs and seeds runs unchanged.
"""

import json
import os
from pathlib import Path

import pytest

ENV = "DISTREWARD_FIXTURES"
_CI_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixtures_dir() -> Path:
    """The fixture folder: $DISTREWARD_FIXTURES, else CI's location next to the checkout (it may not exist)."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else _CI_DIR


def fixtures_available() -> bool:
    return fixtures_dir().is_dir()


def missing_reason(pattern: str = "*") -> str:
    """Why a fixture test is skipped, with the fix."""
    d = fixtures_dir()
    if not d.is_dir():
        return f"golden fixtures not found: {d} is not a folder (set ${ENV} to the folder of golden fixtures)"
    return f"no {pattern} fixtures in {d} (set ${ENV} to a folder that holds them)"


def fixture_configs(prefix: str) -> list:
    """Names of the `<prefix>_*` network fixtures (a skipped param when there are none)."""
    names = sorted(p.name[: -len(".kwargs.json")] for p in fixtures_dir().glob(f"{prefix}_*.kwargs.json"))
    if names:
        return names
    return [pytest.param(None, marks=pytest.mark.skip(reason=missing_reason(f"{prefix}_*.kwargs.json")))]


def load_fixture(cfg: str):
    """(constructor kwargs, key rows, state_dict, io tensors) of one network fixture."""
    from safetensors.torch import load_file

    d = fixtures_dir()
    kwargs = json.loads((d / f"{cfg}.kwargs.json").read_text())
    keys = json.loads((d / f"{cfg}.keys.json").read_text())["keys"]
    return kwargs, keys, load_file(str(d / f"{cfg}.state_dict.safetensors")), load_file(str(d / f"{cfg}.io.safetensors"))
