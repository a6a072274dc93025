"""gpt-oss-shaped models with random weights, built in memory: the whole model at real shapes, no file.

A gpt-oss-120b-shaped GGUF is about 65 GB. ``synthetic_model("gpt-oss-120b")`` holds the
same tensors in RAM instead, as a ``gguf.Model`` (the loader's own class: its checks,
its MoE layers, its attributes; only where the bytes live differs), so ``Transformer``,
``HybridMoE`` and the benchmarks take it as they take a loaded file. Names, keys,
types and ggml shapes are those ``write_tiny`` writes (``tiny.model_tensors``,
``tiny.model_metadata``): MXFP4 experts, Q8_0 matrices, F32 norms, biases, sinks and
router, YaRN, a sliding window of 128 on the even layers.

Random bytes are cheap to compute: a Numba kernel fills every quantised tensor in
parallel from a counter-based hash (splitmix64, 8 bytes per hash), then sets each
block's scale, so no layer waits for numpy's generator (0.4 GB/s here). What remains
is the first touch of fresh pages, and that depends on the machine: on this project's
shared, sandboxed 2-core Xeon the fill ran at 1.3-2.5 GB/s into memory the process had
used before, but a whole model, growing into fresh memory, built at only 0.2-0.3 GB/s
(6.4 GB in 20 s), which would make the 61 GB of 120b's experts take minutes there.
``share_experts=True`` builds one block's experts and lets every block view them (own
routers and biases): the copies and kernels are the same, the RAM and build time are
one block's. ``examples/gpu_check.py`` prints the build's time and GB/s wherever it runs.

Values sit where real weights do, so the activations stay finite through every layer:
an MXFP4 block's E8M0 exponent is drawn from four values around ``1 / (5.85 sqrt(cols))``
(uniform nibbles have RMS 5.85; 118..121 at 2880 columns, never 0xFF), a Q8_0 block's
float16 scale likewise, so a row times a unit-RMS input gives about unit RMS. Routing
is skewed as real routers are: each layer's router adds ``-skew * log(rank)`` over a
random ranking of the experts; ``SHAPES``' skews make random tokens use about as many
experts per ubatch as PR #15346 measured on gpt-oss-120b (75 of 128 at ubatch 512,
105 at 2048; fitted on unit-normal tokens: 77 and 109) and near what ``traffic.py``
assumes for 20b (18 and 26 of 32; fitted: 21 and 25). Through the whole model (3 blocks,
2048 random ids) the blocks used 60-74 and 93-96 of 128, 15-21 and 19-23 of 32.
"""
from __future__ import annotations

import math
from pathlib import Path

import numba as nb
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from quant import jitcache, mxfp4
from quant.types import row_nbytes

from ..moe.layer import ExpertTensor, MoELayer
from .gguf import Model, TensorInfo
from .tiny import check_dims, model_metadata, model_tensors

__all__ = ["SHAPES", "GPT_OSS", "synthetic_model", "synthetic_layer", "random_blocks", "MemoryModel"]

# What every gpt-oss has (the released files' keys); n_ctx is the training context.
GPT_OSS = dict(n_embd=2880, n_ff=2880, k=4, n_head=64, n_head_kv=8, head_dim=64, n_swa=128, n_vocab=201088,
               n_ctx=131072)
# Per model: blocks, experts, and the router skew fitted to the experts used (module doc):
# random tokens, ubatch 512 / 2048 -> 77 / 109 of 128 (skew 0.9), 21 / 25 of 32 (skew 1.9).
SHAPES = {"gpt-oss-20b": dict(n_layers=24, n_experts=32, skew=1.9),
          "gpt-oss-120b": dict(n_layers=36, n_experts=128, skew=0.9)}
_E2M1_RMS = math.sqrt(np.mean(np.square(mxfp4.KVALUES_F32)))  # a uniform random nibble (5.85)
_INT8_RMS = math.sqrt(np.mean(np.square(np.arange(-128, 128, dtype=np.float64))))  # a uniform random int8


