"""The built-in tiny models: random MoE layers and small gpt-oss / qwen3moe GGUFs (the demo runs one).

Fixtures for the tests, the examples and ``make demo``: weights are random, so
what such a model says means nothing; its routing is skewed as real routers are.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, quants
from gguf.constants import (GGML_QUANT_VERSION, GGMLQuantizationType as T, GGUFValueType, Keys, LlamaFileType,
                             RopeScalingType)

from quant import mxfp4
from quant import registry as qregistry

from ..moe.layer import ExpertTensor, MoELayer
from . import arch as archs
from .gguf import GGUFError, load

__all__ = ["random_layer", "random_blocks", "set_f16", "tiny_layers", "tiny_vocab", "spm_vocab", "write_tiny", "model_metadata", "model_tensors",
           "write_gguf", "check_dims", "simulator_tiles",
           "default_model_path", "ensure_default_model"]


def set_f16(blocks, f, h, rng=None):
    """Write half ``h`` into every f16 scale of each block (IQ1_M: its four nibbles); with
    ``rng``, each scale of each block gets a random sign (zero-mean weights, as trained ones are)."""
    offs = ((None,) if f.name == "IQ1_M" else f.scale_offsets) or ()
    for at in offs:
        hb = np.full(blocks.shape[0], h, np.int64)
        if rng is not None:
            hb |= rng.integers(0, 2, blocks.shape[0]) << 15
        if at is None:  # IQ1_M: bits 4k..4k+3 of d are the top nibble of the u16 at 48 + 2k
            for k in range(4):
                blocks[:, 49 + 2 * k] = (blocks[:, 49 + 2 * k] & 0x0F) | (((hb >> (4 * k)) & 0xF) << 4)
        else:
            blocks[:, at], blocks[:, at + 1] = hb & 0xFF, hb >> 8


def random_blocks(f, shape, rng, rms):
    """uint8 ``shape[:-1] + (row bytes,)`` of format ``f`` holding values of about ``rms``:
    gguf's quantisation of normal weights where gguf-py quantises the type, else random
    blocks (every code drawn) with the f16 scales set to give that spread."""
    if f.scale_offsets is None and f.name != "IQ1_M":  # a type gguf quantises
        w = (rms * rng.standard_normal(shape)).astype(np.float32)
        return np.ascontiguousarray(quants.quantize(w, f.ggml_type)).view(np.uint8).reshape(
            *shape[:-1], shape[-1] // f.block * f.block_bytes)
    n = int(np.prod(shape)) // f.block
    b = rng.integers(0, 256, (n, f.block_bytes), dtype=np.uint8)
    set_f16(b, f, 0x3C00)  # 1.0: values are linear in the scales
    r = float(np.sqrt(np.mean(f.decode_numpy(b).astype(np.float64) ** 2)))
    set_f16(b, f, int(np.float16(rms / r).view(np.uint16)), rng)
    return b.reshape(*shape[:-1], shape[-1] // f.block * f.block_bytes)


def random_layer(n_embd=64, n_ff=64, n_experts=8, k=2, *, wtype=None, gpt_oss=True,
                 seed=0, index=0, skew=1.0) -> MoELayer:
    """A layer of random weights, quantised to ``wtype`` (default MXFP4; any registered
    type, ``random_blocks``'s codes where gguf-py does not quantise it).

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
            try:
                data = np.ascontiguousarray(quants.quantize(w, wtype))
            except NotImplementedError:  # gguf-py quantises few of the K- and i-quants
                data = random_blocks(qregistry.get(wtype), (n_experts, rows, cols), rng, cols ** -0.5)
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


def tiny_layers(*, n_layers=4, n_embd=128, n_ff=128, n_experts=32, k=4, seed=0, skew=2.0,
                wtype=T.MXFP4) -> list[MoELayer]:
    """The MoE layers ``write_tiny`` stores for gpt-oss: MXFP4 experts, F32 router with popular experts."""
    return [random_layer(n_embd, n_ff, n_experts, k, wtype=wtype, gpt_oss=True,
                         seed=seed * 1009 + i, index=i, skew=skew) for i in range(n_layers)]


# Text the built-in tokenizer is trained on (written for this project): enough English for
# merges of common words, so the demo prompt becomes a few dozen tokens rather than bytes.
CORPUS = """\
The sky is blue because air scatters short wavelengths of sunlight more than long ones.
Light from the sun holds every colour; blue light is scattered across the whole sky, so
wherever we look, some of it reaches our eyes. At sunset the light travels through more air,
the blue is scattered away, and the sun looks red and orange.
A mixture of experts is a layer with many small networks, the experts, and a router that
sends each token to a few of them. Only the experts a token is routed to do any work, so a
large model can run with the cost of a small one. The weights of the experts live in the
memory of the host; the ones a batch of tokens uses are copied to the device before they
are needed. Prompt processing reads the prompt in micro-batches, and each micro-batch goes
through every layer of the model before the next one starts.
Once upon a time there was a small model that wanted to speak. It had read only a few lines,
and its weights were random, so what it said made no sense at all. Still, it tried, token by
token, and the people who built it were happy to see that every layer worked as it should.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096.
"""
TINY_SPECIALS = ("<|endoftext|>", "<|start|>", "<|message|>", "<|end|>", "<|return|>")
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor %}"
                      "{% if add_generation_prompt %}<|start|>assistant<|message|>{% endif %}")
