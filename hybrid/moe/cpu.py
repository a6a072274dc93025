"""The CPU expert path of one MoE layer: ``MoELayer`` and ``ExpertTensor`` in, float32 out.

Checks at this edge, then the kernels of ``hybrid.kernels.cpu.experts`` (tokens
grouped by expert, items of ``CpuTiles.rows`` output rows, the int8 / direct /
tile ways of multiplying; see there). ``CpuTiles``, ``TILES``, ``ISA`` and
``Q8_VARIANT`` are the kernels' own, named here too.
"""
from __future__ import annotations

import functools

import numpy as np

from ..kernels.cpu import experts as K
from ..kernels.cpu.experts import F32_TILES, ISA, Q8_VARIANT, TILES, CpuTiles  # noqa: F401
from .activation import ACT_CODE
from .layer import ExpertTensor, MoELayer

__all__ = ["moe_ffn_cpu", "moe_ffn_cpu_trusted", "mul_mat_id_cpu", "expert_matmul_cpu", "CpuTiles", "TILES", "F32_TILES",
           "ISA"]


def _check_tensor(name, t):
    if not isinstance(t, ExpertTensor):
        raise TypeError(f"{name} must be an ExpertTensor, got {type(t).__name__}")
    K.check_experts(name, t.raw, t.ggml_type, t.n_experts, t.rows, t.cols)
    return _raw(t)


def _raw(t):
    return t.readonly, int(t.ggml_type)


def mul_mat_id_cpu(w: ExpertTensor, x: np.ndarray, ids: np.ndarray, *, tiles: CpuTiles | None = None) -> np.ndarray:
    """ggml_mul_mat_id on the CPU: ``y[t, j] = W[ids[t, j]] @ x[t]`` -> float32 ``[T, k, rows]``.

    ``x`` is ``[T, cols]`` (one input per token, as for gate/up) or ``[T, k, cols]``
    (one per slot, as for down). Weights of a format with an integer dot (``experts.Q8_TYPES``:
    every quantised type) multiply int8-quantised ``x`` as ggml does
    for the experts with at most ``tiles.q8_tokens`` tokens in the call (default: the format's
    crossover, ``experts.Q8_MAX_TOKENS``); the others, and every expert with ``experts.F32_TILES``,
    multiply float32 ``x``.
    """
    raw, wtype = _check_tensor("w", w)
    tl = K.check_tiles(tiles)
    K.check_block(tl, wtype)
    if not isinstance(x, np.ndarray) or x.ndim not in (2, 3):
        raise ValueError(f"x must be [n_tokens, {w.cols}] or [n_tokens, k, {w.cols}]")
    K.check_x(x, w.cols, ndim=x.ndim)
    ids, _ = K.check_routing(ids, x.shape[0], w.n_experts)
    n, k = ids.shape
    if x.ndim == 3 and x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} slots per token, ids has k={k}")
    return K.mul_mat_id(raw, wtype, w.rows, w.cols, x, ids, tl)


def expert_matmul_cpu(w: ExpertTensor, e: int, x: np.ndarray, *, tiles: CpuTiles | None = None) -> np.ndarray:
    """One expert, one matrix: ``y = W[e] @ x`` for each row of ``x`` -> float32 ``[n, rows]``.

    ``x`` is float32 ``[n, cols]`` (or ``[cols]``, giving ``[rows]``).
    """
    _check_tensor("w", w)
    if not isinstance(e, (int, np.integer)) or isinstance(e, bool):
        raise TypeError(f"e must be an int, got {type(e).__name__}")
    if not 0 <= e < w.n_experts:
        raise ValueError(f"expert {e} is out of range [0, {w.n_experts})")
    vec = isinstance(x, np.ndarray) and x.ndim == 1
    x2 = x[None] if vec else x
    K.check_x(x2, w.cols)
    y = mul_mat_id_cpu(w, x2, np.full((x2.shape[0], 1), e, np.int64), tiles=tiles)[:, 0]
    return y[0] if vec else y


