"""F32, F16 and BF16: one element per block, stored as IEEE bits.

Decoders are exact: F32 copies bits (NaN payloads kept), F16 widens, BF16 is
the top half of a float32. The data check flags NaN and inf elements.
"""
from __future__ import annotations

import functools

import numba as nb
import numpy as np
from numba import cuda  # a module global: the simulator swaps it in kernels
from gguf.constants import GGMLQuantizationType as T

from ..registry import Format


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
def _f32_block(src, off, out, o):
    out.view(np.uint32)[o] = (np.uint32(src[off]) | (np.uint32(src[off + 1]) << np.uint32(8))
                              | (np.uint32(src[off + 2]) << np.uint32(16)) | (np.uint32(src[off + 3]) << np.uint32(24)))


@nb.njit(inline="always")
def _f16_block(src, off, out, o):
    out[o] = f16(src[off], src[off + 1])


@nb.njit(inline="always")
def _bf16_block(src, off, out, o):
    out.view(np.uint32)[o] = (np.uint32(src[off]) << np.uint32(16)) | (np.uint32(src[off + 1]) << np.uint32(24))


# ---------------------------------------------------------------- CUDA (built on first use)

@functools.lru_cache(maxsize=None)
def _f32_tile(rows, k_chunk, n_threads, stride):
    """``quant.cuda.tile_decoder`` for F32 (``w`` float32 ``[n_mats, n_rows, K]``): a copy."""
    ITEMS = rows * k_chunk
    U = np.uint64
    ST, KC = U(stride), U(k_chunk)

    @cuda.jit(device=True, inline=True)
    def decode(w, s, row0, n_rows, k0, K, dst, off, tid, tabs):
        su, r0, nr, k0u, kleft, o = U(s), U(row0), U(n_rows), U(k0), U(K - k0), U(off)
        for i in range(tid, ITEMS, n_threads):
            idx = U(i)
            n = idx // KC
            kk = idx - n * KC
            v = np.float32(0.0)
            row = r0 + n
            if row < nr and kk < kleft:
                v = w[su, row, k0u + kk]
            dst[o + kk * ST + n] = v
    return decode


@functools.lru_cache(maxsize=None)
def _element_pair_reader(ggml_type):
    """``quant.cuda.pair_reader`` for one element per column: item i is columns
    ``c = 32*(i//16) + i%16`` and ``c + 16`` (0 past ``K``)."""
    from ..cuda import bf16_bits_to_f32, f16_bits_to_f32
    U = np.uint64
    if ggml_type == int(T.F32):
        @cuda.jit(device=True, inline=True)
        def value(e, tabs):
            return e
    elif ggml_type == int(T.F16):
        @cuda.jit(device=True, inline=True)
        def value(e, tabs):
            return f16_bits_to_f32(np.int32(e) & 0xFF, np.int32(e) >> 8)
    else:
        value = bf16_bits_to_f32

    @cuda.jit(device=True, inline=True)
    def read(w, s, row, i, K, tabs):
        iu = U(i)
        c = ((iu >> U(4)) << U(5)) + (iu & U(15))
        lo = np.float32(0.0)
        hi = np.float32(0.0)
        if c < U(K):
            lo = value(w[s, row, c], tabs)
        if c + U(16) < U(K):
            hi = value(w[s, row, c + U(16)], tabs)
        return lo, hi
    return read


# ---------------------------------------------------------------- the registered formats

class _Float(Format):
    @classmethod
    def check_what(cls, raw):
        return "NaN or inf"

    @classmethod
    def cuda_pair(cls):
        return _element_pair_reader(cls.ggml_type)


class F32(_Float, ggml_type=T.F32):
    decode_block = _f32_block
    cuda_dtype = np.float32

    @staticmethod
    def decode_numpy(blocks):
        return blocks.reshape(-1).view(np.float32).reshape(-1, 1).copy()

    @staticmethod
    def check_blocks(blocks):
        return ~np.isfinite(blocks.reshape(-1).view(np.float32))

    cuda_tile = staticmethod(_f32_tile)


class F16(_Float, ggml_type=T.F16):
    decode_block = _f16_block
    cuda_dtype = np.uint16

    @staticmethod
    def decode_numpy(blocks):
        return blocks.reshape(-1).view(np.float16).astype(np.float32).reshape(-1, 1)

    @staticmethod
    def check_blocks(blocks):
        return ~np.isfinite(blocks.reshape(-1).view(np.float16))

    @staticmethod
    def ir_block(b, isa_mode, lanes, p8, off):
        from ..simd import emit_f16_block_f32
        return emit_f16_block_f32(b, lanes, p8, off)


class BF16(_Float, ggml_type=T.BF16):
    decode_block = _bf16_block
    cuda_dtype = np.uint16

    @staticmethod
    def decode_numpy(blocks):
        return (blocks.reshape(-1).view(np.int16).astype(np.int32) << 16).view(np.float32).reshape(-1, 1)

    @staticmethod
    def check_blocks(blocks):
        return (blocks.reshape(-1).view(np.uint16) & 0x7F80) == 0x7F80  # exponent all ones: inf or NaN

    @staticmethod
    def ir_block(b, isa_mode, lanes, p8, off):
        from ..simd import emit_bf16_block_f32
        return emit_bf16_block_f32(b, lanes, p8, off)
