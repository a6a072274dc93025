"""MXFP4 decoded in SIMD registers: LLVM IR emitters inlined into Numba code.

Numba's own vectoriser widens the nibble arithmetic to int64 and has no table
lookup, so a 32-weight block is decoded here as IR. ``emit_block_f32`` gives
the block as float vectors (vpermps on the 16-entry table times the block
scale) in three variants: AVX-512 (16 lanes), AVX2 (8 lanes plus a sign bit)
and generic arithmetic any LLVM target compiles. ``best_isa()`` picks the
host's (numba's JIT target, so ``NUMBA_CPU_FEATURES`` can force a narrower
one). The helpers below (typed IR constants, loads, a counted loop, numba
intrinsics over arrays) are what the CPU expert kernels are written with too.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from . import tables as mxfp4  # MXFP4's tables (a leaf: the formats import this module)

ISAS = ("generic", "avx2", "avx512")


def _host_features() -> set:
    """Features numba's JIT compiles for (respects NUMBA_CPU_FEATURES / ENABLE_AVX)."""
    from numba.core import codegen, config
    import llvmlite.binding as ll
    if not ll.get_process_triple().startswith(("x86_64", "i386", "i686")):
        return set()
    feats = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
    return {f[1:] for f in feats.split(",") if f.startswith("+")}


FEATURES = frozenset(_host_features())
HAS = {"avx512": "avx512f" in FEATURES, "avx2": "avx2" in FEATURES, "generic": True}


def best_isa() -> str:
    return "avx512" if HAS["avx512"] else "avx2" if HAS["avx2"] else "generic"


def supported_isas() -> list[str]:
    return [name for name in ISAS if HAS[name]]


# ---------------------------------------------------------------- IR helpers
F32, I32, I64, I16, I8 = ir.FloatType(), ir.IntType(32), ir.IntType(64), ir.IntType(16), ir.IntType(8)
P8 = I8.as_pointer()
_KV = [float(v) for v in mxfp4.KVALUES]


def vec(t, n):
    return ir.VectorType(t, n)


def ivec(n, v, t=I32):
    return ir.Constant(vec(t, n), [v] * n)


def splat(b, val, n):
    ty = vec(val.type, n)
    v = b.insert_element(ir.Constant(ty, ir.Undefined), val, ir.Constant(I32, 0))
    return b.shuffle_vector(v, ir.Constant(ty, ir.Undefined), ir.Constant(vec(I32, n), [0] * n))


def shuf(b, p, q, idx):
    return b.shuffle_vector(p, q, ir.Constant(vec(I32, len(idx)), idx))


def load(b, p8, off, ty):
    return b.load(b.bitcast(b.gep(p8, [off]), ty.as_pointer()), align=1 if ty.element in (I8, I16) else 4)


def store(b, val, p8, off):
    b.store(val, b.bitcast(b.gep(p8, [off]), val.type.as_pointer()), align=4)


def c64(v):
    return ir.Constant(I64, v)


def declare(b, name, ret, args):
    return cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, args), name)


def new_fn(module, name, argtys):
    """An internal always-inline void function; (fn, entry block) or (fn, None) if already built."""
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(ir.VoidType(), argtys), name)
    if not fn.is_declaration:
        return fn, None
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    return fn, fn.append_basic_block("entry")


def emit_loop(fn, entry, n, accs0, body, may_be_empty=False):
    """do { accs = body(b, i, accs) } while (++i < n), accs starting at ``accs0``
    (IR values); returns (builder at the exit, final accs). ``n`` must be >= 1, unless
    ``may_be_empty``: then n <= 0 skips the loop and the accs stay ``accs0``."""
    loop, done = fn.append_basic_block("loop"), fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    if may_be_empty:
        b.cbranch(b.icmp_signed(">", n, c64(0)), loop, done)
    else:
        b.branch(loop)
    b.position_at_end(loop)
    i = b.phi(I64)
    i.add_incoming(c64(0), entry)
    accs = []
    for a0 in accs0:
        ph = b.phi(a0.type)
        ph.add_incoming(a0, entry)
        accs.append(ph)
    new = body(b, i, accs)
    loop_end = b.block
    nxt = b.add(i, c64(1))
    i.add_incoming(nxt, b.block)
    for ph, v in zip(accs, new):
        ph.add_incoming(v, b.block)
    b.cbranch(b.icmp_signed("<", nxt, n), loop, done)
    b.position_at_end(done)
    if may_be_empty:
        out = []
        for a0, v in zip(accs0, new):
            ph = b.phi(a0.type)
            ph.add_incoming(a0, entry)
            ph.add_incoming(v, loop_end)
            out.append(ph)
        return b, out
    return b, new


