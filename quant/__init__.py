"""GGML tensor formats: MXFP4 and the other types GGUF files hold.

Knows nothing of the MoE backend. ``quant.registry`` is the registry keyed by
GGML type id, filled by the format modules of ``quant.formats`` (one per
family); ``quant.types`` its reference decode; ``quant.cpu`` the generated CPU
decoder (MXFP4 in registers through ``quant.simd``); ``quant.cuda`` the device
helpers; ``quant.check`` the data check.
"""
from . import formats, registry  # noqa: F401  (formats registers the built-in types)
from .formats import mxfp4
from . import types
from .types import dequantize, row_nbytes, type_name

__all__ = ["mxfp4", "registry", "types", "dequantize", "row_nbytes", "type_name"]
