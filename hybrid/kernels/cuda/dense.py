"""Dense weights on the device (numba-cuda), in the type the file holds: ``DeviceDense``.

The device twin of ``dense.Dense``: the stored bytes of ``W [rows, cols]`` are
uploaded once and decoded inside the kernels (``quant.cuda.pair_reader`` and the
tile decoders), never expanded in VRAM. ``matmul(x) = x @ W.T`` picks a kernel by
the number of tokens T:

- T <= ``DenseTiles.gemv_tokens`` (decode steps): a GEMV. A warp owns
  ``gemv_rows`` weight rows; its lanes walk the rows' items (two values each, two
  quant blocks a warp step: coalesced), so each weight byte is read once, decoded in
  registers and used for all T tokens; a shuffle reduction ends each row.
- larger T (prompts): a tiled GEMM, weights decoded into shared-memory tiles and
  register tiles per thread, as ``hybrid.kernels.cuda.experts`` does for the experts.

``rows(ids)`` decodes the rows ``ids`` (the embedding lookup).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numba import cuda, types

from quant import cuda as qc
from quant import registry as qregistry
from quant import types as qtypes

from ..cpu.dense import Dense
from .tiles import MIN_BLOCKS_PER_SM, TileConfig, Variant, tile_fma
from .ops import WARP, check_device, scratch_words, warp_sum

__all__ = ["DeviceDense", "DenseTiles", "variants"]

_U = np.uint64
_ZERO = np.float32(0.0)
_NAN = np.float32(np.nan)
_ROWS_THREADS = 256  # block size of the row lookup


@dataclass(frozen=True)
class DenseTiles:
    """Tile sizes of the dense kernels (compile-time constants; one build per config).

    GEMV (T <= gemv_tokens; one build per T): ``gemv_warps`` warps a block, each owning
    ``gemv_rows`` weight rows: T x gemv_rows accumulators per lane.
    GEMM: the experts' ``TileConfig``, read with tokens for pairs: a block computes
    ``block_pairs`` tokens x ``block_cols`` weight rows over K steps of ``k_chunk``; a
    thread owns ``thread_rows`` x ``thread_cols`` of them. The default (32 x 64, K 32,
    4 x 4: 128 threads) needs 13.5 KB of shared memory.
    """

    gemv_tokens: int = 8
    gemv_warps: int = 4
    gemv_rows: int = 2
    gemm: TileConfig = TileConfig()

    def __post_init__(self):
        for name in ("gemv_tokens", "gemv_warps", "gemv_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"DenseTiles.{name} must be a positive int, got {v!r}")
        if not isinstance(self.gemm, TileConfig):
            raise ValueError(f"DenseTiles.gemm must be a TileConfig, got {type(self.gemm).__name__}")
        if self.gemv_threads > 1024:
            raise ValueError(f"DenseTiles gives {self.gemv_threads} GEMV threads per block (1..1024)")

    @property
    def gemv_threads(self) -> int:
        return self.gemv_warps * WARP

    def gemv_shared_bytes(self, n_tok: int) -> int:
        return 4 * (qc.TABLES + scratch_words(self.gemv_threads, n_tok * self.gemv_rows))

    @property
    def gemm_shared_bytes(self) -> int:
        """The decode tables, then the shared tile [k_chunk][x | W] (``TileConfig.row_words(1)``)."""
        return 4 * (qc.TABLES + self.gemm.k_chunk * self.gemm.row_words(1))


# ------------------------------------------------------------------ kernels

@cuda.jit(device=True, inline=True)
def _gemv_finish(acc, n_acc, scratch, tid, threads, lane, out, row0, n_rows, R, NT):
    """Both GEMVs' end: reduce each of a warp's NT x R sums over its lanes, lane 0 writes them."""
    warp_sum(acc, n_acc, scratch, tid, threads)
    if lane == 0:
        for r in range(R):
            if row0 + r < n_rows:
                for t in range(NT):
                    out[t, row0 + r] = acc[t * R + r]


@functools.lru_cache(maxsize=None)
def _gemv_kernel(tiles: DenseTiles, wtype: int, n_tok: int):
    if not qregistry.has(wtype, "cuda_pair"):
        return _gemv_blocks_kernel(tiles, wtype, n_tok)
    WARPS, R, NT = tiles.gemv_warps, tiles.gemv_rows, n_tok
    THREADS, ACC = tiles.gemv_threads, n_tok * tiles.gemv_rows
    offs_scratch = qc.TABLES
    read = qc.pair_reader(wtype)

    @cuda.jit
    def gemv(x, w, out):
        """Tiling: warp ``warp`` of block b owns weight rows row0 .. row0 + R - 1, row0 =
        (b*WARPS + warp)*R. Lane ``lane`` takes items lane, lane + 32, ... of those rows
        (item i: columns c = 32*(i//16) + i%16 and c + 16), reads x[t, c], x[t, c + 16] once
        for all R rows and keeps NT x R sums in registers; warp_sum reduces each, lane 0
        writes out[t, row]. Rows past the matrix read nothing but join the reductions."""
        tid = cuda.threadIdx.x
        warp = tid // WARP
        lane = tid - warp * WARP
        row0 = (cuda.blockIdx.x * WARPS + warp) * R
        n_rows = w.shape[1]
        K = x.shape[1]
        n_items = (K + 31) // 32 * 16
        sm = cuda.shared.array(0, types.float32)  # [tables | warp_sum scratch (simulator)]
        qc.load_tables(sm, tid, THREADS)
        cuda.syncthreads()
        scratch = sm[offs_scratch:]

        acc = cuda.local.array(ACC, np.float32)
        xlo = cuda.local.array(NT, np.float32)
        xhi = cuda.local.array(NT, np.float32)
        for a in range(ACC):
            acc[a] = _ZERO
        if row0 < n_rows:
            for item in range(lane, n_items, WARP):
                c_lo = _U(((item >> 4) << 5) + (item & 15))
                c_hi = c_lo + _U(16)
                for t in range(NT):
                    xlo[t] = x[t, c_lo] if c_lo < _U(K) else _ZERO
                    xhi[t] = x[t, c_hi] if c_hi < _U(K) else _ZERO
                for r in range(R):
                    if row0 + r < n_rows:
                        lo, hi = read(w, 0, row0 + r, item, K, sm)
                        for t in range(NT):
                            acc[t * R + r] += xlo[t] * lo + xhi[t] * hi
        _gemv_finish(acc, ACC, scratch, tid, THREADS, lane, out, row0, n_rows, R, NT)

    return gemv


@functools.lru_cache(maxsize=None)
def _gemv_blocks_kernel(tiles: DenseTiles, wtype: int, n_tok: int):
    """The GEMV of a format read through its block decoder (no pair reader: the K- and i-quants)."""
    f = qregistry.get(wtype)
    dec, B, BB = f.cuda_decode_block, f.block, f.block_bytes
    WARPS, R, NT = tiles.gemv_warps, tiles.gemv_rows, n_tok
    THREADS, ACC = tiles.gemv_threads, n_tok * tiles.gemv_rows
    offs_scratch = qc.TABLES

    @cuda.jit
    def gemv(x, w, out):
        """Tiling: warp ``warp`` of block b owns weight rows row0 .. row0 + R - 1, row0 =
        (b*WARPS + warp)*R, as the pair GEMV; lane ``lane`` takes whole quant blocks lane,
        lane + 32, ... of each row (a warp step reads 32 consecutive blocks), decodes each
        once into local memory and uses it for all NT tokens; warp_sum reduces each sum."""
        tid = cuda.threadIdx.x
        warp = tid // WARP
        lane = tid - warp * WARP
        row0 = (cuda.blockIdx.x * WARPS + warp) * R
        n_rows = w.shape[1]
        n_blk = x.shape[1] // B
        sm = cuda.shared.array(0, types.float32)  # [tables | warp_sum scratch (simulator)]
        scratch = sm[offs_scratch:]

        acc = cuda.local.array(ACC, np.float32)
        buf = cuda.local.array(B, np.float32)
        for a in range(ACC):
            acc[a] = _ZERO
        if row0 < n_rows:
            for blk in range(lane, n_blk, WARP):
                c0 = blk * B
                for r in range(R):
                    if row0 + r < n_rows:
                        dec(w[0, row0 + r], np.int64(blk * BB), buf, 0)
                        for t in range(NT):
                            part = _ZERO
                            for j in range(B):
                                part += x[t, c0 + j] * buf[j]
                            acc[t * R + r] += part
        _gemv_finish(acc, ACC, scratch, tid, THREADS, lane, out, row0, n_rows, R, NT)

    return gemv


@functools.lru_cache(maxsize=None)
def _gemm_kernel(cfg: TileConfig, wtype: int):
    BM, BN, BK = cfg.block_pairs, cfg.block_cols, cfg.k_chunk  # tokens, weight rows, K step
    TM, TN = cfg.thread_rows, cfg.thread_cols
    ROW_STRIDE, COL_STRIDE = BM // TM, BN // TN
    THREADS, ACC = cfg.threads, TM * TN
    ROW_WORDS = cfg.row_words(1)
    offs_x = qc.TABLES  # shared tile after the decode tables: [BK][x (BM) | W (BN)]
    offs_w = offs_x + BM
    decode = qc.dense_tile_decoder(wtype, BN, BK, THREADS, ROW_WORDS)
    fma_step = tile_fma(BK, TM, TN, ROW_WORDS, ROW_STRIDE, COL_STRIDE)

    @cuda.jit
    def gemm(x, w, out):
        """Tiling: block (blockIdx.x, blockIdx.y) = (BM tokens from tok0, BN weight rows
        from col0: output columns). Per K step of BK, the shared tile [BK][BM | BN] holds
        x[tok0:tok0+BM, k0:k0+BK] (offs_x) and the decoded W[col0:col0+BN, k0:k0+BK]
        (offs_w), both transposed: reduction index first, rows of ROW_WORDS words. A
        thread accumulates TM x TN outputs at tokens ty + i*ROW_STRIDE, columns
        tx + j*COL_STRIDE; consecutive threads write consecutive columns."""
        tok0 = cuda.blockIdx.x * BM
        col0 = cuda.blockIdx.y * BN
        tid = cuda.threadIdx.x
        ty = tid // COL_STRIDE
        tx = tid - ty * COL_STRIDE
        n_tok, K = x.shape
        n_cols = out.shape[1]
        sm = cuda.shared.array(0, types.float32)
        qc.load_tables(sm, tid, THREADS)
        cuda.syncthreads()
        row_x = _U(offs_x + ty)
        col_w = _U(offs_w + tx)

        acc = cuda.local.array(ACC, np.float32)
        a = cuda.local.array(TM, np.float32)
        for i in range(ACC):
            acc[i] = _ZERO
        for k0 in range(0, K, BK):
            # x tile, transposed; consecutive threads read consecutive columns of a row
            for i in range(tid, BM * BK, THREADS):
                r = _U(i) // _U(BK)
                kk = _U(i) - r * _U(BK)
                v = _ZERO
                if _U(tok0) + r < _U(n_tok) and _U(k0) + kk < _U(K):
                    v = x[_U(tok0) + r, _U(k0) + kk]
                sm[_U(offs_x) + kk * _U(ROW_WORDS) + r] = v
            decode(w, 0, col0, n_cols, k0, K, sm, offs_w, tid, sm)
            cuda.syncthreads()
            fma_step(sm, row_x, col_w, a, acc)
            cuda.syncthreads()

        for i in range(TM):
            tok = tok0 + ty + i * ROW_STRIDE
            if tok < n_tok:
                for j in range(TN):
                    col = col0 + tx + j * COL_STRIDE
                    if col < n_cols:
                        out[tok, col] = acc[i * TN + j]

    return gemm


@functools.lru_cache(maxsize=None)
def _rows_kernel(wtype: int):
    if not qregistry.has(wtype, "cuda_pair"):
        return _rows_blocks_kernel(wtype)
    read = qc.pair_reader(wtype)

    @cuda.jit
    def rows(w, ids, out):
        """Tiling: grid-stride over (id, item) pairs of the output rows; item i gives
        columns c = 32*(i//16) + i%16 and c + 16. An id outside the matrix gives a row
        of NaN (ids on the device are not checked on the host)."""
        sm = cuda.shared.array(0, types.float32)
        qc.load_tables(sm, cuda.threadIdx.x, cuda.blockDim.x)
        cuda.syncthreads()
        K = out.shape[1]
        per_row = (K + 31) // 32 * 16
        for idx in range(cuda.grid(1), ids.shape[0] * per_row, cuda.gridsize(1)):
            n = idx // per_row
            item = idx - n * per_row
            c_lo = ((item >> 4) << 5) + (item & 15)
            row = ids[n]
            lo = _NAN
            hi = _NAN
            if 0 <= row < w.shape[1]:
                lo, hi = read(w, 0, row, item, K, sm)
            if c_lo < K:
                out[n, c_lo] = lo
            if c_lo + 16 < K:
                out[n, c_lo + 16] = hi

    return rows


@functools.lru_cache(maxsize=None)
def _rows_blocks_kernel(wtype: int):
    """The row lookup of a format read through its block decoder."""
    f = qregistry.get(wtype)
    dec, B, BB = f.cuda_decode_block, f.block, f.block_bytes

    @cuda.jit
    def rows(w, ids, out):
        """Tiling: grid-stride over (id, quant block) pairs; each decodes straight into its
        output row. An id outside the matrix gives a row of NaN."""
        per_row = out.shape[1] // B
        for idx in range(cuda.grid(1), ids.shape[0] * per_row, cuda.gridsize(1)):
            n = idx // per_row
            blk = idx - n * per_row
            row = ids[n]
            if 0 <= row < w.shape[1]:
                dec(w[0, row], np.int64(blk * BB), out[n], blk * B)
            else:
                for j in range(B):
                    out[n, blk * B + j] = _NAN

    return rows


# ------------------------------------------------------------------ the weight

class DeviceDense:
    """A dense weight W [rows, cols] on the device, in the file's type (the stored bytes, uploaded once).

    ``tiles`` sets the kernels' tile sizes (``DenseTiles``; the default suits a GPU).
    """

    def __init__(self, dense: Dense, stream=0, *, tiles: DenseTiles | None = None):
        if not isinstance(dense, Dense):
            raise TypeError(f"expected a hybrid.kernels.cpu.dense.Dense, got {type(dense).__name__}")
        tiles = DenseTiles() if tiles is None else tiles
        if not isinstance(tiles, DenseTiles):
            raise TypeError(f"tiles must be a DenseTiles, got {type(tiles).__name__}")
        if dense.ggml_type not in qc.dense_types():
            raise TypeError(f"tensor {dense.name}: type {qtypes.type_name(dense.ggml_type)} has no device kernels "
                            f"(supported: {', '.join(qtypes.type_name(t) for t in qc.dense_types())})")
        self.name, self.ggml_type, self.shape, self.tiles = dense.name, dense.ggml_type, dense.shape, tiles
        rows = self.shape[0]
        raw = np.ascontiguousarray(dense.raw)
        self._raw = cuda.to_device(raw, stream=stream)  # [rows, row_bytes] uint8, as stored
        # what the kernels read: [1, rows, n] of the type's element (quant.cuda.pair_reader)
        self._w = self._raw.view(qc.dense_dtype(self.ggml_type)).reshape(1, rows, -1) if rows else None

    @property
    def nbytes(self) -> int:
        """Device bytes this weight holds."""
        return int(self._raw.size)

    @staticmethod
    def nbytes_for(dense: Dense) -> int:
        """Device bytes a ``DeviceDense`` of ``dense`` will hold (VRAM accounting before uploading)."""
        if not isinstance(dense, Dense):
            raise TypeError(f"expected a hybrid.kernels.cpu.dense.Dense, got {type(dense).__name__}")
        return int(dense.nbytes)

    def __repr__(self):
        return (f"DeviceDense({self.name!r}, {qtypes.type_name(self.ggml_type)}, shape={self.shape}, "
                f"{self.nbytes} B)")

    def matmul(self, x, out=None, stream=0):
        """``x @ W.T``: device float32 ``x [T, cols]`` (C-contiguous) -> device float32 ``[T, rows]``
        (into ``out`` if given). GEMV up to ``tiles.gemv_tokens`` tokens, else the GEMM."""
        rows, cols = self.shape
        check_device("x", x, np.float32, ndims=(2,))
        if x.shape[1] != cols:
            raise ValueError(f"{self.name}: x must be [T, {cols}], got {tuple(x.shape)}")
        n_tok = x.shape[0]
        if out is None:
            out = cuda.device_array((n_tok, rows), np.float32, stream=stream)
        check_device("out", out, np.float32, shape=(n_tok, rows))
        if n_tok == 0 or rows == 0:
            return out
        t = self.tiles
        if n_tok <= t.gemv_tokens:
            grid = -(-rows // (t.gemv_warps * t.gemv_rows))
            kernel = _gemv_kernel(t, self.ggml_type, n_tok)
            kernel[grid, t.gemv_threads, stream, t.gemv_shared_bytes(n_tok)](x, self._w, out)
        else:
            grid = (-(-n_tok // t.gemm.block_pairs), -(-rows // t.gemm.block_cols))
            kernel = _gemm_kernel(t.gemm, self.ggml_type)
            kernel[grid, t.gemm.threads, stream, t.gemm_shared_bytes](x, self._w, out)
        return out

    def rows(self, ids, out=None, stream=0):
        """Rows ``ids`` (device int32 ``[n]``, checked on the host by the caller; an id outside
        the matrix gives a row of NaN, never a wild read) -> device float32 ``[n, cols]``."""
        check_device("ids", ids, np.int32, ndims=(1,))
        n, cols = ids.shape[0], self.shape[1]
        if out is None:
            out = cuda.device_array((n, cols), np.float32, stream=stream)
        check_device("out", out, np.float32, shape=(n, cols))
        if n == 0 or cols == 0:
            return out
        if self._w is None:
            raise ValueError(f"{self.name}: no rows to look up in an empty matrix")
        # items: value pairs (pair readers) or whole quant blocks (block decoders)
        per_row = -(-cols // 32) * 16 if qregistry.has(self.ggml_type, "cuda_pair") else \
            cols // qregistry.block_size(self.ggml_type)
        _rows_kernel(self.ggml_type)[qc.grid_blocks(n * per_row, _ROWS_THREADS), _ROWS_THREADS, stream,
                                     4 * qc.TABLES](self._w, ids, out)
        return out


# ------------------------------------------------------------------ variants (for compile checks)

def variants(tiles: DenseTiles | None = None, gemv_tokens=(1, 8)):
    """Every dense kernel build for ``tiles`` (GEMV at the token counts ``gemv_tokens``), with the
    argument types ``DeviceDense`` passes (``kernels.Variant``)."""
    tiles = DenseTiles() if tiles is None else tiles
    A = lambda dt, nd: types.Array(dt, nd, "C")  # noqa: E731
    f32 = types.float32
    out = []
    for t in qc.dense_types():
        w = A(getattr(types, qc.dense_dtype(t).name), 3)
        name = qtypes.type_name(t)
        for n in gemv_tokens:
            out.append(Variant(f"dense gemv {name} T={n}", _gemv_kernel(tiles, t, n), (A(f32, 2), w, A(f32, 2)),
                               tiles.gemv_threads, 4 * qc.TABLES, 1))
        out.append(Variant(f"dense gemm {name}", _gemm_kernel(tiles.gemm, t), (A(f32, 2), w, A(f32, 2)),
                           tiles.gemm.threads, tiles.gemm_shared_bytes, MIN_BLOCKS_PER_SM))
        out.append(Variant(f"dense rows {name}", _rows_kernel(t), (w, A(types.int32, 1), A(f32, 2)),
                           _ROWS_THREADS, 4 * qc.TABLES, 1))
    return out
