"""Bit reinterpretation of float32 in device code (numba-cuda): ``f32_bits`` / ``bits_f32``.

One LLVM bitcast on a GPU; on the simulator (no bit casts in device Python) a
numpy view. The MXFP4 -> BF16 tile decoder and the tensor-core kernels use them.
"""
from __future__ import annotations

import numpy as np
from numba import cuda
from numba.cuda.core import config as cuda_config

SIMULATOR = bool(cuda_config.ENABLE_CUDASIM)


def bits_to_f32(u):
    return np.array(int(u) & 0xFFFFFFFF, dtype=np.uint32).view(np.float32)[()]


def f32_to_bits(x):
    return np.uint32(np.array(x, dtype=np.float32).view(np.uint32)[()])


if SIMULATOR:
    @cuda.jit(device=True)
    def f32_bits(x):
        return f32_to_bits(x)

    @cuda.jit(device=True)
    def bits_f32(u):
        return bits_to_f32(u)

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    def _bitcast(accepts, src, dst, dst_ir):
        """An intrinsic reinterpreting the bits of a ``src`` value as ``dst`` (one LLVM bitcast)."""
        @intrinsic
        def bitcast(typingctx, v):
            if not isinstance(v, accepts):
                return None

            def codegen(context, builder, sig, args):
                return builder.bitcast(context.cast(builder, args[0], sig.args[0], src), dst_ir)

            return dst(v), codegen

        return bitcast

    f32_bits = _bitcast(types.Float, types.float32, types.uint32, ir.IntType(32))
    bits_f32 = _bitcast(types.Integer, types.uint32, types.float32, ir.FloatType())