def _ptr(context, builder, aty, val):
    return builder.bitcast(context.make_array(aty)(context, builder, val).data, P8)


def _i64(context, builder, ty, val):
    return context.cast(builder, val, ty, types.int64)


def make_intrinsic(name, build, n_args, array_args):
    """A numba intrinsic calling the IR function ``build(module)``; arrays pass as data pointers.

    ``n_args`` arguments: C-contiguous arrays at the positions ``array_args``, integers elsewhere.
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


# ---------------------------------------------------------------- MXFP4 blocks
def mode(isa: str) -> tuple[str, int]:
    """(lookup used, float lanes) for a requested isa on this host."""
    if isa == "avx512":
        return ("avx512" if HAS["avx512"] else "generic"), 16
    if isa == "avx2":
        return ("avx2" if HAS["avx2"] else "generic"), 8
    return "generic", 16 if HAS["avx512"] else 8


def _global_table(module, name, elt, values):
    try:
        return module.get_global(name)
    except KeyError:
        ty = ir.ArrayType(elt, len(values))
        gv = ir.GlobalVariable(module, ty, name)
        gv.global_constant = True
        gv.linkage = "internal"
        gv.initializer = ir.Constant(ty, values)
        return gv


def emit_scale(b, p8, off):
    """half(e) of the block at byte ``off`` (float32 scalar), from quant.tables.SCALES as an IR constant."""
    e = b.zext(b.load(b.gep(p8, [off])), I64)
    tbl = _global_table(b.module, "hyb_e8m0_half", F32, [float(v) for v in mxfp4.SCALES])
    return b.load(b.gep(tbl, [c64(0), e]))


def emit_block_f32(b, isa_mode, lanes, p8, off):
    """Decode the MXFP4 block at byte ``off`` into 32/lanes float vectors (element order)."""
    # a broadcast load of the scale: no shuffle port
    d = splat(b, emit_scale(b, p8, off), lanes)
    qs = load(b, p8, b.add(off, c64(1)), vec(I8, 16))
    if lanes == 16:
        lo = [b.zext(qs, vec(I32, 16))]
    else:
        lo = [b.zext(b.shuffle_vector(qs, qs, ir.Constant(vec(I32, 8), list(range(h, h + 8)))),
                     vec(I32, 8)) for h in (0, 8)]
    idxs = lo + [b.lshr(i, ivec(lanes, 4)) for i in lo]  # low nibbles 0..15, then high 16..31
    VF = vec(F32, lanes)
    if isa_mode == "avx512":
        perm = declare(b, "llvm.x86.avx512.permvar.sf.512", VF, [VF, vec(I32, 16)])
        tbl = b.fmul(ir.Constant(VF, _KV), d)  # vpermps reads only the low 4 index bits
        return [b.call(perm, [tbl, i]) for i in idxs]
    out = []
    if isa_mode == "avx2":
        perm = declare(b, "llvm.x86.avx2.permps", VF, [VF, vec(I32, 8)])
        tbl = b.fmul(ir.Constant(VF, _KV[:8]), d)  # magnitudes; low 3 index bits
    for i in idxs:
        if isa_mode == "avx2":
            mag = b.call(perm, [tbl, i])
        else:  # E2M1 doubled from bits: m<2 -> m, else float with bits (m+254)<<22
            m = b.and_(i, ivec(lanes, 7))
            big = b.bitcast(b.shl(b.add(m, ivec(lanes, 254)), ivec(lanes, 22)), VF)
            mag = b.fmul(b.select(b.icmp_unsigned("<", m, ivec(lanes, 2)), b.uitofp(m, VF), big), d)
        sign = b.and_(b.shl(i, ivec(lanes, 28)), ivec(lanes, -2 ** 31))
        out.append(b.bitcast(b.xor(b.bitcast(mag, vec(I32, lanes)), sign), VF))
    return out


# ---------------------------------------------------------------- Q8_0 blocks
Q8_0_BYTES = GGML_QUANT_SIZES[T.Q8_0][1]  # a half scale, then 32 int8
_HALF_TO_F32 = 2.0 ** 112  # float32's exponent bias minus half's


def _half_to_f32(b, h):
    """IEEE halves ``h`` (i32 or <n x i32>, the 16 bits zero-extended) as float32, exactly and
    without branches: the bits moved up by 13 are a float32 short of 112 in the exponent
    (subnormal halves too), so one exact multiply finishes; exponent 31 (inf/NaN) is given
    float32's 255 first."""
    n = getattr(h.type, "count", None)
    k = (lambda v: ir.Constant(I32, v)) if n is None else (lambda v: ivec(n, v))  # noqa: E731
    em = b.and_(h, k(0x7FFF))
    top = b.select(b.icmp_unsigned(">=", em, k(0x7C00)), k(0x70000000), k(0))
    bits = b.or_(b.or_(b.shl(b.and_(h, k(0x8000)), k(16)), b.shl(em, k(13))), top)
    ft = F32 if n is None else vec(F32, n)
    return b.fmul(b.bitcast(bits, ft), ir.Constant(ft, _HALF_TO_F32 if n is None else [_HALF_TO_F32] * n))


