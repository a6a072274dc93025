"""CPU kernels (Numba and LLVM IR)."""