def moe_ffn_cpu(layer: MoELayer, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                out: np.ndarray | None = None, *, tiles: CpuTiles | None = None) -> np.ndarray:
    """The MoE FFN of one layer on the CPU, given its routing -> float32 ``[n_tokens, n_embd]``.

    ``ids`` int ``[n_tokens, k]`` expert ids, ``weights`` float ``[n_tokens, k]``;
    ``out[t] = sum_j weights[t, j] * expert_ids[t, j](x[t])``, summed in j order.
    ``tiles`` overrides the blocking (default ``TILES``); results do not depend on it
    beyond float32 rounding, except ``q8_tokens``: experts with at most that many tokens in the
    call (default: the format's crossover, ``experts.Q8_MAX_TOKENS``; every decode step) multiply x
    and the activation quantised to int8 blocks, as ggml does. ``experts.F32_TILES``: float32 always.
    """
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a MoELayer, got {type(layer).__name__}")
    graw, gtype = _check_tensor("gate", layer.gate)
    uraw, utype = _check_tensor("up", layer.up)
    draw, dtype_ = _check_tensor("down", layer.down)
    E, D, F = layer.n_experts, layer.n_embd, layer.n_ff
    if gtype != utype:
        raise ValueError("gate and up experts must share one type")
    for name, t, shape in (("gate", layer.gate, (E, F, D)), ("up", layer.up, (E, F, D)),
                           ("down", layer.down, (E, D, F))):
        if (t.n_experts, t.rows, t.cols) != shape:
            raise ValueError(f"{name} experts are {(t.n_experts, t.rows, t.cols)}, expected {shape}")
    if layer.activation not in ACT_CODE:
        raise ValueError(f"unknown activation {layer.activation!r}")
    tl = K.check_tiles(tiles)
    K.check_x(x, D)
    ids, weights = K.check_routing(ids, x.shape[0], E, weights)
    out = K.check_out(out, (x.shape[0], D))
    for name, b, shape in (("gate_b", layer.gate_b, (E, F)), ("up_b", layer.up_b, (E, F)),
                           ("down_b", layer.down_b, (E, D))):
        if b is not None and (not isinstance(b, np.ndarray) or b.dtype != np.float32 or b.shape != shape):
            raise ValueError(f"{name} must be float32 {shape}, got {getattr(b, 'dtype', None)} "
                             f"{getattr(b, 'shape', None)}")
    return _ffn(layer, x, ids, weights, out, tl)


def moe_ffn_cpu_trusted(layer: MoELayer, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                        tiles: CpuTiles | None = None) -> np.ndarray:
    """``moe_ffn_cpu`` without its checks, for a caller that validated at its edge
    (``HybridMoE.forward``): ``layer`` a MoELayer (checked when built), ``x`` float32
    C-contiguous ``[T, n_embd]`` already checked finite, ``ids``/``weights`` from ``layer.route(x)``."""
    assert x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 2 and x.shape[1] == layer.n_embd
    assert ids.shape == weights.shape == (x.shape[0], layer.k) and weights.dtype == np.float32
    return _ffn(layer, x, np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(weights),
                np.empty((x.shape[0], layer.n_embd), np.float32), (tiles or TILES).astuple())


@functools.lru_cache(maxsize=8)
def _zero_bias(shape):
    # Models without expert biases (Qwen3-MoE, Mixtral): one zero array per shape, never written,
    # not a fresh E x n_ff of zeros per layer and decode step.
    return np.zeros(shape, np.float32)


def _ffn(layer, x, ids, weights, out, tl):
    """The compute of ``moe_ffn_cpu`` on checked inputs (ids int64, weights float32, contiguous)."""
    E, D, F = layer.n_experts, layer.n_embd, layer.n_ff
    graw, gtype = _raw(layer.gate)
    uraw, _ = _raw(layer.up)
    draw, dtype_ = _raw(layer.down)
    biases = [_zero_bias(shape) if b is None else np.ascontiguousarray(b)
              for b, shape in ((layer.gate_b, (E, F)), (layer.up_b, (E, F)), (layer.down_b, (E, D)))]
    return K.moe_ffn(graw, uraw, draw, gtype, dtype_, F, biases, layer.activation, x, ids, weights, out, tl)
