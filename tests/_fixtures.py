"""Where the golden fixtures of the official implementations live: $DISTREWARD_FIXTURES, else ../shared/fixtures."""

import os
from pathlib import Path


def fixtures_dir() -> Path:
    env = os.environ.get("DISTREWARD_FIXTURES")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
