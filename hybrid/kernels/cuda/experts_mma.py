"""The tensor-core grouped expert kernels (``mma.sync`` m16n8k16, BF16 in, FP32 accumulation) for
the formats whose registry entry has ``mma`` and a ``cuda_bf16_tile`` decoder (MXFP4).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, types

from quant import cuda as qc
from quant import registry as qregistry
from quant import types as qtypes
from quant.bits import bits_f32, f32_bits

from . import mma
from .experts_fma import silu_mul as _silu_mul, swiglu_oai as _swiglu_oai
from .tiles import TileConfig, tile_row as _tile_row, tile_slot as _tile_slot

_F32 = np.float32
_U = np.uint64
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)

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
    """x = hi + mid + lo, each a BF16 (returned as its 16 bits in a uint32): exact for finite
    |x| >= 2^-110 (below, the third piece's bits fall under BF16's subnormals and are cut);
    +-Inf gives NaN pieces (Inf - Inf), so an infinite activation yields NaN, as NaN does."""
    u = f32_bits(x)
    hi = u & _HI16
    r = x - bits_f32(hi)
    m = f32_bits(r) & _HI16
    lo = f32_bits(r - bits_f32(m)) & _HI16
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
            r, c, row = _tile_row(i, KW, ps, offs_rows)
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
def gate_up_mma_kernel(cfg: TileConfig, wtype: int, activation: str, has_bias: bool):
    if not qregistry.has(wtype, "mma"):
        raise NotImplementedError(f"no tensor-core kernel for {qtypes.type_name(wtype)} experts")
    BM, BN, BK, WN, MT, NT, THREADS, RS = _mma_layout(cfg)
    PIECE = BM * RS
    offs_pairs, offs_tokens, offs_x = qc.TABLES, qc.TABLES + BM, qc.TABLES + 2 * BM
    offs_gate = offs_x + 3 * PIECE
    offs_up = offs_gate + BN * RS
    NACC, NF = MT * NT * 4, 2 * NT
    decode = qregistry.get(wtype).cuda_bf16_tile(BN, BK, THREADS, RS)
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
def down_mma_kernel(cfg: TileConfig, wtype: int, has_bias: bool):
    if not qregistry.has(wtype, "mma"):
        raise NotImplementedError(f"no tensor-core kernel for {qtypes.type_name(wtype)} experts")
    BM, BN, BK, WN, MT, NT, THREADS, RS = _mma_layout(cfg)
    PIECE = BM * RS
    offs_pairs, offs_x = qc.TABLES, qc.TABLES + 2 * BM  # as gate_up (token rows unused)
    offs_w = offs_x + 3 * PIECE
    NACC, NF = MT * NT * 4, 2 * NT
    decode = qregistry.get(wtype).cuda_bf16_tile(BN, BK, THREADS, RS)
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


