"""CUDA kernels (numba-cuda; the simulator runs them too)."""
