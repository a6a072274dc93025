import os
import shutil
import sys

# Each xdist worker keeps its own numba disk cache. With one cache shared by two workers, one
# worker's CPU kernels turned NaN for the rest of its run (CI, stop 34) while the same tests in
# the same order in one process pass, and quant.jitcache's keyed entries did not cure it: the
# cross-process cause is not found yet, so workers do not share compiled code. Set before any
# test module imports numba (numba reads NUMBA_CACHE_DIR at import).
if os.environ.get("PYTEST_XDIST_WORKER"):
    assert "numba" not in sys.modules, "numba imported before tests/conftest.py set the cache"
    _base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(os.path.dirname(__file__), "..", "build", "numba-cache")
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(os.path.abspath(_base), os.environ["PYTEST_XDIST_WORKER"])

import pytest
from gguf import GGUFReader


@pytest.fixture(autouse=True, scope="session")
def _all_formats_compiled_in():
    # Every format in the generated code from the start: one registry fingerprint for the
    # whole session, so each compiled consumer compiles (or loads from disk) once, instead of
    # once per format that a test happens to activate first (tests of activation itself
    # register a compile_on_use toy of their own).
    from quant import registry
    registry.activate(*registry.types("decode"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _short_gil_switch():
    # The CUDA simulator's block manager polls its threads while holding the GIL;
    # a shorter switch interval cuts each barrier's wait several-fold.
    old = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(autouse=True, scope="session")
def _poison_fresh_simulator_memory():
    # A real GPU's fresh device and shared memory holds leftovers; the simulator's holds
    # whatever numpy gave. Fill both with 0xFF bytes (NaN as float32), so a kernel that
    # reads memory nothing wrote gives NaN in some test instead of passing by luck.
    from numba.core import config
    if not config.ENABLE_CUDASIM:
        yield
        return
    import numpy as np
    from numba import cuda
    from numba.cuda.simulator import kernelapi
    from numba.cuda.simulator.cudadrv import devicearray

    fresh, shared_init = devicearray.device_array, kernelapi.FakeCUDAShared.__init__

    def device_array(*args, **kwargs):
        arr = fresh(*args, **kwargs)
        arr._ary.view(np.uint8).fill(0xFF)
        return arr

    def shared(self, dynshared_size):
        shared_init(self, dynshared_size)
        self._dynshared.fill(-1)

    devicearray.device_array, cuda.device_array = device_array, device_array
    kernelapi.FakeCUDAShared.__init__ = shared
    yield
    devicearray.device_array, cuda.device_array = fresh, fresh
    kernelapi.FakeCUDAShared.__init__ = shared_init


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
