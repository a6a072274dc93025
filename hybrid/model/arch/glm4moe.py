"""GLM-4.5, 4.5-Air, 4.6, 4.7 (llama.cpp ``src/models/glm4-moe.cpp``): GQA with q/k/v biases, per-head
q/k RMSNorm where the file has it (the 355B model), NEOX RoPE on the leading ``rope.dimension_count``
dims of each head (partial rotary), the FFN after ``post_attention_norm``; leading dense FFN layers,
then MoE with one shared expert FFN: sigmoid routing with the selection bias ``exp_probs_b``, the
chosen weights renormalised and scaled as the keys say. Next-token-prediction blocks at the end of
the file are not run (llama.cpp runs them only for speculative decoding)."""
from __future__ import annotations

from gguf.constants import GGMLQuantizationType as T, Keys

from .base import Arch


class Glm4Moe(Arch, name="glm4moe"):
    note = "GLM-4.5/4.6/4.7"
    qkv_bias = "optional"
    qk_norm = "optional"
    ffn_norm = "post_attention_norm"
    gating = "sigmoid"  # llama.cpp's default when the file has no expert_gating_func
    norm = False
    moe_keys = frozenset({"gating", "norm", "scale", "groups"})
    shared = "plain"
    leading_dense = True
    selection_bias = True
    nextn = True
    tiny = dict(pre="glm4", rms_eps=1e-5, expert_type=T.Q8_0, rope_base=1000000.0)

    @classmethod
    def tiny_metadata(cls, meta, dims):
        L = Keys.LLM
        meta.update({Keys.Rope.DIMENSION_COUNT: dims["head_dim"] // 2, L.LEADING_DENSE_BLOCK_COUNT: dims["n_dense"],
                     L.EXPERT_SHARED_COUNT: 1, L.EXPERT_GATING_FUNC: 2, L.EXPERT_WEIGHTS_NORM: True,
                     L.EXPERT_WEIGHTS_SCALE: 2.5})
        return meta
