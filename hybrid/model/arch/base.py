"""What every architecture is built from: the ``Arch`` base class (registered by GGUF name),
the ``Block`` of one layer's weights, the ``Ops`` interface the block is written against,
and the shared builders (GQA attention, dense FFN, MoE FFN, shared expert, the pre-norm block).

The block runs three ways, each an ``Ops`` (plain methods, no state a reader must track):
``ops_host.HostOps`` (numpy and Numba), ``ops_device.DeviceOps`` (device arrays on the MoE
backend's stream, into preallocated buffers) and ``ops_f64.F64Ops`` (the float64
reference). ``out`` names the buffer a result goes to (the device's; the host and the
reference ignore it); ``add_`` adds in place.

An architecture file states only what differs: class attributes for its flags and
defaults, and overrides where its graph or keys differ (``gpt_oss.py``: the sliding window).
"""
from __future__ import annotations

import math
from typing import ClassVar, Protocol

from ...moe.spec import MoESpec, from_gguf_gating
from ..errors import GGUFError

__all__ = ["Arch", "Block", "Ops", "REGISTRY", "block", "gqa_attention", "ffn", "dense_ffn", "shared_expert",
           "KINDS"]

REGISTRY: dict[str, type["Arch"]] = {}
KINDS = ("dense", "moe", "moe_shared")  # what a layer's FFN is


class Ops(Protocol):
    """The operations a block uses (``x``: ``[T, n]`` activations; weights as ``Block`` holds them)."""

    def rmsnorm(self, x, w, out): ...
    def linear(self, W, x, bias, out): ...
    def add_(self, h, y): ...
    def rope(self, il, x): ...
    def attend(self, il, q, k, v, sinks, n_swa, out): ...
    def moe(self, il, x, out): ...
    def glu(self, g, u, activation): ...
    def gate_rows(self, y, x, w): ...
    def head_linear(self, Ws, x, out): ...


class Block:
    """One layer's weights by role (``b.wq``, ``b.attn_norm``; None when the file has none) and
    its FFN ``kind`` (``KINDS``). ``map`` gives the same block with every weight converted."""

    def __init__(self, kind: str, **weights):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.weights = weights

    def __getattr__(self, name):
        try:
            return self.__dict__["weights"][name]
        except KeyError:
            raise AttributeError(name) from None

    def map(self, fn) -> "Block":
        return Block(self.kind, **{k: None if v is None else fn(v) for k, v in self.weights.items()})


