"""The format registry: geometry from gguf, capabilities as queries, and adding a format is one
class (a toy format registered here alone flows through every CPU layer)."""
import subprocess
import sys
from pathlib import Path

import numba as nb
import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

import quant
from quant import check as qcheck, cpu as qcpu, registry

TOY_ID = 250  # no GGML type has it


def test_builtin_formats_match_gguf():
    for f in registry.formats():
        assert registry.get(f.ggml_type) is f
        assert (f.block, f.block_bytes) == GGML_QUANT_SIZES[T(f.ggml_type)]
        rng = np.random.default_rng(f.ggml_type)
        raw = rng.integers(0, 256, (7, f.block_bytes), dtype=np.uint8)
        ours = f.decode_numpy(raw)
        ref = quants.dequantize(raw, T(f.ggml_type)).reshape(7, f.block)
        assert ours.dtype == np.float32 and ours.shape == (7, f.block)
        assert ((ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))).all()


def test_capabilities_are_queries():
    assert set(registry.types("cpu")) >= {T.F32, T.F16, T.BF16, T.Q8_0, T.MXFP4}
    assert registry.types("mma") == (T.MXFP4,)
    # every quantised type multiplies int8 activations; the floats do not
    assert set(registry.types("int8_dot")) == set(registry.types("cpu")) - {T.F32, T.F16, T.BF16}
    # every type but the half floats has device expert tiles: hand-written, or from the block decoder
    assert set(registry.types("cuda_tile")) == set(registry.types("cpu")) - {T.F16, T.BF16}
    assert {f.ggml_type for f in registry.formats() if f.cuda_tile_parts} == \
        {f.ggml_type for f in registry.formats() if f.cuda_decode_block is not None}
    assert not registry.has(T.Q4_0) or registry.get(T.Q4_0).ggml_type == T.Q4_0
    with pytest.raises(ValueError, match="unknown capability"):
        registry.types("teleport")
    with pytest.raises(NotImplementedError, match="not supported"):
        registry.get(12345)


def test_registration_refuses_duplicates_and_missing_geometry():
    with pytest.raises(ValueError, match="already registered"):
        class Again(registry.Format, ggml_type=T.Q8_0):
            @staticmethod
            def decode_numpy(blocks):
                return blocks
    with pytest.raises(ValueError, match="state block and block_bytes"):
        class NoGeometry(registry.Format, ggml_type=TOY_ID):
            @staticmethod
            def decode_numpy(blocks):
                return blocks
    with pytest.raises(TypeError, match="decode_numpy is required"):
        class NoDecode(registry.Format, ggml_type=TOY_ID):
            block, block_bytes = 4, 5
    assert not registry.has(TOY_ID)


# ---------------------------------------------------------------- the toy format
# Blocks of 4 values in 5 bytes: a power-of-two scale 2^(e-127) (e == 255: a NaN scale), then
# 4 int8. Every value is exact in float32, so a tensor of them equals an F32 tensor bit for bit.

@nb.njit(inline="always")
def _toy_block(src, off, out, o):
    d = np.float32(2.0) ** np.float32(np.int32(src[off]) - 127) if src[off] != 255 else np.float32(np.nan)
    for j in range(4):
        out[o + j] = np.float32(np.int8(src[off + 1 + j])) * d


def _toy_numpy(blocks):
    e = blocks[:, :1].astype(np.float32)
    d = np.where(e == 255, np.float32(np.nan), np.float32(2.0) ** (e - np.float32(127))).astype(np.float32)
    return blocks[:, 1:].copy().view(np.int8).astype(np.float32) * d


def _toy_bad(blocks):
    return blocks[:, 0] == 255


def _toy_bytes(rng, n_blocks):
    raw = np.empty((n_blocks, 5), np.uint8)
    raw[:, 0] = rng.integers(120, 130, n_blocks)
    raw[:, 1:] = rng.integers(0, 256, (n_blocks, 4))
    return raw


def _register_toy():
    class Toy(registry.Format, ggml_type=TOY_ID):
        name, block, block_bytes = "TOY", 4, 5
        decode_block = _toy_block
        decode_numpy = staticmethod(_toy_numpy)
        check_blocks = staticmethod(_toy_bad)
    return Toy


@pytest.fixture
def toy():
    Toy = _register_toy()
    try:
        yield Toy
    finally:
        registry.unregister(TOY_ID)
    assert not registry.has(TOY_ID)


def test_toy_flows_through_quant(toy):
    rng = np.random.default_rng(1)
    assert registry.has(TOY_ID, "cpu") and registry.has(TOY_ID, "check")
    assert TOY_ID in registry.types("cpu") and quant.type_name(TOY_ID) == "TOY"
    assert quant.row_nbytes(TOY_ID, 64) == 80
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.row_nbytes(TOY_ID, 6)
    raw = _toy_bytes(rng, 3 * 2 * 16)
    want = _toy_numpy(raw).reshape(3, 2, 64)
    got = quant.dequantize(raw.reshape(-1), TOY_ID, (3, 2, 64))
    assert np.array_equal(got, want)
    # the generated njit dispatcher (whole rows, and a window of whole blocks)
    rows = raw.reshape(3, 2, 80)
    assert np.array_equal(qcpu.dequantize_rows(rows, TOY_ID, 64), want)
    # the data check
    assert qcheck.first_bad(raw, TOY_ID) is None
    bad = raw.copy()
    bad[37, 0] = 255
    assert qcheck.first_bad(bad, TOY_ID) == (37 * 4, "a NaN or inf block scale")
    assert TOY_ID in qcheck.checked()


