"""The block's operations in float64 (``arch.base.Ops``): the reference the tests check against.

Written from the formulas (docs/design.md section 6), loops where they make a formula plain,
no cache and no ubatches: one pass over every token, whose keys and values are kept per
layer as they come. It shares the block's graph with the fast paths (``arch/``), not
their arithmetic; the MoE block is the float64 ``moe.reference``.
"""
from __future__ import annotations

import math

import numpy as np

from ..moe import activation as act
from ..moe.reference import moe_reference

__all__ = ["F64Ops"]


class F64Ops:
    mla_decompressed = True  # deepseek2's block runs MLA as the multi-head attention it absorbs

    def __init__(self, cfg, layers, pos):
        self.cfg, self.pos = cfg, np.asarray(pos)
        self.layers = {L.index: L for L in layers}

    def rmsnorm(self, x, w, out=None):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.cfg.rms_eps) * w

    def linear(self, W, x, bias, out=None):
        y = x @ W.T
        return y if bias is None else y + bias

    def head_linear(self, Ws, x, out=None):
        return np.einsum("thi,hoi->tho", x, Ws)

    def add_(self, h, y):
        h += y

    def rope(self, il, x):
        """NEOX RoPE with YaRN, element by element as ggml's rope_yarn states it."""
        cfg, n_rot = self.cfg, self.cfg.n_rot
        base = cfg.rope_base(il)
        out = x.copy()
        # ggml_rope_yarn_corr_dims
        corr = lambda beta: n_rot * math.log(cfg.n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
        low = max(0.0, math.floor(corr(cfg.beta_fast)))
        high = min(n_rot - 1.0, math.ceil(corr(cfg.beta_slow)))
        for t, p in enumerate(self.pos):
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
                i, j = (i0 // 2, i0 // 2 + n_rot // 2) if cfg.rope_neox else (i0, i0 + 1)
                x0, x1 = x[t, :, i], x[t, :, j]
                out[t, :, i] = x0 * c - x1 * s
                out[t, :, j] = x0 * s + x1 * c
        return out

    def attend(self, il, q, k, v, sinks, n_swa, out=None):
        """Causal softmax per head over keys ``s <= t`` (and ``t - s < n_swa`` on a window), with
        the sink's logit in the denominator."""
        n, H, _ = q.shape
        Hkv = k.shape[1]
        attn = np.zeros((n, H, v.shape[2]))
        for head in range(H):
            g = head // (H // Hkv)
            for t in range(n):
                keys = [s for s in range(t + 1) if not (n_swa and t - s >= n_swa)]
                z = np.array([q[t, head] @ k[s, g] * self.cfg.kq_scale for s in keys])
                extra = [sinks[head]] if sinks is not None else []
                m = max([z.max(), *extra])
                e = np.exp(z - m)
                den = e.sum() + sum(math.exp(x - m) for x in extra)
                attn[t, head] = (e / den) @ v[keys, g]
        return attn.reshape(n, -1)

    def moe(self, il, x, out=None):
        return moe_reference(self.layers[il], x)

    def glu(self, g, u, activation):
        return {"silu": act.silu, "swiglu_oai": act.swiglu_oai}[activation](g, u)

    def gate_rows(self, y, x, w):
        y *= act.sigmoid(x @ w)[:, None]
