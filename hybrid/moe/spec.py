"""The MoE operation as data: how a layer routes, weighs and activates its experts.

One ``MoESpec`` describes every family llama.cpp's ``build_moe_ffn`` runs:

- ``gating``: ``"softmax"`` (probabilities over all experts; Mixtral, Qwen, DeepSeek-V2),
  ``"sigmoid"`` (one probability per expert; DeepSeek-V3, GLM-4.5) or
  ``"softmax_chosen"`` (the softmax is taken over the k chosen logits only; gpt-oss,
  llama.cpp's ``SOFTMAX_WEIGHT``).
- selection bias (``exp_probs_b``, a tensor of the layer): added to the probabilities for
  the choice only; the weights stay the unbiased probabilities.
- ``n_group``/``topk_group``: group-limited top-k (DeepSeek-V3): experts split into
  ``n_group`` groups, each scored by the sum of its two best selection scores, and only
  the ``topk_group`` best groups compete for the k slots. 0 or 1 groups: no limit.
- ``norm``: the chosen weights divided by their sum (llama.cpp clamps the sum at 2^-14).
- ``scale``: the weights multiplied by ``expert_weights_scale``.
- ``activation``: the experts' gated activation (``hybrid.moe.activation``).
- ``shared``: shared experts beside the routed ones: ``"none"``, ``"plain"`` (added,
  DeepSeek, GLM) or ``"sigmoid_gated"`` (scaled by ``sigmoid(ffn_gate_inp_shexp . x)``,
  Qwen2-MoE). They are dense weights run by the model (``hybrid.model.arch.base``); the
  backend runs the routed experts only.

The router itself is ``routing.route_spec``; its float64 model is ``reference.route_reference``.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import ExpertGatingFuncType

from .activation import ACTIVATIONS

__all__ = ["MoESpec", "GATINGS", "SHARED", "GATING_CODE", "from_gguf_gating", "legacy"]

GATINGS = ("softmax", "sigmoid", "softmax_chosen")
GATING_CODE = {name: code for code, name in enumerate(GATINGS)}  # what compiled code branches on
SHARED = ("none", "plain", "sigmoid_gated")
# llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_* (the key expert_gating_func) -> our names
_GGUF_GATING = {int(ExpertGatingFuncType.SOFTMAX): "softmax", int(ExpertGatingFuncType.SIGMOID): "sigmoid"}
_GGUF_GATING[3] = "softmax_chosen"  # SOFTMAX_WEIGHT: gguf-py has no name for it yet
# The spellings MoELayer and routing.route took before the spec existed.
_LEGACY = {"softmax_topk": "softmax_chosen", "topk_softmax_all": "softmax"}


@dataclass(frozen=True)
class MoESpec:
    gating: str = "softmax_chosen"
    norm: bool = False
    scale: float = 1.0
    n_group: int = 0
    topk_group: int = 0
    activation: str = "swiglu_oai"
    shared: str = "none"

    def __post_init__(self):
        if self.gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got {self.gating!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.shared not in SHARED:
            raise ValueError(f"shared must be one of {SHARED}, got {self.shared!r}")
        if not isinstance(self.norm, bool):
            raise TypeError(f"norm must be a bool, got {type(self.norm).__name__}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not (0.0 < float(self.scale) < float("inf")):
            raise ValueError(f"scale must be a finite positive number, got {self.scale!r}")
        for name in ("n_group", "topk_group"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.n_group > 1 and not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group = {self.topk_group} must be in 1..n_group = {self.n_group}")

    @property
    def grouped(self) -> bool:
        return self.n_group > 1

    def check_layer(self, n_experts: int, k: int) -> None:
        """ValueError when the groups cannot hold ``k`` of ``n_experts`` experts."""
        if not self.grouped:
            return
        if n_experts % self.n_group:
            raise ValueError(f"expert count {n_experts} is not a multiple of the group count {self.n_group}")
        per = n_experts // self.n_group
        if per < 2:
            raise ValueError(f"groups of {per} expert: a group is scored by its two best experts")
        if self.topk_group * per < k:
            raise ValueError(f"{self.topk_group} groups of {per} experts cannot hold the {k} chosen experts")

    @property
    def legacy_gating(self) -> str:
        """The older name of the gating (``MoELayer.gating``), or the gating itself."""
        return {v: k for k, v in _LEGACY.items()}.get(self.gating, self.gating)


def legacy(gating: str, renormalize: bool = False, activation: str = "swiglu_oai") -> MoESpec:
    """The spec the older ``(gating, renormalize)`` spelling meant: ``"softmax_topk"`` (gpt-oss)
    or ``"topk_softmax_all"`` (renormalised when asked); a new gating name is taken as it is."""
    g = _LEGACY.get(gating, gating) if isinstance(gating, str) else gating
    return MoESpec(gating=g, norm=bool(renormalize) and g != "softmax_chosen", activation=activation)


def from_gguf_gating(value, default: str) -> str:
    """Our gating name for the key ``expert_gating_func`` (absent: ``default``); ValueError otherwise."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value not in _GGUF_GATING:
        raise ValueError(f"= {value!r} is not a gating function llama.cpp knows "
                         f"({', '.join(f'{k} {v}' for k, v in sorted(_GGUF_GATING.items()))})")
    return _GGUF_GATING[value]
