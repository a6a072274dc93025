"""K-quants, super-blocks of 256: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Per type: numpy decode, one block decoder compiled for Numba and numba-cuda
(``legacy_q.compile_block``), the f16 scale offsets for the data check. The
float32 operations are gguf.quants' in its order: the sub-block scale
``d * sc`` (and ``dmin * m``) is rounded first, then ``scale * q - min``.
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from .legacy_q import f16_col, nibbles, register

U8 = np.uint8


def _crumbs(qs, groups):
    """[n, groups*32] bytes -> [n, groups*128] 2-bit codes: per 32-byte group, shifts 0, 2, 4, 6."""
    q = qs.reshape(qs.shape[0], groups, 1, 32) >> np.array([0, 2, 4, 6], U8).reshape(1, 1, 4, 1)
    return (q & U8(3)).reshape(qs.shape[0], -1)


def _bits(h, planes):
    """[n, 32] bytes -> [n, planes*32]: bit p of byte l is element p*32 + l."""
    q = h.reshape(h.shape[0], 1, 32) >> np.arange(planes, dtype=U8).reshape(1, planes, 1)
    return (q & U8(1)).reshape(h.shape[0], -1)


def _nib32(qs):
    """[n, 32k] bytes -> [n, 64k] nibbles: per 32-byte group, 32 low then 32 high."""
    n = qs.shape[0]
    return nibbles(qs.reshape(n, -1, 32)).reshape(n, -1)


def _scale_min_k4(s):
    """The 8 six-bit (scale, min) pairs of a Q4_K/Q5_K 12-byte scale field, uint8 [n, 8] each."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _sub(v, per):
    return np.repeat(v, per, axis=-1)


# ---------------------------------------------------------------- Q2_K
# 84 bytes: 16 scales (low nibble sc, high nibble m, per 16 elements), 64 qs (2-bit, 2 groups
# of 32 bytes x 4 shifts), f16 d, f16 dmin; (d * sc) * q - (dmin * m)
def q2_k_numpy(b):
    sc = b[:, 0:16]
    d, dmin = f16_col(b, 80), f16_col(b, 82)
    dl = d * (sc & 0xF).astype(np.float32)
    ml = dmin * (sc >> 4).astype(np.float32)
    return _sub(dl, 16) * _crumbs(b[:, 16:80], 2).astype(np.float32) - _sub(ml, 16)