class Arch:
    """An architecture: defaults here are llama.cpp's for a plain GQA MoE (Mixtral-like)."""

    name: ClassVar[str] = ""
    note: ClassVar[str] = ""  # shown in the list of supported architectures
    has_graph: ClassVar[bool] = True
    # attention
    # q, k, v biases; q/k norms: True (the file must hold them), False, or "optional" (used if present)
    qkv_bias: ClassVar[bool | str] = False
    out_bias: ClassVar[bool] = False  # attention output bias
    sinks: ClassVar[bool] = False  # attn_sinks: one extra logit per head
    qk_norm: ClassVar[bool | str] = False  # per-head RMSNorm of q and k before RoPE
    swa_pattern: ClassVar[int | None] = None  # sliding-window layers: il % n < n - 1
    kq_scale_by_rot: ClassVar[bool] = False  # 1/sqrt(n_rot) instead of 1/sqrt(head_dim)
    ffn_norm: ClassVar[str] = "ffn_norm"  # the norm before the FFN
    rope_neox: ClassVar[bool] = True  # llama.cpp's LLAMA_ROPE_TYPE_NEOX, else _NORM (adjacent pairs)
    # MoE (hybrid.moe.spec): defaults, and the keys a file may change them with
    gating: ClassVar[str] = "softmax"
    norm: ClassVar[bool] = True
    activation: ClassVar[str] = "silu"
    moe_keys: ClassVar[frozenset] = frozenset()  # of "gating", "norm", "scale", "groups"
    shared: ClassVar[str] = "none"  # shared experts when a layer has ffn_*_shexp
    expert_biases: ClassVar[bool] = False  # the file must hold ffn_*_exps.bias and ffn_gate_inp.bias
    n_ff_from_feed_forward: ClassVar[bool] = False  # no expert_feed_forward_length: feed_forward_length is it
    dense_activation: ClassVar[str] = "silu"  # dense FFN layers and shared experts
    leading_dense: ClassVar[bool] = False  # leading_dense_block_count must agree with the tensors
    selection_bias: ClassVar[bool | str] = False  # exp_probs_b.bias: required (True), "optional" or unused
    nextn: ClassVar[bool] = False  # files may append next-token-prediction blocks (not run, as in llama.cpp)
    device_graph: ClassVar[bool] = True  # the block has device kernels (else --device cpu only)
    # what tiny.py writes for it (the converter's keys and types), see tiny.model_metadata
    tiny: ClassVar[dict] = {}

    def __init_subclass__(cls, name: str = "", **kw):
        super().__init_subclass__(**kw)
        if name:
            if name in REGISTRY:
                raise ValueError(f"architecture {name!r} is registered twice")
            cls.name = name
            REGISTRY[name] = cls

    # -- keys ----------------------------------------------------------------------------

    @classmethod
    def moe_spec(cls, value, where="") -> MoESpec:
        """The MoE operation from the file's keys: ``value(key)`` is the raw value of a
        ``Keys.LLM`` key (``{arch}`` filled) or None; keys outside ``moe_keys`` are not read,
        as llama.cpp's graph for the architecture does not read them."""
        from gguf.constants import Keys

        L = Keys.LLM

        def read(key, check, what):
            v = value(key)
            if v is not None and not check(v):
                raise GGUFError(f"{where}metadata key {key.format(arch=cls.name)} = {v!r} is not {what}")
            return v

        num = lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        uint = lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 0  # noqa: E731
        kw = dict(gating=cls.gating, norm=cls.norm, activation=cls.activation, shared=cls.shared)
        if "gating" in cls.moe_keys:
            try:
                kw["gating"] = from_gguf_gating(value(L.EXPERT_GATING_FUNC), cls.gating)
            except ValueError as e:
                raise GGUFError(f"{where}metadata key {L.EXPERT_GATING_FUNC.format(arch=cls.name)} {e}") from None
        if "norm" in cls.moe_keys:
            v = read(L.EXPERT_WEIGHTS_NORM, lambda v: isinstance(v, (bool, int)), "a bool")
            kw["norm"] = cls.norm if v is None else bool(v)
        if "scale" in cls.moe_keys:
            v = read(L.EXPERT_WEIGHTS_SCALE, lambda v: num(v) and v >= 0, "a non-negative number")
            kw["scale"] = float(v) if v else 1.0  # llama.cpp: 0 (its default) means no scale
        if "groups" in cls.moe_keys:
            kw["n_group"] = read(L.EXPERT_GROUP_COUNT, uint, "a non-negative integer") or 0
            kw["topk_group"] = read(L.EXPERT_GROUP_USED_COUNT, uint, "a non-negative integer") or 0
        try:
            return MoESpec(**kw)
        except (ValueError, TypeError) as e:
            raise GGUFError(f"{where}{e}") from None

    @classmethod
    def yarn_mscales(cls, log_mul: float) -> tuple[float, float]:
        """``(mscale, mscale_all_dim)`` llama_context's YaRN attention factor takes from the key
        ``rope.scaling.yarn_log_multiplier`` (deepseek2 overrides: its converter writes 0.1x)."""
        return 1.0, log_mul

    @classmethod
    def configure(cls, get, model, kw: dict) -> dict:
        """The ``Config`` fields from the keys every architecture shares (``kw``), with what this
        one reads besides (``get`` is ``read_config``'s key reader). Default: nothing more."""
        return kw

    @classmethod
    def sliding_window(cls, get, meta_value, n_layer):
        """``(n_swa, swa_layers)``: no sliding window (``gpt_oss`` overrides)."""
        return 0, (False,) * n_layer

    # -- tensors -------------------------------------------------------------------------

    @classmethod
    def layer_kind(cls, has, il: int) -> str | None:
        """The FFN kind of block ``il`` from the tensor names it has (``has(name)``), or None
        when it has no FFN tensors at all."""
        p = f"blk.{il}."
        if any(has(p + n) for n in ("ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight",
                                    "ffn_down_exps.weight")):
            return "moe_shared" if has(p + "ffn_up_shexp.weight") else "moe"
        if has(p + "ffn_up.weight"):
            return "dense"
        return None

    @classmethod
    def load_block(cls, w, cfg, il: int, kind: str) -> Block:
        """Block ``il``'s dense weights through the loader ``w``: ``w.mat(name, shape)`` (a
        matrix ``[rows, cols]`` in the file's type), ``w.vec(name, n)`` (float32),
        ``w.has(name)``. The routed experts are the MoE backend's (``model.layers``)."""
        D = cfg.n_embd
        p = f"blk.{il}."
        b = dict(attn_norm=w.vec(p + "attn_norm.weight", D), **cls.load_attention(w, cfg, p),
                 ffn_norm=w.vec(p + cls.ffn_norm + ".weight", D))
        if kind == "dense":
            b.update(_ffn_weights(w, p, "", cfg.n_ff_dense, D))
        if kind == "moe_shared":
            b.update(_ffn_weights(w, p, "_shexp", cfg.n_ff_shexp, D))
            if cls.shared == "sigmoid_gated":
                b["shexp_gate"] = w.vec(p + "ffn_gate_inp_shexp.weight", D)
        return Block(kind, **b)

    @classmethod
    def load_attention(cls, w, cfg, p) -> dict:
        """The attention weights of the block with prefix ``p`` (GQA here; deepseek2: latent)."""
        D, H, Hkv, d, dv = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v

        def vec(name, n, flag):  # flag: True, False or "optional" (the class attributes above)
            return w.vec(p + name, n, required=flag is True) if flag else None

        bias, norm = cls.qkv_bias, cls.qk_norm
        return dict(wq=w.mat(p + "attn_q.weight", (H * d, D)), wk=w.mat(p + "attn_k.weight", (Hkv * d, D)),
                    wv=w.mat(p + "attn_v.weight", (Hkv * dv, D)), wo=w.mat(p + "attn_output.weight", (D, H * dv)),
                    bq=vec("attn_q.bias", H * d, bias), bk=vec("attn_k.bias", Hkv * d, bias),
                    bv=vec("attn_v.bias", Hkv * dv, bias), bo=vec("attn_output.bias", D, cls.out_bias),
                    sinks=vec("attn_sinks.weight", H, cls.sinks),
                    q_norm=vec("attn_q_norm.weight", d, norm), k_norm=vec("attn_k_norm.weight", d, norm))

    @classmethod
    def attention(cls, ops, cfg, il, b, x):
        """The block's attention on normed ``x`` (GQA; deepseek2 overrides)."""
        return gqa_attention(ops, cfg, il, b, x)

    # -- what tiny.py writes for it, as llama.cpp's converter lays it out ----------------

    @classmethod
    def tiny_metadata(cls, meta: dict, dims: dict) -> dict:
        """The keys beyond the common ones (``dims``: the model's sizes); default none."""
        return meta

    @classmethod
    def tiny_selection_bias(cls, dims) -> bool:
        """Whether tiny.py writes ``exp_probs_b.bias`` for the MoE blocks."""
        return bool(cls.selection_bias)

    @classmethod
    def tiny_attention(cls, b, dims, mat, f32, norm) -> list:
        """Block prefix ``b``'s attention tensors (tiny.model_tensors' form)."""
        n_embd, q, kv, hd = dims["n_embd"], dims["n_head"] * dims["head_dim"], \
            dims["n_head_kv"] * dims["head_dim"], dims["head_dim"]
        t = [(b + "attn_q.weight", mat(q, n_embd))] + ([(b + "attn_q.bias", f32(q))] if cls.qkv_bias else [])
        t += [(b + "attn_k.weight", mat(kv, n_embd))] + ([(b + "attn_k.bias", f32(kv))] if cls.qkv_bias else [])
        t += [(b + "attn_v.weight", mat(kv, n_embd))] + ([(b + "attn_v.bias", f32(kv))] if cls.qkv_bias else [])
        t += [(b + "attn_output.weight", mat(n_embd, q))]
        t += [(b + "attn_output.bias", f32(n_embd))] if cls.out_bias else []
        t += [(b + "attn_sinks.weight", f32(dims["n_head"], scale=1.0))] if cls.sinks else []
        if cls.qk_norm:
            t += [(b + "attn_q_norm.weight", norm(hd)), (b + "attn_k_norm.weight", norm(hd))]
        return t

    # -- the graph -----------------------------------------------------------------------

    @classmethod
    def block(cls, ops, cfg, il: int, b: Block, h) -> None:
        """One layer on the residual stream ``h`` (in place)."""
        block(ops, cfg, il, b, h, cls)


