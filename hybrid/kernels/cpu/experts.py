"""CPU expert kernels: one MoE layer's FFN on the host, reading expert weights in place (arrays in,
arrays out; ``hybrid.moe.cpu`` is the layer-level API over them).

Tokens are grouped by expert (pairs t*k+j, as hybrid.moe.routing buckets them) and
gathered into aligned rows. Work is cut into items (expert e, tile of
``CpuTiles.rows`` output rows): an item computes its rows for every token routed
to e, so each weight byte comes from RAM once per call and is reused from
L1/L2 for all of the expert's tokens. Items are ordered row-tile-major and cut
into a few equal-cost chunks per thread, so skewed routing still balances.

Inside an item, three ways to multiply:
- int8 (every quantised format, AVX2 or AVX-512: the formats with an ``int8_block`` or, for
  super-blocks of 256, ``int8_scales``; experts with
  at most ``q8_tokens`` tokens in the call, by default the format's measured crossover
  ``Q8_MAX_TOKENS``: every decode step, and the lightly used experts of a prompt): as ggml does,
  the activations are quantised once per call to int8 blocks of 32 (ggml's Q8_0 rounding, float32
  scales; ``quant.cpu.quantize_q8``; for the formats with integer sub-block scales, ``int8_scales``,
  one scale per super-block of 256 as ggml's Q8_K, ``quantize_q8k``, so a row's 8 sub-block
  dots add up in integers under their scales and the floats come once per 256), the weights'
  blocks become unsigned bytes (nibbles through a
  16-entry vpshufb table, Q8_0's codes with the sign bit flipped, the K-quants' bit fields), integer
  multiply-adds (vpmaddubsw/vpmaddwd, or vpdpbusd with VNNI) give each block's exact sum, scaled by
  the block scale * d_x into float32 accumulators (minus, for a format with a min, min * d_x * the
  token block's code sum).
  It matches the float64 reference of the quantised
  activations to float32 rounding; against unquantised activations it differs
  by the int8 rounding (at gpt-oss shapes 5e-3 of the largest output per
  matrix, 9e-3 for the FFN; examples/bench_experts.py prints it).
- direct (MXFP4, fewer than ``tile_min`` tokens): decode each 32-weight block
  in registers (vpermps on the 16-entry table times the block scale) and FMA it
  into R rows x T tokens (T <= 8) of accumulators, one pass over the weights
  per 8 tokens; K in chunks of ``kc_direct`` blocks keeps the x chunk in L1.
- tile (other types, or many tokens): decode rows x ``kc_tile`` columns into
  an aligned float32 buffer (L2), then an R x T float32 kernel over it.
The direct and tile ways accumulate float32 products of float32 activations.
Gate and up share an item, their activation is fused, down runs after; the k
choices of a token are summed in slot order (deterministic, no atomics).

The kernels are LLVM IR from ``hybrid.kernels.cpu.ir`` (numba's vectoriser cannot do the
nibble lookup well); the host's best variant is compiled in (``ISA``), the
others are testable through ``make_mx_dot``/``make_mx_decode``. Formats are
read through ``quant.cpu`` (the decoder generated from the registry; the consumers
compile through ``quant.registry.jit``). Over 500 lines because the three ways, the
work split and the edge checks are one numba call graph: ``_grouped`` inlines them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numba as nb
import numpy as np

from quant import cpu as qcpu, jitcache, registry as qregistry, types as qtypes

from .ir import W, best_isa, make_act, make_f32_dot, make_mx_dot, make_q8_dot, q8_isa, q8_types, q8s_types
from ...moe.activation import ACT_CODE, silu_f32, swiglu_oai_f32
from ...moe.routing import bucket

__all__ = ["mul_mat_id", "moe_ffn", "check_experts", "check_tiles", "check_block", "check_x", "check_routing",
           "check_out", "CpuTiles", "TILES", "F32_TILES", "Q8_MAX_TOKENS", "q8_max_tokens", "ISA"]

# ---------------------------------------------------------------- tile sizes
@dataclass(frozen=True)
class CpuTiles:
    """Blocking of the CPU path (data, not code: the kernels take them at run time)."""

    rows: int = 64        # output rows per item (a multiple of 4, every kernel's R)
    kc_direct: int = 32   # MXFP4 blocks per K chunk in the direct path (>= 8 tokens: x chunk in L1)
    kc_tile: int = 0      # columns per decoded float32 tile (a multiple of 16 and of the weights' block);
    #                       0: per format, the most whole blocks in KC_TILE (960 for blocks of 32, 768 for 256)
    tile_min: int = 12    # an MXFP4 expert with this many tokens or more uses the tile path
    q8_tokens: int | None = None  # an expert with at most this many tokens in a call multiplies int8
    #                       activations (formats with an integer dot); 0: never (float32 throughout);
    #                       None: per format, the measured crossover in Q8_MAX_TOKENS

    def __post_init__(self):
        for name in ("rows", "kc_direct", "kc_tile", "tile_min", "q8_tokens"):
            v = getattr(self, name)
            if name == "q8_tokens" and v is None:
                continue
            zero_ok = name in ("q8_tokens", "kc_tile")
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (not zero_ok):
                raise ValueError(f"CpuTiles.{name} must be a {'non-negative' if zero_ok else 'positive'} "
                                 f"int, got {v!r}")
        if self.rows % 4 or self.kc_tile % TILE_ALIGN:
            raise ValueError(f"CpuTiles.rows must be a multiple of 4 and kc_tile of {TILE_ALIGN}, got {self}")

    def astuple(self):
        q8 = _Q8_AUTO if self.q8_tokens is None else int(self.q8_tokens)
        return (int(self.rows), int(self.kc_direct), int(self.kc_tile), int(self.tile_min), q8)


ALIGN = 64         # bytes; every float buffer row starts on a cache line
TILE_ALIGN = ALIGN // 4  # floats: decoded tile rows (kc_tile apart) start on cache lines too
_Q8_AUTO = -1  # q8_tokens=None in the tuple the kernels take, resolved per format by check_block
TILES = CpuTiles()
F32_TILES = CpuTiles(q8_tokens=0)  # float32 activations in every call: results checkable to float rounding
KC_TILE = 960  # the auto tile's bound: 960 floats x 64 rows = 240 KB of decoded weights, in L2

_MX_QK, _MX_BYTES, _MXFP4 = qcpu.MX_QK, qcpu.MX_BYTES, qcpu.MXFP4

# Chosen once: numba caches compiled code per CPU, so the kernels must depend on the host alone.
ISA = best_isa()
# Direct kernel rows R for T = 1..8 tokens: R*T accumulators plus the x vectors must fit
# the register file (32 zmm; 16 ymm on AVX2, where every kernel is narrower).
DIRECT_R = (4, 4, 4, 4, 2, 2, 2, 2) if ISA == "avx512" else (2, 2, 2, 2, 1, 1, 1, 1)
(_mx_t1, _mx_t2, _mx_t3, _mx_t4, _mx_t5, _mx_t6, _mx_t7, _mx_t8) = (
    make_mx_dot(DIRECT_R[t - 1], t, ISA) for t in range(1, 9))
# int8 path: the host's variant (None: no integer path, calls stay float); rows per kernel for T = 1..4
# tokens (R*T accumulators: 16 ymm on AVX2), single rows for the rest of a tile
Q8_VARIANT = q8_isa()
# (8 rows for one token on AVX-512 hosts: the token's loads amortised further, 0.96 vs 1.02 ms for n=1 on one thread)
Q8_R = (8, 4, 2, 2) if Q8_VARIANT == "vnni512" else (8, 4, 4, 4) if ISA == "avx512" else (4, 2, 1, 1)
# Tokens per expert up to which the integer path beats the float tile path (which decodes the
# expert's weights to float32 once per call and reuses them for every token): measured by
# examples/bench_crossover.py (BENCHMARKS.md, "Integer or float tiles"). Data per format name; a
# format not listed takes Q8_MAX_DEFAULT. MXFP4's float path decodes in registers (no tile) below
# tile_min, so its integer path pays off for few tokens only.
Q8_MAX_TOKENS = {"Q4_0": 64, "Q4_1": 16, "Q5_0": 48, "Q5_1": 32, "Q8_0": 64, "Q2_K": 64, "Q3_K": 64, "Q4_K": 64,
                 "Q5_K": 64, "Q6_K": 64, "IQ4_NL": 32, "IQ4_XS": 32, "IQ3_S": 32, "IQ3_XXS": 32, "IQ2_S": 32,
                 "IQ2_XS": 32, "IQ2_XXS": 32, "IQ1_S": 16, "IQ1_M": 16, "TQ1_0": 64, "TQ2_0": 64, "MXFP4": 4}
Q8_MAX_DEFAULT = 16


@functools.lru_cache(maxsize=None)  # the dispatcher is rebuilt on every registry change; kernels once
def _q8_kernels(wtype):
    """The integer kernels of ``wtype``: R rows for 1..4 tokens, then single rows for 1..4 tokens."""
    return tuple([make_q8_dot(Q8_R[t - 1], t, Q8_VARIANT, wtype) for t in range(1, 5)]
                 + [make_q8_dot(1, t, Q8_VARIANT, wtype) for t in range(1, 5)])


def _q8_types():
    """GGML ids the integer path runs here: the host variant's ``q8_types`` the generated code holds."""
    active = {int(f.ggml_type) for f in qregistry.compiled_formats()}
    return tuple(t for t in q8_types(Q8_VARIANT) if t in active)


