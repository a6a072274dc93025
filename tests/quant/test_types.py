"""The type registry decodes every supported GGML type exactly as gguf does."""
import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

import quant
from quant import registry

SUPPORTED = registry.types()  # every registered format


@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
def test_dequantize_matches_gguf(t):
    rng = np.random.default_rng()
    cols = max(64, registry.block_size(t))
    x = (rng.standard_normal((5, 3, cols)) * rng.choice([1e-3, 1.0, 100.0], (5, 3, 1))).astype(np.float32)
    try:
        raw = np.ascontiguousarray(quants.quantize(x, t))
    except NotImplementedError:  # random blocks of these: tests/quant/test_formats_all.py
        pytest.skip(f"gguf-py does not quantise {t.name}")
    ours = quant.dequantize(raw, t, x.shape)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_array_equal(ours.view(np.uint32), quants.dequantize(raw, t).view(np.uint32))


@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
def test_row_nbytes_follows_gguf_constants(t):
    block, size = GGML_QUANT_SIZES[t]
    assert quant.row_nbytes(t, 4 * block) == 4 * size
    if block > 1:
        with pytest.raises(ValueError, match="multiple"):
            quant.row_nbytes(t, block + 1)


@pytest.mark.parametrize("t", [T.Q8_1, T.Q8_K, T.I32], ids=lambda t: t.name)  # known to gguf, not decoded
def test_unsupported_type_names_itself(t):
    with pytest.raises(NotImplementedError, match=t.name):
        quant.dequantize(np.zeros(256, np.uint8), t, (1, 256))


def test_unknown_type_id_and_wrong_size():
    with pytest.raises(NotImplementedError, match="unknown"):
        quant.dequantize(np.zeros(4, np.uint8), 9999, (1,))
    with pytest.raises(ValueError, match="bytes"):
        quant.dequantize(np.zeros(33, np.uint8), T.Q8_0, (1, 32))
