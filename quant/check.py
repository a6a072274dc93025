"""A full data check of stored tensors, by GGML type (llama.cpp's ``--check-tensors``).

``first_bad(raw, ggml_type)`` scans the bytes once, without decoding whole
tensors, and names the first block no finite float32 tensor quantises to:

- F32/F16/BF16: a NaN or inf element;
- Q8_0: a NaN or inf float16 scale;
- MXFP4: a block that decodes to a value beyond float32 (exponent 253 with an
  element of magnitude 8 or 12, 254 with 4 or more), or whose exponent byte is
  0xFF, which is NaN in the OCP MX format (ggml decodes it as 2^127). Blocks
  quantised from weights below 2^127 have exponents of 252 or less.

It reads every byte: call it only when asked to (it is not part of loading).
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from . import mxfp4

MXFP4_NAN = 0xFF
MXFP4_SAFE_EXPONENT = 252  # up to here every block decodes finite (12 * 2^124 < float32 max)
CHECKED = (T.F32, T.F16, T.BF16, T.Q8_0, T.MXFP4)
_CHUNK = 1 << 24  # bytes per pass: bounded temporaries on 60 GB of experts


def _bad_elements(chunk: np.ndarray, ggml_type: T) -> np.ndarray:
    """Bool per block (element for float types) of a uint8 chunk of whole blocks."""
    if ggml_type == T.F32:
        return ~np.isfinite(chunk.view(np.float32))
    if ggml_type == T.F16:
        return ~np.isfinite(chunk.view(np.float16))
    if ggml_type == T.BF16:
        return (chunk.view(np.uint16) & 0x7F80) == 0x7F80  # exponent all ones: inf or NaN
    size = GGML_QUANT_SIZES[ggml_type][1]
    blocks = chunk.reshape(-1, size)
    if ggml_type == T.Q8_0:
        return ~np.isfinite(blocks[:, :2].copy().view(np.float16)[:, 0])
    bad = blocks[:, 0] > MXFP4_SAFE_EXPONENT  # MXFP4: rare, so the exact test runs on these alone
    for i in np.flatnonzero(bad):
        e = int(blocks[i, 0])
        q = blocks[i, 1:]
        amax = np.abs(mxfp4.KVALUES_F32[np.concatenate([q & 0x0F, q >> 4])]).max()
        with np.errstate(over="ignore"):
            bad[i] = e == MXFP4_NAN or not np.isfinite(amax * mxfp4.SCALES[e])
    return bad


def first_bad(raw: np.ndarray, ggml_type: int):
    """``(element, what)`` of the first bad value of a tensor's bytes, ``None`` if all are
    good or the type is not one of ``CHECKED``; ``element`` is the flat index of the
    first element of the bad block (of the element itself for F32/F16/BF16)."""
    try:
        t = T(int(ggml_type))
    except ValueError:
        return None
    if t not in CHECKED:
        return None
    block, size = GGML_QUANT_SIZES[t]
    flat = np.asarray(raw).reshape(-1).view(np.uint8)
    step = max(size, _CHUNK // size * size)
    for start in range(0, flat.size - flat.size % size, step):
        bad = _bad_elements(flat[start:start + step], t)
        if bad.any():
            i = int(np.argmax(bad))
            if t in (T.F32, T.F16, T.BF16):
                return start // size + i, "NaN or inf"
            if t == T.Q8_0:
                return (start // size + i) * block, "a NaN or inf block scale"
            e = int(flat[start + i * size])
            return (start // size + i) * block, (
                "a block of exponent 255 (NaN in the MX format)" if e == MXFP4_NAN
                else f"a block of exponent {e} that decodes beyond float32's range")
    return None
