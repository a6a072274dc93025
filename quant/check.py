"""A full data check of stored tensors, by GGML type (llama.cpp's ``--check-tensors``).

``first_bad(raw, ggml_type)`` scans the bytes once, without decoding whole
tensors, and names the first block no finite float32 tensor quantises to. What
counts as bad is the format's own ``check_blocks`` (``quant.formats``):

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

from . import registry
from .formats.mxfp4 import NAN_EXPONENT as MXFP4_NAN, SAFE_EXPONENT as MXFP4_SAFE_EXPONENT  # noqa: F401

_CHUNK = 1 << 24  # bytes per pass: bounded temporaries on 60 GB of experts


def checked() -> tuple:
    """The GGML types whose data the check reads (the formats with ``check_blocks``)."""
    return registry.types("check")


def first_bad(raw: np.ndarray, ggml_type: int):
    """``(element, what)`` of the first bad value of a tensor's bytes, ``None`` if all are
    good or the type has no check; ``element`` is the flat index of the first element of the
    bad block (of the element itself for F32/F16/BF16, whose blocks are one element)."""
    if not registry.has(ggml_type, "check"):
        return None
    f = registry.get(ggml_type)
    block, size = f.block, f.block_bytes
    flat = np.asarray(raw).reshape(-1).view(np.uint8)
    step = max(size, _CHUNK // size * size)
    for start in range(0, flat.size - flat.size % size, step):
        chunk = flat[start:start + step]
        bad = f.check_blocks(chunk.reshape(-1, size))
        if bad.any():
            i = int(np.argmax(bad))
            return (start // size + i) * block, f.check_what(chunk[i * size:(i + 1) * size])
    return None
