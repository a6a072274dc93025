"""The block's operations on the device (``arch.base.Ops``): PR #15346's setup, every weight
but the experts on the device, the hidden states there from the embedding to the logits.

Everything runs in order on the MoE backend's stream, into the ubatch's preallocated
buffers (``vram.device_activations``: no allocation per layer, which could synchronise);
``out`` names the buffer, or is the array itself for an in-place step. Adds are in place.
The one synchronisation per layer is the router logits going to the host, inside
``HybridMoE.forward``. Two small kernels live here, for the dense FFN layers and shared
experts: the gated activation (``hybrid.moe.activation``'s formula) and the per-token gate.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from quant import cuda as qc

from ..moe import activation as act
from ..kernels.cuda import ops as device_ops
from ..kernels.cuda.attention import attention as device_attention

__all__ = ["DeviceOps"]

_THREADS = 128
_silu = cuda.jit(device=True)(act.silu_f32)
_swiglu = cuda.jit(device=True)(act.swiglu_oai_f32)
_SWIGLU = act.ACT_CODE["swiglu_oai"]


@cuda.jit
def _glu_kernel(g, u, code):
    """Tiling: grid-stride over the flat ``g``; ``g = act(g, u)`` in place."""
    for i in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        g[i] = _swiglu(g[i], u[i]) if code == _SWIGLU else _silu(g[i], u[i])


@cuda.jit
def _gate_rows_kernel(y, x, w):
    """Tiling: a thread per token: ``y[t] *= sigmoid(x[t] . w)`` (float32, in id order)."""
    t = cuda.grid(1)
    if t < y.shape[0]:
        s = np.float32(0.0)
        for c in range(x.shape[1]):
            s += x[t, c] * w[c]
        gate = np.float32(1.0) / (np.float32(1.0) + math.exp(-s))
        for c in range(y.shape[1]):
            y[t, c] *= gate


@cuda.jit
def _rope_norm_kernel(x, cos, sin):
    """Tiling: grid-stride over (token, head, i < n_rot/2); each step rotates the adjacent pair
    (2i, 2i + 1) of one head in place (ggml's normal RoPE); dims past n_rot are never touched."""
    n_tok, n_head, _ = x.shape
    half = cos.shape[1]
    per_tok = n_head * half
    for idx in range(cuda.grid(1), n_tok * per_tok, cuda.gridsize(1)):
        t = idx // per_tok
        rem = idx - t * per_tok
        h = rem // half
        i = rem - h * half
        c = cos[t, i]
        s = sin[t, i]
        x0 = x[t, h, 2 * i]
        x1 = x[t, h, 2 * i + 1]
        x[t, h, 2 * i] = x0 * c - x1 * s
        x[t, h, 2 * i + 1] = x0 * s + x1 * c


class DeviceOps:
    def __init__(self, cfg, cache, moe, attention_config):
        self.cfg, self.cache, self.backend = cfg, cache, moe
        self.attention_config = attention_config
        self.s = moe.stream
        self.moe_index = {}  # block number -> position in moe.layers
        self.buf, self.pos0, self.rope_tables, self.cpu_tiles = None, 0, {}, None

    def begin(self, buf, pos0: int, rope_tables: dict, cpu_tiles) -> None:
        self.buf, self.pos0, self.rope_tables, self.cpu_tiles = buf, pos0, rope_tables, cpu_tiles

    def _out(self, out):
        return out if not isinstance(out, str) else self.buf[out]

    def rmsnorm(self, x, w, out):
        return device_ops.rmsnorm(x, w, self.cfg.rms_eps, out=self._out(out), stream=self.s)

    def linear(self, W, x, bias, out):
        y = W.matmul(x, out=self._out(out), stream=self.s)
        if bias is not None:
            device_ops.add(y, bias, stream=self.s)
        return y

    def add_(self, h, y):
        device_ops.add(h, y, stream=self.s)

    def rope(self, il, x):
        cos, sin = self.rope_tables[self.cfg.rope_base(il)]
        if self.cfg.rope_neox:
            return device_ops.rope_neox(x, cos, sin, stream=self.s)
        n = x.shape[0] * x.shape[1] * cos.shape[1]  # (shapes checked by rope_neox's caller: the same tables)
        if n:
            _rope_norm_kernel[qc.grid_blocks(n, _THREADS), _THREADS, self.s](x, cos, sin)
        return x

    def attend(self, il, q, k, v, sinks, n_swa, out):
        self.cache.store(il, self.pos0, k, v, stream=self.s)
        return device_attention(self.cache, il, q, self.pos0, self.cfg.kq_scale, n_swa, sinks,
                                out=self._out(out), stream=self.s, config=self.attention_config)

    def moe(self, il, x, out):
        return self.backend.forward(self.moe_index[il], x, cpu_tiles=self.cpu_tiles, out=self._out(out))

    def glu(self, g, u, activation):
        n = g.size
        if n:
            _glu_kernel[qc.grid_blocks(n, _THREADS), _THREADS, self.s](g.reshape(n), u.reshape(n),
                                                                      act.ACT_CODE[activation])
        return g

    def gate_rows(self, y, x, w):
        T = y.shape[0]
        if T:
            _gate_rows_kernel[-(-T // _THREADS), _THREADS, self.s](y, x, w)
