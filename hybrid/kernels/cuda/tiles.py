"""What the grouped expert kernels and the dense GEMM share: ``TileConfig`` (tile sizes),
``Variant`` (one build, for the compile checks), the resident-block counts the launches
assume, and the device helpers every kernel calls (tile slot, extents, the row gatherer,
the register-tile K step ``tile_fma``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numba import cuda

from quant import cuda as qc
from quant import registry as qregistry

from . import mma

MATHS = ("auto", "fma", "mma")
MMA_MIN_CC = (8, 0)  # mma.sync m16n8k16 with BF16 inputs: Ampere and later
K_ALIGN = 16  # k_chunk steps: the MMA's K (each format's tiles also need whole blocks, checked per build)
_U = np.uint64
_ZERO = np.float32(0.0)
_SMEM_LIMIT = 48 * 1024  # static shared memory per block


# ------------------------------------------------------------------ tile sizes

@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the grouped kernels (compile-time constants; one build per config).

    block_pairs: pairs per tile (the ``block_size`` of the buckets), M of a block.
    block_cols:  output columns per block, N. k_chunk: reduction step, K (a multiple of 16
    and of the weights' block).
    thread_rows x thread_cols: the register tile of one thread (strided, so a
    warp reads consecutive shared-memory words). Threads per block =
    (block_pairs / thread_rows) * (block_cols / thread_cols).

    The default (32x64, K 32, 4x4: 128 threads, 4x4x2 accumulators) needs
    21 KB of shared memory for gate+up and 14 KB for down, so several blocks
    share an H100 SM (ptxas: ~124 registers, no spills), and 32 pairs per
    tile match gpt-oss's typical 16-40 pairs per used expert at ubatch 512.

    math: the arithmetic of the kernels, ``"fma"`` (FFMA, every expert type, exact
    float32 products), ``"mma"`` (tensor cores, ``mma.sync`` m16n8k16 BF16 with
    FP32 accumulation, for the formats with ``mma`` in the registry; others keep FFMA) or
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
        if self.k_chunk % K_ALIGN:
            raise ValueError(f"TileConfig.k_chunk={self.k_chunk} must be a multiple of {K_ALIGN} (the MMA's K; "
                             f"a format's kernels also need whole blocks)")
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
        if self.math == "fma" or not qregistry.has(wtype, "mma"):
            return "fma"
        if self.math == "mma":
            return "mma"
        return "mma" if cc is not None and tuple(cc) >= MMA_MIN_CC and self.mma_unfit() is None else "fma"


# ------------------------------------------------------------------ device helpers

@cuda.jit(device=True, inline=True)
def tile_slot(pairs, tile_expert, slots, tile, bm, sentinel, n_slots):
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
def block_thread(tile0, bn, col_stride):
    """(tile, first column, thread, its row and column in the block's thread grid) of an FMA
    expert kernel's block: block (x, y) = (tile0 + x, columns from y * bn)."""
    tid = cuda.threadIdx.x
    ty = tid // col_stride
    return tile0 + cuda.blockIdx.x, cuda.blockIdx.y * bn, tid, ty, tid - ty * col_stride


@cuda.jit(device=True, inline=True)
def extent(ps, row0, rs, tm, sentinel, col0, cs, tn, n_cols):
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


@cuda.jit(device=True, inline=True)
def tile_row(i, width, ps, offs_rows):
    """Item ``i`` of a loop over a tile's rows, ``width`` items a row: (row r of the tile, item
    c in it, the source row ``ps[offs_rows + r]``); uint64 offsets, as the loaders index."""
    idx = _U(i)
    r = idx // _U(width)
    c = idx - r * _U(width)
    return r, c, ps[_U(offs_rows) + r]


@functools.lru_cache(maxsize=None)
def row_gatherer(BM, BK, THREADS, ROW_WORDS):
    """Device function loading the activation rows of a tile, transposed: for the tile's BM
    rows ``ps[offs_rows + r]`` (an index into ``src``; outside [0, n_rows) is padding),
    ``sm[offs_x + c*ROW_WORDS + r] = src[row, k0 + c]`` for c < BK (0 past K or padding).
    Consecutive threads take consecutive columns of a row, so global reads coalesce."""
    @cuda.jit(device=True, inline=True)
    def gather(src, ps, offs_rows, n_rows, k0, K, sm, offs_x, tid):
        for i in range(tid, BM * BK, THREADS):
            r, c, row = tile_row(i, BK, ps, offs_rows)
            v = _ZERO
            if row >= 0 and row < n_rows and c < _U(K - k0):
                v = src[_U(row), _U(k0) + c]
            sm[_U(offs_x) + c * _U(ROW_WORDS) + r] = v
    return gather


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


# ------------------------------------------------------------------ builds (for compile checks)

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


