"""Routing on the CPU (Numba): logits -> top-k ids + weights -> used experts -> buckets.

``route_spec`` picks each token's k experts and their weights as a layer's ``spec.MoESpec``
says (``route``: the same in the older gating spelling); ``bucket`` groups the
(token, slot) pairs by expert, the order the grouped expert matmuls consume.
Inputs are checked here, in Python, before any Numba code sees them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

from quant import jitcache

from . import spec as spec_mod
from .spec import MoESpec

_INT32_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------- route

@jitcache.njit(cache=True)
def _topk_row(sel, k, bi, bv):
    # A sorted list of the k best so far, scanning experts in id order: the first k
    # fill it, then a newcomer must beat the k-th. It only passes strictly smaller
    # values, so among equal scores the lower expert id stays first.
    kth = 0.0
    for e in range(sel.shape[0]):
        v = sel[e]
        if e < k:
            pos = e
        elif v > kth:
            pos = k - 1
        else:
            continue
        while pos > 0 and bv[pos - 1] < v:
            bv[pos] = bv[pos - 1]
            bi[pos] = bi[pos - 1]
            pos -= 1
        bv[pos] = v
        bi[pos] = e
        kth = bv[k - 1]


@jitcache.njit(cache=True)
def _route(z, bias, has_bias, k, gating, norm, scale, n_group, topk_group, ids, w):
    # One router for every spec (spec.py), float64 inside. Selection scores: the raw
    # logits when nothing is added (every gating is monotone in them: the same choice),
    # else the gating's probabilities plus the selection bias. Weights: the unbiased
    # probabilities of the chosen, softmax_chosen over the chosen logits only.
    n_tok, n_exp = z.shape
    sel = np.empty(n_exp, np.float64)
    p = np.empty(n_exp, np.float64)
    bi = np.empty(k, np.int32)
    bv = np.empty(k, np.float64)
    ex = np.empty(k, np.float64)
    per = n_exp // n_group if n_group > 1 else n_exp
    gsc = np.empty(max(n_group, 1), np.float64)
    gi = np.empty(max(topk_group, 1), np.int32)
    gv = np.empty(max(topk_group, 1), np.float64)
    for t in range(n_tok):
        m = np.float64(z[t, 0])
        for e in range(1, n_exp):
            m = max(m, np.float64(z[t, e]))
        need_p = has_bias or n_group > 1  # else the choice is made on the logits: no p needed
        if need_p and gating == 1:  # sigmoid
            for e in range(n_exp):
                p[e] = 1.0 / (1.0 + np.exp(-np.float64(z[t, e])))
        elif need_p and gating == 0:  # softmax over all
            s = 0.0
            for e in range(n_exp):
                p[e] = np.exp(np.float64(z[t, e]) - m)
                s += p[e]
            for e in range(n_exp):
                p[e] /= s
        elif need_p:  # softmax_chosen: llama.cpp selects on the logits themselves
            for e in range(n_exp):
                p[e] = np.float64(z[t, e])
        for e in range(n_exp):  # (groups are scored by probabilities, as llama.cpp does)
            sel[e] = (p[e] + np.float64(bias[e])) if need_p else np.float64(z[t, e])
        if n_group > 1:  # group-limited: keep the topk_group groups with the best two-expert sums
            for g in range(n_group):
                b1 = -np.inf
                b2 = -np.inf
                for e in range(g * per, (g + 1) * per):
                    if sel[e] > b1:
                        b2 = b1
                        b1 = sel[e]
                    elif sel[e] > b2:
                        b2 = sel[e]
                gsc[g] = b1 + b2
            _topk_row(gsc, topk_group, gi, gv)
            for g in range(n_group):
                keep = False
                for j in range(topk_group):
                    if gi[j] == g:
                        keep = True
                if not keep:
                    for e in range(g * per, (g + 1) * per):
                        sel[e] = -np.inf
        _topk_row(sel, k, bi, bv)
        if gating == 1:
            for j in range(k):
                ex[j] = 1.0 / (1.0 + np.exp(-np.float64(z[t, bi[j]])))
            s = 1.0
            if norm:
                s = 0.0
                for j in range(k):
                    s += ex[j]
                s = max(s, 6.103515625e-5)  # llama.cpp's clamp of the sum
        else:
            # softmax_chosen, and softmax renormalised (the same number): exp over the chosen
            # divided by their sum; plain softmax: by the sum over every expert.
            mc = m
            if gating == 2:
                mc = np.float64(z[t, bi[0]])
                for j in range(1, k):
                    mc = max(mc, np.float64(z[t, bi[j]]))
            s = 0.0
            for j in range(k):
                ex[j] = np.exp(np.float64(z[t, bi[j]]) - mc)
                s += ex[j]
            if gating == 0 and (not norm or has_bias or n_group > 1):
                s_all = 0.0
                for e in range(n_exp):
                    s_all += np.exp(np.float64(z[t, e]) - m)
                # renormalised: llama.cpp's clamp, reachable only when the choice may miss the
                # largest probability (the chosen then hold at least 1/n_experts of the mass)
                s = s_all if not norm else max(s, 6.103515625e-5 * s_all)
        for j in range(k):
            ids[t, j] = bi[j]
            w[t, j] = ex[j] / s * scale if scale != 1.0 else ex[j] / s


def _check_logits(logits, k):
    if not isinstance(logits, np.ndarray):
        raise TypeError(f"logits must be a numpy array, got {type(logits).__name__}")
    if logits.dtype != np.float32:
        raise TypeError(f"logits must be float32, got {logits.dtype}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be [n_tokens, n_experts], got shape {logits.shape}")
    n_exp = logits.shape[1]
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if n_exp < 1:
        raise ValueError("logits have no experts (n_experts == 0)")
    if not 1 <= k <= n_exp:
        raise ValueError(f"k={k} must be in [1, n_experts={n_exp}]")
    if logits.size:
        # min/max propagate NaN and expose +-inf: two fast passes, no temporary.
        lo, hi = logits.min(), logits.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = np.argwhere(~np.isfinite(logits))[0]
            raise ValueError(f"logits must be finite: logits[{bad[0]}, {bad[1]}] = {logits[tuple(bad)]}")
    return np.ascontiguousarray(logits)


def route(logits, k, gating="softmax_topk", renormalize=False):
    """Top-k experts per token and their weights, in the older spelling of the gating.

    logits: float32 ``[n_tokens, n_experts]``, finite. Returns ``ids`` int32
    ``[n_tokens, k]`` in descending logit order (equal logits: lower expert id
    first) and ``weights`` float32 ``[n_tokens, k]`` (computed in float64).

    gating ``"softmax_topk"`` (gpt-oss): softmax over the k selected logits.
    ``"topk_softmax_all"`` (Mixtral/Qwen3-MoE): softmax over all experts, the
    selected probabilities, renormalised to sum 1 if ``renormalize``. A ``MoESpec``
    may stand in place of the gating (then ``renormalize`` is ignored): ``route_spec``.
    """
    if isinstance(gating, MoESpec):
        return route_spec(logits, k, gating)
    if gating not in ("softmax_topk", "topk_softmax_all"):
        raise ValueError(f"gating must be one of ('softmax_topk', 'topk_softmax_all') or a MoESpec, "
                         f"got {gating!r}")
    return route_spec(logits, k, spec_mod.legacy(gating, renormalize))


def route_spec(logits, k, spec: MoESpec, select_b=None):
    """Top-k experts per token and their weights as ``spec`` says (``spec.py``): ``ids`` int32
    ``[n_tokens, k]`` in descending selection order (equal scores: lower id first), ``weights``
    float32 ``[n_tokens, k]``. ``select_b``: float32 ``[n_experts]`` added for the choice only."""
    if not isinstance(spec, MoESpec):
        raise TypeError(f"spec must be a MoESpec, got {type(spec).__name__}")
    z = _check_logits(logits, k)
    k = int(k)
    n_tok, n_exp = z.shape
    try:
        spec.check_layer(n_exp, k)
    except ValueError as e:
        raise ValueError(f"route: {e}") from None
    if select_b is not None:
        if not isinstance(select_b, np.ndarray) or select_b.dtype != np.float32 or select_b.shape != (n_exp,):
            raise ValueError(f"select_b must be float32 [{n_exp}], got {getattr(select_b, 'dtype', type(select_b))} "
                             f"{getattr(select_b, 'shape', '')}")
        if not np.isfinite(select_b).all():
            raise ValueError("select_b must be finite")
    ids = np.empty((n_tok, k), np.int32)
    w = np.empty((n_tok, k), np.float32)
    if n_tok == 0:
        return ids, w
    bias = select_b if select_b is not None else np.zeros(n_exp, np.float32)
    _route(z, bias, select_b is not None, k, spec_mod.GATING_CODE[spec.gating], spec.norm, float(spec.scale),
           spec.n_group if spec.grouped else 0, spec.topk_group if spec.grouped else 0, ids, w)
    return ids, w


# --------------------------------------------------------------------------- bucket

@dataclass
class Buckets:
    """(token, slot) pairs grouped by expert; see ``bucket``."""

    n_tokens: int
    k: int
    n_experts: int
    block_size: int
    used: np.ndarray  # int32 [U] sorted unique expert ids
    used_mask: np.ndarray  # bool [E]
    used_bits: np.ndarray  # uint64 [ceil(E/64)]: bit e%64 of word e//64 set if e is used
    counts: np.ndarray  # int32 [E] real pairs per expert
    offsets: np.ndarray  # int32 [E+1] bucket starts in pairs, multiples of block_size
    pairs: np.ndarray  # int32 [P] t*k + j grouped by expert; padding = sentinel
    tile_expert: np.ndarray  # int32 [P // block_size] expert of each tile

    @property
    def sentinel(self) -> int:
        """The padding value in ``pairs``: one past the last real pair."""
        return self.n_tokens * self.k

    @property
    def n_used(self) -> int:
        return int(self.used.shape[0])

    @property
    def n_tiles(self) -> int:
        return int(self.tile_expert.shape[0])

    def expert_pairs(self, e: int) -> np.ndarray:
        """The real pairs of expert ``e`` (padding stripped)."""
        start = self.offsets[e]
        return self.pairs[start:start + self.counts[e]]


@jitcache.njit(cache=True)
def _bucket(flat, n_exp, bs):
    # Pass 1 counts pairs per expert; offsets round each non-empty bucket up to
    # a multiple of bs (vLLM's moe_align_block_size). Pass 2 scatters the flat
    # pair indices in ascending order, so tokens ascend within each expert.
    n = flat.shape[0]
    counts = np.zeros(n_exp, np.int32)
    for i in range(n):
        counts[flat[i]] += 1
    offsets = np.empty(n_exp + 1, np.int32)
    offsets[0] = 0
    n_used = 0
    for e in range(n_exp):
        c = counts[e]
        if c > 0:
            n_used += 1
        offsets[e + 1] = offsets[e] + (c + bs - 1) // bs * bs
    total = offsets[n_exp]
    pairs = np.full(total, n, np.int32)  # sentinel n = n_tokens * k
    tile_expert = np.empty(total // bs, np.int32)
    used = np.empty(n_used, np.int32)
    used_mask = np.zeros(n_exp, np.bool_)
    bits = np.zeros((n_exp + 63) // 64, np.uint64)
    u = 0
    for e in range(n_exp):
        if counts[e] > 0:
            used[u] = e
            u += 1
            used_mask[e] = True
            bits[e >> 6] |= np.uint64(1) << np.uint64(e & 63)
            for tile in range(offsets[e] // bs, offsets[e + 1] // bs):
                tile_expert[tile] = e
    fill = offsets[:n_exp].copy()
    for i in range(n):
        e = flat[i]
        pairs[fill[e]] = i
        fill[e] += 1
    return used, used_mask, bits, counts, offsets, pairs, tile_expert


def _check_int(name, v, lo):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name}={v} must be >= {lo}")
    return int(v)


def bucket(ids, n_experts, block_size=1) -> Buckets:
    """Group the (token, slot) pairs of ``ids`` (int ``[n_tokens, k]``) by expert.

    Each expert's bucket holds the flat indices ``t*k + j`` of the pairs routed
    to it, tokens ascending, padded with the sentinel ``n_tokens*k`` up to a
    multiple of ``block_size``; unused experts get empty buckets.
    """
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"ids must be a numpy array, got {type(ids).__name__}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be an integer array, got {ids.dtype}")
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"ids must be [n_tokens, k] with k >= 1, got shape {ids.shape}")
    n_experts = _check_int("n_experts", n_experts, 1)
    bs = _check_int("block_size", block_size, 1)
    n_tok, k = ids.shape
    # Worst-case padded length must fit int32 offsets and pair indices.
    if n_tok * k + min(n_tok * k, n_experts) * (bs - 1) >= _INT32_MAX or n_experts >= _INT32_MAX:
        raise ValueError(f"{n_tok}x{k} pairs with block_size {bs} overflow int32 offsets")
    if ids.size:
        lo, hi = ids.min(), ids.max()
        if lo < 0 or hi >= n_experts:
            bad = lo if lo < 0 else hi
            raise ValueError(f"expert id {bad} outside [0, n_experts={n_experts})")
    flat = np.ascontiguousarray(ids, dtype=np.int32).reshape(-1)
    used, used_mask, bits, counts, offsets, pairs, tile_expert = _bucket(flat, n_experts, bs)
    return Buckets(n_tok, k, n_experts, bs, used, used_mask, bits, counts, offsets, pairs, tile_expert)
