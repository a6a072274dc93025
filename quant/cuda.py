"""CUDA device functions that decode GGML blocks inside kernels (numba-cuda).

MXFP4 (17-byte block): ``mxfp4_scale(e, tabs)`` turns the E8M0 byte into
half(e) = 2^(e-128) through the 256-entry table ``quant.mxfp4.SCALES``;
``mxfp4_lo``/``mxfp4_hi`` give elements j and j+16 of a ``qs`` byte through the
16-entry ``KVALUES_F32``. Kernels copy both tables into one shared array
(``load_tables``) so a warp's 32 different nibbles are bank-parallel reads,
not the serialised reads they would be from constant memory.
``tile_decoder`` builds the device function that decodes a matrix tile
(MXFP4, Q8_0 or F32) into shared memory for the matmul kernels.

Q8_0 (34-byte block): ``f16_bits_to_f32`` builds the float16 scale from its two
bytes by hand (the simulator has no fp16 module), value = q * d.

All products are exact in float32 (a power of two or an 11-bit scale times a
small integer), so device results are bit-identical to ``gguf.quants``.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from numba import cuda, types
from numba.cuda.core import config as cuda_config

from . import mxfp4

QK = mxfp4.QK
MXFP4_BYTES = mxfp4.BLOCK_BYTES
Q8_0_QK, Q8_0_BYTES = GGML_QUANT_SIZES[T.Q8_0]
N_SCALES = 256
N_KVALUES = 16
KV_OFFSET = N_SCALES  # tables are one array: 256 scales, then 16 values
TABLES = N_SCALES + N_KVALUES
# Module globals so kernels can read them as constant arrays.
SCALES = mxfp4.SCALES
KVALUES = mxfp4.KVALUES_F32
F16_POW2 = (2.0 ** (np.arange(32) - 25)).astype(np.float32)  # 2^(ex-25) for half exponents

THREADS = 256  # block size of the dequantise kernels
MAX_BLOCKS = 1 << 16  # grid cap of grid-stride kernels (an H100 holds ~2k resident blocks)
SIMULATOR = bool(cuda_config.ENABLE_CUDASIM)


# ---------------------------------------------------------------- device functions

@cuda.jit(device=True, inline=True)
def load_tables(tabs, tid, n_threads):
    """Fill ``tabs[0:TABLES]`` (shared float32): SCALES, then KVALUES; the caller syncs afterwards.

    Kernels use dynamic shared memory (``cuda.shared.array(0, ...)``) and put
    the tables first: static shared arrays cost the simulator a stack walk per
    thread.
    """
    sc = cuda.const.array_like(SCALES)
    kv = cuda.const.array_like(KVALUES)
    for i in range(tid, TABLES, n_threads):
        tabs[i] = sc[i] if i < N_SCALES else kv[i - N_SCALES]


@cuda.jit(device=True, inline=True)
def mxfp4_scale(e, tabs):
    """half(e) = 2^(e-128) of an E8M0 byte, from the tables."""
    return tabs[e]


@cuda.jit(device=True, inline=True)
def mxfp4_lo(q, d, tabs):
    """Element j of the block whose qs[j] is ``q`` (low nibble)."""
    return tabs[KV_OFFSET + (np.int32(q) & 0x0F)] * d


@cuda.jit(device=True, inline=True)
def mxfp4_hi(q, d, tabs):
    """Element j+16 of the block whose qs[j] is ``q`` (high nibble)."""
    return tabs[KV_OFFSET + ((np.int32(q) >> 4) & 0x0F)] * d


@cuda.jit(device=True, inline=True)
def f16_bits_to_f32(lo, hi):
    """IEEE half from its little-endian bytes, exactly, as float32."""
    h = (np.int32(hi) << 8) | np.int32(lo)
    ex = (h >> 10) & 0x1F
    man = h & 0x3FF
    if ex == 31:
        v = np.float32(math.inf) if man == 0 else np.float32(math.nan)
    elif ex == 0:  # zero or subnormal: man * 2^-24
        v = np.float32(man) * cuda.const.array_like(F16_POW2)[1]
    else:  # (1024 + man) * 2^(ex-25)
        v = np.float32(man | 0x400) * cuda.const.array_like(F16_POW2)[ex]
    return -v if h & 0x8000 else v


@cuda.jit(device=True, inline=True)
def q8_0_value(q, d):
    """One Q8_0 element: the raw byte ``q`` read as int8, times the scale ``d``."""
    qi = np.int32(q)
    if qi > 127:
        qi -= 256
    return np.float32(qi) * d


# ---------------------------------------------------------------- tile decoders

@functools.lru_cache(maxsize=None)
def tile_decoder(ggml_type, rows, k_chunk, n_threads, stride):
    """Device function decoding a ``rows x k_chunk`` slice of a stack of matrices.

    ``decode(w, s, row0, n_rows, k0, K, dst, off, tid, tabs)`` writes
    ``dst[off + kk*stride + n] = W[s][row0 + n, k0 + kk]`` (0 past ``n_rows`` or
    ``K``) into a flat shared array: the transposed tile a matmul reads along
    its reduction axis (``stride >= rows``; odd, it avoids bank conflicts). ``w`` is
    ``[n_mats, n_rows, row_bytes]`` uint8 (MXFP4, Q8_0) or ``[n_mats, n_rows, K]``
    float32 (F32); ``k0`` and ``k_chunk`` are multiples of 32; all ``n_threads``
    threads of the block call it with their ``tid``; ``tabs`` is from
    ``load_tables``. Consecutive threads take consecutive bytes of one row, so
    global reads coalesce. The decode is written out here rather than through
    the one-value functions above: same arithmetic, and one device call per
    tile instead of per value keeps the simulator usable.
    """
    NB = k_chunk // 32  # quant blocks per row per chunk
    qt = int(ggml_type)
    # Index math is unsigned (np.uint64): numba then skips its negative-index
    # fix-ups and divides by the constants with shifts.
    U = np.uint64
    ST, KC = U(stride), U(k_chunk)

    if qt == int(T.MXFP4):
        ITEMS = rows * NB * 16  # one item = one qs byte = two values
        PER_ROW = U(NB * 16)

        @cuda.jit(device=True, inline=True)
        def decode(w, s, row0, n_rows, k0, K, dst, off, tid, tabs):
            su, r0, nr, kb0, kleft, o = U(s), U(row0), U(n_rows), U(k0 // 32), U(K - k0), U(off)
            for i in range(tid, ITEMS, n_threads):
                idx = U(i)
                n = idx // PER_ROW
                rem = idx - n * PER_ROW
                b = rem >> U(4)
                j = rem & U(15)
                lo = np.float32(0.0)
                hi = np.float32(0.0)
                row = r0 + n
                if row < nr and b * U(32) < kleft:
                    base = (kb0 + b) * U(MXFP4_BYTES)
                    d = tabs[w[su, row, base]]
                    q = U(w[su, row, base + U(1) + j])
                    lo = tabs[U(KV_OFFSET) + (q & U(15))] * d
                    hi = tabs[U(KV_OFFSET) + (q >> U(4))] * d
                dst[o + (b * U(32) + j) * ST + n] = lo
                dst[o + (b * U(32) + j + U(16)) * ST + n] = hi
        return decode

    if qt == int(T.Q8_0):
        ITEMS = rows * NB * 4  # one item = 8 values of one block (one scale decode)
        PER_ROW = U(NB * 4)

        @cuda.jit(device=True, inline=True)
        def decode(w, s, row0, n_rows, k0, K, dst, off, tid, tabs):
            su, r0, nr, kb0, kleft, o = U(s), U(row0), U(n_rows), U(k0 // 32), U(K - k0), U(off)
            for i in range(tid, ITEMS, n_threads):
                idx = U(i)
                n = idx // PER_ROW
                rem = idx - n * PER_ROW
                b = rem >> U(2)
                g = (rem & U(3)) * U(8)
                row = r0 + n
                live = row < nr and b * U(32) < kleft
                d = np.float32(0.0)
                base = (kb0 + b) * U(Q8_0_BYTES)
                if live:
                    d = f16_bits_to_f32(w[su, row, base], w[su, row, base + U(1)])
                for jj in range(8):
                    j = g + U(jj)
                    v = np.float32(0.0)
                    if live:
                        v = q8_0_value(w[su, row, base + U(2) + j], d)
                    dst[o + (b * U(32) + j) * ST + n] = v
        return decode

    if qt == int(T.F32):
        ITEMS = rows * k_chunk

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

    raise NotImplementedError(f"tile_decoder: GGML type {_name(qt)} is not supported (supported: MXFP4, Q8_0, F32)")


def _name(t):
    try:
        return T(int(t)).name
    except ValueError:
        return f"unknown type {t}"


def is_device_array(a) -> bool:
    """A numba device array (real or simulated)."""
    return bool(getattr(a, "__cuda_ndarray__", False))


# ---------------------------------------------------------------- kernels

@cuda.jit
def _dequantize_mxfp4_kernel(blocks, out):
    # Grid-stride over qs bytes (16 per block): a thread writes elements j and
    # j+16 of its block; consecutive threads read consecutive bytes.
    # blocks: uint8 [n*17] flat; out: float32 [n*32] flat.
    tabs = cuda.shared.array(0, types.float32)  # dynamic: TABLES words
    load_tables(tabs, cuda.threadIdx.x, cuda.blockDim.x)
    cuda.syncthreads()
    n_items = blocks.shape[0] // MXFP4_BYTES * 16
    for i in range(cuda.grid(1), n_items, cuda.gridsize(1)):
        b = i // 16
        j = i - b * 16
        d = mxfp4_scale(blocks[b * MXFP4_BYTES], tabs)
        q = blocks[b * MXFP4_BYTES + 1 + j]
        out[b * QK + j] = mxfp4_lo(q, d, tabs)
        out[b * QK + j + 16] = mxfp4_hi(q, d, tabs)


@cuda.jit
def _dequantize_q8_0_kernel(blocks, out):
    # Grid-stride over elements (32 per block); the scale is decoded per element.
    n_items = blocks.shape[0] // Q8_0_BYTES * Q8_0_QK
    for i in range(cuda.grid(1), n_items, cuda.gridsize(1)):
        b = i // Q8_0_QK
        j = i - b * Q8_0_QK
        base = b * Q8_0_BYTES
        d = f16_bits_to_f32(blocks[base], blocks[base + 1])
        out[i] = q8_0_value(blocks[base + 2 + j], d)


def grid_blocks(n_items, threads):
    """Blocks for a grid-stride kernel over ``n_items``: one per ``threads`` items,
    capped; a single block on the simulator, where every GPU thread is a Python thread."""
    need = max(1, -(-int(n_items) // int(threads)))
    return 1 if SIMULATOR else min(need, MAX_BLOCKS)


_FORMATS = {int(T.MXFP4): (MXFP4_BYTES, QK, 16, _dequantize_mxfp4_kernel),
            int(T.Q8_0): (Q8_0_BYTES, Q8_0_QK, Q8_0_QK, _dequantize_q8_0_kernel)}


def dequantize_cuda(blocks, ggml_type=T.MXFP4, stream=0):
    """Decode ``[..., n*B]`` uint8 blocks to float32 ``[..., n*QK]`` on the device.

    ``blocks`` is a numpy array (uploaded, result returned as numpy) or a
    C-contiguous device array (result stays on the device, on ``stream``).
    MXFP4 (B=17, QK=32) and Q8_0 (B=34, QK=32).
    """
    try:
        qt = int(T(int(ggml_type)))
    except ValueError:
        raise NotImplementedError(f"dequantize_cuda: unknown GGML type id {ggml_type}") from None
    if qt not in _FORMATS:
        raise NotImplementedError(f"dequantize_cuda: GGML type {T(qt).name} is not supported "
                                  f"(supported: MXFP4, Q8_0)")
    nbytes, qk, per_block, kernel = _FORMATS[qt]
    on_device = is_device_array(blocks)
    if not on_device and not isinstance(blocks, np.ndarray):
        raise TypeError(f"dequantize_cuda: expected a numpy or device array, got {type(blocks).__name__}")
    if np.dtype(blocks.dtype) != np.uint8:
        raise TypeError(f"dequantize_cuda: expected uint8 blocks, got {blocks.dtype}")
    shape = tuple(blocks.shape)
    if not shape or shape[-1] % nbytes:
        raise ValueError(f"dequantize_cuda: last dimension {shape[-1] if shape else None} "
                         f"is not a multiple of {nbytes} ({T(qt).name} block bytes)")
    out_shape = shape[:-1] + (shape[-1] // nbytes * qk,)
    n_blocks = int(np.prod(shape)) // nbytes
    if on_device:
        if not blocks.is_c_contiguous():
            raise ValueError("dequantize_cuda: device blocks must be C-contiguous")
        flat_in = blocks.reshape(n_blocks * nbytes)
    else:
        flat_in = cuda.to_device(np.ascontiguousarray(blocks).reshape(-1), stream=stream)
    out = cuda.device_array(n_blocks * qk, dtype=np.float32, stream=stream)
    if n_blocks:
        smem = 4 * TABLES if qt == int(T.MXFP4) else 0
        kernel[grid_blocks(n_blocks * per_block, THREADS), THREADS, stream, smem](flat_in, out)
    if on_device:
        return out.reshape(out_shape)
    return out.copy_to_host(stream=stream).reshape(out_shape)


# ---------------------------------------------------------------- dense matrices (any type a file holds)
#
# Whole weight matrices (attention, embeddings, output head) come in more types
# than the experts: F16 and BF16 too. A kernel reads a row as ``dense_dtype``
# elements (the stored bytes, viewed) and walks it in *items*: item ``i`` holds
# the values at columns ``c = 32*(i//16) + i%16`` and ``c + 16`` (an MXFP4 qs
# byte's two nibbles; the same pairing for every type), so 32 consecutive items
# are two consecutive quant blocks and a warp's loads coalesce.

DENSE_TYPES = (int(T.F32), int(T.F16), int(T.BF16), int(T.Q8_0), int(T.MXFP4))
_DENSE_DTYPES = {int(T.F32): np.float32, int(T.F16): np.uint16, int(T.BF16): np.uint16}
_BF16_UNIT = np.float32(1.0 / 128.0)  # 2^-7: one step of the 7-bit mantissa


def dense_dtype(ggml_type) -> np.dtype:
    """The element type a kernel reads rows of ``ggml_type`` as: float32 (F32), uint16 (F16, BF16
    bits), uint8 (MXFP4, Q8_0 blocks)."""
    qt = int(ggml_type)
    if qt not in DENSE_TYPES:
        raise NotImplementedError(f"dense rows of GGML type {_name(qt)} are not supported "
                                  f"(supported: {', '.join(_name(t) for t in DENSE_TYPES)})")
    return np.dtype(_DENSE_DTYPES.get(qt, np.uint8))


@cuda.jit(device=True, inline=True)
def bf16_bits_to_f32(h, tabs):
    """bfloat16 from its 16 bits, exactly, as float32 (the upper half of its bits). The
    simulator has no bit casts: 1.m times 2^(e-127), the power from the MXFP4 scale table
    ``tabs[e + 1] = 2^(e-127)`` (``load_tables``); both products are exact."""
    hi = np.int32(h)
    ex = (hi >> 7) & 0xFF
    man = hi & 0x7F
    if ex == 0xFF:
        v = np.float32(math.inf) if man == 0 else np.float32(math.nan)
    elif ex == 0:  # zero or subnormal: 0.m * 2^-126
        v = np.float32(man) * _BF16_UNIT * tabs[2]
    else:
        v = np.float32(man | 0x80) * _BF16_UNIT * tabs[ex + 1]
    return -v if hi & 0x8000 else v


@functools.lru_cache(maxsize=None)
def pair_reader(ggml_type):
    """Device function ``read(w, s, row, i, K, tabs) -> (lo, hi)``: the values of item ``i`` of
    row ``row`` of matrix ``s`` (columns ``c = 32*(i//16) + i%16`` and ``c + 16``; 0 past ``K``).

    ``w`` is ``[n_mats, n_rows, n]`` of ``dense_dtype(ggml_type)``: the stored row bytes
    viewed; ``tabs`` is from ``load_tables`` (MXFP4 and BF16 read it). The caller keeps
    ``s`` and ``row`` in range; the block types' K is a multiple of 32.
    """
    qt = int(ggml_type)
    dense_dtype(qt)  # refuses other types
    U = np.uint64

    if qt == int(T.MXFP4):
        @cuda.jit(device=True, inline=True)
        def read(w, s, row, i, K, tabs):
            iu = U(i)
            base = (iu >> U(4)) * U(MXFP4_BYTES)
            d = tabs[w[s, row, base]]
            q = U(w[s, row, base + U(1) + (iu & U(15))])
            return tabs[U(KV_OFFSET) + (q & U(15))] * d, tabs[U(KV_OFFSET) + (q >> U(4))] * d
        return read

    if qt == int(T.Q8_0):
        @cuda.jit(device=True, inline=True)
        def read(w, s, row, i, K, tabs):
            iu = U(i)
            base = (iu >> U(4)) * U(Q8_0_BYTES)
            j = base + U(2) + (iu & U(15))
            d = f16_bits_to_f32(w[s, row, base], w[s, row, base + U(1)])
            return q8_0_value(w[s, row, j], d), q8_0_value(w[s, row, j + U(16)], d)
        return read

    # One element per column: F32, F16, BF16.
    if qt == int(T.F32):
        @cuda.jit(device=True, inline=True)
        def value(e, tabs):
            return e
    elif qt == int(T.F16):
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


@functools.lru_cache(maxsize=None)
def dense_tile_decoder(ggml_type, rows, k_chunk, n_threads, stride):
    """``tile_decoder``'s device function (same arguments, same tile) for every type in
    ``DENSE_TYPES``, ``w`` as ``pair_reader`` takes it: ``tile_decoder`` itself for MXFP4,
    Q8_0 and F32, else one ``pair_reader`` item (two values) per step."""
    qt = int(ggml_type)
    if qt in (int(T.MXFP4), int(T.Q8_0), int(T.F32)):
        return tile_decoder(qt, rows, k_chunk, n_threads, stride)
    read = pair_reader(qt)
    ITEMS = rows * k_chunk // 2
    U = np.uint64
    PER_ROW, ST = U(k_chunk // 2), U(stride)

    @cuda.jit(device=True, inline=True)
    def decode(w, s, row0, n_rows, k0, K, dst, off, tid, tabs):
        r0, nr, item0, o = U(row0), U(n_rows), U(k0 // 2), U(off)
        for i in range(tid, ITEMS, n_threads):
            idx = U(i)
            n = idx // PER_ROW
            rem = idx - n * PER_ROW  # item within the chunk: columns kk and kk + 16
            kk = ((rem >> U(4)) << U(5)) + (rem & U(15))
            lo = np.float32(0.0)
            hi = np.float32(0.0)
            if r0 + n < nr:
                lo, hi = read(w, s, r0 + n, item0 + rem, K, tabs)
            dst[o + kk * ST + n] = lo
            dst[o + (kk + U(16)) * ST + n] = hi
    return decode
