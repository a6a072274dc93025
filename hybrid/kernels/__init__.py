"""Kernels: arrays in, arrays out. No MoELayer, no Config; formats through ``quant.registry``.

``cpu/``: ``experts`` (grouped expert matmuls, Numba), ``dense`` (dense weights in
their stored type), ``ir`` (the LLVM IR dot kernels they inline).
``cuda/``: ``experts`` (launch checks and entry points of the grouped expert
kernels), ``experts_fma`` / ``experts_mma`` (the FFMA and tensor-core kernels),
``tiles`` (``TileConfig``, ``Variant`` and the device helpers they share),
``mma`` (the tensor-core instruction and its emulation), ``dense`` (dense GEMV,
GEMM and row gather), ``ops`` (rmsnorm, RoPE, add), ``attention``.
``hybrid.moe`` and ``hybrid.model`` both build on this package; it imports
neither (``attention`` reads the KV layout's sizes from ``hybrid.model.kvcache``
when a cache is built).
"""
