"""The legacy block formats of llama.cpp (blocks of 32, a half scale). Q8_0 for now.

Q8_0: a float16 scale d, then 32 int8 values; value = d * q (gguf's order of
operations, exact in float32).
"""
from __future__ import annotations

import functools

import numba as nb
import numpy as np
from numba import cuda  # a module global: the simulator swaps it in kernels
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..registry import Format
from .floats import f16

_QK, _BYTES = GGML_QUANT_SIZES[T.Q8_0]


@nb.njit(inline="always")
def _q8_0_block(src, off, out, o):
    d = f16(src[off], src[off + 1])
    for j in range(_QK):
        out[o + j] = np.float32(np.int8(src[off + 2 + j])) * d


# ---------------------------------------------------------------- CUDA (built on first use)
# The half scale is built from its two bytes by hand (the simulator has no fp16 module).

@functools.lru_cache(maxsize=None)
def _q8_0_tile(rows, k_chunk, n_threads, stride):
    """``quant.cuda.tile_decoder`` for Q8_0: one item = 8 values of one block (one scale decode)."""
    from ..cuda import f16_bits_to_f32, q8_0_value, tile_item
    NB = k_chunk // _QK
    ITEMS = rows * NB * 4
    U = np.uint64
    PER_ROW, ST = U(NB * 4), U(stride)

    @cuda.jit(device=True, inline=True)
    def decode(w, s, row0, n_rows, k0, K, dst, off, tid, tabs):
        su, r0, nr, kb0, kleft, o = U(s), U(row0), U(n_rows), U(k0 // _QK), U(K - k0), U(off)
        for i in range(tid, ITEMS, n_threads):
            n, b, g = tile_item(i, PER_ROW, U(2), U(8))
            row = r0 + n
            live = row < nr and b * U(_QK) < kleft
            d = np.float32(0.0)
            base = (kb0 + b) * U(_BYTES)
            if live:
                d = f16_bits_to_f32(w[su, row, base], w[su, row, base + U(1)])
            for jj in range(8):
                j = g + U(jj)
                v = np.float32(0.0)
                if live:
                    v = q8_0_value(w[su, row, base + U(2) + j], d)
                dst[o + (b * U(_QK) + j) * ST + n] = v
    return decode


@functools.lru_cache(maxsize=None)
def _q8_0_pair():
    """``quant.cuda.pair_reader`` for Q8_0: item i is bytes i%16 and i%16 + 16 of block i//16."""
    from ..cuda import f16_bits_to_f32, q8_0_value
    U = np.uint64

    @cuda.jit(device=True, inline=True)
    def read(w, s, row, i, K, tabs):
        iu = U(i)
        base = (iu >> U(4)) * U(_BYTES)
        j = base + U(2) + (iu & U(15))
        d = f16_bits_to_f32(w[s, row, base], w[s, row, base + U(1)])
        return q8_0_value(w[s, row, j], d), q8_0_value(w[s, row, j + U(16)], d)
    return read


@functools.lru_cache(maxsize=None)
def _q8_0_dequantize():
    """(kernel, items per block, shared bytes): grid-stride over elements, the scale decoded per element."""
    from ..cuda import f16_bits_to_f32, q8_0_value

    @cuda.jit
    def kernel(blocks, out):
        n_items = blocks.shape[0] // _BYTES * _QK
        for i in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            b = i // _QK
            j = i - b * _QK
            base = b * _BYTES
            d = f16_bits_to_f32(blocks[base], blocks[base + 1])
            out[i] = q8_0_value(blocks[base + 2 + j], d)
    return kernel, _QK, 0


# ---------------------------------------------------------------- the registered format

class Q8_0(Format, ggml_type=T.Q8_0):
    decode_block = _q8_0_block

    @staticmethod
    def decode_numpy(blocks):
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        return blocks[:, 2:].copy().view(np.int8).astype(np.float32) * d

    @staticmethod
    def check_blocks(blocks):
        return ~np.isfinite(blocks[:, :2].copy().view(np.float16)[:, 0])

    @staticmethod
    def ir_block(b, isa_mode, lanes, p8, off):
        from ..simd import emit_q8_0_block_f32
        return emit_q8_0_block_f32(b, lanes, p8, off)

    # the integer dot: the signed codes (+ 128 with VNNI; AVX2's vpmaddubsw by the sign trick)
    int8_dot, int8_signed, int8_avx2 = True, True, True
    scale_offsets = (0,)  # its f16 d

    @staticmethod
    def int8_block(b, p8, off):
        from ..simd import emit_q8_0_i8
        return emit_q8_0_i8(b, p8, off)

    cuda_tile = staticmethod(_q8_0_tile)
    cuda_pair = staticmethod(_q8_0_pair)
    cuda_dequantize = staticmethod(_q8_0_dequantize)