def emit_half(b, p8, off):
    """The IEEE half at byte ``off`` as float32 (exact)."""
    return _half_to_f32(b, b.zext(b.load(b.bitcast(b.gep(p8, [off]), I16.as_pointer()), align=1), I32))


def emit_f16_block_f32(b, lanes, p8, off):
    """32 F16 values from byte ``off`` as 32/lanes float vectors (exact)."""
    hs = load(b, p8, off, vec(I16, 32))
    return [_half_to_f32(b, b.zext(shuf(b, hs, hs, list(range(h, h + lanes))), vec(I32, lanes)))
            for h in range(0, 32, lanes)]


def emit_bf16_block_f32(b, lanes, p8, off):
    """32 BF16 values from byte ``off`` as 32/lanes float vectors: the top halves of float32."""
    hs = load(b, p8, off, vec(I16, 32))
    return [b.bitcast(b.shl(b.zext(shuf(b, hs, hs, list(range(h, h + lanes))), vec(I32, lanes)), ivec(lanes, 16)),
                      vec(F32, lanes)) for h in range(0, 32, lanes)]


def emit_q8_0_block_f32(b, lanes, p8, off):
    """Decode the Q8_0 block at byte ``off`` into 32/lanes float vectors: int8 times the
    block's half scale, the product gguf computes (exact in float32)."""
    d = splat(b, emit_half(b, p8, off), lanes)
    qs = load(b, p8, b.add(off, c64(2)), vec(I8, 32))
    return [b.fmul(b.sitofp(shuf(b, qs, qs, list(range(h, h + lanes))), vec(F32, lanes)), d)
            for h in range(0, 32, lanes)]


def _build_mx_decode(module, isa):
    """out[ooff + 32*i + j] = value j of block i, for nblk blocks starting at byte woff."""
    isa_mode, lanes = mode(isa)
    fn, entry = new_fn(module, f"hyb_mx_decode_{isa}", [P8, I64, I64, P8, I64])
    if entry is None:
        return fn
    w, woff, nblk, out, ooff = fn.args

    def body(b, i, accs):
        vals = emit_block_f32(b, isa_mode, lanes, w, b.add(woff, b.mul(i, c64(mxfp4.BLOCK_BYTES))))
        if isa_mode != "avx512":  # the sign bit of nibble 8 gives -0.0 where gguf has +0.0: -0 + 0 = +0
            vals = [b.fadd(v, ir.Constant(v.type, [0.0] * lanes)) for v in vals]
        ob = b.shl(b.add(ooff, b.mul(i, c64(mxfp4.QK))), c64(2))
        for v, val in enumerate(vals):
            store(b, val, out, b.add(ob, c64(4 * lanes * v)))
        return []

    b, _ = emit_loop(fn, entry, nblk, [], body)
    b.ret_void()
    return fn


def make_mx_decode(isa):
    """Intrinsic ``(w u8[], woff, nblk, out f32[], ooff)``: decode nblk (>= 1) MXFP4 blocks
    starting at byte ``woff`` of ``w`` to floats at ``out[ooff:]``. No bounds checks."""
    return make_intrinsic(f"mx_decode_{isa}", lambda m: _build_mx_decode(m, isa), 5, (0, 3))


