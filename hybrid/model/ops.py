"""The dense ops of one transformer block in float32: RMSNorm, RoPE (NEOX and normal) with YaRN, attention.

Formulas as ggml computes them (ggml-cpu ops.cpp: rms_norm, rope_yarn, soft_max
with sinks); ``ops_host.HostOps`` calls them, and the float64 reference
(``ops_f64.py``) writes them again independently.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["rmsnorm", "rope_cos_sin", "rope_neox", "rope_norm", "attention"]


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x^2) + eps) * w`` over the last axis (mean in float64 as ggml's sum)."""
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(ms + eps)).astype(np.float32)) * w


def rope_cos_sin(cfg, il: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[n_tokens, n_rot/2]`` (float32) of layer ``il`` at positions ``pos``.

    ggml's rope_yarn: theta_extrap = p * base^(-2i/n_rot); theta_interp = freq_scale *
    theta_extrap; with YaRN the two mix by a ramp over the corr dims and the
    magnitude is scaled by attn_factor * (1 + 0.1 ln(1/freq_scale)).
    """
    base = cfg.rope_base(il)
    i = np.arange(cfg.n_rot // 2, dtype=np.float64)
    extrap = np.asarray(pos, np.float64)[:, None] * base ** (-2.0 * i / cfg.n_rot)
    theta = cfg.freq_scale * extrap
    mscale = cfg.attn_factor
    if cfg.ext_factor != 0.0:
        low, high = cfg.rope_corr_dims(base)
        ramp = 1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)
        mix = ramp * cfg.ext_factor
        theta = theta * (1.0 - mix) + extrap * mix
        mscale *= 1.0 + 0.1 * math.log(1.0 / cfg.freq_scale)
    return (np.cos(theta) * mscale).astype(np.float32), (np.sin(theta) * mscale).astype(np.float32)


def rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NEOX rotation of ``x [n_tokens, n_heads, head_dim]``: pairs (i, i + n_rot/2); dims past n_rot stay."""
    half = cos.shape[1]
    c, s = cos[:, None, :], sin[:, None, :]
    x0, x1 = x[..., :half], x[..., half:2 * half]
    out = x.copy()
    out[..., :half] = x0 * c - x1 * s
    out[..., half:2 * half] = x0 * s + x1 * c
    return out


def rope_norm(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """ggml's normal RoPE (llama, deepseek2): adjacent pairs (2i, 2i + 1); dims past n_rot stay."""
    n_rot = 2 * cos.shape[1]
    c, s = cos[:, None, :], sin[:, None, :]
    x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out = x.copy()
    out[..., 0:n_rot:2] = x0 * c - x1 * s
    out[..., 1:n_rot:2] = x0 * s + x1 * c
    return out


def attention(q, k, v, q_pos, k_pos, scale, n_swa=0, sinks=None, chunk=128) -> np.ndarray:
    """Causal grouped-query attention, float32 ``[n_tokens, n_head * head_dim_v]``.

    q ``[T, n_head, d]`` at positions ``q_pos``; k, v ``[n_keys, n_head_kv, d]`` at
    ascending positions ``k_pos``. A key at p0 is masked for the query at p1 when
    p0 > p1, or (sliding window) p1 - p0 >= n_swa. ``sinks`` ``[n_head]``: one extra
    logit per head that takes probability and carries no value. Queries go in
    chunks, each against only the keys some query of the chunk can see.
    """
    T, H, _ = q.shape
    Hkv, dv = k.shape[1], v.shape[2]
    r = H // Hkv
    out = np.empty((T, H, dv), np.float32)
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        k0 = int(np.searchsorted(k_pos, q_pos[a] - n_swa + 1)) if n_swa else 0
        k1 = int(np.searchsorted(k_pos, q_pos[b - 1], side="right"))
        dq = q_pos[a:b, None] - k_pos[None, k0:k1]
        allowed = dq >= 0
        if n_swa:
            allowed &= dq < n_swa
        neg = np.where(allowed, np.float32(0), np.float32(-np.inf))
        for g in range(Hkv):
            qg = np.ascontiguousarray(q[a:b, g * r:(g + 1) * r].transpose(1, 0, 2))  # [r, n, d]
            s = np.matmul(qg, k[k0:k1, g].T) * np.float32(scale) + neg  # [r, n, keys]
            m = s.max(axis=-1)
            if sinks is not None:
                sk = sinks[g * r:(g + 1) * r, None]
                m = np.maximum(m, sk)
            p = np.exp(s - m[..., None])
            den = p.sum(axis=-1)
            if sinks is not None:
                den += np.exp(sk - m)
            out[a:b, g * r:(g + 1) * r] = (np.matmul(p, v[k0:k1, g]) / den[..., None]).transpose(1, 0, 2)
    return out.reshape(T, H * dv)
