"""I-quants: IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M.

Their lattice grids, sign table and non-linear values are data taken from
gguf-py (``gguf.quants``: ``init_grid`` unpacks each class's ``grid_hex``),
never retyped; we keep each grid as int8 (its values are small integers) so it
fits in CUDA constant memory. Per type: numpy decode, one block decoder for
Numba and numba-cuda (``legacy_q.compile_block``), f16 scale offsets.
Bit-identical to gguf.quants: ``(db * grid) * sign`` or ``dl * (grid + delta)``,
with gguf's float32 sub-block scales.
"""
from __future__ import annotations

import numpy as np
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T

from .legacy_q import f16_col, nibbles, register

U8 = np.uint8
F32 = np.float32


def _grid(cls):
    cls.init_grid()
    g = np.asarray(cls.grid, np.float32).reshape(cls.grid_shape)
    g8 = g.astype(np.int8)
    assert (g8.astype(np.float32) == g).all(), cls.__name__  # small integers: int8 is exact
    return g8


KSIGNS = np.frombuffer(gq.IQ2_XXS.ksigns, U8).copy()  # 7 sign bits -> 8 with even parity
KVALUES = np.array(gq.IQ4_NL.kvalues, np.int8)
GRID_IQ2_XXS = _grid(gq.IQ2_XXS)  # [256, 8]
GRID_IQ2_XS = _grid(gq.IQ2_XS)  # [512, 8]
GRID_IQ2_S = _grid(gq.IQ2_S)  # [1024, 8]
GRID_IQ3_XXS = _grid(gq.IQ3_XXS)  # [256, 4]
GRID_IQ3_S = _grid(gq.IQ3_S)  # [512, 4]
GRID_IQ1 = _grid(gq.IQ1_S)  # [2048, 8], values -1, 0, 1; IQ1_M's is the same data
IQ1_DELTA = F32(gq.IQ1_S.delta)
SIGN_BITS = (KSIGNS[:, None] >> np.arange(8, dtype=U8)) & U8(1)  # [128, 8]


def _pm1(bits):
    return np.where(bits == 0, F32(1), F32(-1))


def _u32(b, at, k):
    return b[:, at:at + 4 * k].copy().view(np.uint32)


def _u16(b, at, k):
    return b[:, at:at + 2 * k].copy().view(np.uint16)


def _half_scales(b, at, k):
    """[n, 2k] nibbles of k bytes: byte i gives entries 2i (low) and 2i+1 (high)."""
    s = b[:, at:at + k]
    return np.stack([s & 0x0F, s >> 4], axis=-1).reshape(b.shape[0], -1)


# ---------------------------------------------------------------- IQ4_NL
# 18 bytes, block 32: f16 d, 16 qs (nibbles as Q4_0) indexing KVALUES; d * kvalue
def iq4_nl_numpy(b):
    return f16_col(b, 0) * KVALUES[nibbles(b[:, 2:18])].astype(F32)


def _iq4_nl(f16, mul, jit):
    kv = KVALUES.astype(np.int32)

    def decode(src, off, out, o):
        d = f16(np.int32(src[off]), np.int32(src[off + 1]))
        for j in range(16):
            q = np.int32(src[off + 2 + j])
            out[o + j] = d * F32(kv[q & 15])
            out[o + j + 16] = d * F32(kv[q >> 4])
    return decode


# ---------------------------------------------------------------- IQ4_XS
# 136 bytes: f16 d, u16 scales_h (2 bits per 32), 4 scales_l (nibble per 32), 128 qs (8 x 16
# bytes, nibbles as IQ4_NL); (d * (scale - 32)) * kvalue
def iq4_xs_numpy(b):
    n = b.shape[0]
    sh = _u16(b, 2, 1)
    hi = ((sh >> (2 * np.arange(8, dtype=np.uint16))).astype(U8) & U8(3))
    ls = (_half_scales(b, 4, 4) | (hi << U8(4))).astype(np.int8) - np.int8(32)
    dl = f16_col(b, 0) * ls.astype(F32)
    q = nibbles(b[:, 8:136].reshape(n, 8, 16)).reshape(n, -1)
    return np.repeat(dl, 32, axis=-1) * KVALUES[q].astype(F32)


