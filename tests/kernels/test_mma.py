"""The tensor-core kernels (``TileConfig(math="mma")``) on the simulator.

The simulator cannot run ``mma.sync``; ``hybrid.kernels.cuda.mma`` emulates it per warp in
the PTX fragment layout. Its own test puts random BF16 fragments through that
layout (``mma.fragments``, written from the PTX ISA's lane -> element tables) and
checks D = A @ B + C against numpy; the kernel tests then run whole layers
through ``HybridMoE`` (plan, copies, waves, reduce) against the float64
reference, at the FFMA path's tolerance: the BF16 split of the activations is
exact, so the only rounding is the FP32 accumulation, as in FFMA.
"""

import numpy as np
import pytest
from numba import cuda

from hybrid import random_layer
from hybrid.kernels.cuda import experts as K
from hybrid.kernels.cuda import mma
from hybrid.moe.reference import moe_reference

from devices import DEVICE_TESTS, mma_vs_fma_tol, rel_tol
from test_kernels import _check, _rel_err, _routed, device_ffn

pytestmark = DEVICE_TESTS
SIM = pytest.mark.skipif(not mma.SIMULATOR, reason="the emulated MMA runs on the simulator only")

# Tensor-core tiles: 16 pairs, 16 columns in 2 warps of 8 (one n8 tile each, 64 threads),
# K 32; or 32 pairs (two m16 tiles), 64 columns in 2 warps of 32 (four n8 tiles each), K 64.
MMA = K.TileConfig(block_pairs=16, block_cols=16, k_chunk=32, math="mma", warp_cols=8)
MMA_K64 = K.TileConfig(block_pairs=32, block_cols=64, k_chunk=64, math="mma", warp_cols=32)
FMA = K.TileConfig(block_pairs=16, block_cols=16, k_chunk=32, thread_rows=1, thread_cols=4, math="fma")


