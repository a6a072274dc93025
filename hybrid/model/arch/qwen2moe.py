"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B; llama.cpp ``src/models/qwen2moe.cpp``): q/k/v biases
(no output bias), full attention, NEOX RoPE; MoE: softmax over every expert, top-k, the chosen
weights not renormalised, ``silu``; beside the routed experts one shared expert, scaled per
token by ``sigmoid(ffn_gate_inp_shexp . x)``."""
from __future__ import annotations

from gguf.constants import GGMLQuantizationType as T

from .base import Arch


class Qwen2Moe(Arch, name="qwen2moe"):
    qkv_bias = True
    norm = False
    shared = "sigmoid_gated"
    tiny = dict(pre="qwen2", rms_eps=1e-6, expert_type=T.Q8_0, rope_base=1000000.0)
