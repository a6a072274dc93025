"""Expert activations: the one definition every path uses (gatings are ``spec.MoESpec``'s).

- ``swiglu_oai`` (gpt-oss): ``g' = min(g, LIMIT)``, ``u' = clamp(u, -LIMIT, LIMIT)``,
  ``a = g' * sigmoid(ALPHA * g') * (u' + 1)``.
- ``silu`` (Mixtral, Qwen3-MoE): ``a = silu(g) * u``.

NaN rule: a NaN in ``g`` or ``u`` gives a NaN activation on every path, as the
float64 reference does; the clamps are written as comparisons that are false
for NaN (``min``/``minnum`` would drop it).

``swiglu_oai_f32``/``silu_f32`` are plain scalar functions in float32 arithmetic:
the CPU path compiles them with ``numba.njit``, the CUDA kernels with
``cuda.jit(device=True)``, so the formula is written once. This module imports
no CUDA.
"""
from __future__ import annotations

import math

import numpy as np

ACTIVATIONS = ("swiglu_oai", "silu")
ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}  # what compiled code branches on
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0

_ALPHA = np.float32(SWIGLU_ALPHA)
_LIMIT = np.float32(SWIGLU_LIMIT)
_ONE = np.float32(1.0)


def swiglu_oai(g, u):
    """Float64 numpy form (the reference)."""
    g = np.where(g > SWIGLU_LIMIT, SWIGLU_LIMIT, g)
    u = np.where(u > SWIGLU_LIMIT, SWIGLU_LIMIT, np.where(u < -SWIGLU_LIMIT, -SWIGLU_LIMIT, u))
    return g / (1.0 + np.exp(-SWIGLU_ALPHA * g)) * (u + 1.0)


def silu(g, u):
    """Float64 numpy form (the reference)."""
    return g / (1.0 + np.exp(-g)) * u


def sigmoid(x):
    """``1 / (1 + exp(-x))`` in numpy (the shared experts' gate)."""
    return 1.0 / (1.0 + np.exp(-x))


def swiglu_oai_f32(g, u):
    """Scalar float32 form for compiled code (numba CPU and CUDA)."""
    if g > _LIMIT:
        g = _LIMIT
    if u > _LIMIT:
        u = _LIMIT
    elif u < -_LIMIT:
        u = -_LIMIT
    return g / (_ONE + math.exp(-_ALPHA * g)) * (u + _ONE)


def silu_f32(g, u):
    """Scalar float32 form for compiled code (numba CPU and CUDA)."""
    return g / (_ONE + math.exp(-g)) * u


def check(activation=None):
    """Raise ValueError naming the choices for an unknown activation."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
