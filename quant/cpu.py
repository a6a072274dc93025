"""Numba CPU decoders of the GGML types, dispatched by GGML type id.

``decode(raw, wtype, e, r, c0, n, out, o)`` writes ``W[e, r, c0:c0+n]`` as float32
to ``out[o:o+n]`` for a tensor of rows ``raw`` (uint8 ``[E, rows, row_bytes]``)
of type ``wtype``: the GGML type id itself (gguf's ``GGMLQuantizationType``).
It is generated from the registry (``quant.registry.cpu_decoder``: one branch
per registered format's ``decode_block``, MXFP4 in registers through
``quant.simd``) and rebound here when the registry changes; compiled callers
read it as ``quant.cpu.decode`` and compile through ``quant.registry.jit``.
Every result is bit-identical to ``gguf.quants.dequantize``.

The caller validates: ``c0`` and ``n`` must be multiples of the type's block
size and lie inside the row (Numba does no bounds checking).
"""
from __future__ import annotations

import numba as nb
import numpy as np
from gguf.constants import GGMLQuantizationType as T

from . import jitcache, registry, simd
from .formats import mxfp4
from .formats.floats import f16  # noqa: F401  (the exact half decode, for callers)

F32, F16, BF16, Q8_0, MXFP4 = (int(t) for t in (T.F32, T.F16, T.BF16, T.Q8_0, T.MXFP4))
MX_QK, MX_BYTES = mxfp4.QK, mxfp4.BLOCK_BYTES
ISA = simd.best_isa()
decode = registry.cpu_decoder()


@registry.on_change
def _rebind():
    global decode
    decode = registry.cpu_decoder()


def types() -> tuple:
    """What ``decode`` reads: the formats with an njit block decoder."""
    return registry.types("cpu")


@registry.jit(cache=True)
def _decode_all(raw, wtype, cols, out):
    for e in range(raw.shape[0]):
        for r in range(raw.shape[1]):
            decode(raw, wtype, e, r, 0, cols, out, (e * raw.shape[1] + r) * cols)


def block_size(ggml_type) -> int:
    return registry.block_size(ggml_type)


def dequantize_rows(raw: np.ndarray, ggml_type: int, cols: int) -> np.ndarray:
    """Rows of ``ggml_type`` (uint8 ``[..., rows, row_bytes]``) -> float32 ``[..., rows, cols]``
    through the compiled decoders (what the CPU expert path reads)."""
    if not registry.has(ggml_type, "cpu"):
        raise NotImplementedError(f"quant.cpu decodes {', '.join(registry.type_name(t) for t in types())}, "
                                  f"not {registry.type_name(ggml_type)}")
    registry.activate(ggml_type)
    qt = int(ggml_type)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim < 2:
        raise TypeError("raw must be a uint8 array [..., rows, row_bytes]")
    if raw.shape[-1] != registry.row_nbytes(qt, cols):
        raise ValueError(f"rows of {raw.shape[-1]} bytes do not hold {cols} {registry.type_name(qt)} elements")
    r3 = np.ascontiguousarray(raw).reshape(-1, raw.shape[-2], raw.shape[-1])
    out = np.empty(r3.shape[0] * r3.shape[1] * cols, np.float32)
    if out.size:
        _decode_all(r3, qt, cols, out)
    return out.reshape(*raw.shape[:-1], cols)


# ---------------------------------------------------------------- int8 activations
# Activations for the integer MXFP4 dot (what ggml does with Q8_0): per block of 32, the
# int8 values ggml's quantize_row_q8_0 (and gguf.quants) produce, q = roundf(x / (amax/127)),
# but the scale kept in float32 (Q8_0 stores it as a half). A block is Q8_REC bytes: the 32
# q, then 8 int32 corrections -U8_OFFSET * (q[4l] + .. + q[4l+3]) for the kernel's unsigned
# weights (quant.simd.U8_OFFSET), so the kernel's lanes sum to exactly sum(w * q). The scale
# is stored Q8_DREP times (a vector operand the kernels load, no broadcast).
Q8_REC = 64
Q8_DREP = 8
U8_OFFSET = simd.U8_OFFSET


@nb.njit(inline="always")
def _roundf(v):
    # C roundf (half away from zero) in float32, as gguf.quants.np_roundf: exact, no x + 0.5
    a = abs(v)
    fl = np.floor(a)
    r = fl + np.floor(np.float32(2.0) * (a - fl))
    return np.copysign(r, v)