def _ffn_weights(w, p, suffix, F, D) -> dict:
    return {f"ffn_gate{suffix}": w.mat(f"{p}ffn_gate{suffix}.weight", (F, D)),
            f"ffn_up{suffix}": w.mat(f"{p}ffn_up{suffix}.weight", (F, D)),
            f"ffn_down{suffix}": w.mat(f"{p}ffn_down{suffix}.weight", (D, F))}


# -- the shared builders ----------------------------------------------------------------

def block(ops, cfg, il, b, h, arch) -> None:
    """Pre-norm residual block: ``h += attention(norm(h))``, ``h += ffn(norm(h))``."""
    x = ops.rmsnorm(h, b.attn_norm, out="x")
    ops.add_(h, arch.attention(ops, cfg, il, b, x))
    x = ops.rmsnorm(h, b.ffn_norm, out="x")
    ops.add_(h, ffn(ops, il, b, x, arch))


def gqa_attention(ops, cfg, il, b, x):
    """Grouped-query attention: q, k, v (with biases where the block has them), per-head q/k
    norms, NEOX RoPE, the cache, causal softmax (sinks, sliding window), output projection."""
    T = x.shape[0]
    q = ops.linear(b.wq, x, b.bq, out="q").reshape(T, cfg.n_head, cfg.head_dim)
    k = ops.linear(b.wk, x, b.bk, out="k").reshape(T, cfg.n_head_kv, cfg.head_dim)
    v = ops.linear(b.wv, x, b.bv, out="v").reshape(T, cfg.n_head_kv, cfg.head_dim_v)
    if b.q_norm is not None:
        q = ops.rmsnorm(q, b.q_norm, out=q)
        k = ops.rmsnorm(k, b.k_norm, out=k)
    q, k = ops.rope(il, q), ops.rope(il, k)
    a = ops.attend(il, q, k, v, b.sinks, cfg.n_swa if cfg.swa_layers[il] else 0, out="attn")
    return ops.linear(b.wo, a, b.bo, out="o")