def _build_format_pass(wt):
    """One format's integer pass (``_q8_pass`` without ``wtype``): its own function, not inlined,
    so LLVM optimises each format's unrolled kernels apart (one function holding every format's
    took 221 s to compile, superlinear in its size) and each consumer links it once."""
    ks = _q8_kernels(wt)
    ns = {"Q8_R": Q8_R, **{f"k{t}": ks[t - 1] for t in range(1, 5)}, **{f"s{t}": ks[3 + t] for t in range(1, 5)}}
    args = "(raw, wo + r * wst, wst, nk, QC, D, xo, xst, out, oo + r, ost)"
    lines = ["def q8_pass(T_, raw, wo, wst, nk, nr, QC, D, xo, xst, out, oo, ost):",
             "    R = Q8_R[T_ - 1]", "    nm = nr - nr % R"]
    for t in range(1, 5):
        lines += [f"    {'if' if t == 1 else 'elif'} T_ == {t}:",
                  "        for r in range(0, nm, R):", f"            k{t}{args}",
                  "        for r in range(nm, nr):", f"            s{t}{args}"]
    exec(compile("\n".join(lines), f"<hybrid.kernels.cpu.experts._q8_pass_{wt}>", "exec"), ns)
    return nb.njit(ns["q8_pass"])


