"""Type names, row sizes and the reference decode by GGML type id: the registry's answers.

Kept as a module so ``quant.types.dequantize`` and friends stay where callers
find them; every answer comes from ``quant.registry`` (the formats in
``quant.formats``), block sizes from ``gguf.constants``.
"""
from __future__ import annotations

from .registry import block_size, dequantize, row_nbytes, type_name, types

__all__ = ["block_size", "dequantize", "row_nbytes", "type_name", "types"]
