"""DeepSeek-V2/V2-Lite/V3/R1, Kimi-K2 (llama.cpp ``src/models/deepseek2.cpp``): multi-head latent
attention (MLA), ggml's normal RoPE on the rope dims only, YaRN with its own mscale; leading dense
FFN layers, one shared expert FFN beside the routed ones; routing by softmax (V2) or sigmoid (V3,
with the selection bias ``exp_probs_b``), group-limited top-k, norm and scale from the keys.

MLA as llama.cpp runs it (the absorption): per token, ``attn_kv_a_mqa`` gives the latent
``c [kv_lora]`` (RMS-normed by ``attn_kv_a_norm``) and one rope key ``k_pe [rope]`` shared by
all heads; q is ``attn_q`` x (V2-Lite) or ``attn_q_b`` rmsnorm(``attn_q_a`` x), per head
``[nope | rope]``. Each head's ``q_nope`` is absorbed into the latent space by ``attn_k_b``
(``k_b[h] q_nope``), so attention is MQA over keys ``[c | k_pe]`` and values ``c``: the cache
holds ``kv_lora + rope`` floats per position, not per head. Each head's output, still a latent,
goes through ``attn_v_b`` then ``attn_output``. Older files hold ``attn_kv_b`` (both per head,
``[k_nope rows | v rows]``) and no ``key_length_mla``; they run the same way (llama.cpp runs them as
plain multi-head attention, the same numbers up to rounding). The float64 reference runs that
decompressed multi-head form (``mla_decompressed``), so the tests check the absorption.

No device kernels for MLA yet (``device_graph``): on ``cuda``/``sim`` the routed experts go through
the offload path as ever and the attention and dense weights stay on the host.
"""
from __future__ import annotations

import math

import numpy as np
from gguf.constants import GGMLQuantizationType as T, Keys

from ..errors import GGUFError
from .base import Arch


