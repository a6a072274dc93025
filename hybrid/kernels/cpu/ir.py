"""LLVM IR kernels of the CPU expert path, inlined into Numba code as intrinsics.

Dot products of R rows x T tokens over MXFP4 rows decoded in registers (the
decoders live with the format, in ``quant.simd``) or over float32 tiles, and
the fused activation. The ISA variants and ``best_isa()`` come from
``quant.simd``.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import cgutils

from gguf.constants import GGMLQuantizationType as GT

from quant import mxfp4, registry as qregistry
from quant.types import row_nbytes
from quant.cpu import Q8_DREP, Q8K_REC, Q8_REC
from quant.simd import (F32 as _F32, HAS as _HAS, I8 as _I8, I16 as _I16, I32 as _I32, I64 as _I64, ISAS, P8 as _P8,
                        U8_OFFSET, best_isa, c64 as _c64, emit_abs_i8, emit_dot_i16, emit_dot_u8_i8,
                        emit_dot_u8_i8_scaled, emit_loop, emit_pair_u8, emit_sign_i8, ivec as _ivec, load as _load,
                        make_intrinsic as _make_intrinsic, make_mx_decode, mode as _mode, new_fn as _new_fn,
                        q8_isa, q8_isas, shuf as _shuf, splat as _splat, store as _store, supported_isas,
                        vec as _vec)

from ...moe.activation import ACT_CODE, SWIGLU_ALPHA, SWIGLU_LIMIT

__all__ = ["ISAS", "W", "best_isa", "supported_isas", "q8_isa", "q8_isas", "q8_types", "q8s_types", "make_mx_dot",
           "make_q8_dot", "make_block_dot", "block_dot_types", "GROUP",
           "make_mx_decode", "make_f32_dot", "make_act"]

W = 16 if _HAS["avx512"] else 8  # float32 lanes of the f32 kernels
# Bytes of 32 weights of each format the block dots read, and their register decoders.
GROUP = 32  # elements per step of the block dots: one format's ``ir_block`` yields 32 // lanes vectors


def block_dot_types() -> tuple:
    """GGML ids the block dots read: the formats with an ``ir_block`` whose block divides GROUP."""
    return tuple(f.ggml_type for f in qregistry.formats() if f.ir_block is not None and GROUP % f.block == 0)


# ---------------------------------------------------------------- LLVM IR kernels
def _row_sums(b, vecs):
    """R vectors of L lanes -> one vector of their R lane-sums, in order.

    A transpose-and-add tree: ~4 ops per vector instead of a full horizontal sum
    each; the order is fixed, so results never depend on the caller.
    """
    R, L = len(vecs), vecs[0].type.count
    while len(vecs) & (len(vecs) - 1):
        vecs = vecs + [ir.Constant(vecs[0].type, [0.0] * L)]
    size = L  # lanes per group; a vector holds L // size groups
    while len(vecs) > 1:  # merge neighbours: each group's halves added, p's groups then q's
        half = size // 2
        firsts = [g * size + i for g in range(L // size) for i in range(half)]
        nxt = []
        for p, q in zip(vecs[::2], vecs[1::2]):
            lo = _shuf(b, p, q, firsts + [L + j for j in firsts])
            hi = _shuf(b, p, q, [j + half for j in firsts] + [L + j + half for j in firsts])
            nxt.append(b.fadd(lo, hi))
        vecs, size = nxt, half
    v, n = vecs[0], L
    while size > 1:  # one vector left: add the halves of every group
        half = size // 2
        groups = n // size
        v = b.fadd(_shuf(b, v, v, [g * size + i for g in range(groups) for i in range(half)]),
                   _shuf(b, v, v, [g * size + half + i for g in range(groups) for i in range(half)]))
        n, size = n // 2, half
    return v if n == R else _shuf(b, v, v, list(range(R)))


def _zero(VF):
    return ir.Constant(VF, [0.0] * VF.count)


def _fma(b, a, x, c):
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(a.type, [a.type] * 3),
                                        f"llvm.fmuladd.v{a.type.count}f32")
    return b.call(fn, [a, x, c])


def _emit_store_sums(b, accs, R, T_, lanes, out, ooff, ost):
    # out[ooff + t*ost + r] += sum(acc[r, t]): R consecutive floats per token
    for t in range(T_):
        sums = _row_sums(b, [accs[r * T_ + t] for r in range(R)])
        o = b.shl(b.add(ooff, b.mul(_c64(t), ost)), _c64(2))
        if R == 1:
            p = b.bitcast(b.gep(out, [o]), _F32.as_pointer())
            b.store(b.fadd(b.load(p), b.extract_element(sums, ir.Constant(_I32, 0))), p)
        else:
            p = b.bitcast(b.gep(out, [o]), sums.type.as_pointer())
            b.store(b.fadd(b.load(p, align=4), sums), p, align=4)


def _build_mx_dot(module, R, T_, isa, wtype=int(GT.MXFP4)):
    """out[t, r] += W[r, groups] . x[t, :] for R rows x T tokens, groups of GROUP weights of GGML
    type ``wtype`` (one of ``block_dot_types()``) decoded in registers by its ``ir_block``."""
    isa_mode, lanes = _mode(isa)
    f = qregistry.get(wtype)
    block_bytes = row_nbytes(wtype, GROUP)
    fmt = f.name.lower()
    fn, entry = _new_fn(module, f"hyb_{fmt}_dot_r{R}_t{T_}_{isa}", [_P8, _I64, _I64, _I64, _P8, _I64, _I64,
                                                                  _P8, _I64, _I64])
    if entry is None:
        return fn
    w, woff, wst, nblk, x, xoff, xst, out, ooff, ost = fn.args
    VF, nv = _vec(_F32, lanes), 32 // lanes

    def body(b, i, accs):
        xb = b.shl(b.add(xoff, b.mul(i, _c64(32))), _c64(2))
        xst4 = b.shl(xst, _c64(2))
        xs = [[_load(b, x, b.add(b.add(xb, b.mul(_c64(t), xst4)), _c64(4 * lanes * v)), VF)
               for v in range(nv)] for t in range(T_)]
        new = []
        for r in range(R):
            at = b.add(b.add(woff, b.mul(_c64(r), wst)), b.mul(i, _c64(block_bytes)))
            wv = f.ir_block(b, isa_mode, lanes, w, at)
            for t in range(T_):
                a = accs[r * T_ + t]
                for v in range(nv):
                    a = _fma(b, wv[v], xs[t][v], a)
                new.append(a)
        return new

    b, accs = emit_loop(fn, entry, nblk, [_zero(VF)] * (R * T_), body)
    _emit_store_sums(b, accs, R, T_, lanes, out, ooff, ost)
    b.ret_void()
    return fn


def _build_q8_dot(module, R, T_, variant, wtype=int(GT.MXFP4)):
    """out[t, r] += W[r, blocks] . x[t] for R rows x T tokens: the weights' blocks of 32 as unsigned
    bytes (the format's ``int8_block``: value + ``int8_offset``), x as int8 blocks
    (quant.cpu.quantize_q8, whose corrections are for MXFP4's offset and are rescaled for
    another), integer multiply-add per block, then float(block sum) * scale * d_x into float32
    accumulators; a block with a min (``value = scale * (u - offset) - min``: Q4_1, Q5_1) also
    subtracts min * d_x * (the token block's code sum, from its corrections). 'vnni512' takes two
    blocks per 512-bit step and an odd last block in 256 bits. A format with ``int8_signed``
    bytes (Q8_0, IQ4_NL: the values, up to 128 in magnitude) becomes value + 128 with VNNI
    (vpdpbusd does not saturate) and, on AVX2, vpmaddubsw(|value|, q * sign(value))."""
    fmt = qregistry.get(wtype)
    tag = "" if wtype == int(GT.MXFP4) else f"_{fmt.name.lower()}"
    fn, entry = _new_fn(module, f"hyb_q8_dot{tag}_r{R}_t{T_}_{variant}",
                        [_P8, _I64, _I64, _I64, _P8, _P8, _I64, _I64, _P8, _I64, _I64])
    if entry is None:
        return fn
    w, woff, wst, nblk, qc, d, xo, xst, out, ooff, ost = fn.args
    V8, V16 = _vec(_F32, 8), _vec(_F32, 16)
    signed = fmt.int8_signed
    sign_trick = signed and variant == "avx2"
    bb, offset = fmt.block_bytes, (0 if sign_trick else 128) if signed else fmt.int8_offset

    def rescaled(b, c):  # corrections -U8_OFFSET * partial sums -> -offset * partial sums (exact)
        if offset == U8_OFFSET:
            return c
        n = c.type.count
        return b.mul(b.sdiv(c, _ivec(n, U8_OFFSET)), _ivec(n, offset))

    def x_block(b, blk, lanes):  # token data of block(s) blk (and blk+1 for 16 lanes)
        rec = b.mul(blk, _c64(Q8_REC))
        dx = _load(b, d, b.mul(blk, _c64(4 * Q8_DREP)), _vec(_F32, lanes))
        if lanes == 8:
            q, c = _load(b, qc, rec, _vec(_I8, 32)), _load(b, qc, b.add(rec, _c64(32)), _vec(_I32, 8))
        else:
            rec1 = b.add(rec, _c64(Q8_REC))
            q = _shuf(b, _load(b, qc, rec, _vec(_I8, 32)), _load(b, qc, rec1, _vec(_I8, 32)), list(range(64)))
            c = _shuf(b, _load(b, qc, b.add(rec, _c64(32)), _vec(_I32, 8)),
                      _load(b, qc, b.add(rec1, _c64(32)), _vec(_I32, 8)), list(range(16)))
        # -(partial code sums) as floats, for a min (unused, and so dropped, without one)
        neg = b.sitofp(b.sdiv(c, _ivec(lanes, U8_OFFSET)), _vec(_F32, lanes))
        return q, rescaled(b, c), neg, dx

    def block(b, wb):  # (u, scale, min or None); signed values: v + 128 (VNNI) or v itself (sign trick)
        u, *rest = fmt.int8_block(b, w, wb)
        u = b.xor(u, _ivec(32, -128, _I8)) if signed and not sign_trick else u
        return (u, *rest) if len(rest) == 2 else (u, *rest, None)

    def pair(b, wb):  # two consecutive blocks: MXFP4's fused 512-bit decode, else two blocks joined
        if wtype == int(GT.MXFP4):
            return (*emit_pair_u8(b, w, wb), None, None)
        (u0, d0, m0), (u1, d1, m1) = block(b, wb), block(b, b.add(wb, _c64(bb)))
        return _shuf(b, u0, u1, list(range(64))), d0, d1, m0, m1

    def lanes16(b, v0, v1):
        return _shuf(b, _splat(b, v0, 8), _splat(b, v1, 8), list(range(16)))

    def step(b, blocks, accs, wide):
        """One block (or a pair, wide) at block index ``blocks`` for every row and token."""
        lanes = 16 if wide else 8
        xs = [x_block(b, b.add(b.add(xo, blocks), b.mul(_c64(t), xst)), lanes) for t in range(T_)]
        new = []
        for r in range(R):
            wb = b.add(b.add(woff, b.mul(_c64(r), wst)), b.mul(blocks, _c64(bb)))
            if wide:
                u, d0, d1, m0, m1 = pair(b, wb)
                dw, mw = lanes16(b, d0, d1), None if m0 is None else lanes16(b, m0, m1)
            else:
                u, d0, m0 = block(b, wb)
                dw, mw = _splat(b, d0, 8), None if m0 is None else _splat(b, m0, 8)
            mag = emit_abs_i8(b, u) if sign_trick else u
            for t in range(T_):
                q, c, neg, dx = xs[t]
                q = emit_sign_i8(b, q, u) if sign_trick else q
                s = b.sitofp(emit_dot_u8_i8(b, variant if wide or variant != "vnni512" else "vnni", mag, q, c),
                             _vec(_F32, lanes))
                a = _fma(b, s, b.fmul(dw, dx), accs[r * T_ + t])
                new.append(a if mw is None else _fma(b, neg, b.fmul(mw, dx), a))  # neg: -sums, so - min
        return new

    if variant != "vnni512":
        b, accs = emit_loop(fn, entry, nblk, [_zero(V8)] * (R * T_), lambda b, i, a: step(b, i, a, False))
    else:
        # pairs of blocks on 512 bits (none when nblk is 1), then an odd last block on 256
        npair = ir.IRBuilder(entry).ashr(nblk, _c64(1))
        b, wides = emit_loop(fn, entry, npair, [_zero(V16)] * (R * T_),
                             lambda b, i, a: step(b, b.shl(i, _c64(1)), a, True), may_be_empty=True)
        mid = b.block
        tail, done = fn.append_basic_block("tail"), fn.append_basic_block("odd_done")
        halves = [b.fadd(_shuf(b, p, p, list(range(8))), _shuf(b, p, p, list(range(8, 16)))) for p in wides]
        b.cbranch(b.icmp_signed("<", b.shl(npair, _c64(1)), nblk), tail, done)
        b.position_at_end(tail)
        tail_accs = step(b, b.sub(nblk, _c64(1)), halves, False)
        tail_end = b.block
        b.branch(done)
        b.position_at_end(done)
        accs = []
        for h, t in zip(halves, tail_accs):
            p = b.phi(V8)
            p.add_incoming(h, mid)
            p.add_incoming(t, tail_end)
            accs.append(p)
    _emit_store_sums(b, accs, R, T_, 8, out, ooff, ost)
    b.ret_void()
    return fn


def _build_f32_dot(module, R, T_):
    """out[t, r] += w[r, :nvec*W] . x[t, :nvec*W] (float32 rows, element offsets)."""
    fn, entry = _new_fn(module, f"hyb_f32_dot_r{R}_t{T_}_w{W}", [_P8, _I64, _I64, _I64, _P8, _I64, _I64,
                                                                _P8, _I64, _I64])
    if entry is None:
        return fn
    w, woff, wst, nvec, x, xoff, xst, out, ooff, ost = fn.args
    VF = _vec(_F32, W)

    def body(b, i, accs):
        k = b.mul(i, _c64(W))
        xs = [_load(b, x, b.shl(b.add(b.add(xoff, b.mul(_c64(t), xst)), k), _c64(2)), VF) for t in range(T_)]
        new = []
        for r in range(R):
            wv = _load(b, w, b.shl(b.add(b.add(woff, b.mul(_c64(r), wst)), k), _c64(2)), VF)
            new += [_fma(b, wv, xs[t], accs[r * T_ + t]) for t in range(T_)]
        return new

    b, accs = emit_loop(fn, entry, nvec, [_zero(VF)] * (R * T_), body)
    _emit_store_sums(b, accs, R, T_, W, out, ooff, ost)
    b.ret_void()
    return fn


def _exp(b, x, VF):
    """Vector e^x, float32 (Cephes expf: ~1 ulp); x clamped so that 2^n stays a normal float."""
    def c(v):
        return ir.Constant(VF, [float(np.float32(v))] * VF.count)

    def poly(r, coefs):
        y = c(coefs[0])
        for k in coefs[1:]:
            y = _fma(b, y, r, c(k))
        return y
    n = VF.count
    x = b.call(_vfn(b, "llvm.minnum", VF, 2), [b.call(_vfn(b, "llvm.maxnum", VF, 2), [x, c(-87.3)]), c(88.0)])
    fx = b.call(_vfn(b, "llvm.floor", VF, 1), [_fma(b, x, c(1.44269504088896341), c(0.5))])
    r = _fma(b, fx, c(2.12194440e-4), _fma(b, fx, c(-0.693359375), x))
    y = poly(r, (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                 5.0000001201e-1))
    y = b.fadd(_fma(b, y, b.fmul(r, r), r), c(1.0))
    bits = b.shl(b.add(b.fptosi(fx, _vec(_I32, n)), _ivec(n, 127)), _ivec(n, 23))
    return b.fmul(y, b.bitcast(bits, VF))


def _vfn(b, name, VF, nargs):
    return cgutils.get_or_insert_function(b.module, ir.FunctionType(VF, [VF] * nargs), f"{name}.v{VF.count}f32")


def _build_act(module, act):
    """h[i] = act(h[i] + gb[i], u[i] + ub[i]) for nvec vectors (offsets in elements)."""
    fn, entry = _new_fn(module, f"hyb_act_{act}_w{W}", [_P8, _I64, _P8, _I64, _P8, _I64, _P8, _I64, _I64])
    if entry is None:
        return fn
    h, ho, u, uo, gb, go, ub, ubo, nvec = fn.args
    VF = _vec(_F32, W)

    def c(v):
        return ir.Constant(VF, [float(np.float32(v))] * W)

    def body(b, i, accs):
        k = b.mul(i, _c64(W))
        at = [b.shl(b.add(o, k), _c64(2)) for o in (ho, uo, go, ubo)]
        g = b.fadd(_load(b, h, at[0], VF), _load(b, gb, at[2], VF))
        v = b.fadd(_load(b, u, at[1], VF), _load(b, ub, at[3], VF))
        if act == ACT_CODE["swiglu_oai"]:  # hybrid.moe.activation; clamps by compare+select keep NaN
            lim = c(SWIGLU_LIMIT)
            g = b.select(b.fcmp_ordered(">", g, lim), lim, g)
            v = b.select(b.fcmp_ordered(">", v, lim), lim, b.select(b.fcmp_ordered("<", v, c(-SWIGLU_LIMIT)),
                                                                     c(-SWIGLU_LIMIT), v))
            a = b.fmul(b.fdiv(g, b.fadd(c(1.0), _exp(b, b.fmul(g, c(-SWIGLU_ALPHA)), VF))), b.fadd(v, c(1.0)))
        else:  # silu(g) * u
            a = b.fmul(b.fdiv(g, b.fadd(c(1.0), _exp(b, b.fsub(c(0.0), g), VF))), v)
        _store(b, a, h, at[0])
        return []

    b, _ = emit_loop(fn, entry, nvec, [], body)
    b.ret_void()
    return fn


def make_mx_dot(R, T_, isa):
    """Intrinsic ``(w u8[], woff, wstride, nblk, x f32[], xoff, xstride, out f32[], ooff, ostride)``:
    out[ooff + t*ostride + r] += row r (bytes from woff + r*wstride, nblk blocks) . x[xoff + t*xstride:]."""
    return _make_intrinsic(f"mx_dot_{R}x{T_}_{isa}", lambda m: _build_mx_dot(m, R, T_, isa), 10, (0, 4, 7))


def make_block_dot(wtype, R, T_, isa):
    """As ``make_mx_dot`` for rows of any GGML type in ``block_dot_types()`` (dense weights)."""
    if not qregistry.has(wtype) or int(wtype) not in block_dot_types():
        raise ValueError(f"the block dots read {', '.join(qregistry.type_name(t) for t in block_dot_types())}, "
                         f"not {qregistry.type_name(wtype)}")
    fmt = qregistry.get(wtype).name.lower()
    return _make_intrinsic(f"{fmt}_dot_{R}x{T_}_{isa}", lambda m: _build_mx_dot(m, R, T_, isa, int(wtype)), 10,
                           (0, 4, 7))


def _build_q8s_dot(module, R, T_, variant, wtype):
    """As ``_build_q8_dot`` for super-blocks of 256 whose sub-block scales are integers
    (``int8_scales``: the K-quants, the i-quants, TQ1_0/TQ2_0), against activations in
    super-blocks of 256 (quant.cpu.quantize_q8k: one d_x, the sums of each 16). Per row, token
    and super-block, as ggml's K-quant x Q8_K dots:
    isum = sum over the 8 sub-blocks of vpmaddubsw(u, q) under the i16 scales (vpmaddwd, or
    vpdpwssd with VNNI) - offset * (scales . sums), then acc += isum * (d * d_x) and, for a min,
    acc -= (mins . sums) * (dmin * d_x): 2 integer ops per 32 multiply-adds, the floats once per
    256 (a format with ``int8_signed`` bytes, IQ4_XS: vpmaddubsw(|w|, q * sign(w)), one op more).
    ``xo``/``xstride`` count super-blocks; ``nblk`` blocks of 32."""
    fmt = qregistry.get(wtype)
    fn, entry = _new_fn(module, f"hyb_q8s_dot_{fmt.name.lower()}_r{R}_t{T_}_{variant}",
                        [_P8, _I64, _I64, _I64, _P8, _P8, _I64, _I64, _P8, _I64, _I64])
    if entry is None:
        return fn
    w, woff, wst, nblk, qc, d, xo, xst, out, ooff, ost = fn.args
    V8, I16x16 = _vec(_F32, 8), _vec(_I16, 16)
    zero = _ivec(8, 0)
    offset = fmt.int8_offset
    nsb = ir.IRBuilder(entry).ashr(nblk, _c64(3))

    def body(b, i, accs):
        new = list(accs)
        xs = []  # per token: the 8 blocks' codes, the 16 sums, d_x
        for t in range(T_):
            sb = b.add(b.add(xo, i), b.mul(_c64(t), xst))
            rec = b.mul(sb, _c64(Q8K_REC))
            q = [_load(b, qc, b.add(rec, _c64(32 * j)), _vec(_I8, 32)) for j in range(8)]
            sums = _load(b, qc, b.add(rec, _c64(256)), I16x16)
            xs.append((q, sums, b.load(b.bitcast(b.gep(d, [b.mul(sb, _c64(4 * Q8_DREP))]), _F32.as_pointer()))))
        for r in range(R):
            wb = b.add(b.add(woff, b.mul(_c64(r), wst)), b.mul(i, _c64(fmt.block_bytes)))
            dw, dmin, us, sc, mn = fmt.int8_scales(b, w, wb)
            scj = [_shuf(b, sc, sc, [2 * j] * 8 + [2 * j + 1] * 8) for j in range(8)]
            mags = [emit_abs_i8(b, u) for u in us] if fmt.int8_signed else us
            osc = b.mul(sc, _ivec(16, -offset, _I16)) if offset else None
            nmn = None if mn is None else b.sub(_ivec(16, 0, _I16), mn)
            for t in range(T_):
                q, sums, dx = xs[t]
                isum = zero
                for j in range(8):  # signed weights: |w| times q under w's sign
                    qj = emit_sign_i8(b, q[j], us[j]) if fmt.int8_signed else q[j]
                    isum = emit_dot_u8_i8_scaled(b, variant, mags[j], qj, scj[j], isum)
                if osc is not None:
                    isum = emit_dot_i16(b, variant, osc, sums, isum)
                a = _fma(b, b.sitofp(isum, V8), _splat(b, b.fmul(dw, dx), 8), new[r * T_ + t])
                if nmn is not None:
                    m = b.sitofp(emit_dot_i16(b, variant, nmn, sums, zero), V8)
                    a = _fma(b, m, _splat(b, b.fmul(dmin, dx), 8), a)
                new[r * T_ + t] = a
        return new

    b, accs = emit_loop(fn, entry, nsb, [_zero(V8)] * (R * T_), body)
    _emit_store_sums(b, accs, R, T_, 8, out, ooff, ost)
    b.ret_void()
    return fn


def q8s_types() -> tuple:
    """GGML ids whose integer dot reads super-block activations (quant.cpu.quantize_q8k): the
    formats with ``int8_scales``."""
    return tuple(int(f.ggml_type) for f in qregistry.formats() if f.int8_dot and f.int8_scales is not None)


def q8_types(variant) -> tuple:
    """GGML ids with an integer dot on ``variant``: the formats' ``int8_block``, blocks of 32, or
    ``int8_scales``, super-blocks of 256; on 'avx2' (and for ``int8_scales``, whose kernel runs
    vpmaddubsw on every variant) only those whose bytes vpmaddubsw takes without saturating
    (``int8_avx2``)."""
    if variant is None:
        return ()
    return tuple(int(f.ggml_type) for f in qregistry.formats() if f.int8_dot and (variant != "avx2" or f.int8_avx2)
                 and ((f.int8_block is not None and f.block == 32)
                      or (f.int8_scales is not None and f.block == 256 and f.int8_avx2)))  # vpmaddubsw everywhere


def make_q8_dot(R, T_, variant, wtype=int(GT.MXFP4)):
    """Intrinsic ``(w u8[], woff, wstride, nblk, qc u8[], d f32[], xo, xstride, out f32[], ooff, ostride)``:
    out[ooff + t*ostride + r] += row r (bytes from woff + r*wstride, nblk >= 1 blocks of ``wtype``) . x_t,
    x_t the int8 blocks xo + t*xstride .. of (qc, d) (quant.cpu.quantize_q8; for ``q8s_types()``
    the super-blocks of quant.cpu.quantize_q8k, xo and xstride counting them). variant: one of
    quant.simd.q8_isas(); ``wtype`` one of ``q8_types(variant)``."""
    if variant not in ("avx2", "vnni", "vnni512"):
        raise ValueError(f"variant must be 'avx2', 'vnni' or 'vnni512', got {variant!r}")
    if int(wtype) not in q8_types(variant):
        raise ValueError(f"{qregistry.type_name(wtype)} has no integer dot on {variant} "
                         f"(it has: {', '.join(qregistry.type_name(t) for t in q8_types(variant))})")
    tag = "" if int(wtype) == int(GT.MXFP4) else f"{qregistry.get(wtype).name.lower()}_"
    f = qregistry.get(wtype)
    build = _build_q8s_dot if f.int8_scales is not None else _build_q8_dot
    return _make_intrinsic(f"q8_dot_{tag}{R}x{T_}_{variant}", lambda m: build(m, R, T_, variant, int(wtype)),
                           11, (0, 4, 5, 8))


def make_f32_dot(R, T_):
    """Intrinsic ``(w f32[], woff, wstride, nvec, x f32[], xoff, xstride, out f32[], ooff, ostride)``."""
    return _make_intrinsic(f"f32_dot_{R}x{T_}", lambda m: _build_f32_dot(m, R, T_), 10, (0, 4, 7))


def make_act(act):
    """Intrinsic ``(h f32[], hoff, u f32[], uoff, gb f32[], gboff, ub f32[], uboff, nvec)``:
    h = act(h + gb, u + ub) on nvec vectors of W floats (act 0: swiglu_oai, 1: silu)."""
    return _make_intrinsic(f"act_{act}_w{W}", lambda m: _build_act(m, act), 9, (0, 2, 4, 6))
