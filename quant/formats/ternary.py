"""Ternary quants, super-blocks of 256 values in {-1, 0, 1} times one f16 scale: TQ1_0, TQ2_0.

Numpy decode, one block decoder for Numba and numba-cuda, f16 scale offsets;
bit-identical to gguf.quants (value = d * q, one rounding).
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from .legacy_q import f16_col, register

U8 = np.uint8
POW3 = np.array([1, 3, 9, 27, 81], U8)


# ---------------------------------------------------------------- TQ1_0
# 54 bytes: 48 qs, 4 qh, f16 d. Five trits per byte in base-3 fixed point: trit k of byte x is
# ((x * 3^k mod 256) * 3) >> 8, minus 1. Elements: qs[0:32] trits k=0..4 (k*32 + l), then
# qs[32:48] (160 + k*16 + l), then qh[0:4] trits k=0..3 (240 + k*4 + l).
def tq1_0_numpy(b):
    n = b.shape[0]
    q0 = (b[:, 0:32].reshape(n, 1, 32) * POW3.reshape(1, 5, 1)).reshape(n, -1)
    q1 = (b[:, 32:48].reshape(n, 1, 16) * POW3.reshape(1, 5, 1)).reshape(n, -1)
    qh = (b[:, 48:52].reshape(n, 1, 4) * POW3[:4].reshape(1, 4, 1)).reshape(n, -1)
    q = np.concatenate([q0, q1, qh], axis=-1)
    q = ((q.astype(np.uint16) * 3) >> 8).astype(np.int8) - np.int8(1)
    return f16_col(b, 52) * q.astype(np.float32)


def _tq1_0(f16, mul, jit):
    p3 = POW3.astype(np.int32)

    def decode(src, off, out, o):
        d = f16(np.int32(src[off + 52]), np.int32(src[off + 53]))
        for j in range(256):
            if j < 160:
                x, k = np.int32(src[off + j % 32]), j // 32
            elif j < 240:
                x, k = np.int32(src[off + 32 + (j - 160) % 16]), (j - 160) // 16
            else:
                x, k = np.int32(src[off + 48 + (j - 240) % 4]), (j - 240) // 4
            x = (x * p3[k]) & 255
            out[o + j] = d * np.float32(((x * 3) >> 8) - 1)
    return decode


# ---------------------------------------------------------------- TQ2_0
# 66 bytes: 64 qs (2-bit, 2 groups of 32 bytes x shifts 0, 2, 4, 6), f16 d; d * (q - 1)
def tq2_0_numpy(b):
    n = b.shape[0]
    q = b[:, 0:64].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], U8).reshape(1, 1, 4, 1)
    q = (q & U8(3)).reshape(n, -1).astype(np.int8) - np.int8(1)
    return f16_col(b, 64) * q.astype(np.float32)


def _tq2_0(f16, mul, jit):
    def decode(src, off, out, o):
        d = f16(np.int32(src[off + 64]), np.int32(src[off + 65]))
        for j in range(256):
            q = (np.int32(src[off + (j // 128) * 32 + j % 32]) >> (2 * ((j % 128) // 32))) & 3
            out[o + j] = d * np.float32(q - 1)
    return decode


# type -> (numpy decode, block factory, byte offsets of the f16 scales)
SPECS = {
    T.TQ1_0: (tq1_0_numpy, _tq1_0, (52,)),
    T.TQ2_0: (tq2_0_numpy, _tq2_0, (64,)),
}
globals().update(register(SPECS, __name__))  # the classes Q4_K, ... in the registry


# ---------------------------------------------------------------- as int8: trits 0..2 (value q - 1)
# (``int8_scales``: one scale d for the 256, so every sub-block's integer scale is 1)
def _tq1_0_sources():
    """Per sub-block of 32 and lane: (byte of the block, power of 3) its trit comes from."""
    out = []
    for j in range(8):
        src, pw = [], []
        for e in range(32 * j, 32 * j + 32):
            at, k = ((e % 32, e // 32) if e < 160 else (32 + (e - 160) % 16, (e - 160) // 16) if e < 240
                     else (48 + (e - 240) % 4, (e - 240) // 4))
            src.append(at)
            pw.append(int(POW3[k]))
        out.append((src, pw))
    return out


TQ1_0_SOURCES = _tq1_0_sources()


def _tq1_0_int8(b, p8, off):
    """TQ1_0: each sub-block's bytes gathered by one shuffle of the qs and qh loads, then the trit
    ((x * 3^k mod 256) * 3) >> 8 in 16-bit lanes."""
    from ..simd import I8, I16, c64, emit_half, ivec, load, shuf, vec
    a = load(b, p8, off, vec(I8, 32))
    qh = load(b, p8, b.add(off, c64(48)), vec(I8, 4))
    rest = shuf(b, load(b, p8, b.add(off, c64(32)), vec(I8, 16)), shuf(b, qh, qh, list(range(4)) * 4),
                list(range(32)))  # bytes 32..47, then 48..51 (and copies)
    d, us = emit_half(b, p8, b.add(off, c64(52))), []
    V16 = vec(I16, 32)
    for src, pw in TQ1_0_SOURCES:
        x = b.zext(shuf(b, a, rest, src), V16)
        x = b.and_(b.mul(x, _i16s(pw)), ivec(32, 255, I16))
        us.append(b.trunc(b.lshr(b.mul(x, ivec(32, 3, I16)), ivec(32, 8, I16)), vec(I8, 32)))
    return d, None, us, ivec(16, 1, I16), None


def _i16s(values):
    from llvmlite import ir
    from ..simd import I16, vec
    return ir.Constant(vec(I16, len(values)), values)


def _tq2_0_int8(b, p8, off):
    """TQ2_0: sub-block j the bits 2(j % 4).. of the 32 qs bytes of half j // 4, as Q2_K's codes."""
    from ..simd import I8, I16, c64, emit_half, ivec, load, vec
    us = [b.and_(b.lshr(load(b, p8, b.add(off, c64(32 * (j // 4))), vec(I8, 32)), ivec(32, 2 * (j % 4), I8)),
                 ivec(32, 3, I8)) for j in range(8)]
    return emit_half(b, p8, b.add(off, c64(64))), None, us, ivec(16, 1, I16), None


for _t, _hook in ((TQ1_0, _tq1_0_int8), (TQ2_0, _tq2_0_int8)):  # noqa: F821 (registered above)
    _t.int8_dot, _t.int8_offset, _t.int8_avx2 = True, 1, True
    _t.int8_scales = staticmethod(_hook)
