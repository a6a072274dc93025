"""GGML tensor formats: MXFP4 and the other types GGUF files hold.

Knows nothing of the MoE backend. ``quant.types`` is the registry keyed by GGML
type id; ``quant.mxfp4`` the Numba CPU codec; ``quant.cpu`` the compiled CPU
decoders by type id (MXFP4 in registers through ``quant.simd``); ``quant.cuda``
the device functions.
"""
from . import mxfp4, types
from .types import dequantize, row_nbytes, type_name

__all__ = ["mxfp4", "types", "dequantize", "row_nbytes", "type_name"]
