"""MXFP4 (GGML type 39): 32 weights in 17 bytes, bit-identical to gguf.quants.

Block: byte 0 is an E8M0 exponent ``e``; bytes 1..16 are ``qs``. Element ``j``
(0..15) is the low nibble of ``qs[j]``, element ``j+16`` its high nibble.
Value = KVALUES[nibble] * half(e), where half(e) = 2^(e-128) built from bits.
"""
from __future__ import annotations

import functools

import numba as nb
import numpy as np
from numba import cuda  # a module global: the simulator swaps it in kernels
from gguf.constants import GGMLQuantizationType

from .. import jitcache
from ..registry import Format

from ..tables import BLOCK_BYTES, HALF, KVALUES, KVALUES_F32, QK, SCALES, e8m0_half_table  # noqa: F401


@jitcache.njit(parallel=True, cache=True)
def _dequantize_rows(blocks, scales, kv, out):
    # blocks: [n_blocks, 17] uint8; out: [n_blocks, 32] float32
    for b in nb.prange(blocks.shape[0]):
        d = scales[blocks[b, 0]]
        for j in range(HALF):
            q = blocks[b, 1 + j]
            out[b, j] = d * kv[q & 0x0F]
            out[b, j + HALF] = d * kv[q >> 4]


@jitcache.njit(parallel=True, cache=True)
def _amax(x, out):
    for b in nb.prange(x.shape[0]):
        m = np.float32(0.0)
        for j in range(QK):
            a = abs(x[b, j])
            if a > m:
                m = a
        out[b] = m


@jitcache.njit(parallel=True, cache=True)
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


# ---------------------------------------------------------------- block decode and data check

@nb.njit(inline="always")
def _decode_block(src, off, out, o):
    d = SCALES[src[off]]
    for j in range(HALF):
        q = src[off + 1 + j]
        out[o + j] = d * KVALUES_F32[q & 0x0F]
        out[o + j + HALF] = d * KVALUES_F32[q >> 4]


def _bad_blocks(blocks):
    bad = blocks[:, 0] > SAFE_EXPONENT  # rare, so the exact test runs on these alone
    for i in np.flatnonzero(bad):
        e = int(blocks[i, 0])
        q = blocks[i, 1:]
        amax = np.abs(KVALUES_F32[np.concatenate([q & 0x0F, q >> 4])]).max()
        with np.errstate(over="ignore"):
            bad[i] = e == NAN_EXPONENT or not np.isfinite(amax * SCALES[e])
    return bad


NAN_EXPONENT = 0xFF  # NaN in the OCP MX format (ggml decodes it as 2^127)
SAFE_EXPONENT = 252  # up to here every block decodes finite (12 * 2^124 < float32 max)


def _simd_run(isa):
    from .. import simd  # simd reads this module's tables: imported once they exist
    return simd.make_mx_decode(isa)


def _best_run():
    from .. import simd
    return _simd_run(simd.best_isa())


# ---------------------------------------------------------------- CUDA (built on first use: numba.cuda loads lazily)
# Kernels copy SCALES then KVALUES_F32 into one shared array (quant.cuda.load_tables): a
# warp's 32 different nibbles are then bank-parallel reads, not serialised constant reads.

