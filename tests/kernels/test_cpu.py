"""CPU expert path (hybrid/moe/cpu.py) against the float64 reference and gguf's decoders."""
import numba as nb
import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType as T
from hypothesis import given, settings, strategies as st

from hybrid.kernels.cpu import experts as kcpu, ir as cpu_ir
from hybrid.moe import cpu
from hybrid.moe.layer import ExpertTensor
from hybrid.model.tiny import random_layer
from hybrid.moe.reference import moe_reference, route_reference, router_logits_reference, silu_gated, swiglu_oai
from quant import cpu as qcpu, mxfp4, registry as qreg


def _gguf_quantises(t):
    try:
        quants.quantize(np.zeros((1, qcpu.block_size(t)), np.float32), t)
        return True
    except NotImplementedError:
        return False


# every format the CPU path decodes (the registry's) with 32-element blocks (these layers are 64
# wide) that gguf-py quantises; the others (K-quants, i-quants, TQ): tests/quant/test_qtypes_model.py
TYPES = tuple(t for t in qcpu.types() if qcpu.block_size(t) <= 32 and _gguf_quantises(t))
TOL = 1e-5
# Float activations everywhere: what the float64 reference computes, to TOL.
F32 = cpu.CpuTiles(q8_tokens=0)
# Experts with few tokens in a call (at most the format's kcpu.q8_max_tokens: every decode step's)
# multiply int8 activations, as ggml does:
# each matmul matches the float64 product of the quantised activations to TOL (test_q8_* below);
# against unquantised activations the whole FFN (x and the activation both quantised) differs by
# the int8 rounding, measured at 1e-3..1.3e-2 of the largest output at these small shapes (fewer
# terms per sum average less than gpt-oss's 2880; examples/bench_experts.py reports that shape).
Q8_FFN_TOL = 5e-2


def rel_err(ours, ref):
    return np.abs(ours - ref).max() / np.abs(ref).max()


def routed(layer, x):
    ids, w = route_reference(router_logits_reference(layer, x), layer.k, layer.gating, layer.renormalize)
    return ids, w.astype(np.float32)


def check_layer(layer, x, ids=None, w=None):
    if ids is None:
        ids, w = routed(layer, x)
    ours = cpu.moe_ffn_cpu(layer, x, ids, w, tiles=F32)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    ref = moe_reference(layer, x, ids, w)
    assert rel_err(ours, ref) < TOL
    dflt = cpu.moe_ffn_cpu(layer, x, ids, w)
    counts = np.bincount(ids.ravel())
    if _q8_applies(layer.gate) and counts[counts > 0].min() <= kcpu.q8_max_tokens(layer.gate.ggml_type):
        assert rel_err(dflt, ref) < Q8_FFN_TOL  # some expert took the integer path
    else:
        assert np.array_equal(dflt, ours)
    return ours


