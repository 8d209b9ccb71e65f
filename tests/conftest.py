"""Suite-wide set-up: one thread count for torch and BLAS ($DISTREWARD_THREADS, else all cores)."""

import pytest

from distreward.utils.threads import set_threads


def pytest_configure(config):
    set_threads()


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
