"""The FFMA grouped expert kernels: gate+up+activation and down (every format with a CUDA tile
decoder; ``hybrid.kernels.cuda.experts`` launches them). Weights are decoded per K chunk into
shared memory by the format's tile decoder (``quant.cuda.tile_decoder``), then each thread
accumulates a register tile with exact float32 products.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, types

from quant import cuda as qc

from ...moe.activation import silu_f32, swiglu_oai_f32
from .tiles import TileConfig, block_thread as _block_thread, extent as _extent, row_gatherer as _row_gatherer
from .tiles import tile_fma, tile_slot as _tile_slot

_F32 = np.float32
_U = np.uint64
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
swiglu_oai = cuda.jit(device=True, inline=True)(swiglu_oai_f32)
silu_mul = cuda.jit(device=True, inline=True)(silu_f32)
_swiglu_oai, _silu_mul = swiglu_oai, silu_mul


@functools.lru_cache(maxsize=None)
def gate_up_kernel(cfg: TileConfig, wtype: int, activation: str, has_bias: bool):
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
        tile, col0, tid, ty, tx = _block_thread(tile0, BN, COL_STRIDE)
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
def down_kernel(cfg: TileConfig, wtype: int, has_bias: bool):
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
        tile, col0, tid, ty, tx = _block_thread(tile0, BN, COL_STRIDE)
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


