import sys

import pytest


@pytest.fixture(autouse=True, scope="session")
def _short_gil_switch():
    # The CUDA simulator's block manager polls its threads while holding the GIL;
    # a shorter switch interval cuts each barrier's wait several-fold.
    old = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(old)