@jitcache.njit(fastmath={"nnan", "ninf"}, cache=True)
def _amax32(x, p, c0):
    # max |x| of 32 floats (a NaN may be skipped: quantize_q8_row tests for it): the flags let LLVM vectorise
    m = np.float32(0.0)
    for j in range(32):
        m = max(m, abs(x[p, c0 + j]))
    return m


@nb.njit(inline="always")
def _block_scale(x, p, c0, n):
    """(amax/127, its inverse or 0, finite) of x[p, c0:c0 + n], n a multiple of 32; (NaN, 0, False)
    when the values hold a NaN or an inf: their codes are then written 0 (x * 0 would round a NaN)."""
    m = np.float32(0.0)
    for j in range(0, n, 32):
        m = max(m, _amax32(x, p, c0 + j))
    z = np.float32(0.0)
    for j in range(n):
        z += x[p, c0 + j] * np.float32(0.0)  # NaN iff the values hold a NaN or an inf
    if z != z:
        return np.float32(np.nan), np.float32(0.0), False
    s = m / np.float32(127.0)
    return s, (np.float32(1.0) / s if s != 0 else np.float32(0.0)), True


@nb.njit(inline="always")
def _code(v, inv, finite):
    return np.int8(np.int32(_roundf(v * inv))) if finite else np.int8(0)


@nb.njit(inline="always")
def quantize_q8_row(x, p, nblk, qc, d):
    """Row p of x (float32 [P, >= nblk*32]) -> its nblk blocks in qc (uint8, flat: row p's
    block b at byte (p*nblk + b)*Q8_REC) and d (float32, flat: d[(p*nblk + b)*Q8_DREP + 0..7]).
    A block holding a NaN or an inf gets zero codes under a NaN scale, so every dot it enters is
    NaN, as the float product would be non-finite (an int8 code cannot hold it). Sizes are the caller's."""
    qi = qc.view(np.int32)
    q8 = qc.view(np.int8)
    for b in range(nblk):
        s, inv, finite = _block_scale(x, p, b * 32, 32)
        o = (p * nblk + b) * Q8_REC
        for j in range(32):
            q8[o + j] = _code(x[p, b * 32 + j], inv, finite)
        for j in range(Q8_DREP):
            d[(p * nblk + b) * Q8_DREP + j] = s
        for g in range(8):
            qi[o // 4 + 8 + g] = np.int32(-U8_OFFSET) * (np.int32(q8[o + 4 * g]) + np.int32(q8[o + 4 * g + 1])
                                                         + np.int32(q8[o + 4 * g + 2]) + np.int32(q8[o + 4 * g + 3]))


@jitcache.njit(cache=True)
def quantize_q8(x, rows, nblk, qc, d):
    """Rows [0, rows) of x, as quantize_q8_row."""
    for p in range(rows):
        quantize_q8_row(x, p, nblk, qc, d)


# Activations for the super-block formats with integer sub-block scales (``int8_scales``: the
# K-quants), as ggml pairs them with Q8_K: one float32 scale amax/127 per super-block of 256 (so a
# row's 8 sub-block dots add up in integers under its integer scales), the values rounded as
# quantize_q8_row rounds them, and the sum of each 16 values (what the mins and the unsigned
# offset multiply). A super-block is Q8K_REC bytes: the 256 q, then 16 int16 sums; the scale is
# stored Q8_DREP times in d, as for blocks of 32.
Q8K_REC = 288


@nb.njit(inline="always")
def quantize_q8k_row(x, p, nsb, qc, d):
    """Row p of x (float32 [P, >= nsb*256]) -> its nsb super-blocks in qc (uint8, flat: row p's
    super-block b at byte (p*nsb + b)*Q8K_REC) and d (float32, d[(p*nsb + b)*Q8_DREP + 0..7]).
    A super-block holding a NaN or an inf gets zero codes under a NaN scale, as quantize_q8_row."""
    q8 = qc.view(np.int8)
    q16 = qc.view(np.int16)
    for b in range(nsb):
        c0 = b * 256
        s, inv, finite = _block_scale(x, p, c0, 256)
        o = (p * nsb + b) * Q8K_REC
        for g in range(16):
            acc = np.int32(0)
            for j in range(16):
                v = _code(x[p, c0 + 16 * g + j], inv, finite)
                q8[o + 16 * g + j] = v
                acc += np.int32(v)
            q16[o // 2 + 128 + g] = np.int16(acc)
        for j in range(Q8_DREP):
            d[(p * nsb + b) * Q8_DREP + j] = s


@jitcache.njit(cache=True)
def quantize_q8k(x, rows, nsb, qc, d):
    """Rows [0, rows) of x, as quantize_q8k_row."""
    for p in range(rows):
        quantize_q8k_row(x, p, nsb, qc, d)