def _bf16(a):
    """float32 values rounded down (truncated) to BF16."""
    return (np.asarray(a, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


# ------------------------------------------------------------------ the instruction

@SIM
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_emulated_mma_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    A = _bf16(rng.standard_normal((16, 16)) * 2.0 ** rng.integers(-20, 20, (16, 16)))
    B = _bf16(rng.standard_normal((16, 8)))
    C = rng.standard_normal((16, 8)).astype(np.float32)
    regs, c = mma.fragments(A, B, C)
    d = np.zeros((32, 4), np.float32)
    mma.probe_kernel[1, 32](regs, c, d)
    D = mma.unfragment(d)
    ref = A.astype(np.float64) @ B.astype(np.float64) + C
    scale = np.abs(A.astype(np.float64)) @ np.abs(B.astype(np.float64)) + np.abs(C)
    assert (np.abs(D - ref) <= 17 * 2.0 ** -24 * scale).all()  # 17 float32 additions
    # Every element reaches the right output: a single 1 in A and B picks one product.
    for m, kk, n in [(0, 0, 0), (15, 15, 7), (9, 3, 5), (4, 12, 2)]:
        A1, B1 = np.zeros((16, 16), np.float32), np.zeros((16, 8), np.float32)
        A1[m, kk], B1[kk, n] = 3.0, 0.5
        regs, c = mma.fragments(A1, B1, np.zeros((16, 8), np.float32))
        mma.probe_kernel[1, 32](regs, c, d)
        want = np.zeros((16, 8), np.float32)
        want[m, n] = 1.5
        assert np.array_equal(mma.unfragment(d), want)


@SIM
def test_emulated_mma_two_warps_do_not_mix():
    rng = np.random.default_rng(5)
    regs, cs, refs = [], [], []
    for _ in range(2):
        A, B = _bf16(rng.standard_normal((16, 16))), _bf16(rng.standard_normal((16, 8)))
        C = np.zeros((16, 8), np.float32)
        r, c = mma.fragments(A, B, C)
        regs.append(r)
        cs.append(c)
        refs.append(A.astype(np.float64) @ B)
    d = np.zeros((64, 4), np.float32)
    mma.probe_kernel[1, 64](np.concatenate(regs), np.concatenate(cs), d)
    for w in range(2):
        np.testing.assert_allclose(mma.unfragment(d[32 * w:32 * w + 32]), refs[w], rtol=1e-6, atol=1e-6)


@SIM
def test_instruction_check_passes_and_catches_a_wrong_layout(monkeypatch):
    # The check auto mode runs on a device before trusting its tensor cores: it passes on
    # the emulation, and fails when the lanes' registers do not follow the layout.
    assert mma.check_instruction(seed=7) is None
    good = mma.fragments
    monkeypatch.setattr(mma, "fragments", lambda A, B, C: (lambda r, c: (r[::-1].copy(), c))(*good(A, B, C)))
    assert "elements off" in mma.check_instruction(seed=7)


def test_auto_trusts_the_tensor_cores_only_after_the_check(monkeypatch):
    monkeypatch.setattr(K, "device_cc", lambda: (9, 0))
    monkeypatch.setattr(mma, "instruction_ok", lambda key: False)
    assert K.launch_math(K.TileConfig(), 39) == "fma"
    assert K.launch_math(K.TileConfig(math="mma"), 39) == "mma"  # asked for by name: no check
    monkeypatch.setattr(mma, "instruction_ok", lambda key: True)
    assert K.launch_math(K.TileConfig(), 39) == "mma"


@cuda.jit
def _split_kernel(x, out):
    i = cuda.grid(1)
    if i < x.shape[0]:
        h, m, lo = K._bf16_split(x[i])
        out[i, 0] = h
        out[i, 1] = m
        out[i, 2] = lo


def test_bf16_split_is_exact():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(200) * 2.0 ** rng.integers(-60, 60, 200)).astype(np.float32)
    x[:4] = [0.0, -0.0, 1.0, np.float32(1) + np.float32(2.0 ** -23)]
    out = np.zeros((200, 3), np.uint32)
    _split_kernel[1, 256](x, out)
    parts = (out << np.uint32(16)).view(np.float32).astype(np.float64)
    assert np.array_equal(parts.sum(axis=1), x.astype(np.float64))
    assert np.array_equal(parts[:, 0], _bf16(x))


# ------------------------------------------------------------------ selection

def test_tile_config_math():
    assert K.TileConfig().math == "auto"
    with pytest.raises(ValueError, match="math"):
        K.TileConfig(math="tensor")
    with pytest.raises(ValueError, match="multiple of 16"):
        K.TileConfig(block_pairs=8, thread_rows=1, math="mma")
    with pytest.raises(ValueError, match="warp_cols"):
        K.TileConfig(warp_cols=12, math="mma")
    mx, q8, f32 = 39, 8, 0
    auto = K.TileConfig()
    assert auto.math_for(mx, (9, 0)) == "mma" and auto.math_for(mx, (8, 0)) == "mma"
    assert auto.math_for(mx, (7, 5)) == "fma" and auto.math_for(mx, None) == "fma"  # None: the simulator
    assert auto.math_for(q8, (9, 0)) == "fma" and auto.math_for(f32, (9, 0)) == "fma"
    assert K.TileConfig(block_pairs=8, thread_rows=1).math_for(mx, (9, 0)) == "fma"  # tile unfit for MMA
    assert K.TileConfig(math="mma").math_for(mx, None) == "mma"
    assert K.TileConfig(math="mma").math_for(q8, None) == "fma"
    assert K.TileConfig(math="fma").math_for(mx, (9, 0)) == "fma"


def test_variants_include_the_tensor_core_kernels():
    names = {v.name: v for v in K.variants(K.TileConfig(), full=False)}
    assert {"gate_up MXFP4 swiglu_oai bias mma", "gate_up MXFP4 silu mma", "down MXFP4 mma",
            "down MXFP4 bias mma"} <= set(names)
    v = names["down MXFP4 mma"]
    assert v.math == "mma" and v.threads == 128 and v.shared_bytes == K.TileConfig().mma_shared_for(1)
    assert not any(v.math == "mma" for v in K.variants(K.TileConfig(block_pairs=8, thread_rows=1), full=False))


# ------------------------------------------------------------------ kernels against the float64 reference

@pytest.mark.parametrize("k", [1, 4])
def test_mma_matches_reference(k):
    layer = random_layer(32, 32, 4, k, seed=10 + k)
    x, ids, w = _routed(layer, 6, seed=k)
    _check(layer, x, ids, w, tiles=MMA)


def test_mma_partial_tiles_and_widths():
    # n_embd 96 (down's columns, gate+up's K) and n_ff 32 (gate+up's columns, down's K) are
    # multiples neither of the 64-wide K chunk nor of the 64-column blocks; 17 tokens on one
    # expert give 17 pairs: a second m16 row tile with one real row.
    layer = random_layer(96, 32, 1, 1, seed=21)
    x, ids, w = _routed(layer, 17, seed=21)
    out = _check(layer, x, ids, w, tiles=MMA_K64)
    assert out.shape == (17, 96)


def test_mma_silu_without_biases_compact():
    layer = random_layer(32, 32, 4, 2, seed=22, gpt_oss=False)
    assert layer.gate_b is None and layer.activation == "silu"
    x, ids, w = _routed(layer, 5, seed=22)
    _check(layer, x, ids, w, tiles=MMA, layout="compact")


def test_mma_tiny_activations():
    # BF16 has float32's exponent range: hidden states FP16 would flush (< 2^-24) go
    # through exactly. (Large ones too, but the simulator's activation overflows math.exp.)
    layer = random_layer(32, 32, 4, 2, seed=23)
    x, ids, w = _routed(layer, 4, seed=23)
    x[0] *= 2.0 ** -30
    out = device_ffn(layer, x, ids, w, tiles=MMA)
    ref = moe_reference(layer, x, ids, w)
    for t in range(4):
        assert _rel_err(out[t], ref[t]) < rel_tol("mma")


def test_mma_agrees_with_fma_and_is_deterministic():
    layer = random_layer(32, 32, 4, 2, seed=24)
    x, ids, w = _routed(layer, 6, seed=24)
    a = device_ffn(layer, x, ids, w, tiles=MMA)
    b = device_ffn(layer, x, ids, w, tiles=FMA)
    ref = moe_reference(layer, x, ids, w)
    assert _rel_err(a, b) < mma_vs_fma_tol() and _rel_err(a, ref) < rel_tol("mma")
    # Same bits whatever the layout and the launches (waves or one per copy range).
    assert np.array_equal(a, device_ffn(layer, x, ids, w, tiles=MMA, layout="compact", launch_tiles=1))


def test_mma_never_reads_unused_slots():
    layer = random_layer(32, 32, 6, 2, seed=25)
    x, ids, w = _routed(layer, 3, seed=25)
    clean = device_ffn(layer, x, ids, w, tiles=MMA)
    assert np.array_equal(clean, device_ffn(layer, x, ids, w, tiles=MMA, poison=0xFF))
