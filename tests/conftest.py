"""Suite-wide set-up: one thread count for torch and BLAS ($DISTREWARD_THREADS, else all cores), and a cache
folder of the test session's own ($DISTREWARD_CACHE, a temporary folder set before collection and removed at the
end), so tests never write into the user's ~/.cache/distreward and reuse no cache from outside the session."""

import os
import shutil
import tempfile

import pytest

from distreward.utils.threads import set_threads

_SAVED: dict = {}


def pytest_configure(config):
    set_threads()
    _SAVED["cache"] = os.environ.get("DISTREWARD_CACHE")
    _SAVED["folder"] = os.environ["DISTREWARD_CACHE"] = tempfile.mkdtemp(prefix="distreward-test-cache-")


def pytest_unconfigure(config):
    shutil.rmtree(_SAVED.pop("folder", ""), ignore_errors=True)
    if _SAVED.get("cache") is None:
        os.environ.pop("DISTREWARD_CACHE", None)
    else:
        os.environ["DISTREWARD_CACHE"] = _SAVED["cache"]


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
