"""Registry of the GGML types we decode, keyed by gguf's own constants.

Block sizes and ids come from ``gguf.constants``; nothing is retyped here.
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from . import mxfp4


def type_name(ggml_type: int) -> str:
    try:
        return T(int(ggml_type)).name
    except ValueError:
        return f"unknown GGML type {ggml_type}"


def row_nbytes(ggml_type: int, n: int) -> int:
    """Bytes of ``n`` consecutive elements (a row) of this type."""
    block, size = GGML_QUANT_SIZES[T(int(ggml_type))]
    if n % block:
        raise ValueError(f"{type_name(ggml_type)} rows must be a multiple of {block} elements, got {n}")
    return n // block * size


def _f32(raw):
    return raw.view(np.float32).copy()


def _f16(raw):
    return raw.view(np.float16).astype(np.float32)


def _bf16(raw):
    return (raw.view(np.int16).astype(np.int32) << 16).view(np.float32)


def _q8_0(raw):
    # Block: float16 scale d, then 32 int8 values; value = d * q (gguf's order of ops).
    block, size = GGML_QUANT_SIZES[T.Q8_0]
    rows = raw.reshape(-1, size)
    d = rows[:, :2].copy().view(np.float16).astype(np.float32)
    return rows[:, 2:].copy().view(np.int8).astype(np.float32) * d


def _mxfp4(raw):
    return mxfp4.dequantize(raw)


DEQUANTIZERS = {T.F32: _f32, T.F16: _f16, T.BF16: _bf16, T.Q8_0: _q8_0, T.MXFP4: _mxfp4}


def dequantize(raw: np.ndarray, ggml_type: int, shape) -> np.ndarray:
    """Decode the bytes of a tensor of ``ggml_type`` into float32 ``shape``.

    ``shape`` is numpy order (last axis contiguous). Bit-identical to
    ``gguf.quants.dequantize`` for every type in the registry.
    """
    try:
        qt = T(int(ggml_type))
    except ValueError:
        raise NotImplementedError(f"unknown GGML type id {ggml_type}") from None
    if qt not in DEQUANTIZERS:
        raise NotImplementedError(f"dequantize: GGML type {qt.name} is not supported "
                                  f"(supported: {', '.join(t.name for t in DEQUANTIZERS)})")
    if not isinstance(raw, np.ndarray):
        raise TypeError("dequantize: raw must be a numpy array")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape) or not shape:
        raise ValueError(f"dequantize: bad shape {shape}")
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    n = int(np.prod(shape))
    need = n // shape[-1] * row_nbytes(qt, shape[-1]) if n else 0
    if raw.size != need:
        raise ValueError(f"dequantize: {raw.size} bytes do not hold a {qt.name} tensor of shape {shape} "
                         f"({need} bytes)")
    if n == 0:
        return np.zeros(shape, dtype=np.float32)
    return DEQUANTIZERS[qt](raw).reshape(shape)
