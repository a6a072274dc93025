"""quant.cpu and quant.simd: the compiled CPU decoders read every type exactly as gguf does."""
import numba as nb
import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from hypothesis import given, settings, strategies as st

from quant import cpu as qcpu, mxfp4, registry, simd


def _same_bits(ours, ref):
    # NaN payloads aside, every float must be the one gguf computes (-0.0 is not 0.0 here)
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
    return bool(same.all())


def _decode(raw, t, cols):
    ours = qcpu.dequantize_rows(raw, t, cols)
    ref = quants.dequantize(raw.reshape(-1, raw.shape[-1]), t).reshape(ours.shape)
    return ours, ref


def test_codes_are_gguf_type_ids():
    assert (qcpu.F32, qcpu.F16, qcpu.BF16, qcpu.Q8_0, qcpu.MXFP4) == (0, 1, 30, 8, 39)
    assert (qcpu.MX_QK, qcpu.MX_BYTES) == GGML_QUANT_SIZES[T.MXFP4]
    for f in registry.formats():  # every format's geometry is gguf's own
        assert (f.block, f.block_bytes) == GGML_QUANT_SIZES[T(f.ggml_type)]
        assert f.name == T(f.ggml_type).name


@pytest.mark.parametrize("t", [T.F16, T.BF16], ids=lambda t: t.name)
def test_half_types_exhaustive(t):
    raw = np.arange(2 ** 16, dtype=np.uint16).view(np.uint8).reshape(1, 256, 512)
    assert _same_bits(*_decode(raw, t, 256))


def test_f32_random_bits():
    raw = np.random.default_rng().integers(0, 256, (2, 3, 4 * 40), dtype=np.uint8)
    assert _same_bits(*_decode(raw, T.F32, 40))


@given(data=st.binary(min_size=3 * 4 * 34, max_size=3 * 4 * 34))
@settings(max_examples=40, deadline=None)
def test_q8_0_any_bytes(data):
    raw = np.frombuffer(data, np.uint8).reshape(3, 4 * 34).copy()  # scales include inf/NaN/subnormal halves
    assert _same_bits(*_decode(raw, T.Q8_0, 128))


@given(data=st.binary(min_size=2 * 5 * 17, max_size=2 * 5 * 17))
@settings(max_examples=40, deadline=None)
def test_mxfp4_any_bytes(data):
    raw = np.frombuffer(data, np.uint8).reshape(2, 5 * 17).copy()
    assert _same_bits(*_decode(raw, T.MXFP4, 160))


@pytest.mark.parametrize("t", qcpu.types(), ids=lambda t: t.name)
def test_quantised_data_and_column_windows(t):
    # Real values (gguf's quantiser), read back whole and as a window [c0, c0+n) of each row.
    # (types gguf cannot quantise: random blocks in tests/quant/test_formats_all.py)
    B = registry.block_size(t)
    cols, c0, n = (128, 32, 64) if B <= 32 else (2 * B, B, B)
    rng = np.random.default_rng()
    x = (rng.standard_normal((2, 3, cols)) * rng.choice([1e-3, 1.0, 100.0], (2, 3, 1))).astype(np.float32)
    try:
        raw = np.ascontiguousarray(quants.quantize(x, t)).view(np.uint8).reshape(2, 3, -1)
    except NotImplementedError:
        pytest.skip(f"gguf-py does not quantise {t.name}")
    ours, ref = _decode(raw, t, cols)
    assert _same_bits(ours, ref)
    out = np.full(n, np.nan, np.float32)
    _window(raw, int(t), 1, 2, c0, n, out)
    assert _same_bits(out, ref[1, 2, c0:c0 + n])


@nb.njit
def _window(raw, wtype, e, r, c0, n, out):
    qcpu.decode(raw, wtype, e, r, c0, n, out, 0)


@pytest.mark.parametrize("isa", simd.ISAS)
def test_mxfp4_register_decoder_every_isa(isa):
    if isa not in simd.supported_isas():
        pytest.skip(f"{isa} not on this CPU")
    dec = simd.make_mx_decode(isa)

    @nb.njit
    def run(raw, nblk, out):
        dec(raw, 0, nblk, out, 0)

    raw = np.random.default_rng().integers(0, 256, 64 * 17, dtype=np.uint8)
    raw[0], raw[17], raw[34] = 0, 1, 255  # zero, subnormal and largest scales
    out = np.empty(64 * 32, np.float32)
    run(raw, 64, out)
    assert _same_bits(out, mxfp4.dequantize(raw))
    assert _same_bits(out, quants.dequantize(raw.reshape(1, -1), T.MXFP4).ravel())


