"""The whole model's hyper-parameters, read from the file's keys as llama.cpp reads them.

Key names come from ``gguf.constants.Keys``; defaults are llama.cpp's
(``llama_model::load_hparams`` and ``llama_context``'s YaRN set-up). A key that
is missing or out of range is a ``GGUFError`` naming it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from gguf.constants import Keys

from . import arch as archs
from .errors import GGUFError

__all__ = ["Config", "read_config", "ARCHS"]

ARCHS = archs.REGISTRY  # the one table (hybrid/model/arch/); each says what its graph has
ROPE_SCALINGS = ("none", "linear", "yarn")


@dataclass(frozen=True)
class Config:
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_rot: int  # leading dims of a head that RoPE rotates (NEOX pairs i, i + n_rot/2)
    rms_eps: float
    rope_freq_base: float
    rope_freq_base_swa: float
    freq_scale: float  # 1 / rope.scaling.factor
    ext_factor: float  # YaRN ramp mix: 1 for yarn, else 0
    attn_factor: float  # llama_context's yarn_attn_factor (before ggml's own mscale)
    beta_fast: float
    beta_slow: float
    n_ctx_orig: int
    n_swa: int  # sliding window (0: none)
    swa_layers: tuple  # bool per layer
    qkv_bias: bool
    sinks: bool
    qk_norm: bool
    ffn_norm: str  # name of the norm before the MoE block
    kq_scale: float  # attention scores are q.k * kq_scale
    kinds: tuple = ()  # each layer's FFN: "dense", "moe" or "moe_shared" (arch.base.KINDS)
    n_ff_dense: int = 0  # rows of the dense FFN layers' ffn_up (0: none)
    n_ff_shexp: int = 0  # rows of the shared experts' ffn_up_shexp (0: none)
    rope_neox: bool = True  # NEOX pairs (i, i + n_rot/2), else ggml's normal pairs (2i, 2i + 1)
    n_layer_nextn: int = 0  # next-token-prediction blocks after the n_layer trunk blocks (not run)
    yarn_log_mul: float = 0.0  # llama.cpp's hparams.rope_yarn_log_mul (after the architecture's reading)
    # multi-head latent attention (deepseek2; 0: none): the low ranks of q and of the cached latent,
    # and the per-head q/k and v widths before absorption (head_dim/head_dim_v are the cache's)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    head_dim_k_mla: int = 0
    head_dim_v_mla: int = 0

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    def rope_base(self, il: int) -> float:
        return self.rope_freq_base_swa if self.swa_layers[il] else self.rope_freq_base

    def rope_corr_dims(self, base: float) -> tuple[float, float]:
        """``ggml_rope_yarn_corr_dims``: the rotary dims between which YaRN ramps."""
        def dim(beta):
            return self.n_rot * math.log(self.n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(base))
        return max(0.0, math.floor(dim(self.beta_fast))), min(self.n_rot - 1.0, math.ceil(dim(self.beta_slow)))


def _usable_rope(read):
    """FLOAT64/UINT64 keys reach values their 32-bit forms cannot (5e-324, 2**63): the RoPE/YaRN
    formulas must give finite numbers from them, or the file is refused here, not at the forward."""
    @functools.wraps(read)
    def checked(model):
        if not all(hasattr(model, a) for a in ("arch", "metadata", "tensors")):  # not an AttributeError later
            raise TypeError(f"expected a loaded model (hybrid.load(path)), got {type(model).__name__}")
        c = read(model)
        try:
            v = (c.freq_scale, 1.0 / c.freq_scale, c.attn_factor, *c.rope_corr_dims(c.rope_freq_base),
                 *c.rope_corr_dims(c.rope_freq_base_swa))
        except (ArithmeticError, ValueError) as e:  # division by zero, overflow, log(0)
            v = (e,)
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v) \
                or not (c.freq_scale > 0 and c.attn_factor >= 0):
            raise GGUFError(f"{model.path}: the RoPE/YaRN keys (rope.scaling.*, rope.freq_base) give no finite "
                            f"scaling ({v[0] if len(v) == 1 else 'inf or NaN'}): out of range")
        return c
    return checked


@_usable_rope
def read_config(model) -> Config:
    """The ``Config`` of a loaded ``gguf.Model`` (its metadata and tensor shapes)."""
    arch = model.arch
    spec = archs.get(arch, model.path, graph=True)
    meta = model.metadata
    k = lambda key: key.format(arch=arch)  # noqa: E731

    def get(key, kind, default=None, lo=None, hi=None, above=None):
        name = k(key)
        v = meta.get(name, default)
        if v is None:
            raise GGUFError(f"{model.path}: metadata key {name} is missing")
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise GGUFError(f"{model.path}: metadata key {name} = {v!r} is not an integer")
        if kind is int and hi is None:  # a UINT64 key: llama.cpp reads them into 32 bits
            hi = (1 << 31) - 1
        if kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise GGUFError(f"{model.path}: metadata key {name} = {v!r} is not a finite number")
            v = float(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise GGUFError(f"{model.path}: metadata key {name} = {v!r} is out of range "
                            f"[{lo}, {'inf' if hi is None else hi}]")
        if above is not None and not v > above:  # the formulas divide by log(v) or by v
            raise GGUFError(f"{model.path}: metadata key {name} = {v!r} must be greater than {above}")
        return v

    L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
    n_layer_all = get(L.BLOCK_COUNT, int, lo=1)
    n_nextn = get(L.NEXTN_PREDICT_LAYERS, int, 0, lo=0, hi=n_layer_all - 1)
    n_layer = n_layer_all - n_nextn  # llama.cpp's hparams.n_layer(): the trunk the graph runs
    n_embd = get(L.EMBEDDING_LENGTH, int, lo=1)
    n_head = get(A.HEAD_COUNT, int, lo=1)
    n_head_kv = get(A.HEAD_COUNT_KV, int, n_head, lo=1, hi=n_head)
    if n_head % n_head_kv:
        raise GGUFError(f"{model.path}: {k(A.HEAD_COUNT)} = {n_head} is not a multiple of "
                        f"{k(A.HEAD_COUNT_KV)} = {n_head_kv}")
    head_dim = get(A.KEY_LENGTH, int, n_embd // n_head, lo=2)
    head_dim_v = get(A.VALUE_LENGTH, int, n_embd // n_head, lo=1)
    n_rot = get(R.DIMENSION_COUNT, int, head_dim, lo=2, hi=head_dim)
    if n_rot % 2:
        raise GGUFError(f"{model.path}: {k(R.DIMENSION_COUNT)} = {n_rot} must be even")
    n_ctx_train = get(L.CONTEXT_LENGTH, int, lo=1)
    rms_eps = get(A.LAYERNORM_RMS_EPS, float, lo=0.0)
    base = get(R.FREQ_BASE, float, 10000.0, above=1.0)

    scaling = meta.get(k(R.SCALING_TYPE), "linear")
    if scaling not in ROPE_SCALINGS:
        raise GGUFError(f"{model.path}: {k(R.SCALING_TYPE)} = {scaling!r} is not supported "
                        f"({', '.join(ROPE_SCALINGS)})")
    factor = get(R.SCALING_FACTOR, float, 0.0, lo=0.0)
    freq_scale = 1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor
    ext_factor = get(R.SCALING_YARN_EXT_FACTOR, float, 1.0 if scaling == "yarn" else 0.0, lo=0.0)
    attn_factor = get(R.SCALING_YARN_ATTN_FACTOR, float, 1.0, lo=0.0)
    m, log_mul = spec.yarn_mscales(get(R.SCALING_YARN_LOG_MUL, float, 0.0))
    if ext_factor != 0.0:  # llama_context: cancels ggml's own 1 + 0.1 ln(factor), see llama.cpp PR 17945
        f = 1.0 / freq_scale
        mscale = lambda m: 1.0 if f <= 1.0 else 0.1 * m * math.log(f) + 1.0  # noqa: E731
        try:  # a zero divisor or log(0) from out-of-range keys: refused by _usable_rope
            attn_factor = mscale(m) / mscale(log_mul) if log_mul != 0.0 else mscale(1.0)
            attn_factor /= 1.0 + 0.1 * math.log(f)
        except (ArithmeticError, ValueError):
            attn_factor = math.nan
    attn_factor *= get(R.SCALING_ATTN_FACTOR, float, 1.0, lo=0.0)

    try:
        n_swa, swa = spec.sliding_window(get, lambda key: meta.get(k(key)), n_layer)
    except GGUFError as e:
        if str(e).startswith(str(model.path)):
            raise
        raise GGUFError(f"{model.path}: {e}") from None
    kinds, ff = _layer_kinds(model, spec, n_layer)
    lead = meta.get(k(L.LEADING_DENSE_BLOCK_COUNT))
    if spec.leading_dense and lead is not None:  # llama.cpp takes the FFN kind from this key
        n_dense = next((il for il, kd in enumerate(kinds) if kd != "dense"), n_layer)
        if not isinstance(lead, int) or isinstance(lead, bool) or lead != n_dense \
                or "dense" in kinds[n_dense:]:
            raise GGUFError(f"{model.path}: {k(L.LEADING_DENSE_BLOCK_COUNT)} = {lead!r}, but the tensors make "
                            f"blocks {[il for il, kd in enumerate(kinds) if kd == 'dense']} dense")

    emb = model.tensors.get("token_embd.weight")
    if emb is None:
        raise GGUFError(f"{model.path}: missing tensor token_embd.weight")
    if len(emb.shape) != 2 or emb.shape[1] != n_embd:
        raise GGUFError(f"{model.path}: token_embd.weight has shape {emb.shape}, expected [n_vocab, {n_embd}]")
    kw = dict(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_vocab=emb.shape[0], n_ctx_train=n_ctx_train,
        n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v, n_rot=n_rot,
        rms_eps=rms_eps, rope_freq_base=base, rope_freq_base_swa=get(R.FREQ_BASE_SWA, float, base, above=1.0),
        freq_scale=freq_scale, ext_factor=ext_factor, attn_factor=attn_factor,
        beta_fast=get(R.SCALING_YARN_BETA_FAST, float, 32.0, above=0.0),
        beta_slow=get(R.SCALING_YARN_BETA_SLOW, float, 1.0, above=0.0),
        n_ctx_orig=get(R.SCALING_ORIG_CTX_LEN, int, n_ctx_train, lo=1), n_swa=n_swa, swa_layers=swa,
        qkv_bias=spec.qkv_bias, sinks=spec.sinks, qk_norm=spec.qk_norm, ffn_norm=spec.ffn_norm,
        kq_scale=1.0 / math.sqrt(n_rot if spec.kq_scale_by_rot else head_dim), kinds=kinds,
        n_ff_dense=ff["dense"], n_ff_shexp=ff["moe_shared"], rope_neox=spec.rope_neox, n_layer_nextn=n_nextn,
        yarn_log_mul=log_mul)
    try:  # what the architecture reads beyond these (deepseek2: the latent attention)
        kw = spec.configure(get, model, kw)
    except GGUFError as e:
        if str(e).startswith(str(model.path)):
            raise
        raise GGUFError(f"{model.path}: {e}") from None
    return Config(**kw)


def _layer_kinds(model, spec, n_layer):
    """Each layer's FFN kind (the MoE layers are the loader's), and the one width each kind of
    dense FFN has (llama.cpp's feed_forward_length is one number too)."""
    moe = {L.index for L in model.layers}
    kinds, ff = [], {"dense": 0, "moe_shared": 0}
    for il in range(n_layer):
        kind = spec.layer_kind(model.tensors.__contains__, il)
        if (il in moe) != (kind in ("moe", "moe_shared")):
            raise GGUFError(f"{model.path}: block {il} has neither MoE nor dense FFN tensors")
        kinds.append(kind)
        if kind in ff:
            name = f"blk.{il}.ffn_up{'_shexp' if kind == 'moe_shared' else ''}.weight"
            info = model.tensors.get(name)
            if info is None or len(info.shape) != 2:
                raise GGUFError(f"{model.path}: block {il} ({kind}) has no 2-D tensor {name}")
            if ff[kind] and info.shape[0] != ff[kind]:
                raise GGUFError(f"{model.path}: {name} has {info.shape[0]} rows, the other layers {ff[kind]}")
            ff[kind] = info.shape[0]
    return tuple(kinds), ff
