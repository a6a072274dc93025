"""Every block format against gguf.quants, bit for bit: numpy, Numba CPU, CUDA device (simulator).

Random blocks from fresh seeds (printed on failure), blocks with every extreme
f16 scale (zeros, subnormals, max, inf, NaN) and all-0x00 / all-0xFF codes.
NaN compares by position (payloads differ between decoders), all else by bits.
"""
import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from hypothesis import given, settings, strategies as st
from numba import cuda, njit

from hybrid.model.tiny import set_f16
from quant import registry

FORMATS = registry.formats()
# formats whose only non-finite values come from f16 scales (the data check's rule for them)
F16_SCALED = [f for f in FORMATS if f.scale_offsets is not None or f.name == "IQ1_M"]

SPECIAL_F16 = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFBFF,
               0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF]
IDS = [f.name for f in FORMATS]


def _same(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.dtype == np.float32 and got.shape == ref.shape
    gn, rn = np.isnan(got), np.isnan(ref)
    np.testing.assert_array_equal(gn, rn)
    np.testing.assert_array_equal(got.view(np.uint32)[~gn], ref.view(np.uint32)[~rn])


def _blocks(f, seed, n_random=48):
    rng = np.random.default_rng(seed)
    size = f.block_bytes
    parts = [rng.integers(0, 256, (n_random, size), dtype=np.uint8)]
    for fill in (0x00, 0xFF, None):
        b = (np.full((len(SPECIAL_F16), size), fill, np.uint8) if fill is not None
             else rng.integers(0, 256, (len(SPECIAL_F16), size), dtype=np.uint8))
        for i, h in enumerate(SPECIAL_F16):
            set_f16(b[i:i + 1], f, h)
        parts.append(b)
    finite = rng.integers(0, 256, (16, size), dtype=np.uint8)  # scales drawn from finite halves
    for i in range(16):
        set_f16(finite[i:i + 1], f, int(rng.integers(0, 0x7C00)) | (0x8000 * (i % 2)))
    parts.append(finite)
    return np.concatenate(parts)


def _gguf(blocks, f):
    with np.errstate(all="ignore"):
        return quants.dequantize(blocks, f.ggml_type).reshape(blocks.shape[0], f.block)


def _numpy(blocks, f):
    with np.errstate(all="ignore"):
        return f.decode_numpy(blocks)


@pytest.fixture
def seed():
    return int(np.random.SeedSequence().entropy % (1 << 32))


@pytest.mark.parametrize("f", FORMATS, ids=IDS)
def test_geometry_from_gguf_constants(f):
    assert (f.block, f.block_bytes) == GGML_QUANT_SIZES[f.ggml_type]


@pytest.mark.parametrize("f", FORMATS, ids=IDS)
def test_numpy_decode_is_gguf(f, seed):
    b = _blocks(f, seed)
    try:
        _same(_numpy(b, f), _gguf(b, f))
    except AssertionError as e:
        raise AssertionError(f"{f.name}, seed {seed}: {e}") from None


_RUNNERS = {}


def _cpu_runner(f):
    if f.name not in _RUNNERS:  # one compile per type
        dec, size, qk = f.decode_block, f.block_bytes, f.block

        @njit
        def run(src, n, out):
            for i in range(n):
                dec(src, i * size, out, i * qk)
        _RUNNERS[f.name] = run
    return _RUNNERS[f.name]


def _cpu(blocks, f):
    out = np.full(blocks.shape[0] * f.block, np.nan, np.float32)
    _cpu_runner(f)(np.ascontiguousarray(blocks).reshape(-1), blocks.shape[0], out)
    return out.reshape(blocks.shape[0], f.block)


def _need_cpu(f):
    if f.decode_block is None:
        pytest.skip(f"{f.name} has no Numba block decoder")


@pytest.mark.parametrize("f", FORMATS, ids=IDS)
def test_numba_decode_is_numpy(f, seed):
    _need_cpu(f)
    b = _blocks(f, seed)
    try:
        _same(_cpu(b, f), _numpy(b, f))
    except AssertionError as e:
        raise AssertionError(f"{f.name}, seed {seed}: {e}") from None


@pytest.mark.parametrize("f", FORMATS, ids=IDS)
def test_numba_decode_at_offsets(f):
    _need_cpu(f)
    # decode_block honours off and o: block 2 of a buffer lands at out[o:o+block] and nowhere else
    b = _blocks(f, 7, n_random=3)[:3]
    src = np.concatenate([np.full(5, 0xAB, np.uint8), b.reshape(-1)])
    out = np.full(f.block * 3 + 7, -7.0, np.float32)
    dec = f.decode_block

    @njit
    def one(src, off, out, o):
        dec(src, off, out, o)
    one(src, 5 + 2 * f.block_bytes, out, 7)
    _same(out[7:7 + f.block], _numpy(b[2:3], f)[0])
    assert (out[:7] == -7).all() and (out[7 + f.block:] == -7).all()


@pytest.mark.skipif(not cuda.is_available(), reason="needs a GPU or NUMBA_ENABLE_CUDASIM=1")
@pytest.mark.parametrize("f", FORMATS, ids=IDS)
def test_cuda_decode_is_numpy(f, seed):
    if f.cuda_decode_block is None:
        pytest.skip(f"{f.name} has no CUDA block decoder")
    # the simulator runs each thread in Python: a few blocks, extreme scales among them
    b = _blocks(f, seed, n_random=2)
    b = b[np.r_[0, 1, 2 + 9, 2 + 11, len(b) - 1]]  # random, random, inf, NaN, finite
    dec, size, qk = f.cuda_decode_block, f.block_bytes, f.block

    @cuda.jit
    def kernel(src, out, n):
        i = cuda.grid(1)
        if i < n:
            dec(src, i * size, out, i * qk)
    out = np.full(b.shape[0] * qk, np.nan, np.float32)
    with np.errstate(all="ignore"):
        kernel[1, 8](np.ascontiguousarray(b).reshape(-1), out, b.shape[0])
    try:
        _same(out.reshape(b.shape[0], qk), _numpy(b, f))
    except AssertionError as e:
        raise AssertionError(f"{f.name}, seed {seed}: {e}") from None


@pytest.mark.parametrize("f", F16_SCALED, ids=[f.name for f in F16_SCALED])
def test_check_flags_exactly_nonfinite_scales(f, seed):
    b = _blocks(f, seed)
    bad = f.check_blocks(b)
    assert bad.dtype == bool and bad.shape == (b.shape[0],)
    # a block holds a non-finite value exactly when a scale is inf or NaN (finite ones cannot overflow)
    np.testing.assert_array_equal(bad, ~np.isfinite(_gguf(b, f)).all(axis=1))
    assert bad.any() and not bad.all()


@pytest.mark.parametrize("f", FORMATS, ids=IDS)
def test_registry_cpu_dispatcher_decodes_rows(f, seed):
    # the generated njit dispatcher (what the CPU expert and dense paths call) reaches each format
    from quant.cpu import dequantize_rows
    _need_cpu(f)
    E, R, nb = 2, 3, 2
    b = _blocks(f, seed)[:E * R * nb]
    got = dequantize_rows(np.ascontiguousarray(b).reshape(E, R, nb * f.block_bytes), f.ggml_type, nb * f.block)
    _same(got.reshape(-1, f.block), _numpy(b, f))


HYPO = [f for f in FORMATS if f.name in ("Q4_K", "Q3_K", "IQ2_XXS", "IQ1_M", "Q5_1", "TQ1_0")]


@pytest.mark.parametrize("f", HYPO, ids=[f.name for f in HYPO])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_hypothesis_block_contents(f, data):
    raw = data.draw(st.binary(min_size=f.block_bytes * 2, max_size=f.block_bytes * 2))
    b = np.frombuffer(raw, np.uint8).reshape(2, f.block_bytes).copy()
    ref = _gguf(b, f)
    _same(_numpy(b, f), ref)
    _same(_cpu(b, f), ref)
    np.testing.assert_array_equal(f.check_blocks(b), ~np.isfinite(ref).all(axis=1))
