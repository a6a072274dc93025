"""Dense weights (attention, embeddings, output) in the type the file holds, read from the memory map.

``Dense.matmul(x)`` is ``x @ W.T`` without ever decoding the whole matrix:
- a batch of tokens decodes W a tile of rows at a time (``quant.types``, float32)
  and multiplies each tile with BLAS, so the decoded copy stays a few MB;
- one to a few tokens (decode steps) with Q8_0 weights, the common dense type,
  run a Numba kernel on the stored blocks: every weight byte is read once.
``Dense.rows(ids)`` decodes only the given rows (the embedding lookup).
"""
from __future__ import annotations

import numba as nb
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from quant import types as qtypes

__all__ = ["Dense", "TYPES"]

TYPES = tuple(qtypes.DEQUANTIZERS)  # F32, F16, BF16, Q8_0, MXFP4
_TILE_BYTES = 1 << 21  # decoded float32 tile: fits in L2/L3
_DIRECT_MAX_TOKENS = 4  # up to this many tokens, Q8_0 runs in the direct kernel
_PARALLEL_BYTES = 1 << 18  # smaller matrices run on one thread


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
        if self.ggml_type == T.Q8_0 and x.shape[0] <= _DIRECT_MAX_TOKENS:
            _q8_0_matmul(x, self.raw, out)
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
def _q8_0_row(x, raw, r, out):
    # Q8_0 block: float16 scale d, 32 int8 q; y[t, r] = sum_b d_b * sum_j q_bj x[t, 32 b + j].
    n_blocks = x.shape[1] // 32
    for t in range(x.shape[0]):
        acc = np.float32(0.0)
        for b in range(n_blocks):
            o = b * 34
            d = _half(raw[r, o], raw[r, o + 1])
            s = np.float32(0.0)
            for j in range(32):
                q = np.int32(raw[r, o + 2 + j])
                if q > 127:
                    q -= 256
                s += np.float32(q) * x[t, b * 32 + j]
            acc += d * s
        out[t, r] = acc


@nb.njit(parallel=True, cache=True)
def _q8_0_matmul_par(x, raw, out):
    for r in nb.prange(raw.shape[0]):
        _q8_0_row(x, raw, r, out)


@nb.njit(cache=True)
def _q8_0_matmul_one(x, raw, out):
    for r in range(raw.shape[0]):
        _q8_0_row(x, raw, r, out)


def _q8_0_matmul(x, raw, out):
    # Waking the thread pool costs more than a small matrix takes on one core.
    (_q8_0_matmul_par if raw.size >= _PARALLEL_BYTES else _q8_0_matmul_one)(x, raw, out)


assert GGML_QUANT_SIZES[T.Q8_0] == (32, 34)  # the layout _q8_0_matmul reads
