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
