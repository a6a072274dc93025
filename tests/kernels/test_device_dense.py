"""hybrid.kernels.cuda.dense on the simulator: x @ W.T on the stored bytes of every Dense type,
against Dense.matmul and a float64 reference (weights decoded by quant.types, bit-identical
to gguf.quants); the row lookup bit for bit. Shapes are tiny: the simulator runs every GPU
thread as a Python thread."""
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from numba import cuda

from cases import one_per_block_size
from hybrid.kernels.cpu.dense import Dense
from hybrid.kernels.cuda.dense import DenseTiles, DeviceDense
from hybrid.kernels.cuda.experts import TileConfig
from hybrid.model.tiny import random_blocks
from quant import cuda as qc
from quant import mxfp4
from quant import registry, types as qtypes
from devices import DEVICE_TESTS

pytestmark = DEVICE_TESTS

# GEMV: one warp of 8 rows a block; GEMM: 8 tokens x 32 rows a block, 32 threads of 2 x 4.
SMALL = DenseTiles(gemv_tokens=4, gemv_warps=1, gemv_rows=8,
                   gemm=TileConfig(block_pairs=8, block_cols=32, k_chunk=32, thread_rows=2, thread_cols=4))


def _weights(t, rows, cols, rng):
    """A random Dense of type ``t`` and its float64 decoded matrix."""
    w = (rng.standard_normal((rows, cols)) * 2.0 ** rng.integers(-4, 5, (rows, 1))).astype(np.float32)
    if t in (T.F32, T.MXFP4):
        raw = w if t == T.F32 else mxfp4.quantize(w)
    else:  # gguf's quantisation where gguf-py has one, else random codes
        raw = random_blocks(registry.get(t), (rows, cols), rng, 1.0)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    return Dense("blk.0.attn_q.weight", raw, t, (rows, cols)), qtypes.dequantize(raw, t, (rows, cols))


def _rel(got, want):
    return np.abs(got - want).max() / np.abs(want).max()


PAIRED = [t for t in qc.dense_types() if registry.has(t, "cuda_pair")]
BLOCKWISE = [t for t in qc.dense_types() if not registry.has(t, "cuda_pair")]
CASES = [(t, n) for t in qc.dense_types() for n in (1, 17) if t in PAIRED or n == 1] + \
    [(t, 17) for t in one_per_block_size(BLOCKWISE)]


