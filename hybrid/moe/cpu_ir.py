"""LLVM IR kernels of the CPU expert path, inlined into Numba code as intrinsics.

Numba's own vectoriser widens the MXFP4 nibble arithmetic to int64 and has no
table lookup, so the inner loops are written here as IR: a 32-weight block is
decoded in registers (vpermps on the 16-entry table times the block scale) and
FMA'd into R rows x T tokens of accumulators. Three variants of the lookup:
AVX-512 (16 lanes), AVX2 (8 lanes plus a sign bit) and generic arithmetic any
LLVM target compiles; ``best_isa()`` picks the host's.
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from quant import mxfp4

from .activation import ACT_CODE, SWIGLU_ALPHA, SWIGLU_LIMIT

_MX_BYTES = GGML_QUANT_SIZES[T.MXFP4][1]

ISAS = ("generic", "avx2", "avx512")


def _host_features() -> set:
    """Features numba's JIT compiles for (respects NUMBA_CPU_FEATURES / ENABLE_AVX)."""
    from numba.core import codegen, config
    import llvmlite.binding as ll
    if not ll.get_process_triple().startswith(("x86_64", "i386", "i686")):
        return set()
    feats = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
    return {f[1:] for f in feats.split(",") if f.startswith("+")}


_FEATURES = _host_features()
_HAS = {"avx512": "avx512f" in _FEATURES, "avx2": "avx2" in _FEATURES, "generic": True}
W = 16 if _HAS["avx512"] else 8  # float32 lanes of the f32 kernels


def best_isa() -> str:
    return "avx512" if _HAS["avx512"] else "avx2" if _HAS["avx2"] else "generic"


def supported_isas() -> list[str]:
    return [name for name in ISAS if _HAS[name]]


# ---------------------------------------------------------------- LLVM IR kernels
_F32, _I32, _I64, _I8 = ir.FloatType(), ir.IntType(32), ir.IntType(64), ir.IntType(8)
_P8 = _I8.as_pointer()
_KV = [float(v) for v in mxfp4.KVALUES]


def _vec(t, n):
    return ir.VectorType(t, n)


def _ivec(n, v):
    return ir.Constant(_vec(_I32, n), [v] * n)


def _splat(b, val, n):
    ty = _vec(val.type, n)
    v = b.insert_element(ir.Constant(ty, ir.Undefined), val, ir.Constant(_I32, 0))
    return b.shuffle_vector(v, ir.Constant(ty, ir.Undefined), ir.Constant(_vec(_I32, n), [0] * n))


def _shuf(b, p, q, idx):
    return b.shuffle_vector(p, q, ir.Constant(_vec(_I32, len(idx)), idx))


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


def _fma(b, a, x, c):
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(a.type, [a.type] * 3),
                                        f"llvm.fmuladd.v{a.type.count}f32")
    return b.call(fn, [a, x, c])


def _load(b, p8, off, ty):
    return b.load(b.bitcast(b.gep(p8, [off]), ty.as_pointer()), align=1 if ty.element == _I8 else 4)


def _store(b, val, p8, off):
    b.store(val, b.bitcast(b.gep(p8, [off]), val.type.as_pointer()), align=4)


def _c64(v):
    return ir.Constant(_I64, v)


def _mode(isa: str) -> tuple[str, int]:
    """(lookup used, lanes) for a requested isa on this host."""
    if isa == "avx512":
        return ("avx512" if _HAS["avx512"] else "generic"), 16
    if isa == "avx2":
        return ("avx2" if _HAS["avx2"] else "generic"), 8
    return "generic", W


def _scales_table(module):
    name = "hyb_e8m0_half"
    try:
        return module.get_global(name)
    except KeyError:
        ty = ir.ArrayType(_F32, 256)
        gv = ir.GlobalVariable(module, ty, name)
        gv.global_constant = True
        gv.linkage = "internal"
        gv.initializer = ir.Constant(ty, [float(v) for v in mxfp4.SCALES])
        return gv