def _q2_k(f16, mul, jit):
    def decode(src, off, out, o):
        d = f16(np.int32(src[off + 80]), np.int32(src[off + 81]))
        dmin = f16(np.int32(src[off + 82]), np.int32(src[off + 83]))
        for s in range(16):  # sub-block of 16: group s // 8, shift 2 * ((s % 8) // 2)
            sc = np.int32(src[off + s])
            dl = d * np.float32(sc & 15)
            ml = mul(dmin, np.float32(sc >> 4))
            qb = off + 16 + (s // 8) * 32 + (s % 2) * 16
            sh = 2 * ((s % 8) // 2)
            for l in range(16):
                q = (np.int32(src[qb + l]) >> sh) & 3
                out[o + s * 16 + l] = mul(dl, np.float32(q)) - ml
    return decode


# ---------------------------------------------------------------- Q3_K
# 110 bytes: 32 hmask (bit p of byte l: element p*32+l has NO -4), 64 qs (2-bit as Q2_K),
# 12 scales (16 six-bit values, offset 32), f16 d; (d * sc) * (q - 4*(1-h))
def _q3_k_scales(s):
    lo = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=-1)
    hi = (s[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], U8).reshape(1, 4, 1)).reshape(-1, 16)
    return ((lo | ((hi & U8(3)) << U8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)


def q3_k_numpy(b):
    d = f16_col(b, 108)
    dl = d * _q3_k_scales(b[:, 96:108])
    ql = _crumbs(b[:, 32:96], 2)
    qh = _bits(b[:, 0:32], 8) ^ U8(1)
    q = (ql.astype(np.int8) - (qh << U8(2)).astype(np.int8)).astype(np.float32)
    return _sub(dl, 16) * q


def _q3_k(f16, mul, jit):
    def decode(src, off, out, o):
        d = f16(np.int32(src[off + 108]), np.int32(src[off + 109]))
        for s in range(16):
            lo = (np.int32(src[off + 96 + s % 8]) >> (4 * (s // 8))) & 15
            hi = (np.int32(src[off + 104 + s % 4]) >> (2 * (s // 4))) & 3
            dl = d * np.float32((lo | (hi << 4)) - 32)
            qb = off + 32 + (s // 8) * 32 + (s % 2) * 16
            sh = 2 * ((s % 8) // 2)
            hb = off + (s % 2) * 16
            p = s // 2  # hmask bit plane of elements s*16 .. s*16+15
            for l in range(16):
                q = (np.int32(src[qb + l]) >> sh) & 3
                h = (np.int32(src[hb + l]) >> p) & 1
                out[o + s * 16 + l] = dl * np.float32(q - ((h ^ 1) << 2))
    return decode


# ---------------------------------------------------------------- Q4_K
# 144 bytes: f16 d, f16 dmin, 12 scales (8 six-bit scale/min pairs, per 32), 128 qs (4 groups
# of 32 bytes: low nibbles then high nibbles); (d * sc) * q - (dmin * m)
def _scale_min(src, off, j):
    # scale and min j (0..7) of the 12 bytes at off (get_scale_min_k4)
    if j < 4:
        return np.int32(src[off + j]) & 63, np.int32(src[off + j + 4]) & 63
    md = np.int32(src[off + j + 4])
    return ((md & 15) | ((np.int32(src[off + j - 4]) >> 2) & 0x30),
            (md >> 4) | ((np.int32(src[off + j]) >> 2) & 0x30))


def q4_k_numpy(b):
    d, dmin = f16_col(b, 0), f16_col(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = d * sc.astype(np.float32)
    ml = dmin * mn.astype(np.float32)
    return _sub(dl, 32) * _nib32(b[:, 16:144]).astype(np.float32) - _sub(ml, 32)


def _make_k4(qh_at, qs_at):
    # Q4_K (no high bits: qh_at < 0) and Q5_K share all but the fifth bit
    def factory(f16, mul, jit):
        sm = jit(_scale_min)

        def decode(src, off, out, o):
            d = f16(np.int32(src[off]), np.int32(src[off + 1]))
            dmin = f16(np.int32(src[off + 2]), np.int32(src[off + 3]))
            for s in range(8):
                sc, m = sm(src, off + 4, s)
                dl = d * np.float32(sc)
                ml = mul(dmin, np.float32(m))
                qb = off + qs_at + (s // 2) * 32
                sh = 4 * (s % 2)
                for l in range(32):
                    q = (np.int32(src[qb + l]) >> sh) & 15
                    if qh_at >= 0:
                        q |= ((np.int32(src[off + qh_at + l]) >> s) & 1) << 4
                    out[o + s * 32 + l] = mul(dl, np.float32(q)) - ml
        return decode
    return factory


# ---------------------------------------------------------------- Q5_K
# 176 bytes: f16 d, f16 dmin, 12 scales (as Q4_K), 32 qh (bit s of byte l: fifth bit of
# element s*32+l), 128 qs (as Q4_K); (d * sc) * q - (dmin * m)
def q5_k_numpy(b):
    d, dmin = f16_col(b, 0), f16_col(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = d * sc.astype(np.float32)
    ml = dmin * mn.astype(np.float32)
    q = _nib32(b[:, 48:176]) | (_bits(b[:, 16:48], 8) << U8(4))
    return _sub(dl, 32) * q.astype(np.float32) - _sub(ml, 32)


# ---------------------------------------------------------------- Q6_K
# 210 bytes: 128 ql (2 halves of 64 bytes: low nibbles then high), 64 qh (2-bit, 2 groups of 32
# x 4 shifts), 16 int8 scales (per 16), f16 d; (d * sc) * (q - 32)
def q6_k_numpy(b):
    n = b.shape[0]
    d = f16_col(b, 208)
    dl = d * b[:, 192:208].view(np.int8).astype(np.float32)
    ql = nibbles(b[:, 0:128].reshape(n, 2, 64)).reshape(n, -1)
    q = (ql | (_crumbs(b[:, 128:192], 2) << U8(4))).astype(np.int8) - np.int8(32)
    return _sub(dl, 16) * q.astype(np.float32)


def _q6_k(f16, mul, jit):
    def decode(src, off, out, o):
        d = f16(np.int32(src[off + 208]), np.int32(src[off + 209]))
        for s in range(16):
            sc = np.int32(src[off + 192 + s])
            dl = d * np.float32(sc - 256 if sc > 127 else sc)
            h = s // 8  # half of 128 elements
            r = (s % 8) * 16  # element offset inside the half
            lb = off + h * 64 + r % 64
            lsh = 4 * (r // 64)
            hb = off + 128 + h * 32 + r % 32
            hsh = 2 * (r // 32)
            for l in range(16):
                q = ((np.int32(src[lb + l]) >> lsh) & 15) | (((np.int32(src[hb + l]) >> hsh) & 3) << 4)
                out[o + s * 16 + l] = dl * np.float32(q - 32)
    return decode


# ---------------------------------------------------------------- table
# type -> (numpy decode, block factory, byte offsets of the f16 scales)
SPECS = {
    T.Q2_K: (q2_k_numpy, _q2_k, (80, 82)),
    T.Q3_K: (q3_k_numpy, _q3_k, (108,)),
    T.Q4_K: (q4_k_numpy, _make_k4(-1, 16), (0, 2)),
    T.Q5_K: (q5_k_numpy, _make_k4(16, 48), (0, 2)),
    T.Q6_K: (q6_k_numpy, _q6_k, (208,)),
}
globals().update(register(SPECS, __name__))  # the classes Q4_K, ... in the registry


# ---------------------------------------------------------------- integer dots
# Each type's ``int8_scales``: the super-block's d (and dmin), its 8 sub-blocks of 32 as unsigned
# bytes (value d*sc*(u - int8_offset) - dmin*mn) and the 16 sub-block scales (and mins), one per
# 16 values, as <16 x i16> integers: the kernel adds the 8 sub-block dots in integers (ggml's
# K-quant x Q8_K dots). LLVM IR; llvmlite is imported where the IR is built.
_PAIRS = [j // 2 for j in range(16)]  # a scale per 32 values, repeated for its two 16s


def _q2_k_int8(b, p8, off):
    """Q2_K: sub-block j of 32 is bits 2(j % 4).. of the 32 qs bytes of group j // 4, codes 0..3;
    scale byte s (one per 16): low nibble sc, high nibble mn."""
    from ..simd import I8, I16, c64, emit_bytes_i16, emit_half, ivec, load, vec
    d, dmin = emit_half(b, p8, b.add(off, c64(80))), emit_half(b, p8, b.add(off, c64(82)))
    us = []
    for j in range(8):
        qs = load(b, p8, b.add(off, c64(16 + 32 * (j // 4))), vec(I8, 32))
        us.append(b.and_(b.lshr(qs, ivec(32, 2 * (j % 4), I8)), ivec(32, 3, I8)))
    s = emit_bytes_i16(b, p8, off, range(16))
    return d, dmin, us, b.and_(s, ivec(16, 15, I16)), b.lshr(s, ivec(16, 4, I16))


Q2_K.int8_dot, Q2_K.int8_avx2 = True, True  # noqa: F821 (registered above); codes 0..3
Q2_K.int8_scales = staticmethod(_q2_k_int8)  # noqa: F821


def _q3_k_int8(b, p8, off):
    """Q3_K: codes q2 | hmask bit << 2 (0..7; value code - 4: a clear bit subtracts 4), sub-block j
    from bits 2(j % 4).. of qs group j // 4 and bit j of the 32 hmask bytes; scale s (one per 16,
    minus 32): the 4 low bits of byte 96 + s % 8 shifted by 4(s // 8), the 2 high of byte 104 + s % 4
    by 2(s // 4)."""
    from llvmlite import ir
    from ..simd import I8, I16, c64, emit_bytes_i16, emit_half, ivec, load, vec
    d = emit_half(b, p8, b.add(off, c64(108)))
    hm = load(b, p8, off, vec(I8, 32))
    us = []
    for j in range(8):
        qs = load(b, p8, b.add(off, c64(32 + 32 * (j // 4))), vec(I8, 32))
        us.append(b.or_(b.and_(b.lshr(qs, ivec(32, 2 * (j % 4), I8)), ivec(32, 3, I8)),
                        b.shl(b.and_(b.lshr(hm, ivec(32, j, I8)), ivec(32, 1, I8)), ivec(32, 2, I8))))
    at = b.add(off, c64(94))  # bytes 94..109: the 12 scale bytes end the block's 16 last but two
    per = lambda f: ir.Constant(vec(I16, 16), [f(s) for s in range(16)])  # noqa: E731 (a constant per scale s)
    lo = b.and_(b.lshr(emit_bytes_i16(b, p8, at, [2 + s % 8 for s in range(16)]), per(lambda s: 4 * (s // 8))),
                ivec(16, 15, I16))
    hi = b.and_(b.lshr(emit_bytes_i16(b, p8, at, [10 + s % 4 for s in range(16)]), per(lambda s: 2 * (s // 4))),
                ivec(16, 3, I16))
    return d, None, us, b.sub(b.or_(lo, b.shl(hi, ivec(16, 4, I16))), ivec(16, 32, I16)), None


Q3_K.int8_dot, Q3_K.int8_offset, Q3_K.int8_avx2 = True, 4, True  # noqa: F821 (registered above); codes 0..7
Q3_K.int8_scales = staticmethod(_q3_k_int8)  # noqa: F821


def _k4_int8(qh_at, qs_at):
    """Q4_K (no high bits: qh_at < 0) and Q5_K: codes 0..15 or 0..31; the 8 six-bit (scale, min)
    pairs of ggml's get_scale_min_k4, unpacked on 16 lanes at once from the 12 bytes at 4."""
    def superblock(b, p8, off):
        from llvmlite import ir
        from ..simd import I8, I16, c64, emit_bytes_i16, emit_half, ivec, load, vec
        d, dmin = emit_half(b, p8, off), emit_half(b, p8, b.add(off, c64(2)))
        qh = None if qh_at < 0 else load(b, p8, b.add(off, c64(qh_at)), vec(I8, 32))
        us = []
        for j in range(8):
            qs = load(b, p8, b.add(off, c64(qs_at + 32 * (j // 2))), vec(I8, 32))
            u = b.and_(qs, ivec(32, 15, I8)) if j % 2 == 0 else b.lshr(qs, ivec(32, 4, I8))
            if qh is not None:  # bit j of qh byte l: the fifth bit of element 32j + l
                u = b.or_(u, b.shl(b.and_(b.lshr(qh, ivec(32, j, I8)), ivec(32, 1, I8)), ivec(32, 4, I8)))
            us.append(u)
        i16 = lambda vals: ir.Constant(vec(I16, 16), [vals[j] for j in _PAIRS])  # noqa: E731 (per sub-block j)
        at = b.add(off, c64(4))  # q[k] = scale byte k
        byte = lambda idx: emit_bytes_i16(b, p8, at, [idx[j] for j in _PAIRS])  # noqa: E731 (q[idx[j]] per j)
        low = i16([63] * 4 + [15] * 4)  # j < 4: six bits of q[j] (scale) or q[j + 4] (min); else four
        # j >= 4: the 2 high bits of q[j - 4] (scale) or q[j] (min) above 4 low ones
        top = lambda idx: b.and_(b.lshr(byte(idx), ivec(16, 2, I16)), i16([0] * 4 + [0x30] * 4))  # noqa: E731
        sc = b.or_(b.and_(byte([0, 1, 2, 3, 8, 9, 10, 11]), low), top([0] * 4 + [0, 1, 2, 3]))
        mn = b.or_(b.and_(b.lshr(byte([4, 5, 6, 7, 8, 9, 10, 11]), i16([0] * 4 + [4] * 4)), low),
                   top([0] * 4 + [4, 5, 6, 7]))
        return d, dmin, us, sc, mn
    return superblock


Q4_K.int8_dot, Q4_K.int8_avx2 = True, True  # noqa: F821 (registered above); codes 0..15
Q4_K.int8_scales = staticmethod(_k4_int8(-1, 16))  # noqa: F821
Q5_K.int8_dot, Q5_K.int8_avx2 = True, True  # noqa: F821; codes 0..31
Q5_K.int8_scales = staticmethod(_k4_int8(16, 48))  # noqa: F821


def _q6_k_int8(b, p8, off):
    """Q6_K: the six-bit codes 0..63 (value code - 32, ``int8_offset``), half h of 128 from
    ql[64h..], qh[32h..] as ggml's dequantize_row_q6_K; 16 int8 scales at 192."""
    from ..simd import I8, c64, emit_bytes_i16, emit_half, ivec, load, vec
    d = emit_half(b, p8, b.add(off, c64(208)))
    us = []
    for h in range(2):
        lo = load(b, p8, b.add(off, c64(64 * h)), vec(I8, 32))
        hi = load(b, p8, b.add(off, c64(64 * h + 32)), vec(I8, 32))
        qh = load(b, p8, b.add(off, c64(128 + 32 * h)), vec(I8, 32))
        for g in range(4):
            low = b.and_(lo if g % 2 == 0 else hi, ivec(32, 15, I8)) if g < 2 else \
                b.lshr(lo if g % 2 == 0 else hi, ivec(32, 4, I8))
            top = b.shl(b.and_(b.lshr(qh, ivec(32, 2 * g, I8)), ivec(32, 3, I8)), ivec(32, 4, I8))
            us.append(b.or_(low, top))
    return d, None, us, emit_bytes_i16(b, p8, b.add(off, c64(192)), range(16), signed=True), None


Q6_K.int8_dot, Q6_K.int8_offset, Q6_K.int8_avx2 = True, 32, True  # noqa: F821 (registered above); codes 0..63
Q6_K.int8_scales = staticmethod(_q6_k_int8)  # noqa: F821