TINY_PRE = {n: a.tiny["pre"] for n, a in archs.REGISTRY.items() if a.tiny}  # the architectures tiny writes


def tiny_vocab(n_vocab: int, pre: str = "gpt-4o"):
    """A byte-level BPE vocabulary trained on ``CORPUS``: ``(tokens, merges, token_types)``.

    256 byte tokens, merges learned by ``tokenizers``' BpeTrainer (deterministic
    for a fixed text), the special tokens, then reserved control tokens up to ``n_vocab``.
    """
    import json

    from gguf.constants import TokenType
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from .tokenizer import pre_tokenizer

    n_bpe = n_vocab - len(TINY_SPECIALS)
    if n_bpe < 256:
        raise ValueError(f"tiny_vocab: n_vocab = {n_vocab} cannot hold 256 byte tokens and "
                         f"{len(TINY_SPECIALS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer(pre)
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [TokenType.NORMAL] * len(tokens)
    tokens += list(TINY_SPECIALS)
    types += [TokenType.CONTROL] * len(TINY_SPECIALS)
    tokens += [f"<|reserved_{i}|>" for i in range(n_vocab - len(tokens))]
    types += [TokenType.CONTROL] * (n_vocab - len(types))
    return tokens, merges, [int(t) for t in types]


def spm_vocab(n_vocab: int):
    """A SentencePiece-style vocabulary (``tokenizer.ggml.model = llama``, as Mixtral's) trained on
    ``CORPUS``: ``(tokens, scores, token_types)``: ``<unk>``, the 256 byte tokens ``<0xXX>``, pieces
    with U+2581 for spaces (BpeTrainer's, each scored by its merge's rank, so merging the highest
    score first is that BPE), the special tokens, then reserved control tokens up to ``n_vocab``."""
    from gguf.constants import TokenType
    import json
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    n_pieces = n_vocab - 257 - len(TINY_SPECIALS)
    if n_pieces < 64:
        raise ValueError(f"spm_vocab: n_vocab = {n_vocab} leaves {n_pieces} pieces beside <unk>, 256 bytes "
                         f"and {len(TINY_SPECIALS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.train_from_iterator(CORPUS.splitlines(), trainers.BpeTrainer(vocab_size=n_pieces, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    pieces = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merged = {("".join(m) if isinstance(m, list) else m.replace(" ", "")): r for r, m in enumerate(model["merges"])}
    scores = [0.0] + [0.0] * 256 + [-float(merged.get(t, len(merged) + i)) for i, t in enumerate(pieces)]
    tokens = ["<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + list(TINY_SPECIALS)
    types = [TokenType.UNKNOWN] + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(pieces) \
        + [TokenType.CONTROL] * len(TINY_SPECIALS)
    tokens += [f"<|reserved_{i}|>" for i in range(n_vocab - len(tokens))]
    types += [TokenType.CONTROL] * (n_vocab - len(types))
    scores += [0.0] * (n_vocab - len(scores))
    return tokens, scores, [int(t) for t in types]


def check_dims(who, *, n_embd, n_ff, n_head, n_head_kv, head_dim, n_vocab):
    """A ValueError naming ``who`` unless the dimensions make a model the block formats can hold."""
    for name, v in (("n_head", n_head), ("n_head_kv", n_head_kv), ("head_dim", head_dim), ("n_vocab", n_vocab)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{who}: {name} must be a positive int, got {v!r}")
    for name, v in (("n_embd", n_embd), ("n_ff", n_ff), ("n_head*head_dim", n_head * head_dim),
                    ("n_head_kv*head_dim", n_head_kv * head_dim)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % mxfp4.QK:
            raise ValueError(f"{who}: {name} = {v!r} must be a positive multiple of {mxfp4.QK}")
    if n_head % n_head_kv:
        raise ValueError(f"{who}: n_head = {n_head} must be a multiple of n_head_kv = {n_head_kv}")


def model_metadata(arch, *, name, n_layers, n_ctx, n_embd, n_ff, n_head, n_head_kv, head_dim, n_experts, k,
                   n_swa, expert_type, n_vocab=0, n_dense=0, n_nextn=0, variant=None) -> dict:
    """The hyper-parameter keys llama.cpp's converter writes for ``arch`` (gpt-oss: YaRN factor 32 over
    4096, RoPE base 150000, sliding window ``n_swa``), as ``load`` reads them back: key -> value,
    floats rounded to float32 as the file stores them. ``write_tiny`` writes these; the in-memory
    models of ``synthetic.py`` hold them. ``n_layers`` counts the trunk; ``n_nextn``
    next-token-prediction blocks follow it; ``n_dense`` leading blocks are dense; ``variant``
    names one of the architecture's ``tiny["variants"]`` (deepseek2: "v3", "lite", "legacy")."""
    a = archs.REGISTRY[arch]
    L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    meta = {Keys.General.NAME: name,
            Keys.General.FILE_TYPE: int(LlamaFileType.MOSTLY_MXFP4_MOE if T(int(expert_type)) == T.MXFP4
                                        else LlamaFileType.MOSTLY_Q8_0),
            Keys.General.QUANTIZATION_VERSION: GGML_QUANT_VERSION,
            L.BLOCK_COUNT: n_layers + n_nextn, L.CONTEXT_LENGTH: n_ctx, L.EMBEDDING_LENGTH: n_embd,
            L.FEED_FORWARD_LENGTH: n_ff, A.HEAD_COUNT: n_head, A.HEAD_COUNT_KV: n_head_kv,
            A.KEY_LENGTH: head_dim, A.VALUE_LENGTH: head_dim, A.LAYERNORM_RMS_EPS: f32(a.tiny["rms_eps"]),
            L.EXPERT_COUNT: n_experts, L.EXPERT_USED_COUNT: k, L.EXPERT_FEED_FORWARD_LENGTH: n_ff}
    meta[R.FREQ_BASE] = f32(a.tiny["rope_base"])
    if a.swa_pattern:
        meta[A.SLIDING_WINDOW] = n_swa
    if "yarn" in a.tiny:
        meta.update({R.SCALING_TYPE: RopeScalingType.YARN.value, R.SCALING_FACTOR: f32(a.tiny["yarn"]["factor"]),
                     R.SCALING_ORIG_CTX_LEN: a.tiny["yarn"]["orig_ctx"]})
    if n_nextn:
        meta[L.NEXTN_PREDICT_LAYERS] = n_nextn
    meta = a.tiny_metadata(meta, dict(n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                                      head_dim=head_dim, n_ff=n_ff, n_experts=n_experts, k=k, n_vocab=n_vocab,
                                      n_dense=n_dense, variant=variant))
    return {key.format(arch=arch): v for key, v in meta.items()}


def model_tensors(arch, layers, *, n_embd, n_head, n_head_kv, head_dim, n_vocab, mat, f32, norm,
                  dense_ff=None, variant=None, nextn=()) -> list:
    """Every tensor of a model laid out as llama.cpp's converter names them, in file order:
    ``(name, value)`` with value a float32 array or ``(raw bytes, ggml type)``. ``layers``: the
    MoE layers (one per MoE block); ``dense_ff``: ``{block: n_ff}`` of dense FFN blocks (their
    ``ffn_gate/up/down.weight``); ``mat(rows, cols)``, ``f32(*shape, scale=0.1)`` and ``norm(n)``
    make the dense weights, vectors and norms (``write_tiny``: numpy; ``synthetic``: fast random bytes).
    ``nextn``: the blocks that are next-token-prediction blocks (their ``nextn.*`` tensors besides)."""
    a = archs.REGISTRY[arch]
    dims = dict(n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, variant=variant)
    dense_ff = dict(dense_ff or {})
    moe = {L.index: L for L in layers}
    tensors = [("token_embd.weight", mat(n_vocab, n_embd))]
    for il in sorted(moe.keys() | dense_ff.keys()):
        b = f"blk.{il}."
        tensors += [(b + "attn_norm.weight", norm(n_embd))] + a.tiny_attention(b, dims, mat, f32, norm)
        tensors += [(b + a.ffn_norm + ".weight", norm(n_embd))]
        if il in dense_ff:
            F = dense_ff[il]
            tensors += [(b + "ffn_gate.weight", mat(F, n_embd)), (b + "ffn_up.weight", mat(F, n_embd)),
                        (b + "ffn_down.weight", mat(n_embd, F))]
            continue
        layer = moe[il]
        tensors += [(b + "ffn_gate_inp.weight", layer.router_w)]
        if layer.router_b is not None:
            tensors += [(b + "ffn_gate_inp.bias", layer.router_b)]
        if a.tiny_selection_bias(dims):  # sigmoid routers' exp_probs_b, of the scale of the probabilities
            tensors += [(b + "exp_probs_b.bias", f32(layer.n_experts, scale=0.3))]
        for n, t, bias in (("gate", layer.gate, layer.gate_b), ("up", layer.up, layer.up_b),
                           ("down", layer.down, layer.down_b)):
            tensors += [(b + f"ffn_{n}_exps.weight", (t.raw, t.ggml_type))]
            if bias is not None:
                tensors += [(b + f"ffn_{n}_exps.bias", bias)]
        if a.shared != "none":  # one shared expert of the experts' width, as Qwen2-MoE's converter writes
            F = layer.n_ff
            # (a Linear(n_embd, 1) in the HF model: one row, as the converter writes it)
            tensors += [(b + "ffn_gate_inp_shexp.weight", f32(1, n_embd))] if a.shared == "sigmoid_gated" else []
            tensors += [(b + "ffn_gate_shexp.weight", mat(F, n_embd)), (b + "ffn_up_shexp.weight", mat(F, n_embd)),
                        (b + "ffn_down_shexp.weight", mat(n_embd, F))]
        if il in nextn:
            tensors += [(b + "nextn.eh_proj.weight", mat(n_embd, 2 * n_embd)), (b + "nextn.enorm.weight", norm(n_embd)),
                        (b + "nextn.hnorm.weight", norm(n_embd))]
    tensors += [("output_norm.weight", norm(n_embd)), ("output.weight", mat(n_vocab, n_embd))]
    return tensors


def write_tiny(path, *, arch="gpt-oss", n_layers=4, n_embd=128, n_ff=128, n_experts=32, k=4, seed=0,
               n_vocab=1024, n_head=4, n_head_kv=2, head_dim=32, skew=2.0, n_swa=128, tokenizer=None,
               expert_type=None, dense_type=T.Q8_0, split_max_tensors=0, layers=None, dense_blocks=(),
               variant=None, n_nextn=0, pre=None) -> Path:
    """Write a small MoE GGUF laid out like the real files; returns the path to load.

    ``arch="gpt-oss"``: keys, tensor names, types and ggml shapes follow llama.cpp's
    converter for gpt-oss (MXFP4 experts, Q8_0 matrices, F32 norms/biases/sinks/router,
    YaRN, sliding window ``n_swa`` on even layers). ``arch="qwen3moe"``: per-head q/k
    norms, no biases, no sinks, full attention, Q8_0 experts by default. ``skew``
    biases each gpt-oss router towards a few experts, as real routing is.
    ``tokenizer``: a byte-level BPE trained on ``CORPUS`` (``tiny_vocab``) with a chat
    template; None: one when ``n_vocab`` has room for it (256 bytes + specials).
    ``split_max_tensors`` > 0 writes ``NAME-0000i-of-0000N.gguf`` parts. ``layers``:
    MoE layers to store instead of random ones (one per block, of the shapes given).
    ``dense_blocks``: blocks whose FFN is dense (``ffn_gate/up/down.weight`` of ``n_ff`` rows,
    as leading dense layers are) instead of experts. ``variant``: one of the architecture's
    ``tiny["variants"]`` (deepseek2: "v3" sigmoid routing with groups, "lite" no q low rank and
    softmax, "legacy" the older ``attn_kv_b`` layout). ``n_nextn``: next-token-prediction blocks
    after the ``n_layers`` trunk blocks (architectures with ``nextn``), which the model skips.
    ``pre``: the tokenizer's ``tokenizer.ggml.pre`` (default: the architecture's).
    """
    if arch not in TINY_PRE:
        raise ValueError(f"write_tiny: arch must be one of {tuple(TINY_PRE)}, got {arch!r}")
    a = archs.REGISTRY[arch]
    variants = a.tiny.get("variants", ())
    if variant is not None and variant not in variants:
        raise ValueError(f"write_tiny: {arch} has variants {variants}, got {variant!r}")
    if n_nextn and not a.nextn:
        raise ValueError(f"write_tiny: {arch} files have no next-token-prediction blocks")
    dense_blocks = sorted(set(int(i) for i in dense_blocks))
    if any(not 0 <= i < n_layers for i in dense_blocks) or len(dense_blocks) >= n_layers:
        raise ValueError(f"write_tiny: dense_blocks {dense_blocks} must be blocks of 0..{n_layers - 1}, "
                         "and at least one block must be MoE")
    check_dims("write_tiny", n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
               n_vocab=n_vocab)
    path = Path(path)
    if tokenizer is None:
        tokenizer = n_vocab >= 256 + len(TINY_SPECIALS)
    if tokenizer not in (True, False, "spm"):
        raise ValueError(f"write_tiny: tokenizer must be None, a bool or 'spm', got {tokenizer!r}")
    pre = TINY_PRE[arch] if pre is None else pre
    if tokenizer == "spm":
        tokens, scores, types = spm_vocab(n_vocab)
        vocab = dict(model="llama", tokens=tokens, scores=scores, types=types)
    elif tokenizer:
        tokens, merges, types = tiny_vocab(n_vocab, pre)
        vocab = dict(model="gpt2", tokens=tokens, merges=merges, types=types, pre=pre)
    else:
        vocab = None
    rng = np.random.default_rng([seed, 1])
    f32 = lambda *s, scale=0.1: (scale * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    norm = lambda n: (1.0 + f32(n)).astype(np.float32)  # noqa: E731
    dense_type = T(int(dense_type))

    def mat(*s):
        w = f32(*s, scale=1 / np.sqrt(s[-1]))
        if dense_type == T.F32:
            return w
        return (mxfp4.quantize(w) if dense_type == T.MXFP4 else quants.quantize(w, dense_type), dense_type)

    etype = a.tiny["expert_type"] if expert_type is None else T(int(expert_type))
    if layers is not None:
        layers = list(layers)
        want = (n_experts, n_embd, n_ff, k)
        if len(layers) != n_layers + n_nextn or any((L.n_experts, L.n_embd, L.n_ff, L.k) != want for L in layers):
            raise ValueError(f"write_tiny: layers must be {n_layers + n_nextn} MoELayers of "
                             f"(experts, n_embd, n_ff, k) {want}")
        etype = T(int(layers[0].gate.ggml_type))
    elif a.expert_biases:  # (gpt-oss-like: biases everywhere, a router skewed as real ones are)
        layers = tiny_layers(n_layers=n_layers + n_nextn, n_embd=n_embd, n_ff=n_ff, n_experts=n_experts, k=k,
                             seed=seed, skew=skew, wtype=etype)
    else:
        layers = [random_layer(n_embd, n_ff, n_experts, k, wtype=etype, gpt_oss=False, seed=seed * 1009 + i,
                               index=i, skew=0.0) for i in range(n_layers + n_nextn)]
    layers = [L for L in layers if L.index not in dense_blocks]

    tensors = model_tensors(arch, layers, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
                            n_vocab=n_vocab, mat=mat, f32=f32, norm=norm, dense_ff={i: n_ff for i in dense_blocks},
                            variant=variant, nextn=range(n_layers, n_layers + n_nextn))
    meta = model_metadata(arch, name=f"tiny-{arch}", n_layers=n_layers, n_ctx=4096, n_embd=n_embd, n_ff=n_ff,
                          n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_experts=n_experts, k=k,
                          n_swa=n_swa, expert_type=etype, n_vocab=n_vocab, n_dense=len(dense_blocks),
                          n_nextn=n_nextn, variant=variant)
    return write_gguf(path, arch, meta, tensors, vocab=vocab, split_max_tensors=split_max_tensors)


def write_gguf(path, arch, metadata: dict, tensors, *, vocab=None, split_max_tensors=0) -> Path:
    """Write ``metadata`` (``model_metadata``'s form) and ``tensors`` (``model_tensors``' form) as a
    GGUF, with the tiny tokenizer ``vocab`` when given: ``tiny_vocab``'s tuple, or a dict of
    ``model`` ("gpt2": ``tokens``, ``merges``, ``types``, ``pre``; "llama": ``tokens``, ``scores``,
    ``types``); returns the path to load."""
    w = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    for key, v in metadata.items():
        kind = (GGUFValueType.STRING if isinstance(v, str) else GGUFValueType.BOOL if isinstance(v, bool)
                else GGUFValueType.FLOAT32 if isinstance(v, float) else GGUFValueType.UINT32)
        w.add_key_value(key, v, kind)
    if vocab is not None:
        if not isinstance(vocab, dict):
            vocab = dict(zip(("tokens", "merges", "types"), vocab), model="gpt2", pre=TINY_PRE[arch])
        tokens = vocab["tokens"]
        w.add_tokenizer_model(vocab["model"])
        if vocab["model"] == "gpt2":
            w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(tokens)
        w.add_token_types(vocab["types"])
        if vocab["model"] == "gpt2":
            w.add_token_merges(vocab["merges"])
        else:
            w.add_token_scores(vocab["scores"])
            w.add_add_space_prefix(True)
        w.add_bos_token_id(tokens.index("<|start|>"))
        w.add_eos_token_id(tokens.index("<|return|>"))
        w.add_eot_token_id(tokens.index("<|end|>"))
        w.add_add_bos_token(False)
        w.add_chat_template(TINY_CHAT_TEMPLATE)
    for name, t in tensors:
        if isinstance(t, tuple):
            w.add_tensor(name, np.ascontiguousarray(t[0]), raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(Path(path))[0]


def default_model_path() -> Path:
    """Where the built-in tiny model lives: ``$HYBRID_MOE_CACHE`` or ``~/.cache/hybrid-moe``."""
    folder = os.environ.get("HYBRID_MOE_CACHE") or Path.home() / ".cache" / "hybrid-moe"
    # The name carries the shape, so a cache written by an older default is not reused.
    return Path(folder) / "tiny-gpt-oss-32x4-tok.gguf"


# The built-in model's vocabulary: every token the trainer learns from CORPUS and
# the specials, no reserved padding (random weights would otherwise print it).
BUILTIN_VOCAB = 611


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
        write_tiny(tmp, n_vocab=BUILTIN_VOCAB)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def simulator_tiles():
    """Kernel tiles small enough for the simulator, which runs every thread in Python: the MoE
    kernels' (``moe``), the dense matmuls' (``dense``) and attention's (``attention``), for
    ``HybridMoE(tiles=moe, dense_tiles=dense)`` and ``Transformer(dense_tiles=dense,
    attention_config=attention)``. Results do not depend on tiles; launches then take
    threads by the tens, not hundreds."""
    from types import SimpleNamespace

    from ..kernels.cuda.experts import TileConfig
    from ..kernels.cuda.attention import AttentionConfig, AttentionTiles
    from ..kernels.cuda.dense import DenseTiles
    moe = TileConfig(block_pairs=4, block_cols=32, k_chunk=32, thread_rows=1, thread_cols=8)
    return SimpleNamespace(
        moe=moe,
        dense=DenseTiles(gemv_tokens=1, gemv_warps=1, gemv_rows=64,
                         gemm=TileConfig(block_pairs=4, block_cols=64, k_chunk=32, thread_rows=1, thread_cols=8)),
        attention=AttentionConfig(wide=AttentionTiles(rows=8, keys=8, thread_rows=2, thread_keys=2),
                                  narrow=AttentionTiles(rows=4, keys=4, thread_rows=2, thread_keys=2),
                                  narrow_rows=4, target_blocks=64, split_keys=4))
