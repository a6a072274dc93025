"""Float64 numpy reference of routing and the MoE block: what tests check against.

Written for clarity, not speed: every step in float64, experts dequantised whole.
The formulas are in docs/design.md; the activations in ``activation``.
"""
from __future__ import annotations

import numpy as np

from .activation import SWIGLU_ALPHA, SWIGLU_LIMIT, silu as silu_gated, swiglu_oai  # noqa: F401


def route_reference(logits, k, gating="softmax_topk", renormalize=False):
    """Top-k ids (ties to the lower id) and float64 weights."""
    z = np.asarray(logits, dtype=np.float64)
    # Stable sort on -z keeps equal logits in id order: lower id first.
    ids = np.argsort(-z, axis=1, kind="stable")[:, :k]
    if gating == "softmax_topk":
        sel = np.take_along_axis(z, ids, axis=1)
        w = np.exp(sel - sel.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
    elif gating == "topk_softmax_all":
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        w = np.take_along_axis(p, ids, axis=1)
        if renormalize:
            w = w / w.sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"unknown gating {gating!r}")
    return ids.astype(np.int32), w


def router_logits_reference(layer, x):
    z = np.asarray(x, np.float64) @ layer.router_w.astype(np.float64).T
    if layer.router_b is not None:
        z += layer.router_b
    return z


def moe_reference(layer, x, ids=None, weights=None):
    """Float64 ``[n_tokens, n_embd]`` output of one MoE layer.

    Routes from ``x`` unless ``ids``/``weights`` are given (then the experts'
    math alone is checked, with the caller's routing).
    """
    x = np.asarray(x, dtype=np.float64)
    if ids is None:
        ids, weights = route_reference(router_logits_reference(layer, x), layer.k,
                                       layer.gating, layer.renormalize)
    act = swiglu_oai if layer.activation == "swiglu_oai" else silu_gated
    out = np.zeros((x.shape[0], layer.n_embd))
    for e in np.unique(ids):
        t, j = np.nonzero(ids == e)
        xe = x[t]
        g = xe @ layer.gate.dequantize(e).astype(np.float64).T
        u = xe @ layer.up.dequantize(e).astype(np.float64).T
        if layer.gate_b is not None:
            g += layer.gate_b[e]
        if layer.up_b is not None:
            u += layer.up_b[e]
        y = act(g, u) @ layer.down.dequantize(e).astype(np.float64).T
        if layer.down_b is not None:
            y += layer.down_b[e]
        np.add.at(out, t, np.asarray(weights, np.float64)[t, j][:, None] * y)
    return out
