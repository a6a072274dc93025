"""MXFP4 codec: bit-identical to gguf.quants on every finite input."""
import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType as T
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from quant import mxfp4


def same_as_gguf(x):
    ours = mxfp4.quantize(x)
    ref = quants.quantize(x, T.MXFP4)
    np.testing.assert_array_equal(ours, ref)
    back = mxfp4.dequantize(ours)
    np.testing.assert_array_equal(back.view(np.uint32), quants.dequantize(ref, T.MXFP4).view(np.uint32))
    return ours


@pytest.mark.parametrize("scale", [1e-38, 1e-20, 1e-3, 0.5, 1.0, 7.0, 1e3, 1e20, 1e37])
def test_random_normals_at_many_scales(scale):
    rng = np.random.default_rng()
    same_as_gguf((rng.standard_normal((33, 96)) * scale).astype(np.float32))


def test_shapes_round_trip():
    x = np.random.default_rng().standard_normal((2, 3, 64)).astype(np.float32)
    q = mxfp4.quantize(x)
    assert q.shape == (2, 3, 2 * 17) and q.dtype == np.uint8
    assert mxfp4.dequantize(q).shape == x.shape


def test_zeros_and_negative_zero():
    x = np.zeros((4, 32), np.float32)
    x[1] = -0.0
    x[2, ::2] = -0.0
    x[3, 5] = 1.0  # a block with one non-zero value among zeros
    q = same_as_gguf(x)
    assert (q[:3] == 0).all()  # 0 maps to index 0, not 8, and e = 0


def test_ties_go_to_lowest_index():
    # amax 4 -> e = 127 -> d = 0.5: table is 0, .5, 1, 1.5, 2, 3, 4, 6 (and negatives).
    x = np.full((1, 32), 0.0, np.float32)
    x[0, :6] = [4.0, 2.5, -2.5, 0.25, -0.25, 5.0]  # each halfway between two table values
    q = same_as_gguf(x)
    nib = lambda j: (q[0, 1 + j % 16] >> (4 * (j // 16))) & 0xF
    assert [nib(j) for j in range(6)] == [6, 4, 12, 0, 0, 6]


def test_extreme_exponents_and_subnormals():
    f = np.finfo(np.float32)
    rows = [
        np.full(32, f.max, np.float32),
        np.linspace(-float(f.max), float(f.max), 32).astype(np.float32),
        np.full(32, f.smallest_subnormal, np.float32),
        np.linspace(-1e-40, 1e-40, 32, dtype=np.float32),  # subnormals: exponent wraps as in gguf
        np.full(32, f.tiny, np.float32),
    ]
    same_as_gguf(np.stack(rows))


def test_amax_just_below_powers_of_two():
    # float32 log2 can round up here; the exponent must still match gguf's.
    p = 2.0 ** np.arange(-126, 127, dtype=np.float64)
    below = np.nextafter(p.astype(np.float32), np.float32(0))
    x = np.zeros((below.size, 32), np.float32)
    x[:, 0] = below
    x[:, 1:] = below[:, None] * np.random.default_rng().uniform(-1, 1, (below.size, 31)).astype(np.float32)
    same_as_gguf(x)


def test_every_byte_decodes_like_gguf():
    blocks = np.zeros((256, 17), np.uint8)
    blocks[:, 0] = np.arange(256)
    blocks[:, 1:] = np.random.default_rng().integers(0, 256, (256, 16), dtype=np.uint8)
    blocks[:16, 1:] = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every qs byte
    np.testing.assert_array_equal(mxfp4.dequantize(blocks).view(np.uint32),
                                  quants.dequantize(blocks, T.MXFP4).view(np.uint32))


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96])), elements=finite32))
def test_property_quantize_matches_gguf(x):
    same_as_gguf(x)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1e-30, 1e-5, 1.0, 1e5, 1e30]))
def test_property_scaled_normals(seed, scale):
    rng = np.random.default_rng(seed)
    same_as_gguf((rng.standard_normal((3, 64)) * scale).astype(np.float32))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 5), st.sampled_from([17, 34])),
                  elements=st.integers(0, 255)))
def test_property_dequantize_matches_gguf(b):
    np.testing.assert_array_equal(mxfp4.dequantize(b).view(np.uint32),
                                  quants.dequantize(b, T.MXFP4).view(np.uint32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_rejected(bad):
    x = np.ones((2, 32), np.float32)
    x[1, 7] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        mxfp4.quantize(x)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(np.ones((2, 33), np.float32))
    with pytest.raises(TypeError, match="float32"):
        mxfp4.quantize(np.ones((2, 32), np.float64))
    with pytest.raises(TypeError, match="float32"):
        mxfp4.quantize([1.0] * 32)
    with pytest.raises(ValueError, match="contiguous"):
        mxfp4.quantize(np.ones((4, 64), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="multiple of 17"):
        mxfp4.dequantize(np.zeros((2, 18), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        mxfp4.dequantize(np.zeros((2, 17), np.int8))
    with pytest.raises(ValueError, match="contiguous"):
        mxfp4.dequantize(np.zeros((2, 34), np.uint8)[:, ::2])