def q8_reference(x, wdq):
    """float64 x_q @ W^T, x_q = x quantised as gguf's Q8_0 does (its int8 values, bit for bit)
    with the block scale amax/127 kept in float32 (Q8_0 would round it to a half)."""
    n, cols = x.shape
    qs = quants.quantize(x, T.Q8_0).reshape(n, cols // 32, 34)[..., 2:].copy().view(np.int8)
    d = np.abs(x.reshape(n, cols // 32, 32)).max(-1) / np.float32(127)
    return (qs * d[..., None].astype(np.float64)).reshape(n, cols) @ wdq.astype(np.float64).T


def q8k_reference(x, wdq):
    """float64 x_q @ W^T, x_q = x in super-blocks of 256 under one float32 scale amax/127 each
    (ggml's Q8_K granularity), the values rounded as gguf's Q8_0 rounds its blocks of 32."""
    n, cols = x.shape
    xb = x.reshape(n, cols // 256, 256)
    d = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = quants.np_roundf(xb * inv)
    return (q * d.astype(np.float64)).reshape(n, cols) @ wdq.astype(np.float64).T


def q8_reference_of(wtype):
    """The reference of ``wtype``'s integer path: its activations in super-blocks for the formats
    with integer sub-block scales, else in blocks of 32."""
    return q8k_reference if int(wtype) in cpu_ir.q8s_types() else q8_reference


def _q8_applies(t):
    from hybrid.kernels.cpu.experts import Q8_TYPES  # (rebound when a format activates)
    return t.ggml_type in Q8_TYPES


def rand_x(n, d, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize("wtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("gpt_oss", [True, False], ids=["swiglu_oai", "silu"])
def test_types_and_activations(wtype, gpt_oss):
    # n_ff = 96: one full and one partial row tile; 23 tokens, skewed routing: experts
    # with many tokens (tile path) and with few (direct kernels for MXFP4).
    layer = random_layer(64, 96, 8, 3, wtype=wtype, gpt_oss=gpt_oss, seed=1, skew=1.5)
    x = rand_x(23, 64, seed=2)
    ids, w = routed(layer, x)
    counts = np.bincount(ids.ravel(), minlength=8)
    assert counts.max() >= cpu.TILES.tile_min and 0 < counts.min() < 8
    check_layer(layer, x, ids, w)


@pytest.mark.parametrize("wtype", [T.MXFP4, T.F32], ids=lambda t: t.name)
def test_long_rows_cross_k_chunks(wtype):
    # 1088 columns = 34 blocks: crosses kc_direct (32 blocks) and kc_tile (960 columns);
    # the down matrix has 1088 rows = 17 row tiles. 9 tokens on one expert: chunked direct path.
    layer = random_layer(1088, 160, 4, 2, wtype=wtype, seed=3)
    x = rand_x(30, 1088, seed=4)
    for n in (1, 3, 30):  # direct kernels; at 30 tokens (7, 14, 14, 25 per expert) both paths
        check_layer(layer, x[:n])
    check_layer(layer, x[:9], np.full((9, 2), [1, 3], np.int32), np.full((9, 2), 0.5, np.float32))


def test_odd_sizes_for_unquantised_types():
    # F32/F16 rows need not be multiples of 32: 40 columns, 50 rows.
    for wtype in (T.F32, T.F16, T.BF16):
        check_layer(random_layer(40, 50, 5, 2, wtype=wtype, seed=5), rand_x(9, 40, seed=6))


@pytest.mark.parametrize("k", range(1, 9))
def test_k_from_1_to_8(k):
    layer = random_layer(64, 64, 8, k, seed=10 + k)
    check_layer(layer, rand_x(11, 64, seed=k))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 15, 19, 20, 21, 45])
def test_every_token_to_one_expert(n):
    # n covers each direct kernel width (1..8), groups of 8 plus a rest, and the tile path (>= 20).
    layer = random_layer(96, 128, 6, 1, seed=7)
    x = rand_x(n, 96, seed=n)
    ids = np.full((n, 1), 4, np.int32)
    ours = check_layer(layer, x, ids, np.ones((n, 1), np.float32))
    assert np.isfinite(ours).all()


def test_one_token_and_unused_experts():
    layer = random_layer(64, 64, 8, 2, seed=8)
    x = rand_x(1, 64, seed=9)
    ids = np.array([[6, 2]], np.int32)  # experts 0, 1, 3, 4, 5, 7 get no token
    check_layer(layer, x, ids, np.array([[0.7, 0.3]], np.float32))


@pytest.mark.parametrize("tiles", [cpu.CpuTiles(rows=4, kc_direct=1, kc_tile=32, tile_min=1, q8_tokens=0),
                                   cpu.CpuTiles(rows=8, kc_direct=3, kc_tile=64, tile_min=100, q8_tokens=0),
                                   cpu.CpuTiles(rows=12, kc_direct=2, kc_tile=96, tile_min=5, q8_tokens=0)])
@pytest.mark.parametrize("wtype", [T.MXFP4, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_any_tiling_gives_the_same_result(tiles, wtype):
    # Small tiles: many row tiles, K chunks and (tile_min) both paths; partial last tiles (float path).
    layer = random_layer(160, 96, 5, 2, wtype=wtype, seed=29)
    x = rand_x(30, 160, seed=30)
    ids, w = routed(layer, x)
    ours = cpu.moe_ffn_cpu(layer, x, ids, w, tiles=tiles)
    assert rel_err(ours, moe_reference(layer, x, ids, w)) < TOL
    assert rel_err(cpu.mul_mat_id_cpu(layer.gate, x, ids, tiles=tiles),
                   cpu.mul_mat_id_cpu(layer.gate, x, ids, tiles=F32)) < TOL


def test_bad_tiles():
    for kw in (dict(rows=6), dict(kc_tile=40), dict(kc_direct=0), dict(tile_min=-1), dict(rows=2.0)):
        with pytest.raises(ValueError, match="Tiles"):
            cpu.CpuTiles(**kw)
    # a tile of 48 columns is well formed but cuts MXFP4's blocks of 32: refused at the call
    layer48 = random_layer(32, 32, 2, 1)
    with pytest.raises(ValueError, match="kc_tile .48. must be a multiple of MXFP4's block of 32"):
        cpu.mul_mat_id_cpu(layer48.gate, np.ones((1, 32), np.float32), np.zeros((1, 1), np.int64),
                           tiles=cpu.CpuTiles(kc_tile=48))
    with pytest.raises(ValueError, match="kc_tile .48. must be a multiple of MXFP4's block of 32"):
        cpu.moe_ffn_cpu(layer48, np.ones((1, 32), np.float32), np.zeros((1, 1), np.int64),
                        np.ones((1, 1), np.float32), tiles=cpu.CpuTiles(kc_tile=48))
    layer = random_layer(32, 32, 2, 1)
    with pytest.raises(TypeError, match="Tiles"):
        cpu.moe_ffn_cpu(layer, rand_x(1, 32), np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32),
                        tiles=(64, 32, 960, 12))


def test_read_only_weights():
    # GGUF memory maps are read-only; the path never writes weights.
    layer = random_layer(64, 96, 6, 2, seed=26)
    for t in (layer.gate, layer.up, layer.down):
        t.data.flags.writeable = False
    check_layer(layer, rand_x(5, 64, seed=27))


def test_reads_only_used_experts():
    # Unused experts poisoned with NaN: the output must not change.
    layer = random_layer(64, 96, 6, 2, wtype=T.F32, seed=11)
    x = rand_x(7, 64, seed=12)
    ids, w = routed(layer, x)
    clean = cpu.moe_ffn_cpu(layer, x, ids, w)
    for t in (layer.gate, layer.up, layer.down):
        t.data[np.setdiff1d(np.arange(6), ids)] = np.nan
    assert np.array_equal(cpu.moe_ffn_cpu(layer, x, ids, w), clean)


def test_clamps_of_swiglu_oai_are_exercised():
    layer = random_layer(64, 64, 4, 2, seed=13)
    x = rand_x(16, 64, seed=14, scale=25.0)  # gate/up far outside [-7, 7]
    ids, w = routed(layer, x)
    g = x @ layer.gate.dequantize(int(ids[0, 0])).T
    assert np.abs(g).max() > 7
    check_layer(layer, x, ids, w)


def test_deterministic_across_runs_and_threads():
    layer = random_layer(64, 128, 8, 4, seed=15)
    x = rand_x(40, 64, seed=16)
    ids, w = routed(layer, x)
    first = cpu.moe_ffn_cpu(layer, x, ids, w)
    decode = cpu.moe_ffn_cpu(layer, x[:1], ids[:1], w[:1])
    n0 = nb.get_num_threads()
    try:
        for n in {1, n0}:
            nb.set_num_threads(n)
            assert np.array_equal(cpu.moe_ffn_cpu(layer, x, ids, w), first)
            assert np.array_equal(cpu.moe_ffn_cpu(layer, x[:1], ids[:1], w[:1]), decode)
    finally:
        nb.set_num_threads(n0)


def test_out_argument_and_zero_tokens():
    layer = random_layer(64, 64, 4, 2, seed=17)
    x = rand_x(5, 64, seed=18)
    ids, w = routed(layer, x)
    out = np.full((5, 64), np.nan, np.float32)
    assert cpu.moe_ffn_cpu(layer, x, ids, w, out=out, tiles=F32) is out
    assert rel_err(out, moe_reference(layer, x, ids, w)) < TOL
    empty = cpu.moe_ffn_cpu(layer, x[:0], ids[:0], w[:0])
    assert empty.shape == (0, 64)


@given(n=st.integers(0, 12), e=st.integers(2, 6), k=st.integers(1, 3), seed=st.integers(0, 2 ** 16),
       gpt_oss=st.booleans())
@settings(max_examples=25, deadline=None)
def test_property_random_routing(n, e, k, seed, gpt_oss):
    k = min(k, e)
    layer = random_layer(32, 64, e, k, gpt_oss=gpt_oss, seed=seed)
    rng = np.random.default_rng(seed)
    x = rand_x(n, 32, seed=seed)
    ids = rng.integers(0, e, (n, k)).astype(np.int32)  # any ids, repeats within a token included
    w = rng.random((n, k)).astype(np.float32)
    ours = cpu.moe_ffn_cpu(layer, x, ids, w, tiles=F32)
    if n:
        assert rel_err(ours, moe_reference(layer, x, ids, w)) < TOL


@pytest.mark.parametrize("wtype", TYPES, ids=lambda t: t.name)
def test_expert_matmul(wtype):
    layer = random_layer(96, 64, 3, 1, wtype=wtype, seed=19)
    w = layer.gate
    x = rand_x(6, 96, seed=20)
    ref = x.astype(np.float64) @ w.dequantize(2).astype(np.float64).T
    assert rel_err(cpu.expert_matmul_cpu(w, 2, x, tiles=F32), ref) < TOL
    y1 = cpu.expert_matmul_cpu(w, 2, x[0], tiles=F32)
    assert y1.shape == (64,) and rel_err(y1, ref[0]) < TOL
    y1 = cpu.expert_matmul_cpu(w, 2, x[0])  # decode: int8 activations for MXFP4
    assert rel_err(y1, q8_reference(x[:1], w.dequantize(2))[0] if _q8_applies(w) else ref[0]) < TOL


def test_mul_mat_id_per_slot_inputs():
    layer = random_layer(64, 96, 5, 3, seed=21)
    x = rand_x(4 * 3, 96, seed=22).reshape(4, 3, 96)
    ids = np.array([[0, 4, 2], [4, 4, 1], [3, 0, 2], [1, 2, 3]], np.int32)
    y = cpu.mul_mat_id_cpu(layer.down, x, ids, tiles=F32)
    ref = np.stack([[layer.down.dequantize(ids[t, j]).astype(np.float64) @ x[t, j] for j in range(3)]
                    for t in range(4)])
    assert y.shape == (4, 3, 64) and rel_err(y, ref) < TOL


def test_bad_inputs():
    layer = random_layer(64, 64, 4, 2, seed=23)
    x = rand_x(3, 64)
    ids, w = routed(layer, x)
    f = cpu.moe_ffn_cpu
    with pytest.raises(ValueError, match="shape"):
        f(layer, rand_x(3, 32), ids, w)
    with pytest.raises(TypeError, match="float32"):
        f(layer, x.astype(np.float64), ids, w)
    with pytest.raises(ValueError, match="NaN"):
        bad = x.copy()
        bad[1, 5] = np.nan
        f(layer, bad, ids, w)
    for v in (-1, 4):
        bad = ids.copy()
        bad[2, 1] = v
        with pytest.raises(ValueError, match=r"ids\[2, 1\] = %d is out of range" % v):
            f(layer, x, bad, w)
    with pytest.raises(TypeError, match="integer"):
        f(layer, x, ids.astype(np.float32), w)
    with pytest.raises(ValueError, match="ids has shape"):
        f(layer, x, ids[:2], w[:2])
    with pytest.raises(ValueError, match="weights has shape"):
        f(layer, x, ids, w[:, :1])
    with pytest.raises(ValueError, match="weights hold NaN"):
        f(layer, x, ids, np.full_like(w, np.nan))
    with pytest.raises(ValueError, match="out has shape"):
        f(layer, x, ids, w, out=np.empty((3, 63), np.float32))
    with pytest.raises(TypeError, match="MoELayer"):
        f("layer", x, ids, w)
    with pytest.raises(ValueError, match="out of range"):
        cpu.expert_matmul_cpu(layer.gate, 4, x)
    with pytest.raises(ValueError, match="shape"):
        cpu.expert_matmul_cpu(layer.gate, 0, rand_x(2, 65))
    with pytest.raises(NotImplementedError, match="not supported"):
        cpu.expert_matmul_cpu(ExpertTensor(np.zeros((1, 2, 80), np.uint8), int(T.Q8_1), 2, 64), 0, rand_x(1, 64))


# ------------------------------------------------------------ decoders and per-ISA kernels
def _tile_of(t: ExpertTensor, e=0):
    rows, cols = t.rows, t.cols
    tile = np.full(((rows + 3) // 4 * 4) * cols, 7.0, np.float32)
    kcpu._decode_tile(t.raw, int(t.ggml_type), e, 0, rows, 0, cols, tile, cols, cols)
    return tile[:rows * cols].reshape(rows, cols), tile[rows * cols:]


@given(data=st.binary(min_size=2 * 5 * 17, max_size=2 * 5 * 17))
@settings(max_examples=60, deadline=None)
def test_mxfp4_tile_decode_matches_reference(data):
    raw = np.frombuffer(data, np.uint8).reshape(1, 2, 5 * 17).copy()
    ours, pad = _tile_of(ExpertTensor(raw, int(T.MXFP4), 2, 160))
    assert np.array_equal(ours, mxfp4.dequantize(raw[0]))  # -0.0 == 0.0; inf where the reference has inf
    assert (pad == 0).all()  # rows rounded up to the kernel's 4 are zero


@pytest.mark.parametrize("wtype", [T.Q8_0, T.F16], ids=lambda t: t.name)
def test_tile_decode_pads_with_zeros(wtype):
    # Rows past nr (up to the kernels' 4) and columns past c1 (up to width) are zero.
    raw = quants.quantize(rand_x(3 * 5, 64, seed=24).reshape(3, 5, 64), wtype)
    t = ExpertTensor(np.ascontiguousarray(raw).view(np.uint8).reshape(3, 5, -1), int(wtype), 5, 64)
    tile = np.full(8 * 96, 7.0, np.float32)
    kcpu._decode_tile(t.raw, int(wtype), 2, 1, 3, 32, 64, tile, 96, 48)
    tile = tile.reshape(8, 96)
    ref = quants.dequantize(np.ascontiguousarray(raw[2]), wtype)
    assert np.array_equal(tile[:3, :32], ref[1:4, 32:64])
    assert (tile[:3, 32:48] == 0).all() and (tile[3:4, :48] == 0).all() and (tile[:4, 48:] == 7).all()


@nb.njit
def _act_harness(h, u, gb, ub, swiglu):
    if swiglu:
        kcpu._act_swiglu(h, 0, u, 0, gb, 0, ub, 0, h.size // kcpu.W)
    else:
        kcpu._act_silu(h, 0, u, 0, gb, 0, ub, 0, h.size // kcpu.W)


@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu_oai", "silu"])
def test_activation_kernel(swiglu):
    # Vector exp and the clamps over a wide range, biases added first.
    rng = np.random.default_rng(28)
    g = np.concatenate([np.linspace(-120, 120, 4096), rng.standard_normal(4096) * 4]).astype(np.float32)
    u = np.concatenate([rng.standard_normal(4096) * 30, rng.standard_normal(4096)]).astype(np.float32)
    gb, ub = (rng.standard_normal(g.size) * 0.1).astype(np.float32), (rng.standard_normal(g.size) * 0.1).astype(np.float32)
    h = g.copy()
    _act_harness(h, u, gb, ub, swiglu)
    f = swiglu_oai if swiglu else silu_gated
    ref = f(g.astype(np.float64) + gb, u.astype(np.float64) + ub)
    assert np.allclose(h, ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max())


def _isa_harness(isa, R, T_):
    dot, dec = cpu_ir.make_mx_dot(R, T_, isa), cpu_ir.make_mx_decode(isa)

    @nb.njit
    def run(raw, x, out, tile, nblk):
        rows, wst = raw.shape[0], raw.shape[1]
        for r in range(0, rows, R):
            for t in range(0, x.shape[0], T_):
                dot(raw, r * wst, wst, nblk, x, t * x.shape[1], x.shape[1], out, t * rows + r, rows)
            for i in range(R):
                dec(raw, (r + i) * wst, nblk, tile, (r + i) * nblk * 32)
    return run


@pytest.mark.parametrize("isa", cpu_ir.ISAS)
def test_isa_kernels(isa):
    """Every lookup variant (the host runs only its best one) decodes and multiplies right."""
    if isa not in cpu_ir.supported_isas():
        pytest.skip(f"{isa} not on this CPU")
    rng = np.random.default_rng(25)
    w = rng.standard_normal((8, 96)).astype(np.float32)
    w[0, :32] = 0.0  # exponent 0 block
    raw = mxfp4.quantize(w)
    raw[1, 0] = 1  # subnormal scale
    x = rng.standard_normal((8, 96)).astype(np.float32)
    dq = mxfp4.dequantize(raw)
    ref = x.astype(np.float64) @ dq.astype(np.float64).T
    for R, T_ in ((2, 8), (4, 1)):
        out = np.zeros((8, 8), np.float32)
        tile = np.zeros(8 * 96, np.float32)
        _isa_harness(isa, R, T_)(raw, x, out.reshape(-1), tile, 3)
        assert rel_err(out, ref) < TOL
        assert np.array_equal(tile.reshape(8, 96), dq)


# ------------------------------------------------------------ int8 activations (decode)
Q8_ALL = cpu.CpuTiles(q8_tokens=1000, rows=8)  # every expert in these tests takes the int8 path


@pytest.mark.skipif(cpu.Q8_VARIANT is None, reason="no integer path on this CPU")
@pytest.mark.parametrize("rows,cols,n,k", [(64, 96, 1, 4), (50, 1088, 1, 2), (13, 64, 9, 3), (40, 160, 23, 1),
                                           (7, 32, 2, 2)])
def test_q8_matmul_matches_quantised_reference(rows, cols, n, k):
    # rows not a multiple of 4 (single-row kernels), 34 blocks, 1..9+ tokens per expert
    # (kernels for 1..4 tokens and groups of 4), every expert's slab read in place.
    rng = np.random.default_rng()
    wt = ExpertTensor(mxfp4.quantize(rng.standard_normal((5, rows, cols)).astype(np.float32)), int(T.MXFP4),
                      rows, cols)
    x = rand_x(n, cols, seed=int(rng.integers(1 << 30)), scale=3.0)
    ids = rng.integers(0, 5, (n, k))
    y = cpu.mul_mat_id_cpu(wt, x, ids, tiles=Q8_ALL)
    ref = np.stack([q8_reference(x[t:t + 1], wt.dequantize(int(ids[t, j])))[0]
                    for t in range(n) for j in range(k)]).reshape(n, k, rows)
    assert rel_err(y, ref) < TOL
    flt = cpu.mul_mat_id_cpu(wt, x, ids, tiles=F32)
    assert not np.array_equal(y, flt) and rel_err(y, flt) < 3e-2  # the int8 path ran; rounding-sized change
    assert np.array_equal(cpu.mul_mat_id_cpu(wt, x, ids, tiles=Q8_ALL), y)


@pytest.mark.skipif(cpu.Q8_VARIANT is None, reason="no integer path on this CPU")
def test_q8_per_slot_inputs_and_default_threshold():
    layer = random_layer(64, 96, 5, 3, seed=31)
    x = rand_x(3, 96, seed=32).reshape(1, 3, 96)  # down: one input per slot
    ids = np.array([[4, 0, 4]])
    y = cpu.mul_mat_id_cpu(layer.down, x, ids)  # one token: int8 by default
    ref = np.stack([q8_reference(x[0, j:j + 1], layer.down.dequantize(int(ids[0, j])))[0] for j in range(3)])
    assert rel_err(y[0], ref) < TOL
    # past the format's crossover every expert has too many tokens: the float path throughout
    m = kcpu.q8_max_tokens(layer.down.ggml_type) + 1
    xm, idm = np.repeat(x, m, axis=0), np.repeat(ids, m, axis=0)
    assert np.array_equal(cpu.mul_mat_id_cpu(layer.down, xm, idm), cpu.mul_mat_id_cpu(layer.down, xm, idm, tiles=F32))


def _q8_harness(variant, R, T_, wtype=T.MXFP4):
    dot = cpu_ir.make_q8_dot(R, T_, variant, int(wtype))

    @nb.njit
    def run(raw, qc, d, out, nblk, n, nx):  # nx: activation blocks per token
        rows, wst = raw.shape[0], raw.shape[1]
        for r in range(0, rows, R):
            for t in range(0, n, T_):
                dot(raw, r * wst, wst, nblk, qc, d, t * nx, nx, out, t * rows + r, rows)
    return run


@pytest.mark.parametrize("variant", ["avx2", "vnni", "vnni512"])
def test_q8_kernel_variants(variant):
    """Both integer variants (the host runs one) against the quantised reference."""
    if variant not in cpu_ir.q8_isas():
        pytest.skip(f"{variant} not on this CPU")
    rng = np.random.default_rng()
    w = rng.standard_normal((8, 96)).astype(np.float32)
    w[0, :32] = 0.0  # exponent 0 block
    raw = mxfp4.quantize(w)
    raw[1, 0] = 1  # subnormal scale
    x = rand_x(8, 96, seed=int(rng.integers(1 << 30)), scale=10.0)
    x[2, 32:64] = 0.0  # an all-zero activation block: scale 0
    qc, d = np.zeros(8 * 3 * 64, np.uint8), np.zeros(8 * 3 * qcpu.Q8_DREP, np.float32)
    qcpu.quantize_q8(x, 8, 3, qc, d)
    ref = q8_reference(x, mxfp4.dequantize(raw))
    for R, T_ in ((4, 1), (2, 4), (1, 2)):
        out = np.zeros((8, 8), np.float32)
        _q8_harness(variant, R, T_)(raw, qc, d, out.reshape(-1), 3, 8, 3)
        assert rel_err(out, ref) < TOL


def _int8_blocks(wtype, rows, cols, rng):
    """Random weights of ``wtype`` as stored, scales included (gguf quantises what it can; the
    others are random bytes under random half scales, 0 and a subnormal among them)."""
    if wtype in (T.MXFP4, T.Q4_0, T.Q8_0):
        raw = np.ascontiguousarray(quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), wtype))
        if wtype == T.Q8_0:  # a code of -128: ggml's quantiser never writes it, a file may hold it
            raw[0, 2:5] = 0x80
        return raw
    f = qreg.get(wtype)
    raw = rng.integers(0, 256, (rows * cols // f.block, f.block_bytes), dtype=np.uint8)

    def halves():
        d = rng.uniform(0.01, 0.1, raw.shape[0]).astype(np.float16)
        d[0], d[1] = 0.0, np.float16(6e-8)
        return d

    if wtype == T.IQ1_M:  # its f16 d: nibble i in the top 4 bits of the scale word i (bytes 48..55)
        words = raw[:, 48:56].copy().view(np.uint16)
        h = halves().view(np.uint16)
        for i in range(4):
            words[:, i] = (words[:, i] & 0x0FFF) | (((h >> (4 * i)) & 15) << 12)
        raw[:, 48:56] = words.view(np.uint8)
    for at in f.scale_offsets or ():
        raw[:, at:at + 2] = halves().view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


# the formats with an int8_block or int8_scales: the registry's, each tested once it has one
INT8 = [T(t) for t in qreg.types("int8_dot")]
assert {T.MXFP4, T.Q4_0, T.Q8_0, T.IQ4_NL, T.Q4_K, T.Q6_K} <= set(INT8)  # none lost its integer dot


@pytest.mark.parametrize("variant", ["avx2", "vnni", "vnni512"])
@pytest.mark.parametrize("wtype", INT8, ids=lambda t: t.name)
def test_q8_kernels_of_every_int8_format(wtype, variant):
    """Each format's integer kernels on each variant the host runs, against the quantised reference."""
    if variant not in cpu_ir.q8_isas():
        pytest.skip(f"{variant} not on this CPU")
    if int(wtype) not in cpu_ir.q8_types(variant):
        assert variant == "avx2" and not qreg.get(wtype).int8_avx2  # bytes above 127 would saturate
        with pytest.raises(ValueError, match="no integer dot on avx2"):
            cpu_ir.make_q8_dot(4, 1, variant, int(wtype))
        return
    rng = np.random.default_rng()
    f = qreg.get(wtype)
    cols = 96 if f.block == 32 else 512
    nblk = cols // 32
    raw = _int8_blocks(wtype, 8, cols, rng)
    wdq = f.decode_numpy(raw.reshape(-1, f.block_bytes)).reshape(8, cols)
    x = rand_x(8, cols, seed=int(rng.integers(1 << 30)), scale=10.0)
    x[2, 32:64] = 0.0  # an all-zero activation block: scale 0
    x[3, 256:] = 0.0  # and super-block
    if int(wtype) in cpu_ir.q8s_types():  # super-block activations
        nx = cols // 256
        qc, d = np.zeros(8 * nx * qcpu.Q8K_REC, np.uint8), np.zeros(8 * nx * qcpu.Q8_DREP, np.float32)
        qcpu.quantize_q8k(x, 8, nx, qc, d)
    else:
        nx = nblk
        qc, d = np.zeros(8 * nblk * 64, np.uint8), np.zeros(8 * nblk * qcpu.Q8_DREP, np.float32)
        qcpu.quantize_q8(x, 8, nblk, qc, d)
    ref = q8_reference_of(wtype)(x, wdq)
    for R, T_ in ((4, 1), (2, 4), (1, 2)):
        out = np.zeros((8, 8), np.float32)
        _q8_harness(variant, R, T_, wtype)(raw, qc, d, out.reshape(-1), nblk, 8, nx)
        assert rel_err(out, ref) < TOL, (R, T_)


@pytest.mark.parametrize("wtype", INT8, ids=lambda t: t.name)
def test_decode_calls_of_int8_formats_take_the_integer_path(wtype):
    qreg.activate(int(wtype))
    rng = np.random.default_rng()
    cols = 160 if qreg.get(wtype).block == 32 else 512
    wt = ExpertTensor(_int8_blocks(wtype, 5 * 40, cols, rng).reshape(5, 40, -1), int(wtype), 40, cols)
    x = rand_x(1, cols, seed=int(rng.integers(1 << 30)), scale=3.0)
    ids = np.array([[4, 0, 2]])
    y = cpu.mul_mat_id_cpu(wt, x, ids)  # one token: the default decode path
    ref = np.stack([q8_reference_of(wtype)(x, wt.dequantize(int(e)))[0] for e in ids[0]])[None]
    if not _q8_applies(wt):
        pytest.skip(f"no integer path for {wtype.name} on this CPU")
    assert rel_err(y, ref) < TOL
    assert not np.array_equal(y, cpu.mul_mat_id_cpu(wt, x, ids, tiles=F32))


@pytest.mark.parametrize("wtype", INT8, ids=lambda t: t.name)
def test_prompt_calls_split_experts_at_the_crossover(wtype):
    """In one call, an expert with q8_max_tokens tokens takes the integer path and one with more
    the float tiles: each slot's bits equal those of the call with that path forced throughout."""
    qreg.activate(int(wtype))
    if int(wtype) not in kcpu.Q8_TYPES:
        pytest.skip(f"no integer path for {wtype.name} on this CPU")
    rng = np.random.default_rng()
    cols = 160 if qreg.get(wtype).block == 32 else 512
    wt = ExpertTensor(_int8_blocks(wtype, 5 * 40, cols, rng).reshape(5, 40, -1), int(wtype), 40, cols)
    m = kcpu.q8_max_tokens(wtype)
    x = rand_x(m + 1, cols, seed=int(rng.integers(1 << 30)), scale=3.0)
    ids = np.stack([np.full(m + 1, 4), np.where(np.arange(m + 1) < m, 0, 2)], axis=1)  # 4: m+1 tokens; 0: m
    y = cpu.mul_mat_id_cpu(wt, x, ids)
    flt = cpu.mul_mat_id_cpu(wt, x, ids, tiles=F32)
    q8 = cpu.mul_mat_id_cpu(wt, x, ids, tiles=cpu.CpuTiles(q8_tokens=m + 1))
    assert np.array_equal(y[:, 0], flt[:, 0]) and not np.array_equal(y[:, 0], q8[:, 0])
    assert np.array_equal(y[:, 1], q8[:, 1]) and not np.array_equal(y[:, 1], flt[:, 1])
