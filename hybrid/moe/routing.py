"""Routing on the CPU (Numba): logits -> top-k ids + weights -> used experts -> buckets.

``route`` picks each token's k experts and their weights; ``bucket`` groups the
(token, slot) pairs by expert, the order the grouped expert matmuls consume.
Inputs are checked here, in Python, before any Numba code sees them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

from . import activation

_INT32_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------- route

@nb.njit(cache=True)
def _topk(z, k, ids, vals):
    # Per token, a sorted list of the k best so far, scanning experts in id
    # order: the first k fill it, then a newcomer must beat the k-th (kept in a
    # register). It only passes strictly smaller values, so among equal logits
    # the lower expert id stays first.
    n_tok, n_exp = z.shape
    bv = np.empty(k, np.float32)
    bi = np.empty(k, np.int32)
    kth = np.float32(0.0)
    for t in range(n_tok):
        for e in range(n_exp):
            v = z[t, e]
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
        for j in range(k):
            ids[t, j] = bi[j]
            vals[t, j] = bv[j]


@nb.njit(cache=True)
def _weights(z, vals, all_experts, renormalize, w):
    # Float64 inside; vals[t, 0] is the token's max logit. Selected-only softmax
    # (gpt-oss) divides by the sum over the k; the softmax over all experts by
    # the sum over every expert, unless renormalised to the k again.
    n_tok, k = vals.shape
    ex = np.empty(k, np.float64)
    for t in range(n_tok):
        m = np.float64(vals[t, 0])
        s = 0.0
        for j in range(k):
            ex[j] = np.exp(np.float64(vals[t, j]) - m)
            s += ex[j]
        if all_experts and not renormalize:
            s = 0.0
            for e in range(z.shape[1]):
                s += np.exp(np.float64(z[t, e]) - m)
        for j in range(k):
            w[t, j] = ex[j] / s


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
    """Top-k experts per token and their weights.

    logits: float32 ``[n_tokens, n_experts]``, finite. Returns ``ids`` int32
    ``[n_tokens, k]`` in descending logit order (equal logits: lower expert id
    first) and ``weights`` float32 ``[n_tokens, k]`` (computed in float64).

    gating ``"softmax_topk"`` (gpt-oss): softmax over the k selected logits.
    ``"topk_softmax_all"`` (Mixtral/Qwen3-MoE): softmax over all experts, the
    selected probabilities, renormalised to sum 1 if ``renormalize``.
    """
    activation.check(gating=gating)
    z = _check_logits(logits, k)
    k = int(k)
    n_tok = z.shape[0]
    ids = np.empty((n_tok, k), np.int32)
    vals = np.empty((n_tok, k), np.float32)
    w = np.empty((n_tok, k), np.float32)
    if n_tok == 0:
        return ids, w
    _topk(z, k, ids, vals)
    _weights(z, vals, gating == "topk_softmax_all", bool(renormalize), w)
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


@nb.njit(cache=True)
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
