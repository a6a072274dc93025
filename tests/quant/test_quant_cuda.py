"""quant.cuda on the simulator: bit-identical to quant.mxfp4 and gguf.quants."""
import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType as T
from numba import cuda, types

from quant import cuda as qc
from quant import mxfp4, registry
from quant.cuda import dequantize_cuda, is_device_array
from devices import DEVICE_TESTS

pytestmark = DEVICE_TESTS


def _all_mxfp4_blocks(rng):
    # Every E8M0 exponent, and every qs byte value (so every nibble in both halves).
    n = 256
    b = np.empty((n, 17), np.uint8)
    b[:, 0] = np.arange(256)
    b[:, 1:] = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    b[:16, 1:] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return b.reshape(4, 64 * 17)  # 4 rows of 64 blocks


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def test_mxfp4_bit_identical_all_exponents_and_nibbles():
    blocks = _all_mxfp4_blocks(np.random.default_rng(0))
    got = dequantize_cuda(blocks)
    assert got.dtype == np.float32 and got.shape == (4, 64 * 32)
    np.testing.assert_array_equal(_bits(got), _bits(mxfp4.dequantize(blocks)))
    ref = quants.dequantize(blocks, T.MXFP4)
    np.testing.assert_array_equal(_bits(got), _bits(ref))


def test_mxfp4_roundtrip_and_device_input():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 2, 96)) * 10.0 ** rng.integers(-30, 30, (3, 2, 1))).astype(np.float32)
    q = mxfp4.quantize(x)
    d = cuda.to_device(q)
    out = dequantize_cuda(d)
    assert is_device_array(out) and out.shape == x.shape
    np.testing.assert_array_equal(_bits(out.copy_to_host()), _bits(mxfp4.dequantize(q)))


def test_q8_0_bit_identical():
    rng = np.random.default_rng(2)
    n = 96
    b = rng.integers(0, 256, (n, 34), dtype=np.uint8)
    # Scales: random finite halves, subnormals, zeros of both signs, inf; no NaN
    # (its payload is not ours to match).
    d = rng.standard_normal(n).astype(np.float16)
    d[:8] = np.array([0.0, -0.0, 6e-8, -6e-8, 3e-5, np.inf, -np.inf, 65504], np.float16)
    b[:, :2] = d.view(np.uint8).reshape(n, 2)
    b[:32, 2] = np.arange(0, 256, 8)  # int8 extremes and both signs
    blocks = b.reshape(2, 48 * 34)
    got = dequantize_cuda(blocks, T.Q8_0)
    ref = quants.dequantize(blocks, T.Q8_0)
    assert got.shape == ref.shape == (2, 48 * 32)
    np.testing.assert_array_equal(_bits(got), _bits(ref))


def test_q8_0_nan_scale_gives_nan():
    b = np.zeros((1, 34), np.uint8)
    b[0, :2] = np.array([np.nan], np.float16).view(np.uint8)
    b[0, 2:] = 1
    assert np.isnan(dequantize_cuda(b, T.Q8_0)).all()


def test_empty_and_bad_inputs():
    assert dequantize_cuda(np.zeros((0, 17), np.uint8)).shape == (0, 32)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_cuda(np.zeros(17, np.int8))
    with pytest.raises(TypeError, match="numpy or device"):
        dequantize_cuda([0] * 17)
    with pytest.raises(ValueError, match="multiple of 17"):
        dequantize_cuda(np.zeros(18, np.uint8))
    with pytest.raises(ValueError, match="multiple of 34"):
        dequantize_cuda(np.zeros(17, np.uint8), T.Q8_0)
    with pytest.raises(NotImplementedError, match="Q4_K"):
        dequantize_cuda(np.zeros(144, np.uint8), T.Q4_K)
    with pytest.raises(NotImplementedError, match="unknown"):
        dequantize_cuda(np.zeros(17, np.uint8), 9999)


def _tile_kernel(qt, rows, k_chunk, n_threads, stride):
    decode = qc.tile_decoder(qt, rows, k_chunk, n_threads, stride)

    @cuda.jit
    def run(w, s, row0, k0, K, out):
        sm = cuda.shared.array(0, types.float32)
        qc.load_tables(sm, cuda.threadIdx.x, n_threads)
        for i in range(cuda.threadIdx.x, k_chunk * stride, n_threads):
            sm[qc.TABLES + i] = -1.0  # a marker: what the decoder must leave alone
        cuda.syncthreads()
        decode(w, s, row0, w.shape[1], k0, K, sm, qc.TABLES, cuda.threadIdx.x, sm)
        cuda.syncthreads()
        for i in range(cuda.threadIdx.x, k_chunk * stride, n_threads):
            out[i] = sm[qc.TABLES + i]
    return run