# ---------------------------------------------------------------- MXFP4 as int8 (the integer dot)
# The 16 values (E2M1 doubled, -12..12) shifted by U8_OFFSET are unsigned bytes 0..24, the
# operand vpmaddubsw/vpdpbusd read unsigned: sum (w + 12) q = sum w q + 12 sum q, and the
# activation side subtracts 12 sum q (once per token, see quant.cpu.quantize_q8).
U8_OFFSET = -int(mxfp4.KVALUES.min())
KVALUES_U8 = (mxfp4.KVALUES.astype(np.int32) + U8_OFFSET).astype(np.uint8)


def q8_isas() -> list[str]:
    """The integer-dot variants this host can run, best last: 'avx2' (vpmaddubsw + vpmaddwd on
    256 bits), 'vnni' (vpdpbusd on 256 bits: AVX-VNNI or AVX512-VNNI+VL), 'vnni512' (vpdpbusd
    on 512 bits, two blocks per instruction: AVX512-VNNI+BW)."""
    out = ["avx2"] if HAS["avx2"] else []
    if "avxvnni" in FEATURES or {"avx512vnni", "avx512vl"} <= FEATURES:
        out.append("vnni")
    if {"avx512vnni", "avx512bw"} <= FEATURES:
        out.append("vnni512")
    return out


def q8_isa() -> str | None:
    """The host's best integer-dot variant, or None (no integer path)."""
    v = q8_isas()
    return v[-1] if v else None


def emit_nibbles_u8(b, p8, qoff, table=None):
    """The 16 bytes of nibbles at byte ``qoff`` (element j < 16 the low nibble of byte j, j + 16 its
    high one: ggml's order) as <32 x i8> ``table[nibble]``: one 128-bit broadcast load, vpsrlvd
    (high lane by 4), vpand, vpshufb. ``table``: 16 byte values; None: the nibbles themselves."""
    qs = load(b, p8, qoff, vec(I8, 16))
    both = b.bitcast(shuf(b, qs, qs, list(range(16)) * 2), vec(I32, 8))
    both = b.lshr(both, ir.Constant(vec(I32, 8), [0] * 4 + [4] * 4))
    idx = b.and_(b.bitcast(both, vec(I8, 32)), ivec(32, 0x0F, I8))
    if table is None:
        return idx
    pshufb = declare(b, "llvm.x86.avx2.pshuf.b", vec(I8, 32), [vec(I8, 32), vec(I8, 32)])
    tbl = ir.Constant(vec(I8, 32), [(int(v) & 0xFF) - (256 if int(v) & 0x80 else 0) for v in table] * 2)
    return b.call(pshufb, [tbl, idx])


