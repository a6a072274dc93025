"""Dense weights (attention, embeddings, output) in the type the file holds, read from the memory map.

``Dense.matmul(x)`` is ``x @ W.T`` without ever decoding the whole matrix:
- a batch of tokens decodes W a tile of rows at a time (``quant.types``, float32)
  and multiplies each tile with BLAS, so the decoded copy stays a few MB;
- one to a few tokens (decode steps) run a Numba kernel on the stored bytes
  (Q8_0, F16, BF16, MXFP4; F32 goes to BLAS): every weight byte is read once.
``Dense.rows(ids)`` decodes only the given rows (the embedding lookup).
"""
from __future__ import annotations

import numba as nb
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from quant import mxfp4, types as qtypes

__all__ = ["Dense", "TYPES"]

TYPES = tuple(qtypes.DEQUANTIZERS)  # F32, F16, BF16, Q8_0, MXFP4
_TILE_BYTES = 1 << 21  # decoded float32 tile: fits in L2/L3
_DIRECT_MAX_TOKENS = 4  # up to this many tokens, the direct kernel
_PARALLEL_BYTES = 1 << 18  # smaller matrices run on one thread
_Q8_0, _F16, _BF16, _MXFP4 = range(4)  # what the direct kernel branches on
_KIND = {T.Q8_0: _Q8_0, T.F16: _F16, T.BF16: _BF16, T.MXFP4: _MXFP4}


class Dense:
    """A weight matrix ``W [rows, cols]`` (y = W x) of any type in ``TYPES``, stored bytes as given."""

    def __init__(self, name: str, raw: np.ndarray, ggml_type: int, shape):
        self.name, self.ggml_type = name, int(ggml_type)
        self.shape = tuple(int(s) for s in shape)
        if self.ggml_type not in TYPES:
            raise TypeError(f"tensor {name}: type {qtypes.type_name(ggml_type)} is not supported for dense "
                            f"weights (supported: {', '.join(T(t).name for t in TYPES)})")
        if len(self.shape) != 2:
            raise ValueError(f"tensor {name}: a dense weight must be 2-D, got shape {self.shape}")
        rows, cols = self.shape
        self.row_bytes = qtypes.row_nbytes(self.ggml_type, cols)
        # a plain ndarray view of the map: np.memmap's per-slice bookkeeping costs more than a small matmul
        self.raw = raw.view(np.ndarray).view(np.uint8).reshape(rows, self.row_bytes)
        self.tile = max(8, _TILE_BYTES // (4 * cols))

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` decoded to float32 ``[len(ids), cols]`` (ids checked by the caller)."""
        return qtypes.dequantize(self.raw[ids], self.ggml_type, (len(ids), self.shape[1]))

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T``: float32 ``[n, rows]`` for float32 ``x [n, cols]``."""
        rows, cols = self.shape
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != cols:
            raise ValueError(f"{self.name}: input must be float32 [n, {cols}], got {x.dtype} {x.shape}")
        x = np.ascontiguousarray(x)
        out = np.empty((x.shape[0], rows), np.float32)
        if self.ggml_type in _KIND and x.shape[0] <= _DIRECT_MAX_TOKENS:
            _direct(self.ggml_type, x, self.raw, out)
            return out
        if self.ggml_type == T.F32:
            return np.matmul(x, self.raw.view(np.float32).T, out=out)
        for r0 in range(0, rows, self.tile):
            r1 = min(rows, r0 + self.tile)
            w = qtypes.dequantize(self.raw[r0:r1], self.ggml_type, (r1 - r0, cols))
            np.matmul(x, w.T, out=out[:, r0:r1])
        return out


@nb.njit(cache=True, inline="always")
def _half(lo, hi):
    # IEEE half from its two little-endian bytes, exactly (every half is a float32).
    h = np.int32(lo) | (np.int32(hi) << 8)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float32(m) * np.float32(2.0 ** -24)
    elif e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(1024 + m) * np.float32(2.0 ** (e - 25))
    return -v if h & 0x8000 else v


@nb.njit(cache=True, inline="always")
def _bf16(lo, hi):
    # bfloat16 = the top half of a float32: 8-bit exponent, 7-bit mantissa.
    h = np.int32(lo) | (np.int32(hi) << 8)
    e = (h >> 7) & 0xFF
    m = h & 0x7F
    if e == 0:
        v = np.float32(m) * np.float32(2.0 ** -133)
    elif e == 255:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(128 + m) * np.float32(2.0 ** (e - 134))
    return -v if h & 0x8000 else v


@nb.njit(cache=True, inline="always")
def _row_dot(kind, x, t, raw, r, kv, scales):
    # One output: row r of the stored weights (type ``kind``) times token t of x, float32.
    n = x.shape[1]
    acc = np.float32(0.0)
    if kind == _Q8_0:  # blocks of a float16 scale and 32 int8
        for b in range(n // 32):
            o = b * 34
            s = np.float32(0.0)
            for j in range(32):
                q = np.int32(raw[r, o + 2 + j])
                if q > 127:
                    q -= 256
                s += np.float32(q) * x[t, b * 32 + j]
            acc += _half(raw[r, o], raw[r, o + 1]) * s
    elif kind == _F16:
        for j in range(n):
            acc += _half(raw[r, 2 * j], raw[r, 2 * j + 1]) * x[t, j]
    elif kind == _BF16:
        for j in range(n):
            acc += _bf16(raw[r, 2 * j], raw[r, 2 * j + 1]) * x[t, j]
    else:  # MXFP4: an E8M0 scale and 16 bytes; low nibbles are elements 0..15, high 16..31
        for b in range(n // 32):
            o = b * 17
            s = np.float32(0.0)
            for j in range(16):
                q = raw[r, o + 1 + j]
                s += kv[q & 15] * x[t, b * 32 + j] + kv[q >> 4] * x[t, b * 32 + 16 + j]
            acc += scales[raw[r, o]] * s
    return acc


@nb.njit(parallel=True, cache=True)
def _direct_par(kind, x, raw, kv, scales, out):
    for r in nb.prange(raw.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = _row_dot(kind, x, t, raw, r, kv, scales)


@nb.njit(cache=True)
def _direct_one(kind, x, raw, kv, scales, out):
    for r in range(raw.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = _row_dot(kind, x, t, raw, r, kv, scales)


def _direct(ggml_type, x, raw, out):
    # Waking the thread pool costs more than a small matrix takes on one core.
    fn = _direct_par if raw.size >= _PARALLEL_BYTES else _direct_one
    fn(_KIND[ggml_type], x, raw, mxfp4.KVALUES_F32, mxfp4.SCALES, out)


assert GGML_QUANT_SIZES[T.Q8_0] == (32, 34) and GGML_QUANT_SIZES[T.MXFP4] == (32, 17)  # what _row_dot reads