class MemoryModel(Model):
    """A ``gguf.Model`` whose tensors are arrays in memory: ``tensors`` is a list of
    ``(name, value)``, value a float32 array or ``(raw bytes, ggml type)`` as ``raw`` returns
    them (``tiny.model_tensors``' form); ``metadata`` the keys as ``load`` reads them."""

    def __init__(self, name: str, arch: str, metadata: dict, tensors):
        self.paths = [Path(f"<memory>/{name}")]
        self.metadata = {"general.architecture": arch, **metadata}
        self.metadata_array_lengths, self._long_at = {}, {}
        self._data, self.tensors = {}, {}
        for tname, v in tensors:
            raw, ggml_type = v if isinstance(v, tuple) else (v, T.F32)
            ggml_type = int(ggml_type)
            if ggml_type == T.F32:
                shape = raw.shape
            else:
                block, size = GGML_QUANT_SIZES[T(ggml_type)]
                shape = raw.shape[:-1] + (raw.shape[-1] // size * block,)
            raw = raw.view()
            raw.flags.writeable = False  # as a file's memory map: the model's bytes are not for writing
            self._data[tname] = raw
            self.tensors[tname] = TensorInfo(tname, ggml_type, tuple(int(d) for d in shape), int(raw.nbytes),
                                             part=0, offset=0)  # no file: raw() answers from _data
        self.arch = arch
        self._read_hparams()
        self.layers, self.dense_blocks = [self._layer(i) for i in range(self.n_layers)], []

    def raw(self, name: str) -> np.ndarray:
        self._info(name)  # a KeyError naming the tensor
        return self._data[name]

    @property
    def file_bytes(self) -> int:  # what a file of these tensors would hold (without its header)
        return sum(t.nbytes for t in self.tensors.values())


def synthetic_model(shape: str = "gpt-oss-20b", *, n_layers: int | None = None, seed: int = 0,
                    share_experts: bool = False, **dims) -> MemoryModel:
    """A gpt-oss model of ``shape`` (a key of ``SHAPES``) with random weights, in memory.

    ``n_layers``: build only the first blocks (the per-layer costs scale).
    ``share_experts``: every block's expert weights are views of block 0's bytes (its own
    router and biases still): the host RAM and build time of one block, where the copies
    and kernels are those of distinct blocks; what it does not show is the RAM, the
    first touch and the pinning of the full model's experts. ``dims``
    override ``GPT_OSS`` and the shape's ``n_experts``/``skew`` (``n_embd``, ``n_ff``,
    ``n_experts``, ``k``, ``n_head``, ``n_head_kv``, ``head_dim``, ``n_swa``, ``n_vocab``,
    ``n_ctx``, ``skew``): the same structure at small sizes, for tests.
    """
    if shape not in SHAPES:
        raise ValueError(f"synthetic_model: shape must be one of {tuple(SHAPES)}, got {shape!r}")
    spec = {**GPT_OSS, **SHAPES[shape]}
    bad = set(dims) - (set(spec) - {"n_layers"})
    if bad:
        raise TypeError(f"synthetic_model: unknown dimension(s) {', '.join(sorted(bad))}")
    spec.update(dims)
    full = spec["n_layers"]
    n_layers = full if n_layers is None else n_layers
    for name, v in (("n_layers", n_layers), ("n_experts", spec["n_experts"]), ("k", spec["k"]),
                    ("n_swa", spec["n_swa"]), ("n_ctx", spec["n_ctx"]), ("seed", seed + 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"synthetic_model: {name} must be a positive int (seed >= 0), got {v!r}")
    if spec["k"] > spec["n_experts"]:
        raise ValueError(f"synthetic_model: k = {spec['k']} exceeds n_experts = {spec['n_experts']}")
    if not (isinstance(spec["skew"], (int, float)) and math.isfinite(spec["skew"]) and spec["skew"] >= 0):
        raise ValueError(f"synthetic_model: skew must be a finite number >= 0, got {spec['skew']!r}")
    D, F = spec["n_embd"], spec["n_ff"]
    check_dims("synthetic_model", n_embd=D, n_ff=F, n_head=spec["n_head"], n_head_kv=spec["n_head_kv"],
               head_dim=spec["head_dim"], n_vocab=spec["n_vocab"])

    rng = np.random.default_rng([seed, 0x5D])
    f32 = lambda *s, scale=0.1: (scale * rng.standard_normal(s, dtype=np.float32)).astype(np.float32)  # noqa: E731
    norm = lambda n: (1.0 + f32(n)).astype(np.float32)  # noqa: E731
    count = iter(range(1 << 30))
    mat = lambda rows, cols: (random_blocks(rows, cols, T.Q8_0, (seed, 0x3D, next(count))), T.Q8_0)  # noqa: E731
    if not isinstance(share_experts, bool):
        raise TypeError(f"synthetic_model: share_experts must be a bool, got {share_experts!r}")
    layers = []
    for i in range(n_layers):
        shared = layers[0] if share_experts and layers else None
        layers.append(synthetic_layer(i, n_embd=D, n_ff=F, n_experts=spec["n_experts"], k=spec["k"],
                                      skew=spec["skew"], seed=seed, experts_of=shared))
    tensors = model_tensors("gpt-oss", layers, n_embd=D, n_head=spec["n_head"], n_head_kv=spec["n_head_kv"],
                            head_dim=spec["head_dim"], n_vocab=spec["n_vocab"], mat=mat, f32=f32, norm=norm)
    name = shape if n_layers == full else f"{shape} ({n_layers} of {full} layers)"
    meta = model_metadata("gpt-oss", name=f"{name}, random weights", n_layers=n_layers, n_ctx=spec["n_ctx"],
                          n_embd=D, n_ff=F, n_head=spec["n_head"], n_head_kv=spec["n_head_kv"],
                          head_dim=spec["head_dim"], n_experts=spec["n_experts"], k=spec["k"], n_swa=spec["n_swa"],
                          expert_type=T.MXFP4)
    return MemoryModel(f"{shape}-{n_layers}L-seed{seed}", "gpt-oss", meta, tensors)


def synthetic_layer(index: int, *, n_embd: int, n_ff: int, n_experts: int, k: int, skew: float,
                    seed: int = 0, experts_of: MoELayer | None = None) -> MoELayer:
    """One gpt-oss MoE layer of random weights: MXFP4 experts (``random_blocks``; ``experts_of``:
    that layer's, shared), F32 router whose bias ``-skew * log(rank)`` favours a random few
    experts, biases of RMS 0.1."""
    rng = np.random.default_rng([seed, index, 0x4C])
    E, D, F = n_experts, n_embd, n_ff
    f32 = lambda *s, scale: (scale * rng.standard_normal(s, dtype=np.float32)).astype(np.float32)  # noqa: E731

    def experts(name, rows, cols):
        if experts_of is not None:
            return getattr(experts_of, ("gate", "up", "down")[name])
        raw = random_blocks(E * rows, cols, T.MXFP4, (seed, index, name)).reshape(E, rows, -1)
        return ExpertTensor(raw, int(T.MXFP4), rows, cols)

    rank = rng.permutation(E) + 1
    return MoELayer(router_w=f32(E, D, scale=1 / math.sqrt(D)), router_b=(-skew * np.log(rank)).astype(np.float32),
                    gate=experts(0, F, D), up=experts(1, F, D), down=experts(2, D, F),
                    gate_b=f32(E, F, scale=0.1), up_b=f32(E, F, scale=0.1), down_b=f32(E, D, scale=0.1),
                    k=k, index=index)


def random_blocks(rows: int, cols: int, ggml_type, seed) -> np.ndarray:
    """Random ``[rows, cols]`` weights in ``ggml_type`` (MXFP4 or Q8_0) as stored: uint8
    ``[rows, row_bytes]``, filled in parallel. Each block's scale is one of a few values
    around ``1 / (RMS of a random element * sqrt(cols))``, so ``W x`` has about the RMS of ``x``.
    ``seed``: anything ``np.random.SeedSequence`` takes."""
    ggml_type = T(int(ggml_type))
    block, size = GGML_QUANT_SIZES[ggml_type]
    out = np.empty((rows, row_nbytes(ggml_type, cols)), np.uint8)
    if ggml_type == T.MXFP4:
        # the block's value is nibble * 2^(e - 128): centre e on 1/(RMS * sqrt(cols)), 4 values below 0xFF
        mid = int(round(128 + math.log2(1.0 / (_E2M1_RMS * math.sqrt(cols)))))
        e = np.clip(mid - 2 + np.arange(256) % 4, 1, 254).astype(np.uint8)
        head = e.reshape(256, 1)
    elif ggml_type == T.Q8_0:
        d = 2.0 ** ((np.arange(256) - 128) / 256) / (_INT8_RMS * math.sqrt(cols))  # within 2^+-0.5 of the centre
        head = d.astype(np.float16).view(np.uint8).reshape(256, 2)
    else:
        raise ValueError(f"random_blocks: type {ggml_type.name} is not one of MXFP4, Q8_0")
    key = np.random.SeedSequence(seed).generate_state(1, np.uint64)[0]
    _fill(out.reshape(-1, size), key, np.ascontiguousarray(head))
    return out


@nb.njit(inline="always")
def _mix(z):
    """splitmix64's finaliser: a counter in, 64 random bits out."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@jitcache.njit(parallel=True, cache=True)
def _fill(out, key, head):
    """``out`` uint8 [n_blocks, size]: random bytes, then the first ``head.shape[1]`` bytes of each
    block replaced by a row of ``head`` picked at random (the scale). Every byte depends only on
    (key, position): the result is the same on any number of threads."""
    n, size = out.shape
    flat = out.reshape(-1)
    words = flat[:flat.size // 8 * 8].view(np.uint64)
    chunk = 1 << 16
    for c in nb.prange((words.size + chunk - 1) // chunk):
        for i in range(c * chunk, min(words.size, (c + 1) * chunk)):
            words[i] = _mix(key + np.uint64(i))
    for i in range(words.size * 8, flat.size):
        flat[i] = np.uint8(_mix(key ^ np.uint64(i)) & np.uint64(255))
    nh = head.shape[1]
    salt = _mix(key + np.uint64(words.size))
    for c in nb.prange((n + chunk - 1) // chunk):
        for b in range(c * chunk, min(n, (c + 1) * chunk)):
            j = _mix(salt + np.uint64(b)) & np.uint64(255)
            for h in range(nh):
                out[b, h] = head[j, h]