def _bits_set(b, p8, off):
    """<32 x i1>: bit j of the little-endian u32 at byte ``off``, for lane j (byte j // 8
    broadcast to lane j, tested against 1 << (j % 8))."""
    qh = load(b, p8, off, vec(I8, 4))
    lanes = shuf(b, qh, qh, [j // 8 for j in range(32)])
    bit = ir.Constant(vec(I8, 32), [(1 << (j % 8)) - (256 if j % 8 == 7 else 0) for j in range(32)])
    return b.icmp_unsigned("!=", b.and_(lanes, bit), ivec(32, 0, I8))


def emit_bits_u8(b, p8, off, value):
    """The 32 bits of the 4 bytes at ``off`` (bit j of their little-endian u32 for element j: the
    fifth bits of Q5_0/Q5_1) as <32 x i8>, ``value`` where the bit is set, else 0."""
    return b.select(_bits_set(b, p8, off), ivec(32, value, I8), ivec(32, 0, I8))


def emit_sign_bits(b, p8, off):
    """The 32 sign bits at byte ``off`` (element j: bit j of their u32; IQ2_S, IQ3_S) as a <32 x i8>
    mask, -1 where set, else 0: the operand of ``emit_signed_u8``."""
    return b.sext(_bits_set(b, p8, off), vec(I8, 32))


def emit_rows_i8(b, name, table, idxs):
    """The rows ``idxs`` (integer IR values) of ``table`` (a numpy [n, w] array of bytes, w 4 or 8,
    len(idxs) * w == 32), in order, as <32 x i8>: the table one internal IR constant ``name`` of
    w-byte words, one load per row (the i-quants' grids, their sign masks)."""
    n, w = table.shape
    assert w * len(idxs) == 32 and w in (4, 8), (table.shape, len(idxs))
    word = ir.IntType(8 * w)
    words = np.ascontiguousarray(table).view(np.int32 if w == 4 else np.int64).reshape(n)
    tbl = _global_table(b.module, name, word, [int(v) for v in words])
    v = ir.Constant(vec(word, len(idxs)), ir.Undefined)
    for k, i in enumerate(idxs):
        i64 = i if i.type.width == 64 else b.zext(i, I64)
        v = b.insert_element(v, b.load(b.gep(tbl, [c64(0), i64])), ir.Constant(I32, k))
    return b.bitcast(v, vec(I8, 32))


def emit_signed_u8(b, g, mask, offset):
    """<32 x i8> ``offset + (mask ? -g : g)`` (mask lanes -1 or 0): the i-quants' grid values under
    their signs, as the unsigned bytes the integer dot takes."""
    return b.add(b.sub(b.xor(g, mask), mask), ivec(32, offset, I8))


def emit_lanes16(b, s0, s1):
    """Two sub-blocks of 16's floats as the 8 lanes of their sub-block of 32: 4 lanes each (the
    integer dot's i32 lane k sums elements 4k..4k+3)."""
    v = ir.Constant(vec(F32, 4), [0.0] * 4)
    h0, h1 = (b.insert_element(v, s, ir.Constant(I32, 0)) for s in (s0, s1))
    return shuf(b, h0, h1, [0, 0, 0, 0, 4, 4, 4, 4])


def emit_u8_at(b, p8, off):
    """The byte at ``off`` as i32."""
    return b.zext(b.load(b.gep(p8, [off])), I32)


def emit_u16_at(b, p8, off):
    """The little-endian u16 at ``off`` as i32."""
    return b.zext(b.load(b.bitcast(b.gep(p8, [off]), I16.as_pointer()), align=1), I32)


def emit_u32_at(b, p8, off):
    """The little-endian u32 at ``off`` as i32."""
    return b.load(b.bitcast(b.gep(p8, [off]), I32.as_pointer()), align=1)


def emit_block_u8(b, p8, off):
    """The MXFP4 block at byte ``off`` as <32 x i8> of value + U8_OFFSET (element order) and its
    scale half(e)."""
    return emit_nibbles_u8(b, p8, b.add(off, c64(1)), KVALUES_U8), emit_scale(b, p8, off)


def emit_q8_0_i8(b, p8, off):
    """The Q8_0 block at byte ``off`` as <32 x i8> of its values (signed) and its half scale."""
    return load(b, p8, b.add(off, c64(2)), vec(I8, 32)), emit_half(b, p8, off)


def emit_pair_u8(b, p8, off):
    """Two consecutive MXFP4 blocks at byte ``off`` as <64 x i8> (block 0's 32 bytes, then block 1's)
    of value + U8_OFFSET, and their scales: the 512-bit form of emit_block_u8."""
    qs0 = load(b, p8, b.add(off, c64(1)), vec(I8, 16))
    qs1 = load(b, p8, b.add(off, c64(mxfp4.BLOCK_BYTES + 1)), vec(I8, 16))
    both = b.bitcast(shuf(b, qs0, qs1, list(range(16)) * 2 + list(range(16, 32)) * 2), vec(I32, 16))
    both = b.lshr(both, ir.Constant(vec(I32, 16), ([0] * 4 + [4] * 4) * 2))
    idx = b.and_(b.bitcast(both, vec(I8, 64)), ivec(64, 0x0F, I8))
    pshufb = declare(b, "llvm.x86.avx512.pshuf.b.512", vec(I8, 64), [vec(I8, 64), vec(I8, 64)])
    tbl = ir.Constant(vec(I8, 64), [int(v) for v in KVALUES_U8] * 4)
    return b.call(pshufb, [tbl, idx]), emit_scale(b, p8, off), emit_scale(b, p8, b.add(off, c64(mxfp4.BLOCK_BYTES)))


def emit_dot_u8_i8(b, variant, u, q, c):
    """i32 lanes (8, or 16 for 'vnni512'): c + sum of 4 products u*q (u unsigned, q signed bytes)."""
    if variant == "vnni512":
        v16 = vec(I32, 16)
        fn = declare(b, "llvm.x86.avx512.vpdpbusd.512", v16, [v16, v16, v16])
        return b.call(fn, [c, b.bitcast(u, v16), b.bitcast(q, v16)])
    if variant == "vnni":
        v8 = vec(I32, 8)
        fn = declare(b, "llvm.x86.avx512.vpdpbusd.256", v8, [v8, v8, v8])
        return b.call(fn, [c, b.bitcast(u, v8), b.bitcast(q, v8)])
    maddubs = declare(b, "llvm.x86.avx2.pmadd.ub.sw", vec(I16, 16), [vec(I8, 32), vec(I8, 32)])
    maddwd = declare(b, "llvm.x86.avx2.pmadd.wd", vec(I32, 8), [vec(I16, 16), vec(I16, 16)])
    p16 = b.call(maddubs, [u, q])  # |pair| <= 2 * 24 * 128: no saturation
    return b.add(b.call(maddwd, [p16, ivec(16, 1, I16)]), c)


def emit_bytes_i16(b, p8, off, idx, signed=False):
    """<16 x i16> of the bytes at ``off + idx[k]`` (idx: 16 offsets in 0..15; the 16 bytes at ``off``
    must lie inside the block), zero- or sign-extended: a super-block's 16 sub-block scales."""
    v = shuf(b, load(b, p8, off, vec(I8, 16)), ir.Constant(vec(I8, 16), ir.Undefined), list(idx))
    return (b.sext if signed else b.zext)(v, vec(I16, 16))


def emit_dot_i16(b, variant, a, w, acc):
    """acc (<8 x i32>) + per lane k: a[2k]*w[2k] + a[2k+1]*w[2k+1] (<16 x i16> each): vpmaddwd and
    an add, or one vpdpwssd with VNNI."""
    v8 = vec(I32, 8)
    if variant in ("vnni", "vnni512"):
        fn = declare(b, "llvm.x86.avx512.vpdpwssd.256", v8, [v8, v8, v8])
        return b.call(fn, [acc, b.bitcast(a, v8), b.bitcast(w, v8)])
    maddwd = declare(b, "llvm.x86.avx2.pmadd.wd", v8, [vec(I16, 16), vec(I16, 16)])
    return b.add(b.call(maddwd, [a, w]), acc)


def emit_dot_u8_i8_scaled(b, variant, u, q, sc, acc):
    """acc (<8 x i32>) + per lane k: sc[2k]*(u[4k]q[4k] + u[4k+1]q[4k+1]) + sc[2k+1]*(the next
    pair): vpmaddubsw's pair sums (exact for u <= 127) under <16 x i16> scales, so the dots of a
    super-block's sub-blocks add up in integers under their own scales (ggml's Q4_K x Q8_K)."""
    maddubs = declare(b, "llvm.x86.avx2.pmadd.ub.sw", vec(I16, 16), [vec(I8, 32), vec(I8, 32)])
    return emit_dot_i16(b, variant, b.call(maddubs, [u, q]), sc, acc)


def emit_i16_lanes(b, vals):
    """<16 x i16> of 16 i32 values (truncated): sub-block scales computed one by one."""
    v = ir.Constant(vec(I16, 16), ir.Undefined)
    for k, x in enumerate(vals):
        v = b.insert_element(v, b.trunc(x, I16), ir.Constant(I32, k))
    return v


def emit_abs_i8(b, v):
    """<32 x i8> |v| (vpabsb): with emit_sign_i8 the signed-weight form of the u8 x i8 dots."""
    return b.select(b.icmp_signed("<", v, ivec(32, 0, I8)), b.sub(ivec(32, 0, I8), v), v)


def emit_sign_i8(b, q, v):
    """<32 x i8> q * sign(v) (vpsignb): |v| * (q * sign(v)) = v * q, so signed weights multiply
    signed activations by vpmaddubsw (ggml's trick for IQ4_NL/IQ4_XS on AVX2)."""
    fn = declare(b, "llvm.x86.avx2.psign.b", vec(I8, 32), [vec(I8, 32), vec(I8, 32)])
    return b.call(fn, [q, v])
