import shutil
import sys

import pytest
from gguf import GGUFReader


@pytest.fixture(autouse=True, scope="session")
def _short_gil_switch():
    # The CUDA simulator's block manager polls its threads while holding the GIL;
    # a shorter switch interval cuts each barrier's wait several-fold.
    old = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(old)


def _edit_tensor(src, dst, name, edit):
    shutil.copy(src, dst)
    r = GGUFReader(dst, "r+")
    (t,) = [t for t in r.tensors if t.name == name]
    edit(t.data)
    r.data.flush()
    del r, t
    return dst


@pytest.fixture(scope="session")
def edit_tensor():
    """``edit_tensor(src, dst, name, edit)``: ``dst``, a copy of the GGUF file ``src`` whose
    tensor ``name`` was changed in place by ``edit(data)`` (bad files for the tests)."""
    return _edit_tensor