def ffn(ops, il, b, x, arch):
    """The layer's FFN by its kind: dense, routed experts, or routed plus shared experts."""
    if b.kind == "dense":
        return dense_ffn(ops, x, b.ffn_gate, b.ffn_up, b.ffn_down, arch.dense_activation, "ffn", "moe")
    y = ops.moe(il, x, out="moe")
    if b.kind == "moe_shared":
        ops.add_(y, shared_expert(ops, x, b, arch))
    return y


def dense_ffn(ops, x, gate, up, down, activation, scratch, out):
    """``down(act(gate x, up x))`` (llama.cpp's build_ffn with a gated activation)."""
    g = ops.linear(gate, x, None, out=scratch + "_g")
    u = ops.linear(up, x, None, out=scratch + "_u")
    return ops.linear(down, ops.glu(g, u, activation), None, out=out)


def shared_expert(ops, x, b, arch):
    """The shared experts (one dense FFN), scaled per token by ``sigmoid(w . x)`` when gated."""
    y = dense_ffn(ops, x, b.ffn_gate_shexp, b.ffn_up_shexp, b.ffn_down_shexp, arch.dense_activation,
                  "shexp", "shexp")
    if arch.shared == "sigmoid_gated":
        ops.gate_rows(y, x, b.shexp_gate)
    return y
