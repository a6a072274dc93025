"""The block's operations on the host: numpy and Numba, float32 (``arch.base.Ops``).

Each method is the host form of one step of the block (``ops.py`` holds the formulas);
``out`` names are the device's buffers and mean nothing here. One ``HostOps`` runs one
ubatch: ``begin`` sets its positions.
"""
from __future__ import annotations

import numpy as np

from ..moe import activation as act
from .ops import attention, rmsnorm, rope_cos_sin, rope_neox, rope_norm

__all__ = ["HostOps"]


class HostOps:
    def __init__(self, cfg, cache, moe):
        self.cfg, self.cache, self.backend = cfg, cache, moe
        self.moe_index = {}  # block number -> position in moe.layers
        self.pos = None
        self.cpu_tiles = None

    def begin(self, pos: np.ndarray, cpu_tiles) -> None:
        self.pos, self.cpu_tiles = pos, cpu_tiles
        self._rope = {}  # (cos, sin) by RoPE base: once per ubatch

    def embed(self, embd, ids):
        return np.array(embd.rows(ids), np.float32)  # (a copy: the residual stream is added to in place)

    def rmsnorm(self, x, w, out=None):
        return rmsnorm(x, w, self.cfg.rms_eps)

    def linear(self, W, x, bias, out=None):
        y = W.matmul(x)
        if bias is not None:
            y += bias
        return y

    def head_linear(self, Ws, x, out=None):
        """``y[:, h] = Ws[h] x[:, h]`` for ``x [T, H, in]`` (MLA's per-head k_b and v_b)."""
        return np.stack([W.matmul(np.ascontiguousarray(x[:, h])) for h, W in enumerate(Ws)], axis=1)

    def add_(self, h, y):
        h += y

    def rope(self, il, x):
        base = self.cfg.rope_base(il)
        if base not in self._rope:
            self._rope[base] = rope_cos_sin(self.cfg, il, self.pos)
        return (rope_neox if self.cfg.rope_neox else rope_norm)(x, *self._rope[base])

    def attend(self, il, q, k, v, sinks, n_swa, out=None):
        pos0 = int(self.pos[0])
        self.cache.store(il, pos0, k, v)
        K, V, kpos = self.cache.window(il, pos0, q.shape[0])
        return attention(q, K, V, self.pos, kpos, self.cfg.kq_scale, n_swa, sinks)

    def moe(self, il, x, out=None):
        return self.backend.forward(self.moe_index[il], x, cpu_tiles=self.cpu_tiles)

    def glu(self, g, u, activation):
        return {"silu": act.silu, "swiglu_oai": act.swiglu_oai}[activation](g, u).astype(np.float32)

    def gate_rows(self, y, x, w):
        y *= act.sigmoid(x @ w)[:, None].astype(np.float32)

    def logits(self, output, output_norm, h):
        return output.matmul(rmsnorm(h, output_norm, self.cfg.rms_eps))