def test_toy_leaves_no_trace():
    # after the fixture's unregister, the toy id is unknown everywhere again
    assert not registry.has(TOY_ID)
    with pytest.raises(NotImplementedError):
        quant.dequantize(np.zeros(5, np.uint8), TOY_ID, (4,))
    assert qcheck.first_bad(np.zeros(5, np.uint8), TOY_ID) is None


def _toy_matmuls():
    """The toy through the CPU expert path and the dense matmuls (run in a fresh interpreter)."""
    from hybrid.moe import cpu
    from hybrid.moe.layer import ExpertTensor
    from hybrid.kernels.cpu.dense import Dense

    _register_toy()
    rng = np.random.default_rng(2)
    E, rows, cols = 3, 20, 64
    raw = _toy_bytes(rng, E * rows * cols // 4).reshape(E, rows, cols // 4 * 5)
    w = _toy_numpy(raw.reshape(-1, 5)).reshape(E, rows, cols)
    as_f32 = ExpertTensor(w.view(np.uint8).reshape(E, rows, cols * 4).copy(), T.F32, rows, cols)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    ids = rng.integers(0, E, (5, 2))
    got = cpu.mul_mat_id_cpu(ExpertTensor(raw, TOY_ID, rows, cols), x, ids)
    # the toy's values are exact: the expert path must give what it gives for the same F32 weights
    assert np.array_equal(got, cpu.mul_mat_id_cpu(as_f32, x, ids))
    want = np.einsum("tkrc,tc->tkr", w[ids].astype(np.float64), x.astype(np.float64))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    d = Dense("blk.0.attn_q.weight", raw[0].reshape(-1), TOY_ID, (rows, cols))
    for n in (1, 7):
        xd = x[:n]
        assert np.array_equal(d.rows(np.array([3, 0])), w[0][[3, 0]])
        ref = xd.astype(np.float64) @ w[0].astype(np.float64).T
        assert np.abs(d.matmul(xd) - ref).max() <= 1e-5 * np.abs(ref).max()
    print("toy matmuls: ok")


def test_toy_flows_through_cpu_matmuls():
    # In a fresh interpreter: here every format is compiled in (conftest), and a toy added to
    # all 25 would recompile the whole generated expert code (~90 s) for this one test; there
    # the toy joins the five formats compiled by default.
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_registry as t; t._toy_matmuls()"
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True,
                       text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert r.returncode == 0 and "toy matmuls: ok" in r.stdout, r.stderr[-3000:]


def test_compiled_consumers_are_keyed_on_the_registry():
    # numba's disk cache keys a function on its own source only: a consumer of the generated
    # dispatcher compiled before a format existed must not be loaded after it registers
    from numba.core import types as nt
    d = qcpu._decode_all
    assert isinstance(d._cache, registry._RegistryCache) and d in registry._CONSUMERS
    sig = (nt.Array(nt.uint8, 3, "C"), nt.int64, nt.int64, nt.Array(nt.float32, 1, "C"))
    codegen = d.targetctx.codegen()
    before = d._cache._index_key(sig, codegen)

    class Toy(registry.Format, ggml_type=TOY_ID):
        name, block, block_bytes = "TOY", 4, 5
        decode_block = _toy_block
        decode_numpy = staticmethod(_toy_numpy)
    try:
        assert registry.fingerprint()[-1][:3] == (TOY_ID, __name__, "test_compiled_consumers_are_keyed_on_the_registry"
                                                  ".<locals>.Toy")
        assert d._cache._index_key(sig, codegen) != before
    finally:
        registry.unregister(TOY_ID)
    assert d._cache._index_key(sig, codegen) == before


def test_compile_on_use_formats_join_the_generated_code_when_first_used():
    # a rarely used format stays out of the dispatchers (and their compile time) until an entry
    # point activates it; compiled code reaching it before that raises instead of writing nothing
    class LazyToy(registry.Format, ggml_type=TOY_ID):
        name, block, block_bytes = "LAZYTOY", 4, 5
        decode_block = _toy_block
        decode_numpy = staticmethod(_toy_numpy)
        compile_on_use = True
    try:
        assert TOY_ID not in [f.ggml_type for f in registry.compiled_formats()]
        rng = np.random.default_rng()
        raw = _toy_bytes(rng, 6 * 16)
        rows = raw.reshape(6, 16 * 5)
        out = np.full(6 * 64, np.nan, np.float32)
        with pytest.raises(ValueError, match="not compiled in"):
            qcpu._decode_all(rows.reshape(1, 6, -1), TOY_ID, 64, out)
        got = qcpu.dequantize_rows(rows, TOY_ID, 64)  # the entry point activates it
        assert TOY_ID in [f.ggml_type for f in registry.compiled_formats()]
        assert np.array_equal(got, _toy_numpy(raw).reshape(6, 64))
    finally:
        registry.unregister(TOY_ID)
    assert TOY_ID not in [f.ggml_type for f in registry.compiled_formats()]