def _iq4_xs(f16, mul, jit):
    kv = KVALUES.astype(np.int32)

    def decode(src, off, out, o):
        d = f16(np.int32(src[off]), np.int32(src[off + 1]))
        sh = np.int32(src[off + 2]) | (np.int32(src[off + 3]) << 8)
        for ib in range(8):
            ls = ((np.int32(src[off + 4 + ib // 2]) >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
            dl = d * F32(ls - 32)
            for j in range(16):
                q = np.int32(src[off + 8 + ib * 16 + j])
                out[o + ib * 32 + j] = dl * F32(kv[q & 15])
                out[o + ib * 32 + j + 16] = dl * F32(kv[q >> 4])
    return decode


# ---------------------------------------------------------------- IQ2_XXS
# 66 bytes: f16 d, then 8 x (4 grid bytes, u32 aux: 4 x 7 sign-table bits, 4-bit scale on top);
# db = d * (0.5 + scale) * 0.25, value = (db * grid) * sign
def iq2_xxs_numpy(b):
    n = b.shape[0]
    q = _u32(b, 2, 16).reshape(n, 8, 2)
    db = f16_col(b, 0) * (F32(0.5) + (q[..., 1] >> 28).astype(F32)) * F32(0.25)
    sidx = (q[..., 1:2] >> np.array([0, 7, 14, 21], np.uint32)) & np.uint32(127)  # [n, 8, 4]
    signs = _pm1(SIGN_BITS[sidx])  # [n, 8, 4, 8]
    grid = GRID_IQ2_XXS[q[..., 0].copy().view(U8).reshape(n, 8, 4)].astype(F32)
    return (db.reshape(n, 8, 1, 1) * grid * signs).reshape(n, -1)


def _signed8(out, at, db, grid, g, sn):
    """``out[at + i] = (db * grid[g + i]) * sign`` for i < 8, sign -1 where bit i of ``sn`` is
    set: the 8-value grid row of IQ2_XXS, IQ2_XS and IQ2_S (compiled per target by ``jit``)."""
    for i in range(8):
        sg = F32(-1.0) if (sn >> i) & 1 else F32(1.0)
        out[at + i] = (db * F32(grid[g + i])) * sg


def _half_db(d, src, at, gi):
    """IQ2_XS's and IQ2_S's scale of group ``gi`` (8 values; a scale nibble per 16 values at
    ``at``): d * (0.5 + nibble) * 0.25."""
    sc = (np.int32(src[at + gi // 4]) >> (4 * (gi // 2 % 2))) & 15
    return d * (F32(0.5) + F32(sc)) * F32(0.25)


def _iq2_xxs(f16, mul, jit):
    grid, ks = GRID_IQ2_XXS.reshape(-1).astype(np.int8), KSIGNS.astype(np.int32)
    signed8 = jit(_signed8)

    def decode(src, off, out, o):
        d = f16(np.int32(src[off]), np.int32(src[off + 1]))
        for ib in range(8):
            p = off + 2 + ib * 8
            aux = (np.int64(src[p + 4]) | (np.int64(src[p + 5]) << 8) | (np.int64(src[p + 6]) << 16)
                   | (np.int64(src[p + 7]) << 24))
            db = d * (F32(0.5) + F32(aux >> 28)) * F32(0.25)
            for k in range(4):
                g = np.int32(src[p + k]) * 8
                signed8(out, o + ib * 32 + k * 8, db, grid, g, ks[(aux >> (7 * k)) & 127])
    return decode


# ---------------------------------------------------------------- IQ2_XS
# 74 bytes: f16 d, 32 u16 (9-bit grid index, 7-bit sign-table index), 8 scales (nibble per 16);
# db = d * (0.5 + scale) * 0.25, value = (db * grid) * sign
def iq2_xs_numpy(b):
    n = b.shape[0]
    q = _u16(b, 2, 32)
    db = f16_col(b, 0) * (F32(0.5) + _half_scales(b, 66, 8)) * F32(0.25)
    signs = _pm1(SIGN_BITS[q >> 9])  # [n, 32, 8]
    grid = GRID_IQ2_XS[q & np.uint16(511)].astype(F32)
    return (np.repeat(db, 16, axis=-1).reshape(n, 32, 8) * grid * signs).reshape(n, -1)


def _iq2_xs(f16, mul, jit):
    grid, ks = GRID_IQ2_XS.reshape(-1).astype(np.int8), KSIGNS.astype(np.int32)
    signed8, half_db = jit(_signed8), jit(_half_db)

    def decode(src, off, out, o):
        d = f16(np.int32(src[off]), np.int32(src[off + 1]))
        for gi in range(32):
            db = half_db(d, src, off + 66, gi)
            q = np.int32(src[off + 2 + 2 * gi]) | (np.int32(src[off + 3 + 2 * gi]) << 8)
            signed8(out, o + gi * 8, db, grid, (q & 511) * 8, ks[q >> 9])
    return decode


# ---------------------------------------------------------------- IQ2_S
# 82 bytes: f16 d, 32 qs (grid index low 8 bits), 32 signs (bit per element), 8 qh (2 high index
# bits per group of 8), 8 scales (nibble per 16); db as IQ2_XS, value = (db * grid) * sign
def iq2_s_numpy(b):
    n = b.shape[0]
    db = f16_col(b, 0) * (F32(0.5) + _half_scales(b, 74, 8)) * F32(0.25)
    signs = _pm1((b[:, 34:66, None] >> np.arange(8, dtype=U8)) & U8(1))  # [n, 32, 8]
    qh = (b[:, 66:74, None] >> np.array([0, 2, 4, 6], U8)).reshape(n, 32) & U8(3)
    idx = b[:, 2:34].astype(np.uint16) | (qh.astype(np.uint16) << 8)
    grid = GRID_IQ2_S[idx].astype(F32)
    return (np.repeat(db, 16, axis=-1).reshape(n, 32, 8) * grid * signs).reshape(n, -1)


def _iq2_s(f16, mul, jit):
    grid = GRID_IQ2_S.reshape(-1).astype(np.int8)
    signed8, half_db = jit(_signed8), jit(_half_db)

    def decode(src, off, out, o):
        d = f16(np.int32(src[off]), np.int32(src[off + 1]))
        for gi in range(32):
            db = half_db(d, src, off + 74, gi)
            hi = (np.int32(src[off + 66 + gi // 4]) >> (2 * (gi % 4))) & 3
            g = (np.int32(src[off + 2 + gi]) | (hi << 8)) * 8
            signed8(out, o + gi * 8, db, grid, g, np.int32(src[off + 34 + gi]))
    return decode


# ---------------------------------------------------------------- IQ3_XXS
# 98 bytes: f16 d, 64 qs (grid index per 4 elements), 8 u32 (4 x 7 sign-table bits per 32
# elements, 4-bit scale on top); db = d * (0.5 + scale) * 0.5, value = (db * grid) * sign
def iq3_xxs_numpy(b):
    n = b.shape[0]
    sc = _u32(b, 66, 8)
    db = f16_col(b, 0) * (F32(0.5) + (sc >> 28).astype(F32)) * F32(0.5)
    sidx = (sc[..., None] >> np.array([0, 7, 14, 21], np.uint32)) & np.uint32(127)  # [n, 8, 4]
    signs = _pm1(SIGN_BITS[sidx]).reshape(n, 8, 32)
    grid = GRID_IQ3_XXS[b[:, 2:66]].astype(F32).reshape(n, 8, 32)
    return (db.reshape(n, 8, 1) * grid * signs).reshape(n, -1)


def _iq3_xxs(f16, mul, jit):
    grid, ks = GRID_IQ3_XXS.reshape(-1).astype(np.int8), KSIGNS.astype(np.int32)

    def decode(src, off, out, o):
        d = f16(np.int32(src[off]), np.int32(src[off + 1]))
        for ib in range(8):
            p = off + 66 + ib * 4
            aux = (np.int64(src[p]) | (np.int64(src[p + 1]) << 8) | (np.int64(src[p + 2]) << 16)
                   | (np.int64(src[p + 3]) << 24))
            db = d * (F32(0.5) + F32(aux >> 28)) * F32(0.5)
            for k in range(4):
                s = ks[(aux >> (7 * k)) & 127]
                for i in range(8):
                    g = np.int32(src[off + 2 + ib * 8 + k * 2 + i // 4]) * 4 + i % 4
                    sg = F32(-1.0) if (s >> i) & 1 else F32(1.0)
                    out[o + ib * 32 + k * 8 + i] = (db * F32(grid[g])) * sg
    return decode


# ---------------------------------------------------------------- IQ3_S
# 110 bytes: f16 d, 64 qs (grid index low 8 bits per 4 elements), 8 qh (the 9th bits), 32 signs
# (bit per element), 4 scales (nibble per 32); db = d * (1 + 2 * scale), value = (db * grid) * sign
def iq3_s_numpy(b):
    n = b.shape[0]
    db = f16_col(b, 0) * (1 + 2 * _half_scales(b, 106, 4))
    signs = _pm1((b[:, 74:106, None] >> np.arange(8, dtype=U8)) & U8(1)).reshape(n, 8, 32)
    qh = ((b[:, 66:74, None] >> np.arange(8, dtype=U8)) & U8(1)).reshape(n, 64)
    idx = b[:, 2:66].astype(np.uint16) | (qh.astype(np.uint16) << 8)
    grid = GRID_IQ3_S[idx].astype(F32).reshape(n, 8, 32)
    return (db.reshape(n, 8, 1) * grid * signs).reshape(n, -1)


def _iq3_s(f16, mul, jit):
    grid = GRID_IQ3_S.reshape(-1).astype(np.int8)

    def decode(src, off, out, o):
        d = f16(np.int32(src[off]), np.int32(src[off + 1]))
        for ib in range(8):
            db = d * F32(1 + 2 * ((np.int32(src[off + 106 + ib // 2]) >> (4 * (ib % 2))) & 15))
            for j in range(32):
                gi = ib * 8 + j // 4
                hi = (np.int32(src[off + 66 + gi // 8]) >> (gi % 8)) & 1
                g = (np.int32(src[off + 2 + gi]) | (hi << 8)) * 4 + j % 4
                e = ib * 32 + j
                sg = F32(-1.0) if (np.int32(src[off + 74 + e // 8]) >> (e % 8)) & 1 else F32(1.0)
                out[o + e] = (db * F32(grid[g])) * sg
    return decode


# ---------------------------------------------------------------- IQ1_S
# 50 bytes: f16 d, 32 qs (grid index low 8 bits per 8 elements), 8 u16 qh (per 32 elements:
# 4 x 3 high index bits, 3-bit scale, delta sign on top); dl = d * (2 * scale + 1),
# value = dl * (grid + delta)
def iq1_s_numpy(b):
    n = b.shape[0]
    qh = _u16(b, 34, 8)
    dl = f16_col(b, 0) * (2 * ((qh >> 12) & 7) + 1)
    delta = np.where((qh & np.uint16(0x8000)) == 0, IQ1_DELTA, -IQ1_DELTA)
    hi = (qh[..., None] >> np.array([0, 3, 6, 9], np.uint16)) & np.uint16(7)
    idx = b[:, 2:34].astype(np.uint16) | (hi.reshape(n, 32) << 8)
    grid = GRID_IQ1[idx].astype(F32).reshape(n, 8, 32)
    return (dl.reshape(n, 8, 1) * (grid + delta.reshape(n, 8, 1))).reshape(n, -1)


def _iq1_s(f16, mul, jit):
    # grids as int8 (the decoders' constant tables): IQ1's 2048 x 8 as int32 is 64 KB, past the
    # 64 KB constant bank of a GPU with the kernel's other constants
    grid = GRID_IQ1.reshape(-1).astype(np.int8)

    def decode(src, off, out, o):
        d = f16(np.int32(src[off]), np.int32(src[off + 1]))
        for ib in range(8):
            qh = np.int32(src[off + 34 + 2 * ib]) | (np.int32(src[off + 35 + 2 * ib]) << 8)
            dl = d * F32(2 * ((qh >> 12) & 7) + 1)
            delta = -IQ1_DELTA if qh & 0x8000 else IQ1_DELTA
            for k in range(4):
                g = (np.int32(src[off + 2 + ib * 4 + k]) | (((qh >> (3 * k)) & 7) << 8)) * 8
                for i in range(8):
                    out[o + ib * 32 + k * 8 + i] = dl * (F32(grid[g + i]) + delta)
    return decode


# ---------------------------------------------------------------- IQ1_M
# 56 bytes: 32 qs (grid index low 8 bits per 8), 16 qh (nibble per 8: 3 high index bits, delta
# sign), 4 u16 scales (3-bit scale per 16 elements in bits 0..11; f16 d in the top nibbles,
# word k giving bits 4k..4k+3); value = (d * (2 * scale + 1)) * (grid + delta)
def _iq1_m_d(b):
    sc = _u16(b, 48, 4)
    top = (sc & np.uint16(0xF000)) >> np.array([12, 8, 4, 0], np.uint16)
    return (top[:, 0] | top[:, 1] | top[:, 2] | top[:, 3]).view(np.float16).astype(F32).reshape(-1, 1), sc


def iq1_m_numpy(b):
    n = b.shape[0]
    d, sc = _iq1_m_d(b)
    s = ((sc[..., None] >> np.array([0, 3, 6, 9], np.uint16)) & np.uint16(7)).reshape(n, 16)
    dl = d * (2 * s + 1)
    h = (b[:, 32:48, None] >> np.array([0, 4], U8)).reshape(n, 32)
    idx = b[:, 0:32].astype(np.uint16) | ((h & U8(7)).astype(np.uint16) << 8)
    delta = np.where((h & U8(8)) == 0, IQ1_DELTA, -IQ1_DELTA)
    grid = GRID_IQ1[idx].astype(F32)  # [n, 32, 8]
    return (np.repeat(dl, 2, axis=-1).reshape(n, 32, 1) * (grid + delta[..., None])).reshape(n, -1)


def iq1_m_bad(b):
    d, _ = _iq1_m_d(b)
    return ~np.isfinite(d[:, 0])


def _iq1_m(f16, mul, jit):
    grid = GRID_IQ1.reshape(-1).astype(np.int8)

    def decode(src, off, out, o):
        w0 = np.int32(src[off + 49]) >> 4
        w1 = np.int32(src[off + 51]) >> 4
        w2 = np.int32(src[off + 53]) >> 4
        w3 = np.int32(src[off + 55]) >> 4
        d = f16(w0 | (w1 << 4), w2 | (w3 << 4))
        for s in range(16):
            w = np.int32(src[off + 48 + 2 * (s // 4)]) | (np.int32(src[off + 49 + 2 * (s // 4)]) << 8)
            dl = d * F32(2 * ((w >> (3 * (s % 4))) & 7) + 1)
            for h in range(2):
                gi = s * 2 + h
                qh = (np.int32(src[off + 32 + gi // 2]) >> (4 * (gi % 2))) & 15
                g = (np.int32(src[off + gi]) | ((qh & 7) << 8)) * 8
                delta = -IQ1_DELTA if qh & 8 else IQ1_DELTA
                for i in range(8):
                    out[o + gi * 8 + i] = dl * (F32(grid[g + i]) + delta)
    return decode


# type -> (numpy decode, block factory, byte offsets of the f16 scales or a check function)
SPECS = {
    T.IQ4_NL: (iq4_nl_numpy, _iq4_nl, (0,)),
    T.IQ4_XS: (iq4_xs_numpy, _iq4_xs, (0,)),
    T.IQ2_XXS: (iq2_xxs_numpy, _iq2_xxs, (0,)),
    T.IQ2_XS: (iq2_xs_numpy, _iq2_xs, (0,)),
    T.IQ2_S: (iq2_s_numpy, _iq2_s, (0,)),
    T.IQ3_XXS: (iq3_xxs_numpy, _iq3_xxs, (0,)),
    T.IQ3_S: (iq3_s_numpy, _iq3_s, (0,)),
    T.IQ1_S: (iq1_s_numpy, _iq1_s, (0,)),
    T.IQ1_M: (iq1_m_numpy, _iq1_m, iq1_m_bad),
}
globals().update(register(SPECS, __name__))  # the classes Q4_K, ... in the registry


def _iq4_nl_int8(b, p8, off):
    """IQ4_NL's integer-dot block: the kvalues (-127..113) as signed bytes (``int8_signed``)."""
    from ..simd import c64, emit_half, emit_nibbles_u8
    return emit_nibbles_u8(b, p8, b.add(off, c64(2)), KVALUES.astype(np.int32)), emit_half(b, p8, off)


IQ4_NL.int8_dot, IQ4_NL.int8_signed, IQ4_NL.int8_avx2 = True, True, True  # noqa: F821 (registered above)
IQ4_NL.int8_block = staticmethod(_iq4_nl_int8)  # noqa: F821


def _iq4_xs_int8(b, p8, off):
    """IQ4_XS's ``int8_scales``: each sub-block of 32 an IQ4_NL block's kvalues as signed bytes
    (-127..113: ``int8_signed``, so vpmaddubsw takes them on AVX2 too) under its 6-bit scale ls - 32."""
    from llvmlite import ir
    from ..simd import I32, c64, emit_half, emit_i16_lanes, emit_nibbles_u8, emit_u8_at, emit_u16_at
    sh = emit_u16_at(b, p8, b.add(off, c64(2)))
    k = lambda v: ir.Constant(I32, v)  # noqa: E731
    us, scales = [], []
    for ib in range(8):  # ls: nibble ib of scales_l, bits 2ib..2ib+1 of scales_h on top
        lo = b.and_(b.lshr(emit_u8_at(b, p8, b.add(off, c64(4 + ib // 2))), k(4 * (ib % 2))), k(15))
        ls = b.or_(lo, b.shl(b.and_(b.lshr(sh, k(2 * ib)), k(3)), k(4)))
        us.append(emit_nibbles_u8(b, p8, b.add(off, c64(8 + 16 * ib)), KVALUES.astype(np.int32)))
        scales += [b.sub(ls, k(32))] * 2
    return emit_half(b, p8, off), None, us, emit_i16_lanes(b, scales), None


IQ4_XS.int8_dot, IQ4_XS.int8_signed, IQ4_XS.int8_avx2 = True, True, True  # noqa: F821 (registered above)
IQ4_XS.int8_scales = staticmethod(_iq4_xs_int8)  # noqa: F821


# ---------------------------------------------------------------- the lattice i-quants as int8
# Each sub-block of 32 becomes the unsigned bytes offset + (sign ? -grid : grid) (quant.simd's
# emit_rows_i8 gathers the grid rows and, for the 7-bit sign indices, 8-byte masks from this table).
KSIGN_MASKS = np.where(SIGN_BITS != 0, U8(0xFF), U8(0))  # [128, 8]: -1 where a value is negated


def _ir():
    from llvmlite import ir
    from .. import simd
    return ir, simd, (lambda v: ir.Constant(simd.I32, v))


def _ksign_mask(b, aux):
    """The 32 sign bytes of four 7-bit KSIGNS indices in ``aux`` (bits 0, 7, 14, 21)."""
    ir, s, k = _ir()
    return s.emit_rows_i8(b, "hyb_ksign_masks", KSIGN_MASKS, [b.and_(b.lshr(aux, k(7 * j)), k(127)) for j in range(4)])


def _signed_superblock(fmt, grid, sub, unit):
    """A lattice i-quant's ``int8_scales``: per sub-block j of 32, ``sub(b, p8, off, j)`` gives
    (grid row indices, sign mask, its integer scale, or the two of its 16s), the values
    d * unit * scale * (sign ? -grid : grid); the bytes are offset + (sign ? -grid : grid), the
    offset the grid's largest value (so the format's ``int8_offset``, ``_offset(grid)``)."""
    offset = _offset(grid)
    name = f"hyb_grid_{fmt}"

    def superblock(b, p8, off):
        ir, s, k = _ir()
        d = b.fmul(s.emit_half(b, p8, off), ir.Constant(s.F32, unit))
        us, scales = [], []
        for j in range(8):
            idx, mask, sc = sub(b, p8, off, j)
            us.append(s.emit_signed_u8(b, s.emit_rows_i8(b, name, grid, idx), mask, offset))
            scales += list(sc) if isinstance(sc, tuple) else [sc, sc]
        return d, None, us, s.emit_i16_lanes(b, scales), None
    return superblock


def _offset(grid):
    return int(np.abs(grid.astype(np.int32)).max())


def _odd(b, v):
    """2v + 1 (v an i32): the i-quants' scales d * (0.5 + v) * unit as (d * unit / 2) * (2v + 1)."""
    ir, s, k = _ir()
    return b.add(b.shl(v, k(1)), k(1))


def _bytes_at(b, p8, at, n):
    ir, s, k = _ir()
    return [s.emit_u8_at(b, p8, b.add(at, s.c64(i))) for i in range(n)]


def _iq2_xxs_sub(b, p8, off, j):
    """IQ2_XXS: per 32, 4 grid bytes and a u32 of 4 sign indices under a 4-bit scale
    (d * (0.5 + scale) * 0.25)."""
    ir, s, k = _ir()
    at = b.add(off, s.c64(2 + 8 * j))
    aux = s.emit_u32_at(b, p8, b.add(at, s.c64(4)))
    return _bytes_at(b, p8, at, 4), _ksign_mask(b, aux), _odd(b, b.lshr(aux, k(28)))


def _half_dbs(b, p8, at):
    """IQ2_XS's and IQ2_S's two scales of a sub-block of 32, the nibbles of the byte at ``at``
    (d * (0.5 + nibble) * 0.25)."""
    ir, s, k = _ir()
    sc = s.emit_u8_at(b, p8, at)
    return _odd(b, b.and_(sc, k(15))), _odd(b, b.lshr(sc, k(4)))


def _iq2_xs_sub(b, p8, off, j):
    """IQ2_XS: per 32, 4 u16 of (9-bit grid index, 7-bit sign index), a scale nibble per 16."""
    ir, s, k = _ir()
    q = [s.emit_u16_at(b, p8, b.add(off, s.c64(2 + 8 * j + 2 * i))) for i in range(4)]
    m = s.emit_rows_i8(b, "hyb_ksign_masks", KSIGN_MASKS, [b.lshr(v, k(9)) for v in q])
    return [b.and_(v, k(511)) for v in q], m, _half_dbs(b, p8, b.add(off, s.c64(66 + j)))


def _high_bits(b, p8, lo_at, qh, width, n):
    """n grid indices: the bytes from ``lo_at``, index i with bits i*width.. of ``qh`` above them."""
    ir, s, k = _ir()
    return [b.or_(lo, b.shl(b.and_(b.lshr(qh, k(width * i)), k((1 << width) - 1)), k(8)))
            for i, lo in enumerate(_bytes_at(b, p8, lo_at, n))]


def _iq2_s_sub(b, p8, off, j):
    """IQ2_S: per 32, 4 grid bytes with 2 high bits each from one qh byte, 32 sign bits."""
    ir, s, k = _ir()
    idx = _high_bits(b, p8, b.add(off, s.c64(2 + 4 * j)), s.emit_u8_at(b, p8, b.add(off, s.c64(66 + j))), 2, 4)
    return idx, s.emit_sign_bits(b, p8, b.add(off, s.c64(34 + 4 * j))), _half_dbs(b, p8, b.add(off, s.c64(74 + j)))


def _iq3_xxs_sub(b, p8, off, j):
    """IQ3_XXS: per 32, 8 grid bytes (4 values each), a u32 of sign indices and the scale
    (d * (0.5 + scale) * 0.5)."""
    ir, s, k = _ir()
    aux = s.emit_u32_at(b, p8, b.add(off, s.c64(66 + 4 * j)))
    return _bytes_at(b, p8, b.add(off, s.c64(2 + 8 * j)), 8), _ksign_mask(b, aux), _odd(b, b.lshr(aux, k(28)))


def _iq3_s_sub(b, p8, off, j):
    """IQ3_S: per 32, 8 grid bytes with a 9th bit each from one qh byte, 32 sign bits, a scale
    nibble: d * (1 + 2 * nibble)."""
    ir, s, k = _ir()
    idx = _high_bits(b, p8, b.add(off, s.c64(2 + 8 * j)), s.emit_u8_at(b, p8, b.add(off, s.c64(66 + j))), 1, 8)
    nib = b.and_(b.lshr(s.emit_u8_at(b, p8, b.add(off, s.c64(106 + j // 2))), k(4 * (j % 2))), k(15))
    return idx, s.emit_sign_bits(b, p8, b.add(off, s.c64(74 + 4 * j))), _odd(b, nib)


def _iq1_rows(b, p8, lo_at, highs):
    """IQ1_S's and IQ1_M's 4 grid rows (-1..1) + 1 as bytes: low index bytes from ``lo_at``, the
    3 high bits of row i in ``highs[i]``."""
    ir, s, k = _ir()
    idx = [b.or_(s.emit_u8_at(b, p8, b.add(lo_at, s.c64(i))), b.shl(h, k(8))) for i, h in enumerate(highs)]
    return b.add(s.emit_rows_i8(b, "hyb_grid_iq1", GRID_IQ1, idx), s.ivec(32, _offset(GRID_IQ1), s.I8))


# IQ1: dl * (grid + delta), delta = +-IQ1_DELTA = +-1/8, as (dl / 8) * (8 * grid +- 1): the bytes
# 8 * (grid + 1) + (1 +- 1), offset 9 (``_IQ1_OFFSET``), the scales the odd integers of dl.
_IQ1_OFFSET = 8 * _offset(GRID_IQ1) + 1
assert IQ1_DELTA == 0.125


def _iq1_delta(b, neg_bit):
    """1 + the sign of delta as an i8: 0 where ``neg_bit`` (i32) is set (delta -1/8), else 2."""
    ir, s, k = _ir()
    return b.select(b.icmp_unsigned("!=", neg_bit, k(0)), ir.Constant(s.I8, 0), ir.Constant(s.I8, 2))


def _iq1_bytes(b, rows, deltas):
    """u = 8 * (grid + 1) + (1 + sign of delta): ``rows`` the grid + 1 (<32 x i8>), ``deltas`` one
    i8 per sub-block (1) or per row of 8 (4)."""
    ir, s, k = _ir()
    v = ir.Constant(s.vec(s.I8, 4), ir.Undefined)
    for i, dv in enumerate(deltas):
        v = b.insert_element(v, dv, k(i))
    per = 32 // len(deltas)
    return b.add(b.shl(rows, s.ivec(32, 3, s.I8)), s.shuf(b, v, v, [lane // per for lane in range(32)]))


def _iq1_s_int8(b, p8, off):
    """IQ1_S: per 32, 4 grid bytes, a u16 of 4 x 3 high bits, a 3-bit scale (dl = d * (2 scale + 1))
    and the delta's sign."""
    ir, s, k = _ir()
    us, scales = [], []
    for ib in range(8):
        qh = s.emit_u16_at(b, p8, b.add(off, s.c64(34 + 2 * ib)))
        rows = _iq1_rows(b, p8, b.add(off, s.c64(2 + 4 * ib)), [b.and_(b.lshr(qh, k(3 * i)), k(7)) for i in range(4)])
        us.append(_iq1_bytes(b, rows, [_iq1_delta(b, b.and_(qh, k(0x8000)))]))
        scales += [_odd(b, b.and_(b.lshr(qh, k(12)), k(7)))] * 2
    d = b.fmul(s.emit_half(b, p8, off), ir.Constant(s.F32, IQ1_DELTA))
    return d, None, us, s.emit_i16_lanes(b, scales), None


def _iq1_m_int8(b, p8, off):
    """IQ1_M: per 32, 4 grid bytes, 2 qh bytes (per row of 8: 3 high bits and the delta's sign),
    two 3-bit scales (per 16) of the u16 scales whose top nibbles hold d."""
    ir, s, k = _ir()
    w = [s.emit_u16_at(b, p8, b.add(off, s.c64(48 + 2 * i))) for i in range(4)]
    top = [b.shl(b.lshr(v, k(12)), k(4 * i)) for i, v in enumerate(w)]
    d = s._half_to_f32(b, b.or_(b.or_(top[0], top[1]), b.or_(top[2], top[3])))
    us, scales = [], []
    for ib in range(8):
        qh = [b.and_(b.lshr(s.emit_u8_at(b, p8, b.add(off, s.c64(32 + 2 * ib + i // 2))), k(4 * (i % 2))), k(15))
              for i in range(4)]
        rows = _iq1_rows(b, p8, b.add(off, s.c64(4 * ib)), [b.and_(h, k(7)) for h in qh])
        us.append(_iq1_bytes(b, rows, [_iq1_delta(b, b.and_(h, k(8))) for h in qh]))
        scales += [_odd(b, b.and_(b.lshr(w[ib // 2], k(3 * (2 * ib % 4 + h))), k(7))) for h in range(2)]
    return b.fmul(d, ir.Constant(s.F32, IQ1_DELTA)), None, us, s.emit_i16_lanes(b, scales), None


# (type, grid, sub-block reader, d's unit: the scale is d * unit * the odd integer 2 v + 1)
for _t, _grid, _sub, _unit in ((IQ2_XXS, GRID_IQ2_XXS, _iq2_xxs_sub, 0.125),  # noqa: F821
                              (IQ2_XS, GRID_IQ2_XS, _iq2_xs_sub, 0.125),  # noqa: F821
                              (IQ2_S, GRID_IQ2_S, _iq2_s_sub, 0.125),  # noqa: F821
                              (IQ3_XXS, GRID_IQ3_XXS, _iq3_xxs_sub, 0.25),  # noqa: F821
                              (IQ3_S, GRID_IQ3_S, _iq3_s_sub, 1.0)):  # noqa: F821
    # grid + offset at most 86 (IQ2), 124 (IQ3_XXS): vpmaddubsw's pairs stay under 2^15 with |q| <= 127
    _t.int8_dot, _t.int8_offset, _t.int8_avx2 = True, _offset(_grid), True
    _t.int8_scales = staticmethod(_signed_superblock(_t.name.lower(), _grid, _sub, _unit))
for _t, _hook in ((IQ1_S, _iq1_s_int8), (IQ1_M, _iq1_m_int8)):  # noqa: F821
    _t.int8_dot, _t.int8_offset, _t.int8_avx2 = True, _IQ1_OFFSET, True  # bytes 0..18
    _t.int8_scales = staticmethod(_hook)