def _build_q8_pass():
    """``_q8_pass(wtype, T_, raw, wo, wst, nk, nr, QC, D, xo, xst, out, oo, ost)``: out[oo + t*ost + r]
    += row r . x_t for T_ (1..4) tokens, rows [0, nr), x_t the int8 blocks xo + t*xst .. of (QC, D).
    Generated from the formats with an integer dot (one call site per format; Numba cannot call
    through a dict), rebuilt when the registry changes."""
    ns, lines = {}, ["def _q8_pass(wtype, T_, raw, wo, wst, nk, nr, QC, D, xo, xst, out, oo, ost):"]
    for i, wt in enumerate(_q8_types()):
        ns[f"p{wt}"] = _format_pass(wt)
        lines += [f"    {'if' if i == 0 else 'elif'} wtype == {wt}:",
                  f"        p{wt}(T_, raw, wo, wst, nk, nr, QC, D, xo, xst, out, oo, ost)"]
    lines.append("    pass")
    exec(compile("\n".join(lines), "<hybrid.kernels.cpu.experts._q8_pass>", "exec"), ns)
    return nb.njit(inline="always")(ns["_q8_pass"])


def _build_q8_superblocks():
    """``_q8_superblocks(wtype)``: whether ``wtype``'s integer dot reads activations in super-blocks
    of 256 (quant.cpu.quantize_q8k: the formats with integer sub-block scales) instead of blocks of 32."""
    sbs = sorted(set(_q8_types()) & set(q8s_types()))
    ns = {}
    body = " or ".join(f"wtype == {wt}" for wt in sbs) or "False"
    exec(compile(f"def _q8_superblocks(wtype):\n    return {body}", "<hybrid.kernels.cpu.experts._q8_superblocks>",
                 "exec"), ns)
    return nb.njit(inline="always")(ns["_q8_superblocks"])


_format_pass = functools.lru_cache(maxsize=None)(_build_format_pass)  # each format's compiled once a process


_q8_pass, _q8_superblocks = _build_q8_pass(), _build_q8_superblocks()


@qregistry.on_change
def _rebuild_q8():
    global _q8_pass, _q8_superblocks, Q8_TYPES
    _q8_pass, _q8_superblocks = _build_q8_pass(), _build_q8_superblocks()
    Q8_TYPES = _q8_types()


