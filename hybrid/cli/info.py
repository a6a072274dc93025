"""``info``: architecture, layers, experts, types and sizes of a GGUF file."""
from __future__ import annotations

from ..model import GGUFError
from .common import add_check_tensors, open_model

HELP = "architecture, layers, experts, types, sizes"


def add_arguments(p):
    p.add_argument("-m", "--model", help="GGUF file (default: the built-in tiny gpt-oss)")
    p.add_argument("--per-layer", action="store_true", help="list every expert tensor")
    add_check_tensors(p)


def main(args):
    model = open_model(args.model, args.check_tensors)
    per_ub = model.layers[0].expert_bytes * model.n_experts
    print(f"{model.path}\n")
    print(model.describe(per_layer=args.per_layer))
    print(f"\ncopy-all moves {per_ub / 1e6:.2f} MB of expert weights and biases per MoE layer and ubatch "
          f"({per_ub * len(model.layers) / 1e6:.2f} MB for all {len(model.layers)} layers)")
    print("\n" + whole_model_info(model))


def whole_model_info(model) -> str:
    """Attention, RoPE and tokenizer as the whole-model runner reads them, or why it cannot."""
    from ..model.config import read_config
    from ..model.tokenizer import Tokenizer
    try:
        c = read_config(model)
    except GGUFError as e:
        return f"whole model: not runnable here ({e})"
    swa = [i for i, s in enumerate(c.swa_layers) if s]
    rope = f"RoPE NEOX base {c.rope_freq_base:g} over {c.n_rot} dims"
    if c.ext_factor:
        rope += f", YaRN factor {1 / c.freq_scale:g} (original context {c.n_ctx_orig})"
    lines = [f"attention: {c.n_head} heads, {c.n_head_kv} KV heads, head_dim {c.head_dim}"
             + (", sinks" if c.sinks else "") + (", q/k norm" if c.qk_norm else "")
             + (f", sliding window {c.n_swa} on {len(swa)} of {c.n_layer} layers" if swa else ", full attention"),
             f"{rope}; context {c.n_ctx_train}; vocabulary {c.n_vocab}"]
    try:
        tok = Tokenizer.from_model(model)
        lines.append(f"tokenizer: byte-level BPE, pre-tokenizer {tok.pre!r}, {tok.n_vocab} tokens"
                     + (", chat template" if tok.chat_template else ""))
    except GGUFError as e:
        lines.append(f"tokenizer: none usable ({e}); run takes --tokens or -p N")
    return "\n".join(lines)
