"""CUDA device functions that decode GGML blocks inside kernels (numba-cuda).

MXFP4 (17-byte block): ``mxfp4_scale(e, tabs)`` turns the E8M0 byte into
half(e) = 2^(e-128) through the 256-entry table ``quant.tables.SCALES``;
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
from numba import cuda
from numba.cuda.core import config as cuda_config

from . import registry
from . import tables as mxfp4  # MXFP4's tables (a leaf: the formats import this module)

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


@cuda.jit(device=True, inline=True)
def tile_item(i, per_row, shift, step):
    """Item ``i`` of a tile decoder's flat loop as (row of the tile, block of the row, first
    element in the block), ``per_row`` items a row, ``2**shift`` a block, ``step`` elements an
    item; uint64, as the decoders index."""
    idx = np.uint64(i)
    n = idx // per_row
    rem = idx - n * per_row
    return n, rem >> shift, (rem & ((np.uint64(1) << shift) - np.uint64(1))) * step


# ---------------------------------------------------------------- tile decoders (from the formats)

def tile_decoder(ggml_type, rows, k_chunk, n_threads, stride):
    """Device function decoding a ``rows x k_chunk`` slice of a stack of matrices.

    ``decode(w, s, row0, n_rows, k0, K, dst, off, tid, tabs)`` writes
    ``dst[off + kk*stride + n] = W[s][row0 + n, k0 + kk]`` (0 past ``n_rows`` or
    ``K``) into a flat shared array: the transposed tile a matmul reads along
    its reduction axis (``stride >= rows``; odd, it avoids bank conflicts). ``w`` is
    ``[n_mats, n_rows, row_bytes]`` uint8 (block formats) or ``[n_mats, n_rows, K]``
    of ``dense_dtype`` (F32); ``k0`` and ``k_chunk`` are multiples of the format's
    block; all ``n_threads`` threads of the block call it with their ``tid``; ``tabs``
    is from ``load_tables``. Consecutive threads take consecutive bytes of one row, so
    global reads coalesce. The format's ``cuda_tile`` builds it (registry).
    """
    f = registry.require(ggml_type, "cuda_tile", "tile_decoder")
    check_chunk(f.ggml_type, k_chunk, "k_chunk")
    return f.cuda_tile(rows, k_chunk, n_threads, stride)


def check_chunk(ggml_type, k, what):
    """A K extent device kernels step by must hold whole blocks of the format, or (a format
    whose tiles come from its block decoder) divide its block."""
    f = registry.get(ggml_type)
    blk, parts = f.block, f.cuda_tile_parts
    if k <= 0 or (k % blk and not (parts and blk % k == 0)):
        raise ValueError(f"{what} ({k}) must be a positive multiple of {registry.type_name(ggml_type)}'s "
                         f"block of {blk}" + (" or divide it" if parts else ""))


# ---------------------------------------------------------------- any block format, from its block decoder
#
# The formats with no hand-written tile decoder (the legacy, K-, i- and ternary quants) get
# one from ``cuda_decode_block``, the decoder the tests hold bit-identical to gguf: a thread
# decodes a whole block into its local memory and stores the part of it the tile covers.
# Exact for every type; the cost is a local array of one block per thread and, for blocks
# of 256 under a K step of 32, each block decoded once per step (8 times).

@functools.lru_cache(maxsize=None)
def block_tile_decoder(ggml_type, rows, k_chunk, n_threads, stride):
    """``tile_decoder``'s device function (same contract) built on the format's
    ``cuda_decode_block``; ``k_chunk`` a multiple of the block or a divisor of it."""
    f = registry.get(ggml_type)
    dec, B, BB = f.cuda_decode_block, f.block, f.block_bytes
    if dec is None:
        raise NotImplementedError(f"{f.name} has no CUDA block decoder")
    NB = k_chunk // B if k_chunk >= B else 1  # blocks a row of the tile touches
    SPAN = B if k_chunk >= B else k_chunk  # values of each block the tile stores
    ITEMS = rows * NB
    U = np.uint64
    ROWS, ST, UB = U(rows), U(stride), U(B)

    @cuda.jit(device=True, inline=True)
    def decode(w, s, row0, n_rows, k0, K, dst, off, tid, tabs):
        # item i: row n = i % rows of block b = i // rows (consecutive threads take consecutive
        # rows, so their stores hit consecutive words); j0: where the chunk starts in its block
        buf = cuda.local.array(B, np.float32)
        su, r0, nr, kb0, j0, kleft, o = U(s), U(row0), U(n_rows), U(k0) // UB, U(k0) % UB, U(K - k0), U(off)
        for i in range(tid, ITEMS, n_threads):
            b = U(i) // ROWS
            n = U(i) - b * ROWS
            row = r0 + n
            live = row < nr and b * U(SPAN) < kleft
            if live:
                dec(w[su, row], np.int64((kb0 + b) * U(BB)), buf, 0)
            for j in range(SPAN):
                v = np.float32(0.0)
                if live:
                    v = buf[j0 + U(j)]
                dst[o + (b * U(SPAN) + U(j)) * ST + n] = v
    return decode


def _name(t):
    try:
        return T(int(t)).name
    except ValueError:
        return f"unknown type {t}"


def is_device_array(a) -> bool:
    """A numba device array (real or simulated)."""
    return bool(getattr(a, "__cuda_ndarray__", False))


# ---------------------------------------------------------------- kernels

def grid_blocks(n_items, threads):
    """Blocks for a grid-stride kernel over ``n_items``: one per ``threads`` items,
    capped; a single block on the simulator, where every GPU thread is a Python thread."""
    need = max(1, -(-int(n_items) // int(threads)))
    return 1 if SIMULATOR else min(need, MAX_BLOCKS)


def dequantize_cuda(blocks, ggml_type=T.MXFP4, stream=0):
    """Decode ``[..., n*B]`` uint8 blocks to float32 ``[..., n*QK]`` on the device.

    ``blocks`` is a numpy array (uploaded, result returned as numpy) or a
    C-contiguous device array (result stays on the device, on ``stream``).
    The formats with a ``cuda_dequantize`` kernel (registry: MXFP4, Q8_0).
    """
    f = registry.require(ggml_type, "cuda_dequantize", "dequantize_cuda")
    kernel, per_block, smem = f.cuda_dequantize()
    nbytes, qk = f.block_bytes, f.block
    on_device = is_device_array(blocks)
    if not on_device and not isinstance(blocks, np.ndarray):
        raise TypeError(f"dequantize_cuda: expected a numpy or device array, got {type(blocks).__name__}")
    if np.dtype(blocks.dtype) != np.uint8:
        raise TypeError(f"dequantize_cuda: expected uint8 blocks, got {blocks.dtype}")
    shape = tuple(blocks.shape)
    if not shape or shape[-1] % nbytes:
        raise ValueError(f"dequantize_cuda: last dimension {shape[-1] if shape else None} "
                         f"is not a multiple of {nbytes} ({f.name} block bytes)")
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

_BF16_UNIT = np.float32(1.0 / 128.0)  # 2^-7: one step of the 7-bit mantissa


def dense_types() -> tuple:
    """GGML ids of the formats whose dense rows device kernels read: with a pair reader
    (``cuda_pair``) or through their block decoder (``cuda_decode_block``)."""
    return tuple(int(f.ggml_type) for f in registry.formats()
                 if f.cuda_pair is not None or f.cuda_decode_block is not None)


def dense_dtype(ggml_type) -> np.dtype:
    """The element type a kernel reads rows of ``ggml_type`` as: float32 (F32), uint16 (F16, BF16
    bits), uint8 (block formats)."""
    if int(ggml_type) not in dense_types():
        raise NotImplementedError(f"dense rows of GGML type {_name(ggml_type)} are not supported "
                                  f"(supported: {', '.join(_name(t) for t in dense_types())})")
    return np.dtype(registry.get(ggml_type).cuda_dtype)


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


def pair_reader(ggml_type):
    """Device function ``read(w, s, row, i, K, tabs) -> (lo, hi)``: the values of item ``i`` of
    row ``row`` of matrix ``s`` (columns ``c = 32*(i//16) + i%16`` and ``c + 16``; 0 past ``K``).

    ``w`` is ``[n_mats, n_rows, n]`` of ``dense_dtype(ggml_type)``: the stored row bytes
    viewed; ``tabs`` is from ``load_tables`` (MXFP4 and BF16 read it). The caller keeps
    ``s`` and ``row`` in range; the block types' K is a multiple of their block. The
    format's ``cuda_pair`` builds it (registry).
    """
    registry.require(ggml_type, "cuda_pair", "pair_reader")  # refuses other types
    return registry.get(ggml_type).cuda_pair()


@functools.lru_cache(maxsize=None)
def dense_tile_decoder(ggml_type, rows, k_chunk, n_threads, stride):
    """``tile_decoder``'s device function (same arguments, same tile) for every type in
    ``dense_types()``, ``w`` as ``pair_reader`` takes it: ``tile_decoder`` itself for the formats
    with ``cuda_tile``, else one ``pair_reader`` item (two values) per step."""
    qt = int(ggml_type)
    if registry.has(qt, "cuda_tile"):
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