Q8_TYPES = _q8_types()
F32_R = 4  # float32 tile kernel rows; tokens F32_T, largest first
F32_T = (6, 4, 2, 1) if W == 16 else (3, 2, 1, 1)
_f32_a, _f32_b, _f32_c, _f32_d = (make_f32_dot(F32_R, t) for t in F32_T)
_SWIGLU, _SILU = ACT_CODE["swiglu_oai"], ACT_CODE["silu"]
_act_swiglu, _act_silu = make_act(_SWIGLU), make_act(_SILU)
_swiglu_oai, _silu = nb.njit(inline="always")(swiglu_oai_f32), nb.njit(inline="always")(silu_f32)


# ---------------------------------------------------------------- numba helpers
@jitcache.njit(cache=True)
def _aligned(n):
    """float32[n] whose first element sits on an ALIGN-byte boundary."""
    raw = np.empty(n * 4 + ALIGN, np.uint8)
    off = (ALIGN - raw.ctypes.data % ALIGN) % ALIGN
    return raw[off:off + n * 4].view(np.float32)


@nb.njit(inline="always")
def _decode_tile(raw, wtype, e, r0, nr, c0, c1, tile, ld, width):
    """tile[r*ld + c] = W[e, r0+r, c0+c] for r < nr, c < c1-c0; zeros up to ``width`` columns
    and in the rows up to the next multiple of F32_R."""
    n = c1 - c0
    for r in range(nr):
        qcpu.decode(raw, wtype, e, r0 + r, c0, n, tile, r * ld)
        for c in range(n, width):
            tile[r * ld + c] = 0.0
    for r in range(nr, (nr + F32_R - 1) // F32_R * F32_R):
        for c in range(width):
            tile[r * ld + c] = 0.0


@jitcache.njit(cache=True)
def _direct_pass(T_, raw, wo, wst, nk, nr, X, xo, xst, out, oo, ost):
    """out[oo + t*ost + r] += row r . x_t for T_ (1..8) tokens, rows [0, nr), MXFP4 read in place."""
    if T_ == 1:
        for r in range(0, nr, DIRECT_R[0]):
            _mx_t1(raw, wo + r * wst, wst, nk, X, xo, xst, out, oo + r, ost)
    elif T_ == 2:
        for r in range(0, nr, DIRECT_R[1]):
            _mx_t2(raw, wo + r * wst, wst, nk, X, xo, xst, out, oo + r, ost)
    elif T_ == 3:
        for r in range(0, nr, DIRECT_R[2]):
            _mx_t3(raw, wo + r * wst, wst, nk, X, xo, xst, out, oo + r, ost)
    elif T_ == 4:
        for r in range(0, nr, DIRECT_R[3]):
            _mx_t4(raw, wo + r * wst, wst, nk, X, xo, xst, out, oo + r, ost)
    elif T_ == 5:
        for r in range(0, nr, DIRECT_R[4]):
            _mx_t5(raw, wo + r * wst, wst, nk, X, xo, xst, out, oo + r, ost)
    elif T_ == 6:
        for r in range(0, nr, DIRECT_R[5]):
            _mx_t6(raw, wo + r * wst, wst, nk, X, xo, xst, out, oo + r, ost)
    elif T_ == 7:
        for r in range(0, nr, DIRECT_R[6]):
            _mx_t7(raw, wo + r * wst, wst, nk, X, xo, xst, out, oo + r, ost)
    else:
        for r in range(0, nr, DIRECT_R[7]):
            _mx_t8(raw, wo + r * wst, wst, nk, X, xo, xst, out, oo + r, ost)


@jitcache.njit(cache=True)
def _tile_pass(T_, tile, ld, nvec, nr4, X, xo, xst, out, oo, ost):
    """out[oo + t*ost + r] += tile row r . x_t for T_ (one of F32_T) tokens, rows [0, nr4)."""
    if T_ == F32_T[0]:
        for r in range(0, nr4, F32_R):
            _f32_a(tile, r * ld, ld, nvec, X, xo, xst, out, oo + r, ost)
    elif T_ == F32_T[1]:
        for r in range(0, nr4, F32_R):
            _f32_b(tile, r * ld, ld, nvec, X, xo, xst, out, oo + r, ost)
    elif T_ == F32_T[2]:
        for r in range(0, nr4, F32_R):
            _f32_c(tile, r * ld, ld, nvec, X, xo, xst, out, oo + r, ost)
    else:
        for r in range(0, nr4, F32_R):
            _f32_d(tile, r * ld, ld, nvec, X, xo, xst, out, oo + r, ost)


@qregistry.jit(cache=True)  # reads quant.cpu.decode: recompiled when the registry changes
def _item(raw, wtype, e, r0, nr, cols, X, QC, D, p0, n, out, ooff, ost, tile, tiles):
    """out[ooff + t*ost + r] += W[e, r0+r, :] . X[p0+t, :] for t < n, r < nr (rounded up to 4).

    X rows are ALIGN-aligned with zeros past ``cols``; ``tile`` holds rows x kc_tile floats.
    With ``QC.size`` (formats with an integer dot) and at most ``q8_max`` tokens, X's rows quantised
    (quant.cpu.quantize_q8) are read instead.
    """
    _, kc_direct, kc_tile, tile_min, q8_max = tiles
    xst = X.shape[1]
    if QC.size and n <= q8_max:
        nbx = xst // (256 if _q8_superblocks(wtype) else _MX_QK)  # activation blocks per row
        wst = raw.shape[2]
        base = (e * raw.shape[1] + r0) * wst
        for t in range(0, n, 4):  # x of 4 tokens (4 x 5.6 KB at 2880 columns) stays in L1
            _q8_pass(wtype, min(4, n - t), raw, base, wst, cols // _MX_QK, nr, QC, D, (p0 + t) * nbx, nbx,
                     out, ooff + t * ost, ost)
        return
    if wtype == _MXFP4 and n < tile_min and nr % 4 == 0:
        # direct: tokens in groups of 8, the rest in one group; each group is one pass over the weights
        nblk = cols // _MX_QK
        wst = raw.shape[2]
        base = (e * raw.shape[1] + r0) * wst
        kc = kc_direct if n > 8 else nblk  # up to 8 tokens' x fit L1 whole
        for k0 in range(0, nblk, kc):
            nk = min(kc, nblk - k0)
            for t in range(0, n, 8):
                _direct_pass(min(8, n - t), raw, base + k0 * _MX_BYTES, wst, nk, nr,
                             X, (p0 + t) * xst + k0 * _MX_QK, xst, out, ooff + t * ost, ost)
        return
    nr4 = (nr + F32_R - 1) // F32_R * F32_R
    for c0 in range(0, cols, kc_tile):
        c1 = min(cols, c0 + kc_tile)
        nvec = (c1 - c0 + W - 1) // W
        _decode_tile(raw, wtype, e, r0, nr, c0, c1, tile, kc_tile, nvec * W)
        t = 0
        while t < n:
            T_ = F32_T[0]
            for cand in F32_T:  # the widest kernel that fits the tokens left
                if cand <= n - t:
                    T_ = cand
                    break
            _tile_pass(T_, tile, kc_tile, nvec, nr4, X, (p0 + t) * xst + c0, xst, out, ooff + t * ost, ost)
            t += T_


def _bucket(ids, n_experts):
    """Pairs t*k+j grouped by expert (routing's buckets) as int64, plus the position
    of each pair in that order: (pairs, starts[E+1], used, pos[T*k])."""
    bk = bucket(ids, n_experts)
    pairs = bk.pairs.astype(np.int64)
    pos = np.empty_like(pairs)
    pos[pairs] = np.arange(pairs.size)
    return pairs, bk.offsets.astype(np.int64), bk.used.astype(np.int64), pos


@jitcache.njit(cache=True)
def _work_items(starts, used, rows, rt, nchunks):
    """Items (expert, first row) row-tile-major, and chunk bounds of about equal cost."""
    ntile = (rows + rt - 1) // rt
    m = ntile * used.size
    item_e = np.empty(m, np.int64)
    item_r = np.empty(m, np.int64)
    cost = np.zeros(m + 1, np.float64)
    i = 0
    for tr in range(ntile):
        for e in used:
            item_e[i] = e
            item_r[i] = tr * rt
            # decoding a row costs about as much as two tokens' dot products
            cost[i + 1] = cost[i] + (starts[e + 1] - starts[e] + 2) * min(rt, rows - tr * rt)
            i += 1
    nch = max(1, min(nchunks, m))
    bounds = np.zeros(nch + 1, np.int64)
    j = 0
    for c in range(1, nch):
        while j < m and cost[j] < cost[m] * c / nch:
            j += 1
        bounds[c] = j
    bounds[nch] = m
    return item_e, item_r, bounds


@jitcache.njit(cache=True)
def _gather(x, pairs, k, width, slot_rows):
    """X[p] = x[pairs[p] // k] (or x[pairs[p]] when slot_rows), aligned rows of ``width``, zero padded."""
    P, cols = pairs.size, x.shape[1]
    X = _aligned(max(P, 1) * width).reshape((max(P, 1), width))
    for p in range(P):
        src = pairs[p] if slot_rows else pairs[p] // k
        for c in range(cols):
            X[p, c] = x[src, c]
        for c in range(cols, width):
            X[p, c] = 0.0
    return X


@nb.njit(inline="always")
def _quantize_row(sb, X, p, nbx, QC, D):
    if sb:
        qcpu.quantize_q8k_row(X, p, nbx, QC, D)
    else:
        qcpu.quantize_q8_row(X, p, nbx, QC, D)


@nb.njit(inline="always")
def _act(g, u, act):
    if act == _SWIGLU:
        return _swiglu_oai(g, u)
    return _silu(g, u)


@qregistry.jit(parallel=True, cache=True)
def _grouped(graw, uraw, wtype, rows, cols, X, starts, used, gb, ub, act, H, tiles, nchunks, q8):
    """H[p, r] += W[e(p), r, :] . X[p, :] for every pair p (H pre-zeroed).

    With act >= 0 gate and up are fused (``uraw`` the up experts): H = act(gate + gb, up + ub).
    With q8 X is quantised to int8 blocks first; experts with at most tiles[4] tokens then run the
    int8 kernels, the others the float32 ones.
    One call site of _item keeps the unrolled kernels compiled once.
    """
    fused = act >= 0
    rt, kc_tile = tiles[0], tiles[2]
    sb = _q8_superblocks(wtype)  # activations in super-blocks of 256 (K-quants), else blocks of 32
    P, nbx = X.shape[0], X.shape[1] // (256 if sb else _MX_QK)
    QC = _aligned(P * nbx * (qcpu.Q8K_REC if sb else qcpu.Q8_REC) // 4 if q8 else 0).view(np.uint8)
    D = _aligned(P * nbx * qcpu.Q8_DREP if q8 else 0)
    if q8:
        if P <= 16:  # decode: a parallel region costs more than these few rows (~3 us each)
            for p in range(P):
                _quantize_row(sb, X, p, nbx, QC, D)
        else:
            for p in nb.prange(P):
                _quantize_row(sb, X, p, nbx, QC, D)
    item_e, item_r, bounds = _work_items(starts, used, rows, rt, nchunks)
    nmax = 1
    for e in used:
        nmax = max(nmax, starts[e + 1] - starts[e])
    hflat = H.reshape(-1)
    for c in nb.prange(bounds.size - 1):
        tile = _aligned(rt * kc_tile)
        U = _aligned(nmax * rt if fused else 1)
        for it in range(bounds[c], bounds[c + 1]):
            e, r0 = item_e[it], item_r[it]
            p0, nr = starts[e], min(rt, rows - item_r[it])
            n = starts[e + 1] - p0
            for m in range(2 if fused else 1):
                if m == 0:
                    raw, dst, doff, dst_st = graw, hflat, p0 * H.shape[1] + r0, H.shape[1]
                else:
                    raw, dst, doff, dst_st = uraw, U, 0, rt
                    U[:n * rt] = 0.0
                _item(raw, wtype, e, r0, nr, cols, X, QC, D, p0, n, dst, doff, dst_st, tile, tiles)
            if fused:
                nv = nr // W  # whole vectors in the IR kernel, the rest (unquantised types) here
                for t in range(n):
                    ho = (p0 + t) * H.shape[1] + r0
                    if nv and act == _SWIGLU:
                        _act_swiglu(hflat, ho, U, t * rt, gb, e * gb.shape[1] + r0, ub, e * ub.shape[1] + r0, nv)
                    elif nv:
                        _act_silu(hflat, ho, U, t * rt, gb, e * gb.shape[1] + r0, ub, e * ub.shape[1] + r0, nv)
                    for r in range(nv * W, nr):
                        g = H[p0 + t, r0 + r] + gb[e, r0 + r]
                        u = U[t * rt + r] + ub[e, r0 + r]
                        H[p0 + t, r0 + r] = _act(g, u, act)


@jitcache.njit(parallel=True, cache=True)
def _combine(Y, pos, weights, ids, db, out):
    """out[t] = sum_j w[t, j] * (Y[pos[t, j]] + b_down[ids[t, j]]), j ascending."""
    n = weights.shape[0]
    if n <= 4:  # decode: waking the threads costs more than these rows
        for t in range(n):
            _combine_row(Y, pos, weights, ids, db, out, t)
    else:
        for t in nb.prange(n):
            _combine_row(Y, pos, weights, ids, db, out, t)


@nb.njit(inline="always")
def _combine_row(Y, pos, weights, ids, db, out, t):
    k = weights.shape[1]
    for c in range(out.shape[1]):
        s = np.float32(0.0)
        for j in range(k):
            s += weights[t, j] * (Y[pos[t * k + j], c] + db[ids[t, j], c])
        out[t, c] = s


@jitcache.njit(cache=True)
def _check_ids(ids, n_experts):
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if ids[t, j] < 0 or ids[t, j] >= n_experts:
                return t, j
    return -1, -1


# ---------------------------------------------------------------- Python API (checked at this edge)
def _pad(n, m=32):
    return (n + m - 1) // m * m


def check_experts(name, raw, wtype, n_experts, rows, cols):
    """Expert bytes ``raw`` (uint8 ``[n_experts, rows, row_bytes]``, C-contiguous) of GGML type
    ``wtype`` that the CPU path reads; returns (raw, wtype as int)."""
    if not qregistry.has(wtype, "cpu"):
        raise NotImplementedError(f"{name}: GGML type {qtypes.type_name(wtype)} is not supported "
                                  f"(supported: {', '.join(qtypes.type_name(q) for q in qcpu.types())})")
    qt = int(wtype)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:  # the kernels index bytes
        raise TypeError(f"{name}: expert bytes must be a uint8 array, got "
                        f"{getattr(raw, 'dtype', type(raw).__name__)}")
    if raw.shape != (n_experts, rows, qtypes.row_nbytes(qt, cols)) or not raw.flags.c_contiguous:
        raise ValueError(f"{name}: bytes {raw.shape} do not hold {n_experts} x [{rows}, {cols}] "
                         f"{qtypes.type_name(qt)}")
    if rows < 1 or cols < 1 or n_experts < 1:
        raise ValueError(f"{name}: empty tensor [{n_experts}, {rows}, {cols}]")
    return raw, qt


def check_x(x, cols, what="x", ndim=2):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"{what} must be float32, got {x.dtype}")
    if x.ndim != ndim or x.shape[-1] != cols:
        raise ValueError(f"{what} has shape {x.shape}, expected {'[n_tokens, ' if ndim == 2 else '[..., '}{cols}]")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} holds NaN or inf")


