"""The built-in tiny models: random MoE layers and the small gpt-oss GGUF the demo runs.

Fixtures for the tests, the examples and ``make demo``: weights are random, so
what such a model says means nothing; its routing is skewed as real routers are.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, quants
from gguf.constants import GGML_QUANT_VERSION, GGMLQuantizationType as T, LlamaFileType, RopeScalingType

from quant import mxfp4

from ..moe.layer import ExpertTensor, MoELayer
from .gguf import GGUFError, load

__all__ = ["random_layer", "tiny_layers", "write_tiny", "default_model_path", "ensure_default_model"]


def random_layer(n_embd=64, n_ff=64, n_experts=8, k=2, *, wtype=None, gpt_oss=True,
                 seed=0, index=0, skew=1.0) -> MoELayer:
    """A layer of random weights, quantised to ``wtype`` (default MXFP4).

    ``skew`` adds a per-expert router bias (Zipf-like), so routing favours some
    experts as real routers do; 0 gives unbiased routing.
    """
    wtype = T.MXFP4 if wtype is None else T(int(wtype))
    rng = np.random.default_rng(seed)

    def experts(rows, cols):
        w = (rng.standard_normal((n_experts, rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if wtype == T.MXFP4:
            data = mxfp4.quantize(w)
        elif wtype == T.F32:
            data = w
        else:
            data = np.ascontiguousarray(quants.quantize(w, wtype))
        return ExpertTensor(data, int(wtype), rows, cols)

    rank = rng.permutation(n_experts) + 1
    router_b = (skew * -np.log(rank)).astype(np.float32)
    bias = (lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)) if gpt_oss else (lambda *s: None)
    return MoELayer(
        router_w=(rng.standard_normal((n_experts, n_embd)) / np.sqrt(n_embd)).astype(np.float32),
        router_b=router_b if gpt_oss or skew else None,
        gate=experts(n_ff, n_embd), up=experts(n_ff, n_embd), down=experts(n_embd, n_ff),
        gate_b=bias(n_experts, n_ff), up_b=bias(n_experts, n_ff), down_b=bias(n_experts, n_embd),
        k=k, gating="softmax_topk" if gpt_oss else "topk_softmax_all",
        activation="swiglu_oai" if gpt_oss else "silu", index=index)


def tiny_layers(*, n_layers=4, n_embd=128, n_ff=128, n_experts=32, k=4, seed=0, skew=2.0) -> list[MoELayer]:
    """The MoE layers ``write_tiny`` stores: MXFP4 experts, F32 router with popular experts."""
    return [random_layer(n_embd, n_ff, n_experts, k, wtype=T.MXFP4, gpt_oss=True,
                         seed=seed * 1009 + i, index=i, skew=skew) for i in range(n_layers)]


def write_tiny(path, *, n_layers=4, n_embd=128, n_ff=128, n_experts=32, k=4, seed=0, n_vocab=1024,
               n_head=4, n_head_kv=2, head_dim=32, skew=2.0, split_max_tensors=0) -> Path:
    """Write a small gpt-oss GGUF laid out like the real files; returns the path to load.

    Keys, tensor names, types and ggml shapes follow llama.cpp's converter for
    gpt-oss (MXFP4 experts, Q8_0 matrices, F32 norms/biases/sinks/router), at
    small sizes and without a tokenizer. ``skew`` biases each router towards a
    few experts, as real gpt-oss routing is. ``split_max_tensors`` > 0 writes
    ``NAME-0000i-of-0000N.gguf`` parts (the first is returned).
    """
    for name, v in (("n_embd", n_embd), ("n_ff", n_ff), ("n_head*head_dim", n_head * head_dim),
                    ("n_head_kv*head_dim", n_head_kv * head_dim)):
        if v <= 0 or v % mxfp4.QK:
            raise ValueError(f"write_tiny: {name} = {v} must be a positive multiple of {mxfp4.QK}")
    if n_head % n_head_kv or n_vocab < 1:
        raise ValueError("write_tiny: n_head must be a multiple of n_head_kv, n_vocab >= 1")
    path = Path(path)
    rng = np.random.default_rng([seed, 1])
    f32 = lambda *s, scale=0.1: (scale * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    norm = lambda n: (1.0 + f32(n)).astype(np.float32)  # noqa: E731
    q8 = lambda *s: (quants.quantize(f32(*s, scale=1 / np.sqrt(s[-1])), T.Q8_0), T.Q8_0)  # noqa: E731
    q, kv = n_head * head_dim, n_head_kv * head_dim

    tensors = [("token_embd.weight", q8(n_vocab, n_embd))]
    for layer in tiny_layers(n_layers=n_layers, n_embd=n_embd, n_ff=n_ff, n_experts=n_experts, k=k,
                             seed=seed, skew=skew):
        b = f"blk.{layer.index}."
        tensors += [
            (b + "attn_norm.weight", norm(n_embd)),
            (b + "attn_q.weight", q8(q, n_embd)), (b + "attn_q.bias", f32(q)),
            (b + "attn_k.weight", q8(kv, n_embd)), (b + "attn_k.bias", f32(kv)),
            (b + "attn_v.weight", q8(kv, n_embd)), (b + "attn_v.bias", f32(kv)),
            (b + "attn_output.weight", q8(n_embd, q)), (b + "attn_output.bias", f32(n_embd)),
            (b + "attn_sinks.weight", f32(n_head, scale=1.0)),
            (b + "post_attention_norm.weight", norm(n_embd)),
            (b + "ffn_gate_inp.weight", layer.router_w), (b + "ffn_gate_inp.bias", layer.router_b),
        ]
        for n, t, bias in (("gate", layer.gate, layer.gate_b), ("up", layer.up, layer.up_b),
                           ("down", layer.down, layer.down_b)):
            tensors += [(b + f"ffn_{n}_exps.weight", (t.raw, t.ggml_type)), (b + f"ffn_{n}_exps.bias", bias)]
    tensors += [("output_norm.weight", norm(n_embd)), ("output.weight", q8(n_vocab, n_embd))]

    w = GGUFWriter(path, "gpt-oss", split_max_tensors=split_max_tensors)
    w.add_name("tiny-gpt-oss")
    w.add_file_type(LlamaFileType.MOSTLY_MXFP4_MOE)
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_block_count(n_layers)
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(150000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_sliding_window(128)
    w.add_expert_count(n_experts)
    w.add_expert_used_count(k)
    w.add_expert_feed_forward_length(n_ff)
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(32.0)
    w.add_rope_scaling_orig_ctx_len(4096)
    for name, t in tensors:
        if isinstance(t, tuple):
            w.add_tensor(name, np.ascontiguousarray(t[0]), raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(path)[0]


def default_model_path() -> Path:
    """Where the built-in tiny model lives: ``$HYBRID_MOE_CACHE`` or ``~/.cache/hybrid-moe``."""
    folder = os.environ.get("HYBRID_MOE_CACHE") or Path.home() / ".cache" / "hybrid-moe"
    # The name carries the shape, so a cache written by an older default is not reused.
    return Path(folder) / "tiny-gpt-oss-32x4.gguf"


def ensure_default_model() -> Path:
    """The tiny model's path, written on first use (temp file + rename: readers never see half a file)."""
    path = default_model_path()
    if path.is_file():
        try:
            load(path)
            return path
        except GGUFError:
            pass  # damaged or from an older layout: write it again
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tiny-gpt-oss.", suffix=".gguf.tmp", dir=path.parent)
    os.close(fd)
    try:
        write_tiny(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