def test_bad_arguments():
    with pytest.raises(NotImplementedError, match="Q8_K"):
        qcpu.dequantize_rows(np.zeros((1, 292), np.uint8), T.Q8_K, 256)
    with pytest.raises(ValueError, match="do not hold"):
        qcpu.dequantize_rows(np.zeros((2, 18), np.uint8), T.MXFP4, 32)
    with pytest.raises(TypeError, match="uint8"):
        qcpu.dequantize_rows(np.zeros((2, 17), np.int8), T.MXFP4, 32)


def test_q8_activations_are_ggml_q8_0_values():
    # int8 values bit for bit as gguf's Q8_0 (ggml's roundf rounding, ties included), the scale
    # amax/127 in float32 (Q8_0 rounds it to a half), the corrections -12 * (sum of 4 values).
    rng = np.random.default_rng()
    x = (rng.standard_normal((5, 96)) * rng.choice([1e-3, 1.0, 100.0], (5, 1))).astype(np.float32)
    x[0, :32] = 0.0  # zero block: scale 0, values 0
    x[1, :32] = np.arange(32, dtype=np.float32) - 15.5  # halves at many points: ties round away from 0
    x[1, 0] = 127.0
    qc, d = np.zeros(5 * 3 * qcpu.Q8_REC, np.uint8), np.zeros(5 * 3 * qcpu.Q8_DREP, np.float32)
    d8 = d.reshape(5, 3, qcpu.Q8_DREP)
    qcpu.quantize_q8(x, 5, 3, qc, d)
    ref = quants.quantize(x, T.Q8_0).reshape(5, 3, 34)
    rec = qc.reshape(5, 3, qcpu.Q8_REC)
    assert np.array_equal(rec[..., :32], ref[..., 2:])
    d = d8[..., 0]
    assert (d8 == d[..., None]).all()
    assert np.array_equal(d, np.abs(x.reshape(5, 3, 32)).max(-1) / np.float32(127))
    assert np.array_equal(d.astype(np.float16), ref[..., :2].copy().view(np.float16)[..., 0])
    sums = rec[..., :32].copy().view(np.int8).astype(np.int32).reshape(5, 3, 8, 4).sum(-1)
    assert np.array_equal(rec[..., 32:].copy().view(np.int32), -simd.U8_OFFSET * sums)
    assert simd.U8_OFFSET == 12 and list(simd.KVALUES_U8) == list(mxfp4.KVALUES.astype(int) + 12)


def test_q8k_activations_are_q8_0_values_over_256():
    # super-blocks of 256: the Q8_0 rounding of x / (amax/127) with amax over all 256 (so the
    # values equal gguf's Q8_0 of a block whose amax is the super-block's), the 16 sums of 16
    # values, the scale Q8_DREP times; a non-finite value makes the super-block NaN with zero codes.
    rng = np.random.default_rng()
    x = (rng.standard_normal((4, 768)) * rng.choice([1e-3, 1.0, 100.0], (4, 1))).astype(np.float32)
    x[0, :256] = 0.0  # zero super-block: scale 0, values 0
    x[1, :32] = np.arange(32, dtype=np.float32) - 15.5  # ties round away from 0
    x[1, 40] = 127.0  # the super-block's amax outside its first block
    x[2, 300] = np.inf
    qc, d = np.zeros(4 * 3 * qcpu.Q8K_REC, np.uint8), np.zeros(4 * 3 * qcpu.Q8_DREP, np.float32)
    qcpu.quantize_q8k(x, 4, 3, qc, d)
    rec, d8 = qc.reshape(4, 3, qcpu.Q8K_REC), d.reshape(4, 3, qcpu.Q8_DREP)
    codes = rec[..., :256].copy().view(np.int8)
    amax = np.abs(x.reshape(4, 3, 256)).max(-1)
    fin = np.isfinite(amax)
    assert (d8[fin] == d8[fin][..., :1]).all()
    assert np.array_equal(d8[..., 0][fin], (amax / np.float32(127))[fin]) and np.isnan(d8[2, 1]).all()
    assert not codes[2, 1].any() and not codes[0, 0].any()
    for p, s in zip(*np.nonzero(fin & (amax > 0))):
        for j in range(8):  # each block's values as gguf's Q8_0 of the block with the super-block's amax
            b = x[p, 256 * s + 32 * j:256 * s + 32 * j + 32]
            q = quants.np_roundf(b * (np.float32(1) / (amax[p, s] / np.float32(127))))
            assert np.array_equal(codes[p, s, 32 * j:32 * j + 32], q.astype(np.int8))
    sums = codes.astype(np.int32).reshape(4, 3, 16, 16).sum(-1)
    assert np.array_equal(rec[..., 256:].copy().view(np.int16), sums)
