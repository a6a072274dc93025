"""One MoE layer's weights as the rest of the backend sees them.

Arrays keep ggml's byte layout in numpy order, so a GGUF memory map can be used
without a copy: an expert tensor is ``[n_experts, rows, row_bytes]`` uint8 for
quantised types (or ``[n_experts, rows, cols]`` float for F32/F16/BF16), and
one expert's slab is contiguous.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from quant import types as qtypes

from . import activation
from .spec import MoESpec, legacy

_LEGACY_GATINGS = ("softmax_topk", "topk_softmax_all")
_LEGACY_DEFAULTS = ("softmax_topk", False, "swiglu_oai")


@dataclass
class ExpertTensor:
    """A stack of expert matrices ``W[e]`` of shape ``[rows, cols]`` (y = W x)."""

    data: np.ndarray  # raw bytes/elements, first axis = expert
    ggml_type: int
    rows: int
    cols: int

    def __post_init__(self):
        expect = (self.data.shape[0], self.rows, qtypes.row_nbytes(self.ggml_type, self.cols))
        raw = self.data.view(np.uint8).reshape(self.data.shape[0], self.rows, -1)
        if raw.shape != expect:
            raise ValueError(f"expert tensor bytes {raw.shape} do not match type "
                             f"{qtypes.type_name(self.ggml_type)} [{self.rows}, {self.cols}]")
        if not raw.flags.c_contiguous:
            raise ValueError("expert tensor must be C-contiguous")
        # Views made once: each forward reads them, and a view of a memory map costs ~2 us.
        self._raw = raw
        self._readonly = raw.view(np.ndarray)
        self._readonly.flags.writeable = False

    @property
    def n_experts(self) -> int:
        return self.data.shape[0]

    @property
    def raw(self) -> np.ndarray:
        """The bytes as ``[n_experts, rows, row_bytes]`` uint8 (no copy)."""
        return self._raw

    @property
    def readonly(self) -> np.ndarray:
        """``raw`` as a read-only plain ndarray: what compiled code reads (GGUF maps are
        read-only, and one array type means one compiled variant)."""
        return self._readonly

    @property
    def slab_bytes(self) -> int:
        """Bytes of one expert: the unit the copy plan moves."""
        return self.rows * qtypes.row_nbytes(self.ggml_type, self.cols)

    def dequantize(self, expert: int) -> np.ndarray:
        """Float32 ``[rows, cols]`` of one expert (tests and references)."""
        return qtypes.dequantize(self.raw[expert], self.ggml_type, (self.rows, self.cols))


@dataclass(frozen=True)
class Copied:
    """One tensor copied per expert: its role (attribute), GGUF name, host array
    ``[n_experts, ...]`` and bytes per expert."""

    role: str
    name: str
    host: np.ndarray
    slab_bytes: int


@dataclass
class MoELayer:
    """Router and experts of one layer.

    ``spec`` (a ``spec.MoESpec``) says how it routes, weighs and activates; without one it is
    made from the older spelling ``gating``/``renormalize``/``activation`` (gpt-oss:
    ``"softmax_topk"``, ``"swiglu_oai"``, biases set; Mixtral/Qwen3-MoE: ``"topk_softmax_all"``,
    ``"silu"``, no biases). With a spec, those three fields are set from it. ``select_b``:
    the selection bias (``exp_probs_b``), added to the probabilities for the choice only.

    Construction checks shapes, types and that the router and biases are finite
    (small arrays: one pass each). Expert weights are not scanned (they may be a
    60 GB memory map); a NaN in them, or in an array changed after construction,
    comes out as NaN in the outputs it reaches, on every target.
    """

    router_w: np.ndarray  # float32 [n_experts, n_embd]
    router_b: np.ndarray | None  # float32 [n_experts]
    gate: ExpertTensor  # [E, n_ff, n_embd]
    up: ExpertTensor  # [E, n_ff, n_embd]
    down: ExpertTensor  # [E, n_embd, n_ff]
    gate_b: np.ndarray | None = None  # float32 [E, n_ff]
    up_b: np.ndarray | None = None  # float32 [E, n_ff]
    down_b: np.ndarray | None = None  # float32 [E, n_embd]
    k: int = 4
    gating: str = "softmax_topk"
    activation: str = "swiglu_oai"
    renormalize: bool = False  # only for topk_softmax_all
    index: int = 0  # block number in the model (for names in reports)
    spec: MoESpec | None = None
    select_b: np.ndarray | None = None  # float32 [n_experts]

    def __post_init__(self):
        E, D, F = self.n_experts, self.n_embd, self.n_ff
        self._settle_spec()
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {type(self.k).__name__}")
        if not 1 <= self.k <= E:
            raise ValueError(f"k={self.k} must be in [1, n_experts={E}]")
        names = self.tensor_names()
        _check_f32("router_w", self.router_w, (E, D), gguf=names["router_w"])
        _check_f32("router_b", self.router_b, (E,), optional=True, gguf=names["router_b"])
        _check_f32("select_b", self.select_b, (E,), optional=True, gguf=names["select_b"])
        self.spec.check_layer(E, self.k)
        for name, t, shape in (("gate", self.gate, (E, F, D)), ("up", self.up, (E, F, D)),
                               ("down", self.down, (E, D, F))):
            if (t.n_experts, t.rows, t.cols) != shape:
                raise ValueError(f"{name} experts are {(t.n_experts, t.rows, t.cols)}, expected {shape}")
        if self.gate.ggml_type != self.up.ggml_type:
            raise ValueError("gate and up experts must share one type")
        for name, shape in (("gate_b", (E, F)), ("up_b", (E, F)), ("down_b", (E, D))):
            _check_f32(name, getattr(self, name), shape, optional=True, gguf=names[name])

    def _settle_spec(self):
        # The spec, or the older three fields where they say something else than it: a caller
        # who gave them (or changed them with dataclasses.replace) meant them.
        if self.spec is not None and not isinstance(self.spec, MoESpec):
            raise TypeError(f"spec must be a MoESpec or None, got {type(self.spec).__name__}")
        mine = (self.gating, bool(self.renormalize), self.activation)
        view = None if self.spec is None else (self.spec.legacy_gating, self.spec.norm, self.spec.activation)
        if self.spec is None or (mine != view and mine != _LEGACY_DEFAULTS):
            if self.gating not in _LEGACY_GATINGS:
                raise ValueError(f"gating must be one of {_LEGACY_GATINGS} (other gatings: give a spec), "
                                 f"got {self.gating!r}")
            activation.check(activation=self.activation)
            new = legacy(self.gating, self.renormalize, self.activation)
            self.spec = new if self.spec is None else dataclasses.replace(
                self.spec, gating=new.gating, norm=new.norm, activation=new.activation)
        self.gating, self.renormalize, self.activation = \
            self.spec.legacy_gating, self.spec.norm, self.spec.activation

    def with_spec(self, spec: MoESpec, **changes) -> "MoELayer":
        """This layer routed as ``spec`` says (``dataclasses.replace`` would keep the older
        fields, which then win over a new spec)."""
        return dataclasses.replace(self, spec=spec, gating=spec.legacy_gating, renormalize=spec.norm,
                                   activation=spec.activation, **changes)

    def tensor_names(self) -> dict[str, str]:
        """The GGUF tensor name of each field (for messages)."""
        b = f"blk.{self.index}."
        return {"router_w": b + "ffn_gate_inp.weight", "router_b": b + "ffn_gate_inp.bias",
                "select_b": b + "exp_probs_b.bias",
                **{f"{n}_b": b + f"ffn_{n}_exps.bias" for n in ("gate", "up", "down")},
                **{n: b + f"ffn_{n}_exps.weight" for n in ("gate", "up", "down")}}

    @property
    def n_experts(self) -> int:
        return self.router_w.shape[0]

    @property
    def n_embd(self) -> int:
        return self.router_w.shape[1]

    @property
    def n_ff(self) -> int:
        return self.gate.rows

    def route(self, x: np.ndarray):
        """Router logits of hidden states ``x`` (float32 [n_tokens, n_embd]), then top-k:
        ``(ids int32 [n_tokens, k], weights float32 [n_tokens, k])``."""
        return self.route_logits(x @ self.router_w.T)

    def route_logits(self, logits: np.ndarray):
        """As ``route``, from ``x @ router_w.T`` computed elsewhere (the device): adds the
        router bias in place, then top-k."""
        from .routing import route_spec

        if self.router_b is not None:
            logits += self.router_b
        return route_spec(logits, self.k, self.spec, self.select_b)

    def tensors(self) -> dict[str, ExpertTensor]:
        """Expert tensors by their GGUF names, in copy order."""
        return {f"blk.{self.index}.ffn_{n}_exps.weight": t
                for n, t in (("gate", self.gate), ("up", self.up), ("down", self.down))}

    def copied(self) -> list[Copied]:
        """Every tensor the device needs per expert, in copy order: weights, then biases
        (made once: the scheduler records them per forward)."""
        if getattr(self, "_copied", None) is not None:
            return self._copied
        out = [Copied(n, f"blk.{self.index}.ffn_{n}_exps.weight", t.raw, t.slab_bytes)
               for n, t in (("gate", self.gate), ("up", self.up), ("down", self.down))]
        for n in ("gate", "up", "down"):
            b = getattr(self, f"{n}_b")
            if b is not None:
                out.append(Copied(f"{n}_b", f"blk.{self.index}.ffn_{n}_exps.bias", b, b[0].nbytes))
        self._copied = out
        return out

    @property
    def expert_bytes(self) -> int:
        """Bytes one expert occupies on the device: all its weights and biases."""
        return sum(c.slab_bytes for c in self.copied())


def _check_f32(name, a, shape, optional=False, gguf=""):
    if a is None:
        if optional:
            return
        raise ValueError(f"{name} is required")
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        raise TypeError(f"{name} must be a float32 numpy array, got {getattr(a, 'dtype', type(a))}")
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    # min/max propagate NaN and show +-inf: two passes, no temporary array.
    if a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
        at = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise ValueError(f"tensor {gguf} ({name}) holds {a[at]} at {list(at)}: router weights and "
                         "biases must be finite")
