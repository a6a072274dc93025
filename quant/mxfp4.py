"""MXFP4 (GGML type 39): 32 weights in 17 bytes, bit-identical to gguf.quants.

Block: byte 0 is an E8M0 exponent ``e``; bytes 1..16 are ``qs``. Element ``j``
(0..15) is the low nibble of ``qs[j]``, element ``j+16`` its high nibble.
Value = KVALUES[nibble] * half(e), where half(e) = 2^(e-128) built from bits.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.MXFP4]
HALF = QK // 2
# E2M1 values, doubled (the table ggml calls kvalues_mxfp4).
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
KVALUES_F32 = KVALUES.astype(np.float32)


def e8m0_half_table() -> np.ndarray:
    """half(e) for all 256 exponents, as float32 (decoders index it)."""
    e = np.arange(256, dtype=np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


SCALES = e8m0_half_table()


@nb.njit(parallel=True, cache=True)
def _dequantize_rows(blocks, scales, kv, out):
    # blocks: [n_blocks, 17] uint8; out: [n_blocks, 32] float32
    for b in nb.prange(blocks.shape[0]):
        d = scales[blocks[b, 0]]
        for j in range(HALF):
            q = blocks[b, 1 + j]
            out[b, j] = d * kv[q & 0x0F]
            out[b, j + HALF] = d * kv[q >> 4]


@nb.njit(parallel=True, cache=True)
def _amax(x, out):
    for b in nb.prange(x.shape[0]):
        m = np.float32(0.0)
        for j in range(QK):
            a = abs(x[b, j])
            if a > m:
                m = a
        out[b] = m


@nb.njit(parallel=True, cache=True)
def _encode(x, e, scales, kv, out):
    # Nearest table entry, lowest index on ties: float32 arithmetic exactly as
    # gguf's |d*kv - x| then argmin, so rounding ties agree bit for bit.
    for b in nb.prange(x.shape[0]):
        d = scales[e[b]]
        out[b, 0] = e[b]
        for j in range(HALF):
            lo = _nearest(x[b, j], d, kv)
            hi = _nearest(x[b, j + HALF], d, kv)
            out[b, 1 + j] = np.uint8(lo | (hi << 4))


@nb.njit(inline="always")
def _nearest(v, d, kv):
    best = 0
    best_err = abs(d * kv[0] - v)
    for i in range(1, 16):
        err = abs(d * kv[i] - v)
        if err < best_err:
            best_err = err
            best = i
    return best


def _exponents(amax: np.ndarray) -> np.ndarray:
    # The reference takes floor(log2(amax)) with numpy's float32 log2, which can
    # round up just below a power of two; using the same ufunc keeps us identical.
    with np.errstate(divide="ignore"):
        return np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0).astype(np.uint8)


def _blocks_view(a: np.ndarray, width: int, what: str) -> np.ndarray:
    if a.ndim < 1 or a.shape[-1] % width:
        raise ValueError(f"{what}: last dimension {a.shape[-1] if a.ndim else None} "
                         f"is not a multiple of {width}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what}: array must be C-contiguous")
    return a.reshape(-1, width)


def quantize(x: np.ndarray) -> np.ndarray:
    """float32 ``[..., K]`` (K % 32 == 0) -> uint8 ``[..., K//32*17]``."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise TypeError(f"quantize: expected a float32 numpy array, got {getattr(x, 'dtype', type(x))}")
    rows = _blocks_view(x, QK, "quantize")
    if not np.isfinite(rows).all():
        raise ValueError("quantize: input holds NaN or inf; MXFP4 has no encoding for them")
    amax = np.empty(rows.shape[0], dtype=np.float32)
    _amax(rows, amax)
    out = np.empty((rows.shape[0], BLOCK_BYTES), dtype=np.uint8)
    _encode(rows, _exponents(amax), SCALES, KVALUES_F32, out)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * BLOCK_BYTES)


def dequantize(blocks: np.ndarray) -> np.ndarray:
    """uint8 ``[..., n*17]`` -> float32 ``[..., n*32]``."""
    if not isinstance(blocks, np.ndarray) or blocks.dtype != np.uint8:
        raise TypeError(f"dequantize: expected a uint8 numpy array, got {getattr(blocks, 'dtype', type(blocks))}")
    rows = _blocks_view(blocks, BLOCK_BYTES, "dequantize")
    out = np.empty((rows.shape[0], QK), dtype=np.float32)
    _dequantize_rows(rows, SCALES, KVALUES_F32, out)
    return out.reshape(*blocks.shape[:-1], blocks.shape[-1] // BLOCK_BYTES * QK)