def check_routing(ids, n_tokens, n_experts, weights=None):
    if not isinstance(ids, np.ndarray) or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be an integer numpy array, got {getattr(ids, 'dtype', type(ids))}")
    if ids.ndim != 2 or ids.shape[0] != n_tokens or ids.shape[1] < 1:
        raise ValueError(f"ids has shape {ids.shape}, expected [n_tokens={n_tokens}, k>=1]")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    t, j = _check_ids(ids, n_experts)
    if t >= 0:
        raise ValueError(f"ids[{t}, {j}] = {ids[t, j]} is out of range [0, {n_experts})")
    if weights is None:
        return ids, None
    if not isinstance(weights, np.ndarray) or not np.issubdtype(weights.dtype, np.floating):
        raise TypeError(f"weights must be a float numpy array, got {getattr(weights, 'dtype', type(weights))}")
    if weights.shape != ids.shape:
        raise ValueError(f"weights has shape {weights.shape}, expected {ids.shape} (as ids)")
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if not np.isfinite(weights).all():
        raise ValueError("weights hold NaN or inf")
    return ids, weights


def check_out(out, shape):
    if out is None:
        return np.empty(shape, np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise TypeError(f"out must be a float32 numpy array, got {getattr(out, 'dtype', type(out))}")
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    return out


_NO_BIAS = np.zeros((1, 1), np.float32)


def _zeros_aligned(rows, width):
    a = _aligned(max(rows, 1) * width).reshape(max(rows, 1), width)
    a[:] = 0.0
    return a


def _chunks():
    # A few chunks per thread, handed out one at a time: a thread that is
    # descheduled (shared machines) delays one small chunk, not half the work.
    return 4 * nb.get_num_threads()


def _use_q8(wtype, starts, used, tl):
    """Whether a call quantises its activations: some used expert has at most ``tl[4]`` tokens."""
    if int(wtype) not in Q8_TYPES or tl[4] <= 0 or used.size == 0:
        return False
    return int((starts[used + 1] - starts[used]).min()) <= tl[4]


def q8_max_tokens(wtype):
    """Tokens per expert up to which ``wtype``'s experts take the integer path by default (0: none)."""
    if int(wtype) not in Q8_TYPES:
        return 0
    return Q8_MAX_TOKENS.get(qtypes.type_name(wtype), Q8_MAX_DEFAULT)


def check_block(tl, wtype):
    """``tl`` with its tile width for ``wtype``: decoded tiles hold whole blocks, so a given
    kc_tile must be a multiple of the format's block; 0 takes the most whole blocks in KC_TILE."""
    blk = qregistry.block_size(wtype)
    qregistry.activate(wtype)  # the tile path's generated decoder must hold this format
    if tl[4] == _Q8_AUTO:
        tl = tl[:4] + (q8_max_tokens(wtype),)
    if tl[2] == 0:
        step = blk * TILE_ALIGN // math.gcd(blk, TILE_ALIGN)
        return tl[:2] + (max(step, KC_TILE // step * step),) + tl[3:]
    if tl[2] % blk:
        raise ValueError(f"CpuTiles.kc_tile ({tl[2]}) must be a multiple of {qtypes.type_name(wtype)}'s block "
                         f"of {blk}")
    return tl


def check_tiles(tiles):
    if tiles is None:
        return TILES.astuple()
    if not isinstance(tiles, CpuTiles):
        raise TypeError(f"tiles must be a CpuTiles, got {type(tiles).__name__}")
    return tiles.astuple()


def mul_mat_id(raw, wtype, rows, cols, x, ids, tl):
    """ggml_mul_mat_id on checked inputs: ``raw`` from ``check_experts``, ``x`` float32 ``[T, cols]``
    or ``[T, k, cols]`` (finite), ``ids`` int64 ``[T, k]`` in range, ``tl`` from ``check_tiles``
    -> float32 ``[T, k, rows]``."""
    tl = check_block(tl, wtype)
    n, k = ids.shape
    if n == 0:
        return np.zeros((0, k, rows), np.float32)
    pairs, starts, used, pos = _bucket(ids, raw.shape[0])
    X = _gather(np.ascontiguousarray(x.reshape(-1, cols)), pairs, k, _pad(cols), x.ndim == 3)
    Y = _zeros_aligned(pairs.size, _pad(rows))
    with nb.parallel_chunksize(1):
        _grouped(raw, raw, wtype, rows, cols, X, starts, used, _NO_BIAS, _NO_BIAS, -1, Y, tl, _chunks(),
                 _use_q8(wtype, starts, used, tl))
    return Y[pos, :rows].reshape(n, k, rows)


def moe_ffn(graw, uraw, draw, gtype, dtype_, n_ff, biases, activation, x, ids, weights, out, tl):
    """One MoE FFN on checked inputs: gate/up ``[E, n_ff, n_embd]`` (type ``gtype``), down
    ``[E, n_embd, n_ff]`` (``dtype_``) as raw bytes, ``biases`` three float32 arrays (gate, up
    ``[E, n_ff]``, down ``[E, n_embd]``), ``activation`` a name of ``ACT_CODE``, ``x`` float32
    C-contiguous ``[T, n_embd]``, ``ids`` int64 / ``weights`` float32 ``[T, k]``, ``out``
    float32 ``[T, n_embd]`` (written, returned). ``out[t] = sum_j weights[t, j] * expert(x[t])``
    in j order."""
    E, D, F = graw.shape[0], x.shape[1], n_ff
    tlg, tld = check_block(tl, gtype), check_block(tl, dtype_)
    n, k = ids.shape
    if n == 0:
        return out
    pairs, starts, used, pos = _bucket(ids, E)
    X = _gather(np.ascontiguousarray(x), pairs, k, _pad(D), False)
    H = _zeros_aligned(pairs.size, _pad(F))
    Y = _zeros_aligned(pairs.size, _pad(D))
    with nb.parallel_chunksize(1):
        _grouped(graw, uraw, gtype, F, D, X, starts, used, biases[0], biases[1], ACT_CODE[activation], H,
                 tlg, _chunks(), _use_q8(gtype, starts, used, tlg))
        _grouped(draw, draw, dtype_, D, F, H, starts, used, _NO_BIAS, _NO_BIAS, -1, Y, tld, _chunks(),
                 _use_q8(dtype_, starts, used, tld))
    _combine(Y, pos, weights, ids, biases[2], out)
    return out