def _emit_block(b, mode, lanes, p8, off):
    """Decode the MXFP4 block at byte ``off`` into 32/lanes float vectors (element order)."""
    # half(e) from quant/mxfp4.SCALES as an IR constant: a broadcast load, no shuffle port
    e = b.zext(b.load(b.gep(p8, [off])), _I64)
    d = _splat(b, b.load(b.gep(_scales_table(b.module), [_c64(0), e])), lanes)
    qs = _load(b, p8, b.add(off, _c64(1)), _vec(_I8, 16))
    if lanes == 16:
        lo = [b.zext(qs, _vec(_I32, 16))]
    else:
        lo = [b.zext(b.shuffle_vector(qs, qs, ir.Constant(_vec(_I32, 8), list(range(h, h + 8)))),
                     _vec(_I32, 8)) for h in (0, 8)]
    idxs = lo + [b.lshr(i, _ivec(lanes, 4)) for i in lo]  # low nibbles 0..15, then high 16..31
    VF = _vec(_F32, lanes)
    if mode == "avx512":
        perm = cgutils.get_or_insert_function(b.module, ir.FunctionType(VF, [VF, _vec(_I32, 16)]),
                                              "llvm.x86.avx512.permvar.sf.512")
        tbl = b.fmul(ir.Constant(VF, _KV), d)  # vpermps reads only the low 4 index bits
        return [b.call(perm, [tbl, i]) for i in idxs]
    out = []
    if mode == "avx2":
        perm = cgutils.get_or_insert_function(b.module, ir.FunctionType(VF, [VF, _vec(_I32, 8)]),
                                              "llvm.x86.avx2.permps")
        tbl = b.fmul(ir.Constant(VF, _KV[:8]), d)  # magnitudes; low 3 index bits
    for i in idxs:
        if mode == "avx2":
            mag = b.call(perm, [tbl, i])
        else:  # E2M1 doubled from bits: m<2 -> m, else float with bits (m+254)<<22
            m = b.and_(i, _ivec(lanes, 7))
            big = b.bitcast(b.shl(b.add(m, _ivec(lanes, 254)), _ivec(lanes, 22)), VF)
            mag = b.fmul(b.select(b.icmp_unsigned("<", m, _ivec(lanes, 2)), b.uitofp(m, VF), big), d)
        sign = b.and_(b.shl(i, _ivec(lanes, 28)), _ivec(lanes, -2 ** 31))
        out.append(b.bitcast(b.xor(b.bitcast(mag, _vec(_I32, lanes)), sign), VF))
    return out


def _new_fn(module, name, argtys):
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(ir.VoidType(), argtys), name)
    if not fn.is_declaration:
        return fn, None
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    return fn, fn.append_basic_block("entry")


def _emit_loop(fn, entry, n, nacc, VF, body):
    """do { accs = body(i, accs) } while (++i < n); returns (builder at exit, final accs)."""
    loop, done = fn.append_basic_block("loop"), fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    b.branch(loop)
    b.position_at_end(loop)
    i = b.phi(_I64)
    i.add_incoming(_c64(0), entry)
    accs = []
    for _ in range(nacc):
        ph = b.phi(VF)
        ph.add_incoming(ir.Constant(VF, [0.0] * VF.count), entry)
        accs.append(ph)
    new = body(b, i, accs)
    nxt = b.add(i, _c64(1))
    i.add_incoming(nxt, b.block)
    for ph, v in zip(accs, new):
        ph.add_incoming(v, b.block)
    b.cbranch(b.icmp_signed("<", nxt, n), loop, done)
    b.position_at_end(done)
    return b, new


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


