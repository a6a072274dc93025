"""Tiny random Hugging Face MoE models of each family, converted by llama.cpp's own converter.

    pip install torch transformers            # not the project's dependencies: this script only
    python examples/hf_tiny_models.py LLAMA_CPP_DIR OUT_DIR [name ...]

writes OUT_DIR/<name>/ (a ``save_pretrained`` model with a byte-level BPE tokenizer trained
through the family's pre-tokenizer) and OUT_DIR/<name>-f32.gguf made by
``LLAMA_CPP_DIR/convert_hf_to_gguf.py --outtype f32``; then compare with
``compare_llamacpp.py FILE`` (and with transformers itself: ``--vs-hf``). The converter picks the
pre-tokenizer by hashing a real tokenizer's output, which a random vocabulary cannot match, so
its ``get_vocab_base_pre`` is told the name. Weights are redrawn at scale 1/sqrt(fan-in): the
default 0.02 init gives flat logits and routing.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, Glm4MoeConfig, MixtralConfig,
                          PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen3MoeConfig)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenizers import AddedToken, Tokenizer, decoders, models  # noqa: E402

from hybrid.model.tiny import TINY_SPECIALS, tiny_vocab  # noqa: E402
from hybrid.model.tokenizer import pre_tokenizer  # noqa: E402

V = 512
common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
cfgs = {
    "mixtral": MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6),
    "qwen2moe": Qwen2MoeConfig(**common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                               shared_expert_intermediate_size=64, norm_topk_prob=False),
    "qwen3moe": Qwen3MoeConfig(**common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                               head_dim=16, norm_topk_prob=True),
    "glm4moe": Glm4MoeConfig(**dict(common, num_hidden_layers=3), n_routed_experts=8, num_experts_per_tok=2,
                             moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                             topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, head_dim=32,
                             partial_rotary_factor=0.5, use_qk_norm=True, attention_bias=True),
    "deepseekv3": DeepseekV3Config(**dict(common, num_key_value_heads=4), n_routed_experts=8, num_experts_per_tok=2,
                                   moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=4,
                                   topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32,
                                   kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                                   rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                                     beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
                                   scoring_func="sigmoid", topk_method="noaux_tc"),  # as the hub's config.json
    # (transformers' config drops scoring_func; without it the converter writes no gating and
    #  llama.cpp, like us, takes V2's softmax)
    # (27 blocks: llama.cpp knows V2-Lite by its block count)
    "deepseekv2lite": DeepseekV2Config(**dict(common, num_key_value_heads=4, num_hidden_layers=27),
                                       n_routed_experts=8,
                                       num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                                       first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                                       qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                                       topk_method="greedy", n_group=1, topk_group=1),
}
PRE = {"mixtral": "llama-bpe", "qwen2moe": "qwen2", "qwen3moe": "qwen2", "glm4moe": "glm4",
       "deepseekv3": "deepseek-v3", "deepseekv2lite": "deepseek-llm"}
def write(name, out):
    cfg = cfgs[name]
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # std 0.02 init gives near-uniform logits; widen so routing and logits vary
        for n, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
            elif "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    d = out / name
    m.save_pretrained(d, safe_serialization=True)
    extra = ["[gMASK]", "<|user|>", "<|observation|>"] if name == "glm4moe" else []  # GLM's converter names these
    tokens, merges, types = tiny_vocab(V - len(extra), PRE[name])
    tokens = tokens + extra
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(x.split(" ")) for x in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizer(PRE[name])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in list(TINY_SPECIALS) + extra])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|start|>", eos_token="<|return|>")
    fast.save_pretrained(d)
    return d


# convert_hf_to_gguf.py, imported, with the pre-tokenizer named (run in a child: it parses sys.argv)
CONVERT = """
import sys
sys.path[:0] = [sys.argv[1] + "/gguf-py", sys.argv[1]]
import convert_hf_to_gguf as c, conversion.base as cb
pre = sys.argv[2]
for mod in (c, cb):
    for cls in vars(mod).values():
        if isinstance(cls, type) and hasattr(cls, "get_vocab_base_pre"):
            cls.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[3:]
c.main()
"""


def vs_hf(name, out, n_tokens=(7, 300)):
    """Our logits on the converted file against transformers' on the model it came from."""
    from hybrid.model import load
    from hybrid.model.forward import Transformer
    hf = AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32).eval()
    m = load(out / f"{name}-f32.gguf")
    for n in n_tokens:
        toks = np.random.default_rng(n).integers(0, V, n)
        with torch.no_grad():
            ref = hf(torch.tensor(toks[None])).logits[0].double().numpy()
        ours = Transformer(m, n_ctx=max(16, n), n_ubatch=128, f32=True).prefill(toks)
        d = np.abs(ours - ref).max() / np.abs(ref).max()
        print(f"| {name} | {n} | {d:.2e} | {np.mean(ours.argmax(1) == ref.argmax(1)):.2f} |", flush=True)


def main():
    args = [a for a in sys.argv[1:] if a != "--vs-hf"]
    if len(args) < 2:
        sys.exit(__doc__)
    llama, out, names = args[0], Path(args[1]), args[2:] or list(cfgs)
    for name in names:
        d = write(name, out)
        gguf = out / f"{name}-f32.gguf"
        subprocess.run([sys.executable, "-c", CONVERT, llama, PRE[name], str(d), "--outtype", "f32",
                        "--outfile", str(gguf)], check=True, capture_output=True)
        print(f"{gguf}: written", flush=True)
        if "--vs-hf" in sys.argv:
            vs_hf(name, out)


if __name__ == "__main__":
    main()
