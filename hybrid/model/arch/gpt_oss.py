"""gpt-oss (llama.cpp ``src/models/openai-moe.cpp``): q/k/v/o biases, attention sinks, sliding
window on every other layer, YaRN; MoE: top-k of the raw logits, softmax over the chosen
(``softmax_chosen``), ``swiglu_oai``, biases on the router and every expert."""
from __future__ import annotations

from gguf.constants import GGMLQuantizationType as T, Keys

from ..errors import GGUFError
from .base import Arch


class GptOss(Arch, name="gpt-oss"):
    qkv_bias = True
    out_bias = True
    sinks = True
    swa_pattern = 2  # llama.cpp: il % 2 < 1, the even layers, unless the file says otherwise
    kq_scale_by_rot = True  # openai-moe.cpp scales by 1/sqrt(n_rot); equal to head_dim in the released files
    ffn_norm = "post_attention_norm"
    gating = "softmax_chosen"
    norm = False
    activation = "swiglu_oai"
    expert_biases = True
    tiny = dict(pre="gpt-4o", rms_eps=1e-5, expert_type=T.MXFP4, rope_base=150000.0,
                yarn=dict(factor=32.0, orig_ctx=4096))

    @classmethod
    def sliding_window(cls, get, meta_value, n_layer):
        A = Keys.Attention
        n_swa = get(A.SLIDING_WINDOW, int, lo=1)
        pat = meta_value(A.SLIDING_WINDOW_PATTERN)
        if isinstance(pat, list):  # one flag per layer
            if len(pat) != n_layer:
                raise GGUFError(f"{A.SLIDING_WINDOW_PATTERN.format(arch=cls.name)} has {len(pat)} entries, "
                                f"expected {n_layer}")
            return n_swa, tuple(bool(p) for p in pat)
        p = get(A.SLIDING_WINDOW_PATTERN, int, cls.swa_pattern, lo=0)
        return n_swa, tuple(p == 0 or il % p < p - 1 for il in range(n_layer))
