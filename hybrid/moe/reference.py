"""Float64 numpy reference of routing and the MoE block: what tests check against.

Written for clarity, not speed: every step in float64, experts dequantised whole.
The formulas are in docs/design.md; the activations in ``activation``.
"""
from __future__ import annotations

import numpy as np

from .activation import SWIGLU_ALPHA, SWIGLU_LIMIT, silu as silu_gated, swiglu_oai  # noqa: F401
from .spec import legacy


def route_reference(logits, k, gating="softmax_topk", renormalize=False, *, spec=None, select_b=None):
    """Top-k ids (ties to the lower id) and float64 weights, as ``spec`` says (default: the
    older ``gating``/``renormalize`` spelling, ``spec.legacy``); the formulas of ``spec.py``."""
    spec = legacy(gating, renormalize) if spec is None else spec
    z = np.asarray(logits, dtype=np.float64)
    if spec.gating == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-z))
    elif spec.gating == "softmax":
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
    else:
        p = z
    sel = p + (0.0 if select_b is None else np.asarray(select_b, np.float64))
    if spec.n_group > 1:
        T, E = z.shape
        groups = sel.reshape(T, spec.n_group, E // spec.n_group)
        score = np.sort(groups, axis=2)[:, :, -2:].sum(axis=2)
        best = np.argsort(-score, axis=1, kind="stable")[:, :spec.topk_group]
        keep = np.zeros((T, spec.n_group), bool)
        np.put_along_axis(keep, best, True, axis=1)
        sel = np.where(np.repeat(keep, E // spec.n_group, axis=1), sel, -np.inf)
    # Stable sort on -sel keeps equal scores in id order: lower id first.
    ids = np.argsort(-sel, axis=1, kind="stable")[:, :k]
    if spec.gating == "softmax_chosen":
        chosen = np.take_along_axis(z, ids, axis=1)
        w = np.exp(chosen - chosen.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
    else:
        w = np.take_along_axis(p, ids, axis=1)
        if spec.norm:
            w = w / np.maximum(w.sum(axis=1, keepdims=True), 6.103515625e-5)
    return ids.astype(np.int32), w * spec.scale


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
        ids, weights = route_reference(router_logits_reference(layer, x), layer.k, spec=layer.spec,
                                       select_b=layer.select_b)
    act = {"swiglu_oai": swiglu_oai, "silu": silu_gated}[layer.spec.activation]
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
