"""The backend for one MoE layer: route -> plan -> copy -> compute -> record.

``spec`` (the MoE operation as data), ``layer`` (weights), ``routing`` (the router, buckets), ``copyplan`` (the coalescer),
``residency`` (VRAM slot cache), ``transfer`` (host memory), ``engine`` and
``kernels`` (the device), ``cpu``/``cpu_ir`` (the CPU path), ``scheduler``
(``HybridMoE``: the steps in order), ``stats`` (the record), ``reference``
(float64 numpy, what tests check against), ``traffic`` (synthetic routing).
"""