def _build_mx_dot(module, R, T_, isa):
    """out[t, r] += W[r, blocks] . x[t, :] for R rows x T tokens, MXFP4 read directly."""
    mode, lanes = _mode(isa)
    fn, entry = _new_fn(module, f"hyb_mx_dot_r{R}_t{T_}_{isa}", [_P8, _I64, _I64, _I64, _P8, _I64, _I64,
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
            wv = _emit_block(b, mode, lanes, w, b.add(b.add(woff, b.mul(_c64(r), wst)), b.mul(i, _c64(_MX_BYTES))))
            for t in range(T_):
                a = accs[r * T_ + t]
                for v in range(nv):
                    a = _fma(b, wv[v], xs[t][v], a)
                new.append(a)
        return new

    b, accs = _emit_loop(fn, entry, nblk, R * T_, VF, body)
    _emit_store_sums(b, accs, R, T_, lanes, out, ooff, ost)
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

    b, accs = _emit_loop(fn, entry, nvec, R * T_, VF, body)
    _emit_store_sums(b, accs, R, T_, W, out, ooff, ost)
    b.ret_void()
    return fn


def _build_mx_decode(module, isa):
    """out[ooff + 32*i + j] = value j of block i, for nblk blocks starting at byte woff."""
    mode, lanes = _mode(isa)
    fn, entry = _new_fn(module, f"hyb_mx_decode_{isa}", [_P8, _I64, _I64, _P8, _I64])
    if entry is None:
        return fn
    w, woff, nblk, out, ooff = fn.args
    VF = _vec(_F32, lanes)

    def body(b, i, accs):
        vals = _emit_block(b, mode, lanes, w, b.add(woff, b.mul(i, _c64(_MX_BYTES))))
        ob = b.shl(b.add(ooff, b.mul(i, _c64(32))), _c64(2))
        for v, val in enumerate(vals):
            _store(b, val, out, b.add(ob, _c64(4 * lanes * v)))
        return []

    b, _ = _emit_loop(fn, entry, nblk, 0, VF, body)
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

    b, _ = _emit_loop(fn, entry, nvec, 0, VF, body)
    b.ret_void()
    return fn


def _ptr(context, builder, aty, val):
    return builder.bitcast(context.make_array(aty)(context, builder, val).data, _P8)


def _i64(context, builder, ty, val):
    return context.cast(builder, val, ty, types.int64)


def _make_intrinsic(name, build, n_args, array_args):
    """A numba intrinsic calling the IR function ``build(module)``; arrays pass as data pointers.

    ``n_args`` arguments: arrays at the positions ``array_args``, integers elsewhere.
    """
    def typer(args):
        for i, t in enumerate(args):
            ok = (isinstance(t, types.Array) and t.layout == "C") if i in array_args else isinstance(t, types.Integer)
            if not ok:
                return None

        def codegen(context, builder, signature, vals):
            a = [_ptr(context, builder, t, v) if isinstance(t, types.Array) else _i64(context, builder, t, v)
                 for t, v in zip(signature.args, vals)]
            builder.call(build(builder.module), a)
            return context.get_dummy_value()
        return types.void(*args), codegen

    # numba lowers only fixed positional parameters: write the function with n_args of them
    params = ", ".join(f"a{i}" for i in range(n_args))
    ns = {"typer": typer}
    exec(f"def {name}(typingctx, {params}):\n    return typer(({params},))", ns)
    return intrinsic(ns[name])


def make_mx_dot(R, T_, isa):
    """Intrinsic ``(w u8[], woff, wstride, nblk, x f32[], xoff, xstride, out f32[], ooff, ostride)``:
    out[ooff + t*ostride + r] += row r (bytes from woff + r*wstride, nblk blocks) . x[xoff + t*xstride:]."""
    return _make_intrinsic(f"mx_dot_{R}x{T_}_{isa}", lambda m: _build_mx_dot(m, R, T_, isa), 10, (0, 4, 7))


def make_mx_decode(isa):
    """Intrinsic ``(w u8[], woff, nblk, out f32[], ooff)``: decode nblk MXFP4 blocks to floats."""
    return _make_intrinsic(f"mx_decode_{isa}", lambda m: _build_mx_decode(m, isa), 5, (0, 3))


def make_f32_dot(R, T_):
    """Intrinsic ``(w f32[], woff, wstride, nvec, x f32[], xoff, xstride, out f32[], ooff, ostride)``."""
    return _make_intrinsic(f"f32_dot_{R}x{T_}", lambda m: _build_f32_dot(m, R, T_), 10, (0, 4, 7))


def make_act(act):
    """Intrinsic ``(h f32[], hoff, u f32[], uoff, gb f32[], gboff, ub f32[], uboff, nvec)``:
    h = act(h + gb, u + ub) on nvec vectors of W floats (act 0: swiglu_oai, 1: silu)."""
    return _make_intrinsic(f"act_{act}_w{W}", lambda m: _build_act(m, act), 9, (0, 2, 4, 6))
