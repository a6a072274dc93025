"""Where the device tests run: the simulator under ``NUMBA_ENABLE_CUDASIM=1``, else a real GPU
when one is present (``pytest -m gpu`` runs them alone), else they skip. Their tolerances
are named here per math mode: the simulator's FFMA products are numpy's, a GPU's tensor
cores round their own way (``MMA_HW_REL_TOL`` says why)."""
import numba
import pytest
from numba import cuda

SIM = bool(numba.config.ENABLE_CUDASIM)
GPU = not SIM and cuda.is_available()
DEVICE = "sim" if SIM else "cuda" if GPU else None

needs_device = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1")
DEVICE_TESTS = [needs_device, pytest.mark.gpu]  # a device test module's pytestmark

FMA_REL_TOL = 1e-5  # FFMA kernels against the float64 reference (max error over max value)


def rel_tol(math: str = "fma") -> float:
    """Max relative error against the float64 reference of kernels doing ``math``."""
    if math == "mma" and GPU:
        from hybrid.kernels.cuda.experts import MMA_HW_REL_TOL
        return MMA_HW_REL_TOL
    return FMA_REL_TOL


def mma_vs_fma_tol() -> float:
    """Max relative difference between the tensor-core and the FFMA kernels' outputs: the
    emulation (BF16 x3, float32 sums) stays within 2e-6 of FFMA; hardware's own tolerance."""
    return rel_tol("mma") if GPU else 2e-6
