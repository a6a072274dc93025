"""One module per format family; importing this package registers the built-in formats.

Each module holds everything of its formats that any layer needs (numpy
decode, njit block decode, SIMD/IR hooks, CUDA tile decode, data check) and
registers each format with its GGML id (``quant.registry``). A new family is a
new module here plus its name in ``FAMILIES``.
"""
from . import floats, legacy, mxfp4  # noqa: F401  (registration order: any)
from . import iquants, kquants, legacy_q, ternary  # noqa: F401

FAMILIES = ("floats", "legacy", "mxfp4", "legacy_q", "kquants", "iquants", "ternary")
