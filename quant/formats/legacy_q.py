"""Legacy 32-element quants: Q4_0, Q4_1, Q5_0, Q5_1 (Q8_0 lives in ``legacy.py``).

Each type has a numpy decode (whole tensors), one block decoder written once as
plain Python and compiled twice, by Numba for the CPU and by numba-cuda as a
device function, and a data check. Every result is bit-identical to
``gguf.quants.dequantize``: the float32 operations are gguf's, in its order.

This module also holds the scalar helpers the other families share
(``f16``, ``mul``, ``compile_block``).
"""
from __future__ import annotations

import numba as nb
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from numba import cuda
from numba.cuda.core import config as cuda_config

from .. import jitcache

SIMULATOR = bool(cuda_config.ENABLE_CUDASIM)

# ---------------------------------------------------------------- shared scalar helpers
F16_POW2 = (2.0 ** (np.arange(32) - 25)).astype(np.float32)  # 2^(e-25), exact
F32_INF = np.float32(np.inf)
F32_NAN = np.float32(np.nan)


def _f16(lo, hi):
    # IEEE half from its two bytes (ints), exact as float32; inf and NaN kept
    h = lo | (hi << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 31:
        v = F32_INF if m == 0 else F32_NAN
    elif e == 0:
        v = np.float32(m) * F16_POW2[1]  # subnormal: m * 2^-24
    else:
        v = np.float32(m + 1024) * F16_POW2[e]
    return -v if h & 0x8000 else v


def _mul(a, b):
    return a * b


cpu_f16 = nb.njit(inline="always")(_f16)
cpu_mul = nb.njit(inline="always")(_mul)


def _cuda_jit(fn):
    # The simulator wraps every device-function call in a swap of the ``cuda`` module (each
    # value of a block of 256 paid it several times); these helpers never use that module,
    # so there they stay plain Python.
    return fn if SIMULATOR else cuda.jit(device=True, inline=True)(fn)


cuda_f16 = _cuda_jit(_f16)
if SIMULATOR:
    cuda_mul = _mul
else:
    from numba.cuda import libdevice

    # NVVM contracts a*b+c into an FMA by default; gguf rounds the product first.
    @cuda.jit(device=True, inline=True)
    def cuda_mul(a, b):
        return libdevice.fmul_rn(a, b)


def _cpu_jit(fn):
    # Not inline="always": the registry's dispatcher has a branch per format, and inlining
    # twenty 256-value decoders into every consumer took its first compile from 1 s to 27 s;
    # a call per block of 32..256 values costs little. Cached: the closure's contents key it.
    return jitcache.njit(cache=True)(fn)


def compile_block(factory):
    """``factory(f16, mul, jit) -> decode(src, off, out, o)`` as (Numba CPU, CUDA device) functions.

    One Python source for both targets: ``mul`` is the product that an add or a
    subtract follows (a rounded multiply on the GPU, where it would fuse);
    ``jit`` compiles a helper for the same target."""
    return (_cpu_jit(factory(cpu_f16, cpu_mul, _cpu_jit)),
            _cuda_jit(factory(cuda_f16, cuda_mul, _cuda_jit)))


def f16_col(blocks, at):
    """float32 of the half at byte ``at`` of each block (gguf's own conversion)."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def f16_bad(blocks, offsets):
    """True per block where a half at one of the byte ``offsets`` is inf or NaN."""
    bad = np.zeros(blocks.shape[0], bool)
    for at in offsets:
        h = blocks[:, at].astype(np.uint16) | (blocks[:, at + 1].astype(np.uint16) << 8)
        bad |= (h & 0x7C00) == 0x7C00
    return bad


def nibbles(qs):
    """[n, k] bytes -> [n, 2k]: the k low nibbles, then the k high ones (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


# ---------------------------------------------------------------- Q4_0
# 18 bytes: f16 d, 16 qs; element j < 16 is qs[j] & 15, j + 16 is qs[j] >> 4; d * (q - 8)
Q4_0_QK, Q4_0_BYTES = GGML_QUANT_SIZES[T.Q4_0]


def q4_0_numpy(blocks):
    d = f16_col(blocks, 0)
    return d * (nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_0(f16, mul, jit):
    def decode(src, off, out, o):
        d = f16(np.int32(src[off]), np.int32(src[off + 1]))
        for j in range(16):
            q = np.int32(src[off + 2 + j])
            out[o + j] = d * np.float32((q & 15) - 8)
            out[o + j + 16] = d * np.float32((q >> 4) - 8)
    return decode


# ---------------------------------------------------------------- Q4_1
# 20 bytes: f16 d, f16 m, 16 qs (nibbles as Q4_0); (d * q) + m
Q4_1_QK, Q4_1_BYTES = GGML_QUANT_SIZES[T.Q4_1]


def q4_1_numpy(blocks):
    d, m = f16_col(blocks, 0), f16_col(blocks, 2)
    return d * nibbles(blocks[:, 4:]).astype(np.float32) + m


def _q4_1(f16, mul, jit):
    def decode(src, off, out, o):
        d = f16(np.int32(src[off]), np.int32(src[off + 1]))
        m = f16(np.int32(src[off + 2]), np.int32(src[off + 3]))
        for j in range(16):
            q = np.int32(src[off + 4 + j])
            out[o + j] = mul(d, np.float32(q & 15)) + m
            out[o + j + 16] = mul(d, np.float32(q >> 4)) + m
    return decode


# ---------------------------------------------------------------- Q5_0
# 22 bytes: f16 d, u32 qh (bit j = 5th bit of element j), 16 qs (nibbles as Q4_0); d * (q - 16)
Q5_0_QK, Q5_0_BYTES = GGML_QUANT_SIZES[T.Q5_0]


def _q5_codes(blocks, at):
    qh = blocks[:, at:at + 4].copy().view(np.uint32)
    hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return nibbles(blocks[:, at + 4:]) | (hi << 4)


def q5_0_numpy(blocks):
    d = f16_col(blocks, 0)
    return d * (_q5_codes(blocks, 2).astype(np.int8) - np.int8(16)).astype(np.float32)


def _q5_0(f16, mul, jit):
    def decode(src, off, out, o):
        d = f16(np.int32(src[off]), np.int32(src[off + 1]))
        for j in range(16):
            q = np.int32(src[off + 6 + j])
            h0 = (np.int32(src[off + 2 + j // 8]) >> (j % 8)) & 1
            h1 = (np.int32(src[off + 4 + j // 8]) >> (j % 8)) & 1
            out[o + j] = d * np.float32(((q & 15) | (h0 << 4)) - 16)
            out[o + j + 16] = d * np.float32(((q >> 4) | (h1 << 4)) - 16)
    return decode


# ---------------------------------------------------------------- Q5_1
# 24 bytes: f16 d, f16 m, u32 qh, 16 qs (as Q5_0, unsigned); (d * q) + m
Q5_1_QK, Q5_1_BYTES = GGML_QUANT_SIZES[T.Q5_1]


def q5_1_numpy(blocks):
    d, m = f16_col(blocks, 0), f16_col(blocks, 2)
    return d * _q5_codes(blocks, 4).astype(np.float32) + m


def _q5_1(f16, mul, jit):
    def decode(src, off, out, o):
        d = f16(np.int32(src[off]), np.int32(src[off + 1]))
        m = f16(np.int32(src[off + 2]), np.int32(src[off + 3]))
        for j in range(16):
            q = np.int32(src[off + 8 + j])
            h0 = (np.int32(src[off + 4 + j // 8]) >> (j % 8)) & 1
            h1 = (np.int32(src[off + 6 + j // 8]) >> (j % 8)) & 1
            out[o + j] = mul(d, np.float32((q & 15) | (h0 << 4))) + m
            out[o + j + 16] = mul(d, np.float32((q >> 4) | (h1 << 4))) + m
    return decode


# ---------------------------------------------------------------- table
# type -> (numpy decode, block factory, byte offsets of the f16 scales)
SPECS = {
    T.Q4_0: (q4_0_numpy, _q4_0, (0,)),
    T.Q4_1: (q4_1_numpy, _q4_1, (0, 2)),
    T.Q5_0: (q5_0_numpy, _q5_0, (0,)),
    T.Q5_1: (q5_1_numpy, _q5_1, (0, 2)),
}


def format_attrs(ggml_type, spec):
    """What the registry needs of one type, from its ``SPECS`` entry: geometry from
    gguf.constants, the numpy decode, both compiled block decoders, the data check."""
    numpy_decode, factory, scales = spec
    block, size = GGML_QUANT_SIZES[ggml_type]
    cpu, dev = compile_block(factory)

    def check_blocks(blocks):
        blocks = np.asarray(blocks, np.uint8).reshape(-1, size)
        return scales(blocks) if callable(scales) else f16_bad(blocks, scales)

    return dict(name=T(ggml_type).name, ggml_type=T(ggml_type), block=block, block_bytes=size,
                decode_numpy=staticmethod(numpy_decode), decode_block=cpu, cuda_decode_block=dev,
                check_blocks=staticmethod(check_blocks), scale_offsets=None if callable(scales) else scales)


def _block_tile(cls, rows, k_chunk, n_threads, stride):
    from ..cuda import block_tile_decoder  # numba-cuda kernels only when a device path asks
    return block_tile_decoder(cls.ggml_type, rows, k_chunk, n_threads, stride)


def register(specs, module):
    """One registry Format per ``specs`` entry (the family's table), defined in ``module``;
    returns name -> class for the module's namespace."""
    from ..registry import Format
    out = {}
    for t, spec in specs.items():
        a = format_attrs(t, spec)
        attrs = {k: v for k, v in a.items() if k not in ("ggml_type", "block", "block_bytes")}
        attrs["__module__"] = module
        attrs["compile_on_use"] = True  # compiled into the dispatchers once a model uses the type
        attrs["cuda_tile"] = classmethod(_block_tile)  # device tiles from the block decoder
        attrs["cuda_tile_parts"] = True
        out[a["name"]] = type(a["name"], (Format,), attrs, ggml_type=t)
    return out


globals().update(register(SPECS, __name__))  # the classes Q4_0, ... in the registry


def _q4_0_int8(b, p8, off):
    """Q4_0's integer-dot block: q - 8 + 12 (4..19) as bytes, the offset MXFP4's kernel uses."""
    from ..simd import c64, emit_half, emit_nibbles_u8
    return emit_nibbles_u8(b, p8, b.add(off, c64(2)), np.arange(16) + 4), emit_half(b, p8, off)


Q4_0.int8_dot, Q4_0.int8_offset, Q4_0.int8_avx2 = True, 12, True  # noqa: F821 (defined just above)
Q4_0.int8_block = staticmethod(_q4_0_int8)  # noqa: F821


def _five_bit_codes(b, p8, off, qh_at):
    """Q5_0's and Q5_1's 32 codes 0..31 as bytes: nibble | fifth bit << 4 (qh at ``qh_at``, the
    nibbles right after it)."""
    from ..simd import c64, emit_bits_u8, emit_nibbles_u8
    return b.or_(emit_nibbles_u8(b, p8, b.add(off, c64(qh_at + 4))), emit_bits_u8(b, p8, b.add(off, c64(qh_at)), 16))


def _q5_0_int8(b, p8, off):
    """Q5_0's integer-dot block: the codes q (0..31, value q - 16) as bytes and d."""
    from ..simd import emit_half
    return _five_bit_codes(b, p8, off, 2), emit_half(b, p8, off)


Q5_0.int8_dot, Q5_0.int8_offset, Q5_0.int8_avx2 = True, 16, True  # noqa: F821 (defined above)
Q5_0.int8_block = staticmethod(_q5_0_int8)  # noqa: F821


def _q4_1_int8(b, p8, off):
    """Q4_1's integer-dot block: the nibbles (0..15) as bytes, d, and -m as the min (d * q + m)."""
    from ..simd import c64, emit_half, emit_nibbles_u8
    m = emit_half(b, p8, b.add(off, c64(2)))
    return emit_nibbles_u8(b, p8, b.add(off, c64(4))), emit_half(b, p8, off), b.fneg(m)


def _q5_1_int8(b, p8, off):
    """Q5_1's integer-dot block: the codes 0..31 as bytes, d, and -m as the min."""
    from ..simd import c64, emit_half
    return _five_bit_codes(b, p8, off, 4), emit_half(b, p8, off), b.fneg(emit_half(b, p8, b.add(off, c64(2))))


Q4_1.int8_dot, Q4_1.int8_avx2 = True, True  # noqa: F821 (defined above); codes 0..15, offset 0
Q4_1.int8_block = staticmethod(_q4_1_int8)  # noqa: F821
Q5_1.int8_dot, Q5_1.int8_avx2 = True, True  # noqa: F821; codes 0..31
Q5_1.int8_block = staticmethod(_q5_1_int8)  # noqa: F821
