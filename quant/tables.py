"""MXFP4's constant tables, a leaf module: the format (``quant.formats.mxfp4``), the LLVM IR
library (``quant.simd``) and the device helpers (``quant.cuda``) all read them, so they
live below all three (no import cycle).
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.MXFP4]
HALF = QK // 2
# E2M1 values, doubled (the table ggml calls kvalues_mxfp4).
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
KVALUES_F32 = KVALUES.astype(np.float32)


def e8m0_half_table() -> np.ndarray:
    """half(e) for all 256 exponents, as float32 (decoders index it)."""
    e = np.arange(256, dtype=np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


SCALES = e8m0_half_table()
