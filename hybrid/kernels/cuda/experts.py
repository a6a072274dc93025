"""Grouped MoE expert kernels (numba-cuda) over the bucket layout of ``hybrid.moe.routing``.

A launch covers tiles ``[tile_begin, tile_end)`` of a ``Buckets`` layout: each
tile is ``block_pairs`` (token, slot) pairs of one expert. Blocks map to
(tile) x (output-column tile), as vLLM's fused_moe does; quantised weights are
decoded in the kernel into shared memory. Three kernels:

1. gate+up+activation: ``act[p] = act_fn(Wg[s] x_t + bg[s], Wu[s] x_t + bu[s])``
2. down:               ``y[p]   = w_p * (Wd[s] act[p] + bd[s])``
3. reduce:             ``out[t] = sum_j y[t*k + j]`` in fixed j order (no atomics)

``p = t*k + j`` is the flat pair index; ``s = slots[e]`` is the device slot of
expert ``e``: the same kernels serve the natural layout (slot = expert id) and
compact slots. A block never touches a slot other than its tile's expert, and
tiles that hold only padding return before reading any weight.

Kernels 1 and 2 come in two kinds, chosen by ``TileConfig.math``: FFMA (every
expert type) and, for MXFP4 experts, tensor cores (``mma.sync`` m16n8k16, BF16
inputs exact, FP32 accumulation; the instruction and its simulator emulation are
in ``hybrid.kernels.cuda.mma``). ``"auto"`` picks tensor cores on compute capability >= 8.0.

Public API: ``TileConfig``, ``DeviceBuckets``, ``moe_launch``, ``moe_reduce``
(driven by ``engine.DeviceEngine``, the one host-side device path),
``launch_math`` (which kind a launch runs here) and ``variants`` (every kernel
build, for the compile checks).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGMLQuantizationType as T
from numba import cuda, types

from quant import cuda as qc
from quant import types as qtypes

from . import mma
from ...moe.activation import check as check_activation, silu_f32, swiglu_oai_f32
from ...moe.routing import Buckets

SUPPORTED = (int(T.MXFP4), int(T.Q8_0), int(T.F32))
# Expert types with tensor-core kernels; the others keep FFMA whatever TileConfig.math says.
MMA_TYPES = (int(T.MXFP4),)
MATHS = ("auto", "fma", "mma")
MMA_MIN_CC = (8, 0)  # mma.sync m16n8k16 with BF16 inputs: Ampere and later
# Tolerance (max |err| / max |ref| against the float64 reference) of the tensor-core
# kernels on real hardware. Their inputs and products are exact; the hardware's FP32
# accumulation inside an MMA aligns and truncates rather than rounding to nearest
# (Fasi et al., "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021), a biased
# error of up to one unit in the last place of the accumulator per MMA. The kernels
# add the hi pieces' products into one accumulator and the mid and lo pieces' into
# another, so K/16 MMAs touch the large one: 180 at K = 2880, up to 180 * 2^-23 ~ 2e-5
# of a partial sum, twice in a row (gate/up, then down), partial sums a few times the
# result: 1e-4. The FFMA kernels (round to nearest, random-walk error) and the
# simulator's emulation hold 1e-5. Not yet measured on a GPU (examples/gpu_check.py).
MMA_HW_REL_TOL = 1e-4

_F32 = np.float32
_U = np.uint64
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_SMEM_LIMIT = 48 * 1024  # static shared memory per block


# ------------------------------------------------------------------ tile sizes

@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the grouped kernels (compile-time constants; one build per config).

    block_pairs: pairs per tile (the ``block_size`` of the buckets), M of a block.
    block_cols:  output columns per block, N. k_chunk: reduction step, K (multiple of 32).
    thread_rows x thread_cols: the register tile of one thread (strided, so a
    warp reads consecutive shared-memory words). Threads per block =
    (block_pairs / thread_rows) * (block_cols / thread_cols).

    The default (32x64, K 32, 4x4: 128 threads, 4x4x2 accumulators) needs
    21 KB of shared memory for gate+up and 14 KB for down, so several blocks
    share an H100 SM (ptxas: ~124 registers, no spills), and 32 pairs per
    tile match gpt-oss's typical 16-40 pairs per used expert at ubatch 512.

    math: the arithmetic of the kernels, ``"fma"`` (FFMA, every expert type, exact
    float32 products), ``"mma"`` (tensor cores, ``mma.sync`` m16n8k16 BF16 with
    FP32 accumulation, for the types in ``MMA_TYPES``; other types keep FFMA) or
    ``"auto"`` (the default: ``"mma"`` where the device has compute capability
    >= 8.0 and the tile fits the tensor-core kernels, else ``"fma"``; the
    simulator reports 5.2, so ``"auto"`` is FFMA there and the tensor-core path is
    asked for by name). ``warp_cols``: output columns per warp of the tensor-core
    kernels (a multiple of 8); they take ``32 * block_cols / warp_cols`` threads,
    each warp the whole ``block_pairs`` (a multiple of 16) by ``warp_cols`` tile.
    ``thread_rows``/``thread_cols`` shape only the FFMA kernels.
    """

    block_pairs: int = 32
    block_cols: int = 64
    k_chunk: int = 32
    thread_rows: int = 4
    thread_cols: int = 4
    math: str = "auto"
    warp_cols: int = 16

    def __post_init__(self):
        for name in ("block_pairs", "block_cols", "k_chunk", "thread_rows", "thread_cols", "warp_cols"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"TileConfig.{name} must be a positive int, got {v!r}")
        if self.math not in MATHS:
            raise ValueError(f"TileConfig.math must be one of {', '.join(map(repr, MATHS))}, got {self.math!r}")
        if self.math == "mma":
            why = self.mma_unfit()
            if why:
                raise ValueError(f"TileConfig(math='mma'): {why}")
        if self.k_chunk % 32:
            raise ValueError(f"TileConfig.k_chunk={self.k_chunk} must be a multiple of 32 (the quant block)")
        if self.block_pairs % self.thread_rows or self.block_cols % self.thread_cols:
            raise ValueError("TileConfig: block_pairs must be a multiple of thread_rows and "
                             "block_cols a multiple of thread_cols")
        if not 1 <= self.threads <= 1024:
            raise ValueError(f"TileConfig gives {self.threads} threads per block (1..1024)")
        if self.shared_bytes > _SMEM_LIMIT:
            raise ValueError(f"TileConfig needs {self.shared_bytes} B of shared memory (> {_SMEM_LIMIT})")

    @property
    def threads(self) -> int:
        return (self.block_pairs // self.thread_rows) * (self.block_cols // self.thread_cols)

    def row_words(self, n_mats: int) -> int:
        """Words per row of the shared tile [k_chunk][x | n_mats weight tiles], made odd:
        the transposed stores (consecutive threads, consecutive rows) then hit 32 banks."""
        return (self.block_pairs + n_mats * self.block_cols) | 1

    def shared_for(self, n_mats: int) -> int:
        """Dynamic shared bytes of a kernel reading ``n_mats`` weight tiles (gate+up: 2, down: 1)."""
        return 4 * (qc.TABLES + 2 * self.block_pairs + self.k_chunk * self.row_words(n_mats))

    @property
    def shared_bytes(self) -> int:
        """Shared memory of the gate+up kernel (the larger of the two)."""
        return self.shared_for(2)

    # ---- tensor-core kernels

    @property
    def mma_threads(self) -> int:
        return 32 * (self.block_cols // self.warp_cols)

    @property
    def mma_row_words(self) -> int:
        """Words per row of a BF16 shared tile (two halves a word along K), plus 4: the
        fragment loads (8 rows x 4 words a warp) then hit 32 different banks."""
        return self.k_chunk // 2 + 4

    def mma_shared_for(self, n_mats: int) -> int:
        """Dynamic shared bytes of a tensor-core kernel: tables, pair ids and token rows,
        three BF16 pieces of the BM activation rows and ``n_mats`` BN-row weight tiles."""
        return 4 * (qc.TABLES + 2 * self.block_pairs + (3 * self.block_pairs + n_mats * self.block_cols)
                    * self.mma_row_words)

    def mma_unfit(self) -> str | None:
        """Why the tensor-core kernels cannot use this tile, or None."""
        if self.block_pairs % 16:
            return f"block_pairs={self.block_pairs} must be a multiple of 16 (the MMA's M)"
        if self.warp_cols % 8 or self.block_cols % self.warp_cols:
            return (f"warp_cols={self.warp_cols} must be a multiple of 8 (the MMA's N) dividing "
                    f"block_cols={self.block_cols}")
        if self.mma_threads > 1024 or self.block_cols // self.warp_cols > mma.MAX_WARPS:
            return f"{self.mma_threads} threads per block (at most 1024)"
        if self.mma_shared_for(2) > _SMEM_LIMIT:
            return f"{self.mma_shared_for(2)} B of shared memory (> {_SMEM_LIMIT})"
        return None

    def math_for(self, wtype: int, cc: tuple | None) -> str:
        """The kernels' arithmetic for experts of GGML type ``wtype`` on a device of compute
        capability ``cc`` (None: the simulator): ``"mma"`` or ``"fma"``."""
        if self.math == "fma" or int(wtype) not in MMA_TYPES:
            return "fma"
        if self.math == "mma":
            return "mma"
        return "mma" if cc is not None and tuple(cc) >= MMA_MIN_CC and self.mma_unfit() is None else "fma"


# ------------------------------------------------------------------ device helpers

_swiglu_oai = cuda.jit(device=True, inline=True)(swiglu_oai_f32)
_silu_mul = cuda.jit(device=True, inline=True)(silu_f32)


@cuda.jit(device=True, inline=True)
def _tile_slot(pairs, tile_expert, slots, tile, bm, sentinel, n_slots):
    """The weight slot a tile reads, or -1 to skip it: an all-padding tile, or an
    expert or slot outside the buffers (a device slot map is not checked on the host)."""
    if pairs[tile * bm] >= sentinel:
        return -1
    e = tile_expert[tile]
    if e < 0 or e >= slots.shape[0]:
        return -1
    s = slots[e]
    if s < 0 or s >= n_slots:
        return -1
    return s


@cuda.jit(device=True, inline=True)
def _extent(ps, row0, rs, tm, sentinel, col0, cs, tn, n_cols):
    """How many of a thread's strided rows hold real pairs (they come first in a
    tile) and how many of its strided columns lie inside the matrix."""
    nr = 0
    for i in range(tm):
        if ps[row0 + i * rs] < sentinel:
            nr = i + 1
    nc = 0
    for j in range(tn):
        if col0 + j * cs < n_cols:
            nc = j + 1
    return nr, nc


# ------------------------------------------------------------------ kernel factories

@functools.lru_cache(maxsize=None)
def _row_gatherer(BM, BK, THREADS, ROW_WORDS):
    """Device function loading the activation rows of a tile, transposed: for the tile's BM
    rows ``ps[offs_rows + r]`` (an index into ``src``; outside [0, n_rows) is padding),
    ``sm[offs_x + c*ROW_WORDS + r] = src[row, k0 + c]`` for c < BK (0 past K or padding).
    Consecutive threads take consecutive columns of a row, so global reads coalesce."""
    @cuda.jit(device=True, inline=True)
    def gather(src, ps, offs_rows, n_rows, k0, K, sm, offs_x, tid):
        for i in range(tid, BM * BK, THREADS):
            idx = _U(i)
            r = idx // _U(BK)
            c = idx - r * _U(BK)
            row = ps[_U(offs_rows) + r]
            v = _ZERO
            if row >= 0 and row < n_rows and c < _U(K - k0):
                v = src[_U(row), _U(k0) + c]
            sm[_U(offs_x) + c * _U(ROW_WORDS) + r] = v
    return gather


@functools.lru_cache(maxsize=None)
def _gate_up_kernel(cfg: TileConfig, wtype: int, activation: str, has_bias: bool):
    BM, BN, BK, TM, TN = cfg.block_pairs, cfg.block_cols, cfg.k_chunk, cfg.thread_rows, cfg.thread_cols
    ROW_STRIDE, COL_STRIDE = BM // TM, BN // TN
    THREADS, ACC = ROW_STRIDE * COL_STRIDE, TM * TN
    ROW_WORDS = cfg.row_words(2)  # words per shared tile row: x | gate | up
    # Shared offsets (words): pair ids, their token rows (x row, -1 for padding), tile.
    offs_pairs, offs_tokens, offs_x = qc.TABLES, qc.TABLES + BM, qc.TABLES + 2 * BM
    offs_gate, offs_up = offs_x + BM, offs_x + BM + BN
    decode = qc.tile_decoder(wtype, BN, BK, THREADS, ROW_WORDS)
    gather = _row_gatherer(BM, BK, THREADS, ROW_WORDS)
    act_fn = _swiglu_oai if activation == "swiglu_oai" else _silu_mul

    @cuda.jit
    def gate_up(x, pairs, tile_expert, tile0, slots, k, wg, wu, bg, bu, act):
        """Tiling: block (blockIdx.x, blockIdx.y) = (tile of BM pairs of one expert, BN
        columns of n_ff). Per K step of BK, one shared tile [BK][BM | BN | BN] holds the
        BM rows of x (gathered by token, at offs_x) and the decoded BN x BK slices of Wg
        (offs_gate) and Wu (offs_up), all transposed: reduction index first, rows of
        ROW_WORDS words (odd, against bank conflicts). Each thread accumulates TM x TN
        outputs of g and of u at rows ty + i*ROW_STRIDE, columns tx + j*COL_STRIDE (a warp
        reads consecutive words); the activation is fused in the epilogue."""
        tile = tile0 + cuda.blockIdx.x
        col0 = cuda.blockIdx.y * BN
        tid = cuda.threadIdx.x
        ty = tid // COL_STRIDE
        tx = tid - ty * COL_STRIDE
        sentinel = act.shape[0]
        n_ff = act.shape[1]
        K = x.shape[1]
        s = _tile_slot(pairs, tile_expert, slots, tile, BM, sentinel, min(wg.shape[0], wu.shape[0]))
        if s < 0:
            return  # block-uniform, before any barrier

        # Dynamic shared memory, one buffer seen as float32 and int32:
        # [tables | pair ids (BM) | token rows (BM) | tile (BK rows of ROW_WORDS words)].
        sm = cuda.shared.array(0, types.float32)
        ps = cuda.shared.array(0, types.int32)
        qc.load_tables(sm, tid, THREADS)
        for r in range(tid, BM, THREADS):
            p = pairs[tile * BM + r]
            ps[offs_pairs + r] = p
            ps[offs_tokens + r] = p // k if p < sentinel else -1  # one division per row, not per element
        cuda.syncthreads()
        # Real pairs come first in a tile: this thread's rows i < nr are real,
        # its columns j < nc inside n_ff. Only the epilogue looks at them: the
        # zero-filled padding in shared memory is cheaper to multiply than to
        # predicate, and a thread with no real row or column skips the loop.
        nr, nc = _extent(ps, offs_pairs + ty, ROW_STRIDE, TM, sentinel, col0 + tx, COL_STRIDE, TN, n_ff)
        # Unsigned shared offsets: numba skips its negative-index fix-up.
        row_x = _U(offs_x + ty)
        col_gate = _U(offs_gate + tx)
        col_up = _U(offs_up + tx)

        acc_g = cuda.local.array(ACC, np.float32)
        acc_u = cuda.local.array(ACC, np.float32)
        a = cuda.local.array(TM, np.float32)
        for i in range(ACC):
            acc_g[i] = _ZERO
            acc_u[i] = _ZERO
        for k0 in range(0, K, BK):
            gather(x, ps, offs_tokens, x.shape[0], k0, K, sm, offs_x, tid)
            decode(wg, s, col0, n_ff, k0, K, sm, offs_gate, tid, sm)
            decode(wu, s, col0, n_ff, k0, K, sm, offs_up, tid, sm)
            cuda.syncthreads()
            if nr > 0 and nc > 0:
                for kk in range(BK):
                    r = _U(kk * ROW_WORDS)
                    for i in range(TM):
                        a[i] = sm[r + row_x + _U(i * ROW_STRIDE)]
                    for j in range(TN):
                        gv = sm[r + col_gate + _U(j * COL_STRIDE)]
                        uv = sm[r + col_up + _U(j * COL_STRIDE)]
                        for i in range(TM):
                            acc_g[i * TN + j] += a[i] * gv
                            acc_u[i * TN + j] += a[i] * uv
            cuda.syncthreads()

        for i in range(TM):
            p = ps[offs_pairs + ty + i * ROW_STRIDE]
            if i < nr and 0 <= p < sentinel:  # padding is never written, wherever it sits
                for j in range(TN):
                    if j < nc:
                        col = col0 + tx + j * COL_STRIDE
                        g = acc_g[i * TN + j]
                        u = acc_u[i * TN + j]
                        if has_bias:
                            g += bg[s, col]
                            u += bu[s, col]
                        act[p, col] = act_fn(g, u)

    return gate_up


@functools.lru_cache(maxsize=None)
def _down_kernel(cfg: TileConfig, wtype: int, has_bias: bool):
    BM, BN, BK, TM, TN = cfg.block_pairs, cfg.block_cols, cfg.k_chunk, cfg.thread_rows, cfg.thread_cols
    ROW_STRIDE, COL_STRIDE = BM // TM, BN // TN
    THREADS, ACC = ROW_STRIDE * COL_STRIDE, TM * TN
    ROW_WORDS = cfg.row_words(1)  # words per shared tile row: act | down
    offs_pairs, offs_x = qc.TABLES, qc.TABLES + 2 * BM  # same layout as gate_up (token rows unused)
    offs_w = offs_x + BM
    decode = qc.tile_decoder(wtype, BN, BK, THREADS, ROW_WORDS)
    gather = _row_gatherer(BM, BK, THREADS, ROW_WORDS)
    fma_step = tile_fma(BK, TM, TN, ROW_WORDS, ROW_STRIDE, COL_STRIDE)

    @cuda.jit
    def down(act, pairs, tile_expert, tile0, slots, wd, bd, weights, y):
        """Tiling: block = (tile of BM pairs, BN columns of n_embd). Per K step of BK (over
        n_ff), the shared tile [BK][BM | BN] holds rows act[p] of the tile's pairs (offs_x)
        and the decoded BN x BK slice of Wd (offs_w), transposed as in gate_up; each thread
        accumulates TM x TN outputs. Epilogue: bias, then the routing weight."""
        tile = tile0 + cuda.blockIdx.x
        col0 = cuda.blockIdx.y * BN
        tid = cuda.threadIdx.x
        ty = tid // COL_STRIDE
        tx = tid - ty * COL_STRIDE
        sentinel = y.shape[0]
        n_embd = y.shape[1]
        K = act.shape[1]
        s = _tile_slot(pairs, tile_expert, slots, tile, BM, sentinel, wd.shape[0])
        if s < 0:
            return

        sm = cuda.shared.array(0, types.float32)  # [tables | pair ids | tile], as in gate_up
        ps = cuda.shared.array(0, types.int32)
        qc.load_tables(sm, tid, THREADS)
        for r in range(tid, BM, THREADS):
            ps[offs_pairs + r] = pairs[tile * BM + r]
        cuda.syncthreads()
        # as in gate_up
        nr, nc = _extent(ps, offs_pairs + ty, ROW_STRIDE, TM, sentinel, col0 + tx, COL_STRIDE, TN, n_embd)
        row_x = _U(offs_x + ty)
        col_w = _U(offs_w + tx)

        acc = cuda.local.array(ACC, np.float32)
        a = cuda.local.array(TM, np.float32)
        for i in range(ACC):
            acc[i] = _ZERO
        for k0 in range(0, K, BK):
            gather(act, ps, offs_pairs, sentinel, k0, K, sm, offs_x, tid)
            decode(wd, s, col0, n_embd, k0, K, sm, offs_w, tid, sm)
            cuda.syncthreads()
            if nr > 0 and nc > 0:
                fma_step(sm, row_x, col_w, a, acc)
            cuda.syncthreads()

        for i in range(TM):
            p = ps[offs_pairs + ty + i * ROW_STRIDE]
            if i < nr and 0 <= p < sentinel:
                wp = weights[p]
                for j in range(TN):
                    if j < nc:
                        col = col0 + tx + j * COL_STRIDE
                        v = acc[i * TN + j]
                        if has_bias:
                            v += bd[s, col]
                        y[p, col] = wp * v

    return down


# ------------------------------------------------------------------ tensor-core kernels (MXFP4)
#
# The same grouped layout as the FFMA kernels, with the inner product on tensor cores:
# per K chunk, the tile's activation rows and the decoded weights go to shared memory
# as BF16 (two halves a 32-bit word, K along a row, rows of RS words), and each warp
# computes the block's BM pairs x its warp_cols columns with mma.sync m16n8k16
# (FP32 accumulation). Exact inputs, no scale to fold:
# - an MXFP4 weight is an E2M1 value (at most 2 significant bits) times 2^(e-128); BF16
#   has FP32's exponent range (subnormals included down to 2^-133), so every decoded
#   weight, the E8M0 scale applied, is exactly a BF16: the decoder takes the top half
#   of the float32 the FFMA decoder computes;
# - an activation x (24 significant bits) is split by truncation into three BF16
#   pieces, x = hi + mid + lo exactly (hi: the top 16 bits of x; mid, lo: the same of
#   the exact remainders), and every K step runs three MMAs, one per piece.
# The products are exact in FP32, so the only rounding is the MMA's FP32 accumulation:
# what the FFMA kernels do, in another order. (The FP16 scheme of docs/gpu.md would
# need the E8M0 scale out of the tile and a per-row scale to keep x in FP16's range;
# BF16 needs neither, for one more MMA per step.)

_U32 = np.uint32
_HI16 = np.uint32(0xFFFF0000)


@cuda.jit(device=True, inline=True)
def _bf16_split(x):
    """x = hi + mid + lo exactly, each a BF16 (returned as its 16 bits in a uint32)."""
    u = mma.f32_bits(x)
    hi = u & _HI16
    r = x - mma.bits_f32(hi)
    m = mma.f32_bits(r) & _HI16
    lo = mma.f32_bits(r - mma.bits_f32(m)) & _HI16
    return hi >> _U32(16), m >> _U32(16), lo >> _U32(16)


@functools.lru_cache(maxsize=None)
def _row_splitter(BM, BK, THREADS, RS):
    """Device function loading a tile's BM activation rows (``ps[offs_rows + r]`` indexes
    ``src``; outside [0, n_rows) is padding, zero) for K columns [k0, k0 + BK) as three
    BF16 pieces: word ``c`` of row ``r`` of piece ``q`` at ``su[offs + q*BM*RS + r*RS + c]``
    holds columns 2c (low half) and 2c+1. Consecutive threads take consecutive pairs."""
    KW = BK // 2
    PIECE = BM * RS

    @cuda.jit(device=True, inline=True)
    def split(src, ps, offs_rows, n_rows, k0, K, su, offs, tid):
        for i in range(tid, BM * KW, THREADS):
            idx = _U(i)
            r = idx // _U(KW)
            c = idx - r * _U(KW)
            row = ps[_U(offs_rows) + r]
            w0 = _U32(0)
            w1 = _U32(0)
            w2 = _U32(0)
            if row >= 0 and row < n_rows and _U(2) * c < _U(K - k0):
                kk = _U(k0) + _U(2) * c
                h0, m0, l0 = _bf16_split(src[_U(row), kk])
                h1, m1, l1 = _bf16_split(src[_U(row), kk + _U(1)])
                w0 = h0 | (h1 << _U32(16))
                w1 = m0 | (m1 << _U32(16))
                w2 = l0 | (l1 << _U32(16))
            o = _U(offs) + r * _U(RS) + c
            su[o] = w0
            su[o + _U(PIECE)] = w1
            su[o + _U(2 * PIECE)] = w2
    return split


@functools.lru_cache(maxsize=None)
def tile_fma(BK, TM, TN, ROW_WORDS, ROW_STRIDE, COL_STRIDE):
    """Device function: one K step of a thread's TM x TN register tile from a shared tile of
    BK rows of ROW_WORDS words, x at ``row_x + i*ROW_STRIDE`` and W at ``col_w +
    j*COL_STRIDE`` of each row: ``acc[i*TN + j] += x[i] * w[j]`` (``a``: TM floats of scratch).
    The down kernel and the dense GEMM share it."""
    @cuda.jit(device=True, inline=True)
    def fma_step(sm, row_x, col_w, a, acc):
        for kk in range(BK):
            row = _U(kk * ROW_WORDS)
            for i in range(TM):
                a[i] = sm[row + row_x + _U(i * ROW_STRIDE)]
            for j in range(TN):
                wv = sm[row + col_w + _U(j * COL_STRIDE)]
                for i in range(TM):
                    acc[i * TN + j] += a[i] * wv
    return fma_step


@functools.lru_cache(maxsize=None)
def _mxfp4_bf16_decoder(rows, BK, THREADS, RS):
    """Device function decoding a ``rows x BK`` slice of MXFP4 matrices into BF16 words:
    ``su[off + n*RS + c]`` = W[s][row0 + n, k0 + 2c] (low half) and k0 + 2c + 1 (0 past
    ``n_rows`` or ``K``). One item is two consecutive ``qs`` bytes: elements j, j+1 (low
    nibbles) and j+16, j+17 (high nibbles) of a block, two words. Values are the FFMA
    decoder's float32 ``kvalue * 2^(e-128)``, whose low 16 bits are zero (see above)."""
    NB = BK // 32
    ITEMS = rows * NB * 8
    PER_ROW = _U(NB * 8)
    KV = _U(qc.KV_OFFSET)

    @cuda.jit(device=True, inline=True)
    def decode(w, s, row0, n_rows, k0, K, su, off, tid, tabs):
        sl, r0, nr, kb0, kleft, o = _U(s), _U(row0), _U(n_rows), _U(k0 // 32), _U(K - k0), _U(off)
        for i in range(tid, ITEMS, THREADS):
            idx = _U(i)
            n = idx // PER_ROW
            rem = idx - n * PER_ROW
            b = rem >> _U(3)
            j = (rem & _U(7)) * _U(2)
            lo = _U32(0)
            hi = _U32(0)
            row = r0 + n
            if row < nr and b * _U(32) < kleft:
                base = (kb0 + b) * _U(qc.MXFP4_BYTES)
                d = tabs[w[sl, row, base]]
                q0 = _U(w[sl, row, base + _U(1) + j])
                q1 = _U(w[sl, row, base + _U(2) + j])
                lo = (mma.f32_bits(tabs[KV + (q0 & _U(15))] * d) >> _U32(16)) | \
                     (mma.f32_bits(tabs[KV + (q1 & _U(15))] * d) & _HI16)
                hi = (mma.f32_bits(tabs[KV + (q0 >> _U(4))] * d) >> _U32(16)) | \
                     (mma.f32_bits(tabs[KV + (q1 >> _U(4))] * d) & _HI16)
            dst = o + n * _U(RS) + b * _U(16) + (j >> _U(1))
            su[dst] = lo
            su[dst + _U(8)] = hi
    return decode


def _mma_layout(cfg: TileConfig):
    BM, BN, BK, WN = cfg.block_pairs, cfg.block_cols, cfg.k_chunk, cfg.warp_cols
    return BM, BN, BK, WN, BM // 16, WN // 8, cfg.mma_threads, cfg.mma_row_words


@cuda.jit(device=True, inline=True)
def _real_rows(ps, offs_pairs, bm, sentinel):
    """Rows of a tile holding real pairs (they come first): the same for every thread."""
    n = 0
    for r in range(bm):
        if ps[offs_pairs + r] < sentinel:
            n = r + 1
    return n


@cuda.jit(device=True, inline=True)
def _mma_acc(a0, a1, a2, a3, f, j, acc, i):
    """acc[i:i+4] += the m16n8k16 product of A (a0..a3) and B (f[j], f[j+1]), one warp."""
    d0, d1, d2, d3 = mma.mma_bf16(a0, a1, a2, a3, f[j], f[j + 1], acc[i], acc[i + 1], acc[i + 2], acc[i + 3])
    acc[i] = d0
    acc[i + 1] = d1
    acc[i + 2] = d2
    acc[i + 3] = d3


@functools.lru_cache(maxsize=None)
def _gate_up_mma_kernel(cfg: TileConfig, wtype: int, activation: str, has_bias: bool):
    if int(wtype) not in MMA_TYPES:
        raise NotImplementedError(f"no tensor-core kernel for {qtypes.type_name(wtype)} experts")
    BM, BN, BK, WN, MT, NT, THREADS, RS = _mma_layout(cfg)
    PIECE = BM * RS
    offs_pairs, offs_tokens, offs_x = qc.TABLES, qc.TABLES + BM, qc.TABLES + 2 * BM
    offs_gate = offs_x + 3 * PIECE
    offs_up = offs_gate + BN * RS
    NACC, NF = MT * NT * 4, 2 * NT
    decode = _mxfp4_bf16_decoder(BN, BK, THREADS, RS)
    split = _row_splitter(BM, BK, THREADS, RS)
    act_fn = _swiglu_oai if activation == "swiglu_oai" else _silu_mul

    @cuda.jit
    def gate_up_mma(x, pairs, tile_expert, tile0, slots, k, wg, wu, bg, bu, act):
        """Block = (tile of BM pairs, BN columns of n_ff), THREADS/32 warps; warp w owns
        columns [w*WN, (w+1)*WN): MT x NT m16n8 accumulators for g and for u. Per K chunk:
        x rows (three BF16 pieces, by token) and the decoded Wg, Wu slices to shared
        memory; per 16 of K, each warp loads its B fragments once and runs 3 (pieces) x
        MT x NT MMAs per matrix. m16 row tiles with no real pair are skipped (uniform
        over the block, as the simulator's emulated MMA needs). Epilogue as in gate_up."""
        tile = tile0 + cuda.blockIdx.x
        col0 = cuda.blockIdx.y * BN
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid - warp * 32
        g = lane >> 2
        t = lane & 3
        sentinel = act.shape[0]
        n_ff = act.shape[1]
        K = x.shape[1]
        s = _tile_slot(pairs, tile_expert, slots, tile, BM, sentinel, min(wg.shape[0], wu.shape[0]))
        if s < 0:
            return

        sm = cuda.shared.array(0, types.float32)  # [tables | pair ids | token rows | x pieces | Wg | Wu]
        su = cuda.shared.array(0, types.uint32)
        ps = cuda.shared.array(0, types.int32)
        qc.load_tables(sm, tid, THREADS)
        for r in range(tid, BM, THREADS):
            p = pairs[tile * BM + r]
            ps[offs_pairs + r] = p
            ps[offs_tokens + r] = p // k if p < sentinel else -1
        cuda.syncthreads()
        mt_live = (_real_rows(ps, offs_pairs, BM, sentinel) + 15) // 16
        # Fragment offsets (words) of this lane: row g / column t of each 16x16 or 16x8 block.
        lane_a = _U(offs_x + g * RS + t)
        lane_g = _U(offs_gate + (warp * WN + g) * RS + t)
        lane_u = _U(offs_up + (warp * WN + g) * RS + t)

        # acc: the hi pieces' products; low: mid and lo (2^-8 of them and less), kept apart so
        # the MMA's own FP32 rounding of the big sums happens once per K step, not three times.
        acc_g = cuda.local.array(NACC, np.float32)
        acc_u = cuda.local.array(NACC, np.float32)
        low_g = cuda.local.array(NACC, np.float32)
        low_u = cuda.local.array(NACC, np.float32)
        fg = cuda.local.array(NF, np.uint32)
        fu = cuda.local.array(NF, np.uint32)
        for i in range(NACC):
            acc_g[i] = _ZERO
            acc_u[i] = _ZERO
            low_g[i] = _ZERO
            low_u[i] = _ZERO
        for k0 in range(0, K, BK):
            split(x, ps, offs_tokens, x.shape[0], k0, K, su, offs_x, tid)
            decode(wg, s, col0, n_ff, k0, K, su, offs_gate, tid, sm)
            decode(wu, s, col0, n_ff, k0, K, su, offs_up, tid, sm)
            cuda.syncthreads()
            for ks in range(BK // 16):
                kw = _U(ks * 8)
                for nt in range(NT):
                    o = kw + _U(nt * 8 * RS)
                    fg[2 * nt] = su[lane_g + o]
                    fg[2 * nt + 1] = su[lane_g + o + _U(4)]
                    fu[2 * nt] = su[lane_u + o]
                    fu[2 * nt + 1] = su[lane_u + o + _U(4)]
                for mt in range(MT):
                    if mt < mt_live:
                        for q in range(3):
                            oa = lane_a + _U(q * PIECE + mt * 16 * RS) + kw
                            a0 = su[oa]
                            a1 = su[oa + _U(8 * RS)]
                            a2 = su[oa + _U(4)]
                            a3 = su[oa + _U(8 * RS + 4)]
                            for nt in range(NT):
                                i = (mt * NT + nt) * 4
                                if q == 0:
                                    _mma_acc(a0, a1, a2, a3, fg, 2 * nt, acc_g, i)
                                    _mma_acc(a0, a1, a2, a3, fu, 2 * nt, acc_u, i)
                                else:
                                    _mma_acc(a0, a1, a2, a3, fg, 2 * nt, low_g, i)
                                    _mma_acc(a0, a1, a2, a3, fu, 2 * nt, low_u, i)
            cuda.syncthreads()

        for mt in range(MT):
            for nt in range(NT):
                for i in range(4):
                    row = mt * 16 + g + (i >> 1) * 8
                    col = col0 + warp * WN + nt * 8 + 2 * t + (i & 1)
                    p = ps[offs_pairs + row]
                    if 0 <= p < sentinel and col < n_ff:
                        a = (mt * NT + nt) * 4 + i
                        gv = acc_g[a] + low_g[a]
                        uv = acc_u[a] + low_u[a]
                        if has_bias:
                            gv += bg[s, col]
                            uv += bu[s, col]
                        act[p, col] = act_fn(gv, uv)

    return gate_up_mma


@functools.lru_cache(maxsize=None)
def _down_mma_kernel(cfg: TileConfig, wtype: int, has_bias: bool):
    if int(wtype) not in MMA_TYPES:
        raise NotImplementedError(f"no tensor-core kernel for {qtypes.type_name(wtype)} experts")
    BM, BN, BK, WN, MT, NT, THREADS, RS = _mma_layout(cfg)
    PIECE = BM * RS
    offs_pairs, offs_x = qc.TABLES, qc.TABLES + 2 * BM  # as gate_up (token rows unused)
    offs_w = offs_x + 3 * PIECE
    NACC, NF = MT * NT * 4, 2 * NT
    decode = _mxfp4_bf16_decoder(BN, BK, THREADS, RS)
    split = _row_splitter(BM, BK, THREADS, RS)

    @cuda.jit
    def down_mma(act, pairs, tile_expert, tile0, slots, wd, bd, weights, y):
        """As gate_up_mma with one matrix: rows act[p] of the tile's pairs, Wd over n_ff;
        epilogue: bias, then the routing weight, as in down."""
        tile = tile0 + cuda.blockIdx.x
        col0 = cuda.blockIdx.y * BN
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid - warp * 32
        g = lane >> 2
        t = lane & 3
        sentinel = y.shape[0]
        n_embd = y.shape[1]
        K = act.shape[1]
        s = _tile_slot(pairs, tile_expert, slots, tile, BM, sentinel, wd.shape[0])
        if s < 0:
            return

        sm = cuda.shared.array(0, types.float32)
        su = cuda.shared.array(0, types.uint32)
        ps = cuda.shared.array(0, types.int32)
        qc.load_tables(sm, tid, THREADS)
        for r in range(tid, BM, THREADS):
            ps[offs_pairs + r] = pairs[tile * BM + r]
        cuda.syncthreads()
        mt_live = (_real_rows(ps, offs_pairs, BM, sentinel) + 15) // 16
        lane_a = _U(offs_x + g * RS + t)
        lane_w = _U(offs_w + (warp * WN + g) * RS + t)

        acc = cuda.local.array(NACC, np.float32)  # hi pieces; low: mid and lo (as in gate_up_mma)
        low = cuda.local.array(NACC, np.float32)
        fw = cuda.local.array(NF, np.uint32)
        for i in range(NACC):
            acc[i] = _ZERO
            low[i] = _ZERO
        for k0 in range(0, K, BK):
            split(act, ps, offs_pairs, sentinel, k0, K, su, offs_x, tid)
            decode(wd, s, col0, n_embd, k0, K, su, offs_w, tid, sm)
            cuda.syncthreads()
            for ks in range(BK // 16):
                kw = _U(ks * 8)
                for nt in range(NT):
                    o = kw + _U(nt * 8 * RS)
                    fw[2 * nt] = su[lane_w + o]
                    fw[2 * nt + 1] = su[lane_w + o + _U(4)]
                for mt in range(MT):
                    if mt < mt_live:
                        for q in range(3):
                            oa = lane_a + _U(q * PIECE + mt * 16 * RS) + kw
                            a0 = su[oa]
                            a1 = su[oa + _U(8 * RS)]
                            a2 = su[oa + _U(4)]
                            a3 = su[oa + _U(8 * RS + 4)]
                            for nt in range(NT):
                                i = (mt * NT + nt) * 4
                                if q == 0:
                                    _mma_acc(a0, a1, a2, a3, fw, 2 * nt, acc, i)
                                else:
                                    _mma_acc(a0, a1, a2, a3, fw, 2 * nt, low, i)
            cuda.syncthreads()

        for mt in range(MT):
            for nt in range(NT):
                for i in range(4):
                    row = mt * 16 + g + (i >> 1) * 8
                    col = col0 + warp * WN + nt * 8 + 2 * t + (i & 1)
                    p = ps[offs_pairs + row]
                    if 0 <= p < sentinel and col < n_embd:
                        a = (mt * NT + nt) * 4 + i
                        v = acc[a] + low[a]
                        if has_bias:
                            v += bd[s, col]
                        y[p, col] = weights[p] * v

    return down_mma


_REDUCE_THREADS = 256


@cuda.jit
def _reduce_kernel(y, k, out):
    """Tiling: grid-stride over the T x n_embd outputs, one element per step; its k
    pair rows are summed in j order, so the result does not depend on scheduling
    (no atomics)."""
    n_embd = out.shape[1]
    for i in range(cuda.grid(1), out.shape[0] * n_embd, cuda.gridsize(1)):
        t = i // n_embd
        c = i - t * n_embd
        acc = y[t * k, c]
        for j in range(1, k):
            acc += y[t * k + j, c]
        out[t, c] = acc


# ------------------------------------------------------------------ variants (for compile checks)

# The launch configuration assumes this many resident blocks of each grouped
# kernel per SM (one block's global loads and decode hide behind another's
# FMAs); the ptxas check holds the kernels to it.
MIN_BLOCKS_PER_SM = 2
# Blocks per SM a wave of launches carries: at least two rounds of full
# residency (ptxas gives the MXFP4 kernels 4 resident blocks on sm_90, 3 on
# sm_80), so the tail of a wave, when the in-order stream leaves SMs idle, is a
# small part of it; at gpt-oss shapes on an H100 a layer at ubatch 512 is a
# handful of waves.
WAVE_BLOCKS_PER_SM = 4 * MIN_BLOCKS_PER_SM


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: its name, dispatcher, argument types, block size and dynamic shared bytes."""

    name: str
    kernel: object
    signature: tuple
    threads: int
    shared_bytes: int
    min_blocks_per_sm: int
    math: str = "fma"


def variants(cfg: TileConfig | None = None, full: bool = True) -> list[Variant]:
    """Every kernel the launches can build for ``cfg``, with the argument types
    ``moe_launch``/``moe_reduce`` pass (C-contiguous arrays, int64 scalars).

    ``full=False`` keeps one gate+up build per expert type, together still
    covering both activations and both bias settings (and every down build).
    The tensor-core builds (``math="mma"``, MXFP4) come too when ``cfg`` fits them
    (``TileConfig.mma_unfit``), whatever ``cfg.math`` says: every build a device can pick.
    """
    cfg = TileConfig() if cfg is None else cfg
    A = lambda dt, nd: types.Array(dt, nd, "C")  # noqa: E731
    f32, i32, i64, u8 = types.float32, types.int32, types.int64, types.uint8
    wt = {int(T.MXFP4): A(u8, 3), int(T.Q8_0): A(u8, 3), int(T.F32): A(f32, 3)}
    out = []
    gate_up = [(t, a, b) for t in SUPPORTED for a in ("swiglu_oai", "silu") for b in (True, False)]
    if not full:
        gate_up = [(int(T.MXFP4), "swiglu_oai", True), (int(T.Q8_0), "silu", False), (int(T.F32), "swiglu_oai", False)]
    for t, act, bias in gate_up:
        sig = (A(f32, 2), A(i32, 1), A(i32, 1), i64, A(i32, 1), i64, wt[t], wt[t], A(f32, 2), A(f32, 2), A(f32, 2))
        out.append(Variant(f"gate_up {qtypes.type_name(t)} {act}{' bias' if bias else ''}",
                           _gate_up_kernel(cfg, t, act, bias), sig, cfg.threads, cfg.shared_for(2),
                           MIN_BLOCKS_PER_SM))
    for t in SUPPORTED:
        for bias in (True, False):
            sig = (A(f32, 2), A(i32, 1), A(i32, 1), i64, A(i32, 1), wt[t], A(f32, 2), A(f32, 1), A(f32, 2))
            out.append(Variant(f"down {qtypes.type_name(t)}{' bias' if bias else ''}", _down_kernel(cfg, t, bias),
                               sig, cfg.threads, cfg.shared_for(1), MIN_BLOCKS_PER_SM))
    if cfg.mma_unfit() is None:
        gate_up = [(t, a, b) for t in MMA_TYPES for a in ("swiglu_oai", "silu") for b in (True, False)]
        if not full:
            gate_up = [(t, a, b) for t in MMA_TYPES for a, b in (("swiglu_oai", True), ("silu", False))]
        for t, act, bias in gate_up:
            sig = (A(f32, 2), A(i32, 1), A(i32, 1), i64, A(i32, 1), i64, wt[t], wt[t], A(f32, 2), A(f32, 2),
                   A(f32, 2))
            out.append(Variant(f"gate_up {qtypes.type_name(t)} {act}{' bias' if bias else ''} mma",
                               _gate_up_mma_kernel(cfg, t, act, bias), sig, cfg.mma_threads, cfg.mma_shared_for(2),
                               MIN_BLOCKS_PER_SM, "mma"))
        for t in MMA_TYPES:
            for bias in (True, False):
                sig = (A(f32, 2), A(i32, 1), A(i32, 1), i64, A(i32, 1), wt[t], A(f32, 2), A(f32, 1), A(f32, 2))
                out.append(Variant(f"down {qtypes.type_name(t)}{' bias' if bias else ''} mma",
                                   _down_mma_kernel(cfg, t, bias), sig, cfg.mma_threads, cfg.mma_shared_for(1),
                                   MIN_BLOCKS_PER_SM, "mma"))
    out.append(Variant("reduce", _reduce_kernel, (A(f32, 2), i64, A(f32, 2)), _REDUCE_THREADS, 0, 1))
    return out


# ------------------------------------------------------------------ buckets on the device

@dataclass
class DeviceBuckets:
    """Device copies of a ``Buckets`` layout's ``pairs`` and ``tile_expert``, with the host layout."""

    host: Buckets
    pairs: object  # device int32 [P]
    tile_expert: object  # device int32 [n_tiles]

    @classmethod
    def from_host(cls, buckets: Buckets, stream=0) -> "DeviceBuckets":
        _check_buckets(buckets)
        return cls(buckets, cuda.to_device(buckets.pairs, stream=stream),
                   cuda.to_device(buckets.tile_expert, stream=stream))

    @property
    def n_tiles(self) -> int:
        return self.host.n_tiles

    @property
    def block_size(self) -> int:
        return self.host.block_size

    def tile_range(self, first: int, last: int) -> tuple[int, int]:
        """Tiles ``[begin, end)`` of the experts ``first..last`` (a copy range)."""
        bs, off = self.host.block_size, self.host.offsets
        if not 0 <= first <= last < self.host.n_experts:
            raise ValueError(f"expert range {first}..{last} outside [0, {self.host.n_experts})")
        return int(off[first]) // bs, int(off[last + 1]) // bs


def _check_buckets(b):
    if not isinstance(b, Buckets):
        raise TypeError(f"expected hybrid.moe.routing.Buckets, got {type(b).__name__}")
    P, bs, E = b.pairs.shape[0], b.block_size, b.n_experts
    for name in ("pairs", "tile_expert", "offsets"):
        a = getattr(b, name)
        if not isinstance(a, np.ndarray) or a.dtype != np.int32 or a.ndim != 1:
            raise TypeError(f"Buckets.{name} must be a 1-D int32 array")
    if P % bs or b.tile_expert.shape[0] != P // bs or b.offsets.shape[0] != E + 1 or b.offsets[-1] != P:
        raise ValueError("Buckets: pairs, tile_expert and offsets do not agree with block_size")
    if P and (b.pairs.min() < 0 or b.pairs.max() > b.sentinel):
        raise ValueError(f"Buckets.pairs hold values outside [0, {b.sentinel}]")
    # The kernels take a tile's real pairs to come first: padding only at its tail.
    live = (b.pairs < b.sentinel).reshape(-1, bs)
    if P and (live[:, 1:] & ~live[:, :-1]).any():
        tile = int(np.argmax((live[:, 1:] & ~live[:, :-1]).any(axis=1)))
        raise ValueError(f"Buckets.pairs: tile {tile} has padding before a real pair")
    real = b.pairs[::bs] < b.sentinel if P else np.zeros(0, bool)
    te = b.tile_expert[real]
    if te.size and (te.min() < 0 or te.max() >= E):
        raise ValueError(f"Buckets.tile_expert holds experts outside [0, {E})")


# ------------------------------------------------------------------ launches

def _int(name, v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(v)


def _is_array(a):
    return isinstance(a, np.ndarray) or qc.is_device_array(a)


def _check(name, a, shape, dtype):
    if not _is_array(a):
        raise TypeError(f"{name} must be a numpy or device array, got {type(a).__name__}")
    if np.dtype(a.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def expert_type(w, rows, cols, name="weights"):
    """GGML type of a device expert tensor ``[n_slots, rows, ...]`` from its dtype and row size.

    uint8 rows of ``qtypes.row_nbytes(t, cols)`` bytes are that type (MXFP4, Q8_0, F32);
    float32 rows of ``cols`` are F32.
    """
    if not _is_array(w):
        raise TypeError(f"{name} must be a numpy or device array, got {type(w).__name__}")
    if len(w.shape) != 3 or w.shape[1] != rows or w.shape[0] < 1:
        raise ValueError(f"{name} must be [n_slots >= 1, {rows}, row], got {tuple(w.shape)}")
    dt, rb = np.dtype(w.dtype), w.shape[2]
    if dt == np.float32 and rb == cols:
        return int(T.F32)
    if dt == np.uint8:
        for t in (T.MXFP4, T.Q8_0, T.F32):
            if rb == qtypes.row_nbytes(t, cols):
                return int(t)
    raise ValueError(f"{name}: {dt} rows of {rb} elements are no supported expert type for {cols} "
                     f"columns (" + ", ".join(f"{t.name} {qtypes.row_nbytes(t, cols)} B" for t in (T.MXFP4, T.Q8_0))
                     + f", F32 {cols})")


def _as_kernel_weights(w, wtype):
    # F32 experts may arrive as their raw bytes; the kernel reads float32.
    if wtype == int(T.F32) and np.dtype(w.dtype) == np.uint8:
        return w.view(np.float32)
    return w


def _check_slots(slots, bk, tile_begin, tile_end, n_slots):
    """Host slot maps are checked for the experts the launch touches, then uploaded."""
    E = bk.host.n_experts
    if not _is_array(slots):
        raise TypeError(f"slots must be a numpy or device array, got {type(slots).__name__}")
    if np.dtype(slots.dtype) != np.int32 or tuple(slots.shape) != (E,):
        raise ValueError(f"slots must be int32 [{E}] (expert -> slot), got {slots.dtype} {tuple(slots.shape)}")
    if isinstance(slots, np.ndarray):
        h, bs = bk.host, bk.block_size
        tiles = np.arange(tile_begin, tile_end)
        tiles = tiles[h.pairs[tiles * bs] < h.sentinel]
        used = np.unique(h.tile_expert[tiles])
        bad = used[(slots[used] < 0) | (slots[used] >= n_slots)]
        if bad.size:
            raise ValueError(f"expert {bad[0]} maps to slot {slots[bad[0]]}, outside the {n_slots} device slots")
    # Device slot maps are trusted for values; the kernels skip out-of-range slots.


def moe_launch(x_d, bk_d, tile_begin, tile_end, slots_d, gate_d, up_d, down_d, gate_b_d, up_b_d, down_b_d,
               weights_d, act_d, y_d, *, n_embd, n_ff, k, activation, tiles: TileConfig, stream=0):
    """Kernels 1 (gate+up+activation) and 2 (down, times the routing weight) over tiles
    ``[tile_begin, tile_end)`` of ``bk_d`` (a ``DeviceBuckets`` built with
    ``block_size == tiles.block_pairs``), enqueued on ``stream``.

    x_d float32 [T, n_embd]; slots_d int32 [E] expert -> slot (numpy: checked
    for the experts launched; device: used as is); gate_d/up_d [n_slots, n_ff, ...]
    and down_d [n_slots, n_embd, ...] in MXFP4/Q8_0 (uint8) or F32 (type from
    the row size, see ``expert_type``); biases float32 [n_slots, rows] or None
    (gate and up together); weights_d float32 [T, k] or [T*k]; scratch act_d
    float32 [T*k, n_ff] and y_d float32 [T*k, n_embd], written at the rows of
    the launched pairs only.
    """
    if not isinstance(tiles, TileConfig):
        raise TypeError(f"tiles must be a TileConfig, got {type(tiles).__name__}")
    if not isinstance(bk_d, DeviceBuckets):
        raise TypeError(f"bk_d must be a DeviceBuckets, got {type(bk_d).__name__}")
    check_activation(activation=activation)
    n_embd, n_ff, k = _int("n_embd", n_embd), _int("n_ff", n_ff), _int("k", k)
    tile_begin, tile_end = _int("tile_begin", tile_begin), _int("tile_end", tile_end)
    h = bk_d.host
    if bk_d.block_size != tiles.block_pairs:
        raise ValueError(f"buckets were built with block_size={bk_d.block_size}, "
                         f"tiles need block_pairs={tiles.block_pairs}")
    if k != h.k:
        raise ValueError(f"k={k} but the buckets hold k={h.k}")
    if n_embd < 32 or n_ff < 32 or n_embd % 32 or n_ff % 32:
        raise ValueError(f"n_embd={n_embd} and n_ff={n_ff} must be positive multiples of 32")
    if not 0 <= tile_begin <= tile_end <= bk_d.n_tiles:
        raise ValueError(f"tile range [{tile_begin}, {tile_end}) outside the {bk_d.n_tiles} tiles")
    T_, P = h.n_tokens, h.n_tokens * h.k
    _check("x_d", x_d, (T_, n_embd), np.float32)
    _check("act_d", act_d, (P, n_ff), np.float32)
    _check("y_d", y_d, (P, n_embd), np.float32)
    if _is_array(weights_d) and tuple(weights_d.shape) == (T_, k):
        weights_d = weights_d.reshape(P)
    _check("weights_d", weights_d, (P,), np.float32)
    gt = expert_type(gate_d, n_ff, n_embd, "gate_d")
    ut = expert_type(up_d, n_ff, n_embd, "up_d")
    dt = expert_type(down_d, n_embd, n_ff, "down_d")
    if gt != ut:
        raise ValueError(f"gate_d ({qtypes.type_name(gt)}) and up_d ({qtypes.type_name(ut)}) must share a type")
    n_slots = gate_d.shape[0]
    if up_d.shape[0] != n_slots or down_d.shape[0] != n_slots:
        raise ValueError(f"gate/up/down hold {gate_d.shape[0]}/{up_d.shape[0]}/{down_d.shape[0]} slots; "
                         f"they must agree")
    if (gate_b_d is None) != (up_b_d is None):
        raise ValueError("gate_b_d and up_b_d must both be given or both be None")
    if gate_b_d is not None:
        _check("gate_b_d", gate_b_d, (n_slots, n_ff), np.float32)
        _check("up_b_d", up_b_d, (n_slots, n_ff), np.float32)
    if down_b_d is not None:
        _check("down_b_d", down_b_d, (n_slots, n_embd), np.float32)
    _check_slots(slots_d, bk_d, tile_begin, tile_end, n_slots)
    if isinstance(slots_d, np.ndarray):
        slots_d = cuda.to_device(slots_d, stream=stream)
    n_tiles = tile_end - tile_begin
    if n_tiles == 0:
        return
    m1, m2 = launch_math(tiles, gt), launch_math(tiles, dt)
    if m1 == "mma":
        k1, th1, sh1 = _gate_up_mma_kernel(tiles, gt, activation, gate_b_d is not None), \
            tiles.mma_threads, tiles.mma_shared_for(2)
    else:
        k1, th1, sh1 = _gate_up_kernel(tiles, gt, activation, gate_b_d is not None), tiles.threads, tiles.shared_for(2)
    if m2 == "mma":
        k2, th2, sh2 = _down_mma_kernel(tiles, dt, down_b_d is not None), tiles.mma_threads, tiles.mma_shared_for(1)
    else:
        k2, th2, sh2 = _down_kernel(tiles, dt, down_b_d is not None), tiles.threads, tiles.shared_for(1)
    # Unused bias arguments still need an array of the right type.
    gb = gate_b_d if gate_b_d is not None else _dummy_bias(stream)
    ub = up_b_d if up_b_d is not None else gb
    db = down_b_d if down_b_d is not None else _dummy_bias(stream)
    grid1 = (n_tiles, (n_ff + tiles.block_cols - 1) // tiles.block_cols)
    grid2 = (n_tiles, (n_embd + tiles.block_cols - 1) // tiles.block_cols)
    k1[grid1, th1, stream, sh1](x_d, bk_d.pairs, bk_d.tile_expert, tile_begin, slots_d, k,
                                _as_kernel_weights(gate_d, gt), _as_kernel_weights(up_d, gt), gb, ub, act_d)
    k2[grid2, th2, stream, sh2](act_d, bk_d.pairs, bk_d.tile_expert, tile_begin, slots_d,
                                _as_kernel_weights(down_d, dt), db, weights_d, y_d)


_CC = {}


def device_cc():
    """Compute capability of the current device, or None on the simulator (which emulates the MMA)."""
    if qc.SIMULATOR:
        return None
    key = id(cuda.current_context())
    if key not in _CC:
        _CC[key] = tuple(cuda.get_current_device().compute_capability)
    return _CC[key]


def launch_math(tiles: TileConfig, wtype: int) -> str:
    """``"mma"`` or ``"fma"``: the kernels ``moe_launch`` runs for ``wtype`` experts on this device."""
    cc = device_cc()
    if tiles.math == "mma" and cc is not None and cc < MMA_MIN_CC and int(wtype) in MMA_TYPES:
        raise ValueError(f"TileConfig(math='mma') needs compute capability >= {MMA_MIN_CC[0]}.{MMA_MIN_CC[1]} "
                         f"(mma.sync with BF16), this device has {cc[0]}.{cc[1]}; use math='auto' or 'fma'")
    math = tiles.math_for(wtype, cc)
    if math == "mma" and tiles.math == "auto" and cc is not None:  # trusted only once seen to work here
        if not mma.instruction_ok(id(cuda.current_context())):
            return "fma"
    return math


_DUMMY = {}


def _dummy_bias(stream):
    # One per context, so a launch without biases allocates nothing.
    key = id(cuda.current_context())
    if key not in _DUMMY:
        _DUMMY[key] = cuda.device_array((1, 1), np.float32)
    return _DUMMY[key]


def moe_reduce(y_d, out_d, k, stream=0):
    """Kernel 3: ``out_d[t] = sum_j y_d[t*k + j]`` in j order (bitwise reproducible)."""
    k = _int("k", k)
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if not _is_array(out_d) or len(out_d.shape) != 2:
        raise ValueError("out_d must be a 2-D float32 array [T, n_embd]")
    T_, D = out_d.shape
    _check("out_d", out_d, (T_, D), np.float32)
    _check("y_d", y_d, (T_ * k, D), np.float32)
    n = T_ * D
    if n:
        _reduce_kernel[qc.grid_blocks(n, _REDUCE_THREADS), _REDUCE_THREADS, stream](y_d, k, out_d)
