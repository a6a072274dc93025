"""The block's operations on the device (``arch.base.Ops``): PR #15346's setup, every weight
but the experts on the device, the hidden states there from the embedding to the logits.

Everything runs in order on the MoE backend's stream, into the ubatch's preallocated
buffers (``vram.device_activations``: no allocation per layer, which could synchronise);
``out`` names the buffer, or is the array itself for an in-place step. Adds are in place.
The one synchronisation per layer is the router logits going to the host, inside
``HybridMoE.forward``. The kernels live in ``hybrid.kernels.cuda``; this only calls them.
"""
from __future__ import annotations

from ..kernels.cuda import ops as device_ops
from ..kernels.cuda.attention import attention as device_attention

__all__ = ["DeviceOps"]


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
        return device_ops.rope(x, cos, sin, self.cfg.rope_neox, stream=self.s)

    def attend(self, il, q, k, v, sinks, n_swa, out):
        self.cache.store(il, self.pos0, k, v, stream=self.s)
        return device_attention(self.cache, il, q, self.pos0, self.cfg.kq_scale, n_swa, sinks,
                                out=self._out(out), stream=self.s, config=self.attention_config)

    def moe(self, il, x, out):
        return self.backend.forward(self.moe_index[il], x, cpu_tiles=self.cpu_tiles, out=self._out(out))

    def glu(self, g, u, activation):
        return device_ops.glu(g, u, activation, stream=self.s)

    def gate_rows(self, y, x, w):
        device_ops.gate_rows(y, x, w, stream=self.s)
