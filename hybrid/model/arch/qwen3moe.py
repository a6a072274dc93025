"""Qwen3-MoE (llama.cpp ``src/models/qwen3moe.cpp``): no biases, no sinks, full attention,
per-head RMSNorm of q and k before RoPE; MoE: softmax over every expert, top-k, the chosen
weights renormalised (the key ``expert_weights_norm`` may say otherwise), ``silu``."""
from __future__ import annotations

from gguf.constants import GGMLQuantizationType as T

from .base import Arch


class Qwen3Moe(Arch, name="qwen3moe"):
    qk_norm = True
    moe_keys = frozenset({"norm"})
    tiny = dict(pre="qwen2", rms_eps=1e-6, expert_type=T.Q8_0, rope_base=1000000.0)