class Deepseek2(Arch, name="deepseek2"):
    note = "DeepSeek-V2/V3, Kimi-K2; MLA"
    rope_neox = False
    gating = "softmax"  # llama.cpp's default for V2 files without expert_gating_func
    norm = False
    moe_keys = frozenset({"gating", "norm", "scale", "groups"})
    shared = "plain"
    leading_dense = True
    selection_bias = "optional"
    device_graph = False
    nextn = True
    tiny = dict(pre="deepseek-v3", rms_eps=1e-6, expert_type=T.Q8_0, rope_base=10000.0,
                yarn=dict(factor=40.0, orig_ctx=4096), variants=("v3", "lite", "legacy"))

    # -- keys ----------------------------------------------------------------------------

    @classmethod
    def yarn_mscales(cls, log_mul):
        # The converter writes 0.1 * mscale_all_dim; llama.cpp divides it back and, for this
        # architecture, takes mscale = mscale_all_dim (so llama_context's factor is 1).
        m_all = log_mul / 0.1
        return (m_all if m_all != 1.0 else 1.0), m_all

    @classmethod
    def configure(cls, get, model, kw):
        A = Keys.Attention
        rope = kw["n_rot"]
        kv_lora = get(A.KV_LORA_RANK, int, lo=1)
        q_lora = get(A.Q_LORA_RANK, int, 0, lo=0)
        if A.KEY_LENGTH_MLA.format(arch=cls.name) not in model.metadata:  # older files: per-head sizes
            dk, dv = kw["head_dim"], kw["head_dim_v"]
        else:
            dk, dv = get(A.KEY_LENGTH_MLA, int, lo=2), get(A.VALUE_LENGTH_MLA, int, lo=1)
            want = dict(head_dim=kv_lora + rope, head_dim_v=kv_lora, n_head_kv=1)
            got = dict(head_dim=kw["head_dim"], head_dim_v=kw["head_dim_v"], n_head_kv=kw["n_head_kv"])
            if got != want:
                raise GGUFError(f"MLA keys disagree: key_length/value_length/head_count_kv are "
                                f"{tuple(got.values())}, kv_lora_rank {kv_lora} and rope dims {rope} make them "
                                f"{tuple(want.values())}")
        if dk - rope < 1:
            raise GGUFError(f"the per-head key length {dk} leaves no dims beside the {rope} rope dims")
        # llama.cpp's deepseek2 graph: undo llama_context's YaRN adjustment, then pre-scale kq.
        fs = kw["freq_scale"]
        org = kw["attn_factor"] * (1.0 + 0.1 * math.log(1.0 / fs))
        mscale = org * (1.0 + 0.1 * kw["yarn_log_mul"] * math.log(1.0 / fs))
        return dict(kw, q_lora_rank=q_lora, kv_lora_rank=kv_lora, head_dim_k_mla=dk, head_dim_v_mla=dv,
                    head_dim=kv_lora + rope, head_dim_v=kv_lora, n_head_kv=1,
                    kq_scale=mscale * mscale / math.sqrt(dk))

    # -- tensors -------------------------------------------------------------------------

    @classmethod
    def load_attention(cls, w, cfg, p):
        D, H, rope, kv = cfg.n_embd, cfg.n_head, cfg.n_rot, cfg.kv_lora_rank
        dk, dv = cfg.head_dim_k_mla, cfg.head_dim_v_mla
        nope = dk - rope
        b = dict(wkv_a=w.mat(p + "attn_kv_a_mqa.weight", (kv + rope, D)),
                 kv_a_norm=w.vec(p + "attn_kv_a_norm.weight", kv),
                 wo=w.mat(p + "attn_output.weight", (D, H * dv)), wq=None, wq_a=None, q_a_norm=None, wq_b=None)
        if cfg.q_lora_rank:
            b.update(wq_a=w.mat(p + "attn_q_a.weight", (cfg.q_lora_rank, D)),
                     q_a_norm=w.vec(p + "attn_q_a_norm.weight", cfg.q_lora_rank),
                     wq_b=w.mat(p + "attn_q_b.weight", (H * dk, cfg.q_lora_rank)))
        else:
            b["wq"] = w.mat(p + "attn_q.weight", (H * dk, D))
        if w.has(p + "attn_k_b.weight"):
            b.update(k_b=w.heads(p + "attn_k_b.weight", (H, kv, nope)), v_b=w.heads(p + "attn_v_b.weight", (H, dv, kv)))
        else:  # attn_kv_b: per head nope key rows then dv value rows, each [.., kv_lora]
            name, shape = p + "attn_kv_b.weight", (H, nope + dv, kv)
            b.update(k_b=w.heads(name, shape, rows=(0, nope), transposed=True),
                     v_b=w.heads(name, shape, rows=(nope, nope + dv)))
        return b

    # -- the graph -----------------------------------------------------------------------

    @classmethod
    def attention(cls, ops, cfg, il, b, x):
        T, H, rope, kv = x.shape[0], cfg.n_head, cfg.n_rot, cfg.kv_lora_rank
        nope = cfg.head_dim_k_mla - rope
        if b.wq is not None:
            q = ops.linear(b.wq, x, None, out="q")
        else:
            q = ops.linear(b.wq_b, ops.rmsnorm(ops.linear(b.wq_a, x, None, out="q_a"), b.q_a_norm, out="q_a"),
                           None, out="q")
        q = q.reshape(T, H, cfg.head_dim_k_mla)
        q_nope, q_pe = q[:, :, :nope], ops.rope(il, q[:, :, nope:])
        ckv = ops.linear(b.wkv_a, x, None, out="kv_a")
        c = ops.rmsnorm(ckv[:, :kv], b.kv_a_norm, out="kv_c")[:, None, :]  # [T, 1, kv_lora]
        k_pe = ops.rope(il, ckv[:, None, kv:])  # [T, 1, rope]
        if getattr(ops, "mla_decompressed", False):  # the reference: per-head keys and values
            k = np.concatenate([np.einsum("sc,hcn->shn", c[:, 0], b.k_b), np.repeat(k_pe, H, axis=1)], axis=2)
            v = np.einsum("sc,hvc->shv", c[:, 0], b.v_b)
            a = ops.attend(il, np.concatenate([q_nope, q_pe], axis=2), k, v, None, 0)
        else:
            q_abs = ops.head_linear(b.k_b, q_nope, out="q_abs")  # [T, H, kv_lora]
            qk = np.concatenate([q_abs, q_pe], axis=2)
            lat = ops.attend(il, qk, np.concatenate([c, k_pe], axis=2), c, None, 0, out="attn")
            a = ops.head_linear(b.v_b, lat.reshape(T, H, kv), out="attn_v").reshape(T, H * cfg.head_dim_v_mla)
        return ops.linear(b.wo, a, None, out="o")

    # -- what tiny.py writes -------------------------------------------------------------

    @classmethod
    def tiny_dims(cls, dims):
        """The MLA sizes of a tiny model: ``head_dim`` is the per-head key length."""
        d = dims["head_dim"]
        variant = dims.get("variant") or "v3"
        return dict(rope=d // 2, nope=d, dv=d, kv_lora=2 * d, q_lora=0 if variant == "lite" else 2 * d,
                    variant=variant)

    @classmethod
    def tiny_metadata(cls, meta, dims):
        L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
        m = cls.tiny_dims(dims)
        meta.update({A.HEAD_COUNT_KV: 1, A.KV_LORA_RANK: m["kv_lora"], R.DIMENSION_COUNT: m["rope"],
                     L.LEADING_DENSE_BLOCK_COUNT: dims["n_dense"], L.EXPERT_SHARED_COUNT: 1,
                     L.VOCAB_SIZE: dims["n_vocab"], R.SCALING_YARN_LOG_MUL: float(np.float32(0.1 * 0.707))})
        # (V2-Lite's converter writes no q_lora_rank; llama.cpp then knows it by its 27 layers, a tiny
        # model by the key's 0)
        meta[A.Q_LORA_RANK] = m["q_lora"]
        if m["variant"] == "legacy":  # before MLA's split tensors: the per-head sizes, n_head KV heads
            meta.update({A.KEY_LENGTH: m["nope"] + m["rope"], A.VALUE_LENGTH: m["dv"],
                         A.HEAD_COUNT_KV: dims["n_head"]})
        else:
            meta.update({A.KEY_LENGTH: m["kv_lora"] + m["rope"], A.VALUE_LENGTH: m["kv_lora"],
                         A.KEY_LENGTH_MLA: m["nope"] + m["rope"], A.VALUE_LENGTH_MLA: m["dv"]})
        if m["variant"] == "v3":  # sigmoid routing with the bias, groups, norm and scale
            n_group = dims["n_experts"] // 2  # groups of two experts, half of them used (V3: 8 of 32, 4 used)
            meta.update({L.EXPERT_GATING_FUNC: 2, L.EXPERT_WEIGHTS_NORM: True, L.EXPERT_WEIGHTS_SCALE: 2.5,
                         L.EXPERT_GROUP_COUNT: n_group, L.EXPERT_GROUP_USED_COUNT: max(1, n_group // 2)})
        return meta

    @classmethod
    def tiny_selection_bias(cls, dims) -> bool:
        return cls.tiny_dims(dims)["variant"] == "v3"

    @classmethod
    def tiny_attention(cls, b, dims, mat, f32, norm):
        m, D, H = cls.tiny_dims(dims), dims["n_embd"], dims["n_head"]
        dk = m["nope"] + m["rope"]
        if m["q_lora"]:
            t = [(b + "attn_q_a_norm.weight", norm(m["q_lora"])), (b + "attn_q_a.weight", mat(m["q_lora"], D)),
                 (b + "attn_q_b.weight", mat(H * dk, m["q_lora"]))]
        else:
            t = [(b + "attn_q.weight", mat(H * dk, D))]
        t += [(b + "attn_kv_a_norm.weight", norm(m["kv_lora"])),
              (b + "attn_kv_a_mqa.weight", mat(m["kv_lora"] + m["rope"], D))]
        if m["variant"] == "legacy":
            t += [(b + "attn_kv_b.weight", mat(H * (m["nope"] + m["dv"]), m["kv_lora"]))]
        else:  # 3-D, as the converter splits kv_b: k_b transposed [H, kv_lora, nope], v_b [H, dv, kv_lora]
            t += [(b + "attn_k_b.weight", _heads(mat(H * m["kv_lora"], m["nope"]), H)),
                  (b + "attn_v_b.weight", _heads(mat(H * m["dv"], m["kv_lora"]), H))]
        return t + [(b + "attn_output.weight", mat(D, H * m["dv"]))]


def _heads(w, H):
    """A matrix ``[H * rows, cols]`` (array or ``(bytes, type)``) as the 3-D ``[H, rows, cols]``."""
    if isinstance(w, tuple):
        return w[0].reshape(H, -1, w[0].shape[-1]), w[1]
    return w.reshape(H, -1, w.shape[-1])