@pytest.mark.parametrize("qt", [t for t in registry.types("cuda_tile") if not registry.get(t).cuda_tile_parts],
                         ids=registry.type_name)
def test_tile_decoder_transposes_and_zero_fills(qt):  # the hand-written tile decoders
    # A 5-row x 64-col tile of matrix 1 of a stack of 3 [7, 96] matrices, taken at
    # rows 4.. (rows 7, 8 are past the matrix) and k0=64 (cols 96..127 past K).
    rng = np.random.default_rng(int(qt))
    w = rng.standard_normal((3, 7, 96)).astype(np.float32)
    raw = w if qt == T.F32 else np.ascontiguousarray(quants.quantize(w, qt))  # F32 read as float32
    dense = np.stack([quants.dequantize(r, qt) for r in raw]) if qt != T.F32 else w
    rows, k_chunk, stride, n_threads = 5, 64, 7, 8
    out = np.zeros(k_chunk * stride, np.float32)
    smem = 4 * (qc.TABLES + k_chunk * stride)
    _tile_kernel(int(qt), rows, k_chunk, n_threads, stride)[1, n_threads, 0, smem](raw, 1, 4, 64, 96, out)
    tile = out.reshape(k_chunk, stride)
    want = np.zeros((k_chunk, rows), np.float32)
    want[:32, :3] = dense[1, 4:7, 64:96].T
    np.testing.assert_array_equal(_bits(tile[:, :rows]), _bits(want))
    assert (tile[:, rows:] == -1.0).all()  # the stride padding is not written


def test_tile_decoder_rejects_other_types():
    with pytest.raises(NotImplementedError, match="BF16"):
        qc.tile_decoder(int(T.BF16), 4, 32, 8, 5)


PARTS = [t for t in registry.types("cuda_tile") if registry.get(t).cuda_tile_parts]


@pytest.mark.parametrize("qt", PARTS, ids=registry.type_name)
def test_block_tile_decoder_every_format(qt):
    # Tiles built from the format's block decoder: rows 4.. of matrix 1 (rows 7, 8 past the
    # matrix); blocks of 32 at k0 = 64 with K = 96 (the chunk's second block past K), blocks
    # of 256 by K steps of 32 at the start, inside and at the end of the second block.
    from hybrid.model.tiny import random_blocks
    f = registry.get(qt)
    B = f.block
    rng = np.random.default_rng()
    K = 96 if B <= 64 else 2 * B
    raw = random_blocks(f, (3, 7, K), rng, 0.5)
    dense = f.decode_numpy(raw.reshape(-1, f.block_bytes)).reshape(3, 7, K)
    rows, stride, n_threads = 5, 7, 8
    k_chunk = 64 if B <= 64 else 32
    for k0 in ([64] if B <= 64 else [B, B + 96, K - 32]):
        out = np.zeros(k_chunk * stride, np.float32)
        smem = 4 * (qc.TABLES + k_chunk * stride)
        _tile_kernel(int(qt), rows, k_chunk, n_threads, stride)[1, n_threads, 0, smem](raw, 1, 4, k0, K, out)
        tile = out.reshape(k_chunk, stride)
        want = np.zeros((k_chunk, rows), np.float32)
        n_k = min(k_chunk, K - k0)
        want[:n_k, :3] = dense[1, 4:7, k0:k0 + n_k].T
        np.testing.assert_array_equal(_bits(tile[:, :rows]), _bits(want), err_msg=f"k0={k0}")
        assert (tile[:, rows:] == -1.0).all()  # the stride padding is not written


def test_block_tile_decoder_checks_the_step():
    with pytest.raises(ValueError, match="divide it"):
        qc.tile_decoder(int(T.Q4_K), 4, 48, 8, 5)
    with pytest.raises(ValueError, match="multiple of Q8_0's block of 32$"):  # hand-written: whole blocks
        qc.tile_decoder(int(T.Q8_0), 4, 16, 8, 5)