@functools.lru_cache(maxsize=None)
def tile_decoder(rows, k_chunk, n_threads, stride):
    """``quant.cuda.tile_decoder`` for MXFP4: one item = one qs byte = values j and j+16."""
    from .. import cuda as qc
    from ..cuda import tile_item
    NB = k_chunk // QK  # quant blocks per row per chunk
    ITEMS = rows * NB * HALF
    U = np.uint64  # unsigned index math: no negative-index fix-ups, shifts for the divisions
    PER_ROW, ST, KV = U(NB * HALF), U(stride), U(qc.KV_OFFSET)

    @cuda.jit(device=True, inline=True)
    def decode(w, s, row0, n_rows, k0, K, dst, off, tid, tabs):
        su, r0, nr, kb0, kleft, o = U(s), U(row0), U(n_rows), U(k0 // QK), U(K - k0), U(off)
        for i in range(tid, ITEMS, n_threads):
            n, b, j = tile_item(i, PER_ROW, U(4), U(1))
            lo = np.float32(0.0)
            hi = np.float32(0.0)
            row = r0 + n
            if row < nr and b * U(QK) < kleft:
                base = (kb0 + b) * U(BLOCK_BYTES)
                d = tabs[w[su, row, base]]
                q = U(w[su, row, base + U(1) + j])
                lo = tabs[KV + (q & U(15))] * d
                hi = tabs[KV + (q >> U(4))] * d
            dst[o + (b * U(QK) + j) * ST + n] = lo
            dst[o + (b * U(QK) + j + U(HALF)) * ST + n] = hi
    return decode


@functools.lru_cache(maxsize=None)
def pair_reader():
    """``quant.cuda.pair_reader`` for MXFP4: item i is qs byte i%16 of block i//16."""
    from .. import cuda as qc
    U = np.uint64
    KV = U(qc.KV_OFFSET)

    @cuda.jit(device=True, inline=True)
    def read(w, s, row, i, K, tabs):
        iu = U(i)
        base = (iu >> U(4)) * U(BLOCK_BYTES)
        d = tabs[w[s, row, base]]
        q = U(w[s, row, base + U(1) + (iu & U(15))])
        return tabs[KV + (q & U(15))] * d, tabs[KV + (q >> U(4))] * d
    return read


@functools.lru_cache(maxsize=None)
def bf16_tile_decoder(rows, BK, THREADS, RS):
    """Device function decoding a ``rows x BK`` slice of MXFP4 matrices into BF16 words for the
    tensor-core kernels: ``su[off + n*RS + c]`` = W[s][row0 + n, k0 + 2c] (low half) and
    k0 + 2c + 1 (0 past ``n_rows`` or ``K``). One item is two consecutive ``qs`` bytes:
    elements j, j+1 (low nibbles) and j+16, j+17 (high nibbles) of a block, two words.
    Values are the FFMA decoder's float32 ``kvalue * 2^(e-128)``: an E2M1 value times a
    power of two is exactly a BF16, so the low 16 bits are zero and the top half is it."""
    from .. import cuda as qc
    from ..bits import f32_bits
    from ..cuda import tile_item
    U, U32 = np.uint64, np.uint32
    HI16 = np.uint32(0xFFFF0000)
    NB = BK // QK
    ITEMS = rows * NB * 8
    PER_ROW = U(NB * 8)
    KV = U(qc.KV_OFFSET)

    @cuda.jit(device=True, inline=True)
    def decode(w, s, row0, n_rows, k0, K, su, off, tid, tabs):
        sl, r0, nr, kb0, kleft, o = U(s), U(row0), U(n_rows), U(k0 // QK), U(K - k0), U(off)
        for i in range(tid, ITEMS, THREADS):
            n, b, j = tile_item(i, PER_ROW, U(3), U(2))
            lo = U32(0)
            hi = U32(0)
            row = r0 + n
            if row < nr and b * U(QK) < kleft:
                base = (kb0 + b) * U(BLOCK_BYTES)
                d = tabs[w[sl, row, base]]
                q0 = U(w[sl, row, base + U(1) + j])
                q1 = U(w[sl, row, base + U(2) + j])
                lo = (f32_bits(tabs[KV + (q0 & U(15))] * d) >> U32(16)) | \
                     (f32_bits(tabs[KV + (q1 & U(15))] * d) & HI16)
                hi = (f32_bits(tabs[KV + (q0 >> U(4))] * d) >> U32(16)) | \
                     (f32_bits(tabs[KV + (q1 >> U(4))] * d) & HI16)
            dst = o + n * U(RS) + b * U(16) + (j >> U(1))
            su[dst] = lo
            su[dst + U(8)] = hi
    return decode


@functools.lru_cache(maxsize=None)
def dequantize_kernel():
    """(kernel, items per block, shared bytes) of ``quant.cuda.dequantize_cuda``: grid-stride over
    qs bytes (16 per block), a thread writes elements j and j+16 of its block; consecutive
    threads read consecutive bytes. blocks: uint8 [n*17] flat; out: float32 [n*32] flat."""
    from numba import types
    from .. import cuda as qc

    load_tables, scale, lo, hi = qc.load_tables, qc.mxfp4_scale, qc.mxfp4_lo, qc.mxfp4_hi

    @cuda.jit
    def kernel(blocks, out):
        tabs = cuda.shared.array(0, types.float32)  # dynamic: TABLES words
        load_tables(tabs, cuda.threadIdx.x, cuda.blockDim.x)
        cuda.syncthreads()
        n_items = blocks.shape[0] // BLOCK_BYTES * HALF
        for i in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            b = i // HALF
            j = i - b * HALF
            d = scale(blocks[b * BLOCK_BYTES], tabs)
            q = blocks[b * BLOCK_BYTES + 1 + j]
            out[b * QK + j] = lo(q, d, tabs)
            out[b * QK + j + HALF] = hi(q, d, tabs)
    return kernel, HALF, 4 * qc.TABLES


# ---------------------------------------------------------------- the registered format

class MXFP4(Format, ggml_type=GGMLQuantizationType.MXFP4):
    """Registered MXFP4: SIMD decode (``quant.simd``), int8 dot, tensor-core tiles."""
    decode_block = _decode_block
    decode_run = _best_run()  # numba caches compiled code per CPU: the decoder depends on the host alone
    simd_run = staticmethod(_simd_run)
    int8_dot, int8_offset, int8_avx2 = True, 12, True  # doubled E2M1 (-12..12) + 12: at most 24
    mma = True

    @staticmethod
    def int8_block(b, p8, off):
        from ..simd import emit_block_u8
        return emit_block_u8(b, p8, off)

    decode_numpy = staticmethod(dequantize)
    check_blocks = staticmethod(_bad_blocks)

    @classmethod
    def check_what(cls, raw):
        e = int(raw[0])
        return ("a block of exponent 255 (NaN in the MX format)" if e == NAN_EXPONENT
                else f"a block of exponent {e} that decodes beyond float32's range")

    @staticmethod
    def ir_block(b, isa_mode, lanes, p8, off):
        from ..simd import emit_block_f32
        return emit_block_f32(b, isa_mode, lanes, p8, off)

    cuda_tile = staticmethod(tile_decoder)
    cuda_pair = staticmethod(pair_reader)
    cuda_bf16_tile = staticmethod(bf16_tile_decoder)
    cuda_dequantize = staticmethod(dequantize_kernel)
