"""Float64 reference of the whole forward, written from the formulas (tests check the fast path against it).

One pass over all tokens, no cache, no ubatches, every weight decoded whole,
loops where they make the formula plain. It shares no code with ``forward``
or ``ops``; the MoE block is the float64 ``moe.reference``.
"""
from __future__ import annotations

import math

import numpy as np

from ..moe.reference import moe_reference
from .config import read_config

__all__ = ["forward_reference"]


def _w(model, name):
    return model.tensor(name).astype(np.float64)


def _rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, cfg, base):
    """NEOX RoPE with YaRN, element by element as ggml's rope_yarn states it."""
    n_rot = cfg.n_rot
    out = x.copy()
    # ggml_rope_yarn_corr_dims
    corr = lambda beta: n_rot * math.log(cfg.n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    low = max(0.0, math.floor(corr(cfg.beta_fast)))
    high = min(n_rot - 1.0, math.ceil(corr(cfg.beta_slow)))
    for t, p in enumerate(positions):
        for i0 in range(0, n_rot, 2):
            theta_extrap = p * base ** (-i0 / n_rot)
            theta = cfg.freq_scale * theta_extrap
            mscale = cfg.attn_factor
            if cfg.ext_factor != 0.0:
                y = (i0 // 2 - low) / max(0.001, high - low)
                ramp_mix = (1 - min(1.0, max(0.0, y))) * cfg.ext_factor
                theta = theta * (1 - ramp_mix) + theta_extrap * ramp_mix
                mscale *= 1.0 + 0.1 * math.log(1.0 / cfg.freq_scale)
            c, s = math.cos(theta) * mscale, math.sin(theta) * mscale
            i, j = i0 // 2, i0 // 2 + n_rot // 2
            x0, x1 = x[t, :, i], x[t, :, j]
            out[t, :, i] = x0 * c - x1 * s
            out[t, :, j] = x0 * s + x1 * c
    return out


def forward_reference(model, tokens) -> np.ndarray:
    """Float64 logits ``[n_tokens, n_vocab]`` of ``tokens`` at positions 0..n-1."""
    cfg = read_config(model)
    tokens = np.asarray(tokens)
    n = len(tokens)
    pos = np.arange(n)
    h = _w(model, "token_embd.weight")[tokens]
    H, Hkv, d = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        x = _rmsnorm(h, _w(model, p + "attn_norm.weight"), cfg.rms_eps)
        q = x @ _w(model, p + "attn_q.weight").T
        k = x @ _w(model, p + "attn_k.weight").T
        v = x @ _w(model, p + "attn_v.weight").T
        if cfg.qkv_bias:
            q += _w(model, p + "attn_q.bias")
            k += _w(model, p + "attn_k.bias")
            v += _w(model, p + "attn_v.bias")
        q, k, v = q.reshape(n, H, d), k.reshape(n, Hkv, d), v.reshape(n, Hkv, cfg.head_dim_v)
        if cfg.qk_norm:
            q = _rmsnorm(q, _w(model, p + "attn_q_norm.weight"), cfg.rms_eps)
            k = _rmsnorm(k, _w(model, p + "attn_k_norm.weight"), cfg.rms_eps)
        base = cfg.rope_freq_base_swa if cfg.swa_layers[il] else cfg.rope_freq_base
        q, k = _rope(q, pos, cfg, base), _rope(k, pos, cfg, base)
        sinks = _w(model, p + "attn_sinks.weight") if cfg.sinks else None
        attn = np.zeros((n, H, cfg.head_dim_v))
        for head in range(H):
            g = head // (H // Hkv)
            for t in range(n):
                keys = [s for s in range(t + 1) if not (cfg.swa_layers[il] and t - s >= cfg.n_swa)]
                # openai-moe.cpp scales by 1/sqrt(n_rot), qwen3moe.cpp by 1/sqrt(head_dim)
                scale = 1 / math.sqrt(cfg.n_rot if cfg.arch == "gpt-oss" else d)
                z = np.array([q[t, head] @ k[s, g] * scale for s in keys])
                extra = [sinks[head]] if sinks is not None else []
                m = max([z.max(), *extra])
                e = np.exp(z - m)
                den = e.sum() + sum(math.exp(x - m) for x in extra)
                attn[t, head] = (e / den) @ v[keys, g]
        o = attn.reshape(n, -1) @ _w(model, p + "attn_output.weight").T
        if cfg.qkv_bias:
            o += _w(model, p + "attn_output.bias")
        h = h + o
        x = _rmsnorm(h, _w(model, p + cfg.ffn_norm + ".weight"), cfg.rms_eps)
        h = h + moe_reference(model.layers[il], x)
    head = "output.weight" if "output.weight" in model.tensors else "token_embd.weight"
    return _rmsnorm(h, _w(model, "output_norm.weight"), cfg.rms_eps) @ _w(model, head).T
