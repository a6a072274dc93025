"""Numba CPU decoders of the GGML types, dispatched by GGML type id.

``decode(raw, wtype, e, r, c0, n, out, o)`` writes ``W[e, r, c0:c0+n]`` as float32
to ``out[o:o+n]`` for a tensor of rows ``raw`` (uint8 ``[E, rows, row_bytes]``)
of type ``wtype``: the GGML type id itself (gguf's ``GGMLQuantizationType``),
block sizes from ``GGML_QUANT_SIZES``. Compiled code branches on the id, so a
caller passes ``int(GGMLQuantizationType.X)`` and never a private code. MXFP4
rows decode in registers (``quant.simd``, the host's best ISA); every result
is bit-identical to ``gguf.quants.dequantize``.

The caller validates: ``c0`` and ``n`` must be multiples of the type's block
size and lie inside the row (Numba does no bounds checking).
"""
from __future__ import annotations

import numba as nb
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from . import mxfp4, simd

F32, F16, BF16, Q8_0, MXFP4 = (int(t) for t in (T.F32, T.F16, T.BF16, T.Q8_0, T.MXFP4))
TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.MXFP4)  # what decode reads
Q8_QK, Q8_BYTES = GGML_QUANT_SIZES[T.Q8_0]
MX_QK, MX_BYTES = mxfp4.QK, mxfp4.BLOCK_BYTES
ISA = simd.best_isa()  # numba caches compiled code per CPU: the decoder depends on the host alone
_mx_decode = simd.make_mx_decode(ISA)


@nb.njit(inline="always")
def f16(lo, hi):
    """IEEE half from its two bytes (little endian) as float32, exact; inf and NaN kept."""
    # (e ? 1024+m : m) * 2^(max(e,1)-25); e == 31 is inf/NaN
    h = np.int32(lo) | (np.int32(hi) << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(m + (1024 if e else 0)) * np.float32(2.0 ** (max(e, 1) - 25))
    return -v if h & 0x8000 else v


@nb.njit(inline="always")
def decode(raw, wtype, e, r, c0, n, out, o):
    """out[o + c] = W[e, r, c0 + c] for c < n (float32)."""
    row = raw[e, r]
    ou = out.view(np.uint32)
    if wtype == MXFP4:
        if n >= MX_QK:
            _mx_decode(raw, (e * raw.shape[1] + r) * raw.shape[2] + c0 // MX_QK * MX_BYTES, n // MX_QK, out, o)
    elif wtype == Q8_0:
        for b in range(n // Q8_QK):
            q0 = (c0 // Q8_QK + b) * Q8_BYTES
            d = f16(row[q0], row[q0 + 1])
            for j in range(Q8_QK):
                out[o + b * Q8_QK + j] = np.float32(np.int8(row[q0 + 2 + j])) * d
    elif wtype == F32:
        for c in range(n):
            p = (c0 + c) * 4
            ou[o + c] = (np.uint32(row[p]) | (np.uint32(row[p + 1]) << np.uint32(8))
                         | (np.uint32(row[p + 2]) << np.uint32(16)) | (np.uint32(row[p + 3]) << np.uint32(24)))
    elif wtype == F16:
        for c in range(n):
            out[o + c] = f16(row[(c0 + c) * 2], row[(c0 + c) * 2 + 1])
    elif wtype == BF16:
        for c in range(n):
            p = (c0 + c) * 2
            ou[o + c] = (np.uint32(row[p]) << np.uint32(16)) | (np.uint32(row[p + 1]) << np.uint32(24))


@nb.njit(cache=True)
def _decode_all(raw, wtype, cols, out):
    for e in range(raw.shape[0]):
        for r in range(raw.shape[1]):
            decode(raw, wtype, e, r, 0, cols, out, (e * raw.shape[1] + r) * cols)


def block_size(ggml_type) -> int:
    return GGML_QUANT_SIZES[T(int(ggml_type))][0]


def dequantize_rows(raw: np.ndarray, ggml_type: int, cols: int) -> np.ndarray:
    """Rows of ``ggml_type`` (uint8 ``[..., rows, row_bytes]``) -> float32 ``[..., rows, cols]``
    through the compiled decoders (what the CPU expert path reads)."""
    from .types import row_nbytes
    qt = T(int(ggml_type))
    if qt not in TYPES:
        raise NotImplementedError(f"quant.cpu decodes {', '.join(t.name for t in TYPES)}, not {qt.name}")
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim < 2:
        raise TypeError("raw must be a uint8 array [..., rows, row_bytes]")
    if raw.shape[-1] != row_nbytes(qt, cols):
        raise ValueError(f"rows of {raw.shape[-1]} bytes do not hold {cols} {qt.name} elements")
    r3 = np.ascontiguousarray(raw).reshape(-1, raw.shape[-2], raw.shape[-1])
    out = np.empty(r3.shape[0] * r3.shape[1] * cols, np.float32)
    if out.size:
        _decode_all(r3, int(qt), cols, out)
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


@nb.njit(fastmath={"nnan", "ninf"}, cache=True)
def _amax32(x, p, c0):
    # max |x| of 32 finite floats (callers validate): the flags let LLVM vectorise the max
    m = np.float32(0.0)
    for j in range(32):
        m = max(m, abs(x[p, c0 + j]))
    return m


@nb.njit(inline="always")
def quantize_q8_row(x, p, nblk, qc, d):
    """Row p of x (float32 [P, >= nblk*32], finite) -> its nblk blocks in qc (uint8, flat: row p's
    block b at byte (p*nblk + b)*Q8_REC) and d (float32, flat: d[(p*nblk + b)*Q8_DREP + 0..7]).
    Sizes are the caller's."""
    qi = qc.view(np.int32)
    q8 = qc.view(np.int8)
    for b in range(nblk):
        s = _amax32(x, p, b * 32) / np.float32(127.0)
        inv = np.float32(1.0) / s if s != 0 else np.float32(0.0)
        o = (p * nblk + b) * Q8_REC
        for j in range(Q8_DREP):
            d[(p * nblk + b) * Q8_DREP + j] = s
        for j in range(32):
            v = x[p, b * 32 + j] * inv
            q = np.int32(_roundf(v))
            q8[o + j] = np.int8(q)
        for g in range(8):
            qi[o // 4 + 8 + g] = np.int32(-U8_OFFSET) * (np.int32(q8[o + 4 * g]) + np.int32(q8[o + 4 * g + 1])
                                                         + np.int32(q8[o + 4 * g + 2]) + np.int32(q8[o + 4 * g + 3]))


@nb.njit(cache=True)
def quantize_q8(x, rows, nblk, qc, d):
    """Rows [0, rows) of x, as quantize_q8_row."""
    for p in range(rows):
        quantize_q8_row(x, p, nblk, qc, d)
