"""llama with experts: Mixtral 8x7B/8x22B (llama.cpp ``src/models/llama.cpp``): GQA without
biases, ggml's normal RoPE (adjacent pairs: the converter permutes q and k for it), full
attention; MoE: softmax over every expert, top-k, the chosen weights renormalised, ``silu``,
no shared expert. Mixtral files have no ``expert_feed_forward_length``: their
``feed_forward_length`` is the experts'."""
from __future__ import annotations

from gguf.constants import GGMLQuantizationType as T

from .base import Arch


class Llama(Arch, name="llama"):
    note = "Mixtral"
    rope_neox = False
    n_ff_from_feed_forward = True
    tiny = dict(pre="llama-bpe", rms_eps=1e-5, expert_type=T.Q8_0, rope_base=1000000.0)