@pytest.mark.parametrize("t,n_tok", CASES, ids=[f"{registry.type_name(t)}-{n}" for t, n in CASES])
def test_matmul_every_type(t, n_tok):  # n_tok 1: the GEMV; 17: the GEMM (3 token tiles, the last short)
    rng = np.random.default_rng()
    # 44 rows: a short last GEMV block and GEMM row tile; plain types get a width that is
    # no multiple of 32 (a half item at the row's end).
    rows, cols = 44, 2 * registry.block_size(t) if registry.block_size(t) > 1 else 72
    dense, w = _weights(t, rows, cols, rng)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    got = DeviceDense(dense, tiles=SMALL).matmul(cuda.to_device(x)).copy_to_host()
    want = x.astype(np.float64) @ w.astype(np.float64).T
    assert got.dtype == np.float32 and got.shape == (n_tok, rows)
    tol = 1e-6 * max(1, cols // 64)  # float32 sums: the rounding grows with the row length
    assert _rel(got, want) < tol
    assert _rel(got, dense.matmul(x)) < tol


@pytest.mark.parametrize("n_tok", [3, 4, 5])  # the GEMV's largest build, then the GEMM
def test_gemv_gemm_boundary_and_out(n_tok):
    rng = np.random.default_rng()
    dense, w = _weights(T.MXFP4, 40, 96, rng)
    x = rng.standard_normal((n_tok, 96)).astype(np.float32)
    out = cuda.to_device(np.full((n_tok, 40), np.nan, np.float32))
    got = DeviceDense(dense, tiles=SMALL).matmul(cuda.to_device(x), out=out)
    assert got is out
    assert _rel(out.copy_to_host(), x.astype(np.float64) @ w.astype(np.float64).T) < 1e-6


def test_default_tiles():
    rng = np.random.default_rng()
    dense, w = _weights(T.Q8_0, 32, 64, rng)
    dd = DeviceDense(dense)
    for n_tok in (1, DenseTiles().gemv_tokens + 1):
        x = rng.standard_normal((n_tok, 64)).astype(np.float32)
        got = dd.matmul(cuda.to_device(x)).copy_to_host()
        assert _rel(got, x.astype(np.float64) @ w.astype(np.float64).T) < 1e-6


@pytest.mark.parametrize("t", qc.dense_types(), ids=registry.type_name)
def test_rows_bit_identical(t):
    rng = np.random.default_rng()
    cols = 2 * registry.block_size(t) if registry.block_size(t) > 1 else 48
    dense, w = _weights(t, 33, cols, rng)
    ids = np.array([32, 0, 7, 7, int(rng.integers(33))], np.int32)
    got = DeviceDense(dense, tiles=SMALL).rows(cuda.to_device(ids)).copy_to_host()
    np.testing.assert_array_equal(got.view(np.uint32), w[ids].view(np.uint32))
    np.testing.assert_array_equal(got.view(np.uint32), dense.rows(ids).view(np.uint32))


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_half_types_decode_special_patterns_exactly(name):
    # Every exponent (zero/subnormal, normal, inf/NaN) with both signs and random
    # mantissas, plus random patterns: the device decode is the float32 value exactly.
    rng = np.random.default_rng()
    man_bits = 10 if name == "F16" else 7
    ex = np.arange(1 << (15 - man_bits), dtype=np.uint32)
    man = rng.integers(0, 1 << man_bits, ex.size, dtype=np.uint32)
    edge = np.concatenate([ex << man_bits, (ex << man_bits) | man, (ex << man_bits) | ((1 << man_bits) - 1)])
    bits = np.concatenate([edge, edge | 0x8000, rng.integers(0, 1 << 16, 256)]).astype(np.uint16)
    bits = np.resize(bits, (bits.size + 31) // 32 * 32).reshape(-1, 32)
    want = (bits.view(np.float16).astype(np.float32) if name == "F16"
            else (bits.astype(np.uint32) << 16).view(np.float32))
    dense = Dense("w", bits.view(np.uint8), T[name], bits.shape)
    ids = np.arange(bits.shape[0], dtype=np.int32)
    got = DeviceDense(dense).rows(cuda.to_device(ids)).copy_to_host()
    assert np.isnan(want).any() and np.isinf(want).any() and (want == 0).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # NaN payloads are not ours to match
    real = ~np.isnan(want)
    np.testing.assert_array_equal(got.view(np.uint32)[real], want.view(np.uint32)[real])


def test_rows_outside_the_matrix_are_nan():
    dense, w = _weights(T.Q8_0, 32, 32, np.random.default_rng())
    got = DeviceDense(dense).rows(cuda.to_device(np.array([1, -1, 32, 31], np.int32))).copy_to_host()
    assert np.isnan(got[1:3]).all()
    np.testing.assert_array_equal(got[[0, 3]], w[[1, 31]])


def test_sizes():
    dense, _ = _weights(T.MXFP4, 40, 64, np.random.default_rng())
    dd = DeviceDense(dense)
    assert DeviceDense.nbytes_for(dense) == dd.nbytes == 40 * 2 * 17 == dense.nbytes
    assert (dd.name, dd.ggml_type, dd.shape) == (dense.name, int(T.MXFP4), (40, 64))
    assert dd.matmul(cuda.device_array((0, 64), np.float32)).shape == (0, 40)
    assert dd.rows(cuda.device_array(0, np.int32)).shape == (0, 64)


def test_bad_inputs():
    dense, _ = _weights(T.F16, 32, 64, np.random.default_rng())
    dd = DeviceDense(dense, tiles=SMALL)
    x = np.ones((2, 64), np.float32)
    with pytest.raises(TypeError, match="device array"):
        dd.matmul(x)
    with pytest.raises(TypeError, match="float32"):
        dd.matmul(cuda.to_device(x.astype(np.float64)))
    with pytest.raises(ValueError, match=r"\[T, 64\]"):
        dd.matmul(cuda.to_device(np.ones((2, 32), np.float32)))
    with pytest.raises(ValueError, match="dimensions"):
        dd.matmul(cuda.to_device(np.ones(64, np.float32)))
    with pytest.raises(ValueError, match="C-contiguous"):
        dd.matmul(cuda.to_device(np.ones((2, 128), np.float32))[:, ::2])
    with pytest.raises(ValueError, match="out has shape"):
        dd.matmul(cuda.to_device(x), out=cuda.device_array((2, 31), np.float32))
    with pytest.raises(TypeError, match="int32"):
        dd.rows(cuda.to_device(np.zeros(3, np.int64)))
    with pytest.raises(TypeError, match="device array"):
        dd.rows(np.zeros(3, np.int32))
    with pytest.raises(TypeError, match="Dense"):
        DeviceDense(np.zeros((4, 4), np.float32))
    with pytest.raises(TypeError, match="DenseTiles"):
        DeviceDense(dense, tiles=(8, 4))
    dense.ggml_type = int(T.Q8_1)  # a type no format reads: DeviceDense must refuse it
    with pytest.raises(TypeError, match=r"attn_q\.weight: type Q8_1 has no device kernels \(supported: F32, F16"):
        DeviceDense(dense)
    with pytest.raises(NotImplementedError, match="Q4_K"):
        qc.pair_reader(int(T.Q4_K))


@pytest.mark.parametrize("bad", [dict(gemv_warps=0), dict(gemv_warps=33), dict(gemv_rows=True),
                                 dict(gemv_tokens=2.0), dict(gemm=(32, 64))])
def test_bad_tiles(bad):
    with pytest.raises(ValueError, match="DenseTiles"):
        DenseTiles(**bad)


def test_the_front_of_a_block_chained_on_the_device():
    # What the device forward will chain: embedding rows -> rmsnorm -> q = Wq x + bq ->
    # per-head rmsnorm (qwen3moe) -> NEOX rope over part of the head, against the CPU ops.
    from hybrid.kernels.cuda import ops as dops
    from hybrid.model import ops
    rng = np.random.default_rng()
    n_vocab, D, H, d, n_rot, eps = 40, 64, 2, 32, 16, 1e-6
    embd, _ = _weights(T.Q8_0, n_vocab, D, rng)
    wq, _ = _weights(T.MXFP4, H * d, D, rng)
    norm, bq, q_norm = (rng.standard_normal(n).astype(np.float32) for n in (D, H * d, d))
    ids = rng.integers(0, n_vocab, 3).astype(np.int32)
    theta = rng.uniform(-5, 5, (3, n_rot // 2))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)

    h = embd.rows(ids)
    q = (wq.matmul(ops.rmsnorm(h, norm, eps)) + bq).reshape(3, H, d)
    want = ops.rope_neox(ops.rmsnorm(q, q_norm, eps), cos, sin)

    dev = lambda a: dops.to_device_f32(a)  # noqa: E731
    h_d = DeviceDense(embd, tiles=SMALL).rows(cuda.to_device(ids))
    q_d = DeviceDense(wq, tiles=SMALL).matmul(dops.rmsnorm(h_d, dev(norm), eps))
    q_d = dops.add(q_d, dev(bq)).reshape(3, H, d)
    got = dops.rope_neox(dops.rmsnorm(q_d, dev(q_norm), eps, out=q_d), dev(cos), dev(sin)).copy_to_host()
    assert _rel(got, want) < 1e-5
