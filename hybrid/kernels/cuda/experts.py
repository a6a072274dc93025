"""Grouped MoE expert kernels (numba-cuda) over the bucket layout of ``hybrid.moe.routing``.

A launch covers tiles ``[tile_begin, tile_end)`` of a ``Buckets`` layout: each
tile is ``block_pairs`` (token, slot) pairs of one expert. Blocks map to
(tile) x (output-column tile), as vLLM's fused_moe does; quantised weights are
decoded in the kernel into shared memory. Three kernels:

1. gate+up+activation: ``act[p] = act_fn(Wg[s] x_t + bg[s], Wu[s] x_t + bu[s])``
2. down:               ``y[p]   = w_p * (Wd[s] act[p] + bd[s])``
3. reduce:             ``out[t] = sum_j y[t*k + j]`` in fixed j order (no atomics)

``p = t*k + j`` is the flat pair index; ``s = slots[e]`` is the device slot of
expert ``e``: the same kernels serve the natural layout (slot = expert id) and
compact slots. A block never touches a slot other than its tile's expert, and
tiles that hold only padding return before reading any weight.

Kernels 1 and 2 come in two kinds, chosen by ``TileConfig.math``: FFMA (every
format with a CUDA tile decoder, ``experts_fma``) and, for the formats with
``mma`` (MXFP4), tensor cores (``experts_mma``) (``mma.sync`` m16n8k16, BF16
inputs exact, FP32 accumulation; the instruction and its simulator emulation are
in ``hybrid.kernels.cuda.mma``). ``"auto"`` picks tensor cores on compute capability >= 8.0.

Public API: ``TileConfig``, ``DeviceBuckets``, ``moe_launch``, ``moe_reduce``
(driven by ``engine.DeviceEngine``, the one host-side device path),
``launch_math`` (which kind a launch runs here) and ``variants`` (every kernel
build, for the compile checks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import cuda, types

from quant import cuda as qc
from quant import registry as qregistry
from quant import types as qtypes

from ...moe.activation import check as check_activation
from ...moe.routing import Buckets
from . import mma
from .experts_fma import down_kernel as _down_kernel, gate_up_kernel as _gate_up_kernel
from .experts_mma import _bf16_split, down_mma_kernel as _down_mma_kernel  # noqa: F401
from .experts_mma import gate_up_mma_kernel as _gate_up_mma_kernel
from .tiles import (MATHS, MIN_BLOCKS_PER_SM, MMA_MIN_CC, WAVE_BLOCKS_PER_SM, TileConfig, Variant,  # noqa: F401
                    tile_fma)

# Tolerance (max |err| / max |ref| against the float64 reference) of the tensor-core
# kernels on real hardware. Their inputs and products are exact; the hardware's FP32
# accumulation inside an MMA aligns and truncates rather than rounding to nearest
# (Fasi et al., "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021), a biased
# error of up to one unit in the last place of the accumulator per MMA. The kernels
# add the hi pieces' products into one accumulator and the mid and lo pieces' into
# another, so K/16 MMAs touch the large one: 180 at K = 2880, up to 180 * 2^-23 ~ 2e-5
# of a partial sum, twice in a row (gate/up, then down), partial sums a few times the
# result: 1e-4. The FFMA kernels (round to nearest, random-walk error) and the
# simulator's emulation hold 1e-5. Not yet measured on a GPU (examples/gpu_check.py).
MMA_HW_REL_TOL = 1e-4


_REDUCE_THREADS = 256


@cuda.jit
def _reduce_kernel(y, k, out):
    """Tiling: grid-stride over the T x n_embd outputs, one element per step; its k
    pair rows are summed in j order, so the result does not depend on scheduling
    (no atomics)."""
    n_embd = out.shape[1]
    for i in range(cuda.grid(1), out.shape[0] * n_embd, cuda.gridsize(1)):
        t = i // n_embd
        c = i - t * n_embd
        acc = y[t * k, c]
        for j in range(1, k):
            acc += y[t * k + j, c]
        out[t, c] = acc


# ------------------------------------------------------------------ builds (for compile checks)

def expert_types(cap: str = "cuda_tile") -> tuple:
    """GGML ids of the expert formats these kernels read (``cap="mma"``: with tensor-core kernels)."""
    return tuple(int(t) for t in qregistry.types(cap) if qregistry.has(t, "cuda_tile"))


def _subset_order(t):
    # the compile-check subset pairs MXFP4 (the experts that matter) with the first pair, then by id
    return (not qregistry.has(t, "mma"), -qregistry.block_size(t), t)


def variants(cfg: TileConfig | None = None, full: bool = True) -> list[Variant]:
    """Every kernel the launches can build for ``cfg``, with the argument types
    ``moe_launch``/``moe_reduce`` pass (C-contiguous arrays, int64 scalars).

    ``full=False`` keeps one gate+up build per expert type, together still
    covering both activations and both bias settings, and every down build; of the formats
    read through their block decoder, a gate+up build for the first of each block size and
    one down build each (every decoder compiled once).
    The tensor-core builds (``math="mma"``, MXFP4) come too when ``cfg`` fits them
    (``TileConfig.mma_unfit``), whatever ``cfg.math`` says: every build a device can pick.
    """
    cfg = TileConfig() if cfg is None else cfg
    A = lambda dt, nd: types.Array(dt, nd, "C")  # noqa: E731
    f32, i32, i64 = types.float32, types.int32, types.int64
    supported, mma_types = tuple(sorted(expert_types(), key=_subset_order)), expert_types("mma")
    wt = {t: A(getattr(types, np.dtype(qregistry.get(t).cuda_dtype).name), 3) for t in supported}
    out = []
    gate_up = [(t, a, b) for t in supported for a in ("swiglu_oai", "silu") for b in (True, False)]
    downs = [(t, b) for t in supported for b in (True, False)]
    if not full:  # one build per type, the (activation, bias) pairs in turn: together they cover all four
        # The formats read through their block decoder share each kernel's code but the decoder:
        # a gate+up build for the first of each block size, a down build (one decoder) for each.
        parts = [t for t in supported if qregistry.get(t).cuda_tile_parts]
        firsts = {qregistry.block_size(t): t for t in reversed(parts)}.values()
        combos = (("swiglu_oai", True), ("silu", False), ("swiglu_oai", False), ("silu", True))
        picked = [t for t in sorted(supported, key=_subset_order) if t not in parts or t in firsts]
        gate_up = [(t, *combos[i % len(combos)]) for i, t in enumerate(picked)]
        downs = [(t, b) for t, b in downs if t not in parts or not b]
    for t, act, bias in gate_up:
        sig = (A(f32, 2), A(i32, 1), A(i32, 1), i64, A(i32, 1), i64, wt[t], wt[t], A(f32, 2), A(f32, 2), A(f32, 2))
        out.append(Variant(f"gate_up {qtypes.type_name(t)} {act}{' bias' if bias else ''}",
                           _gate_up_kernel(cfg, t, act, bias), sig, cfg.threads, cfg.shared_for(2),
                           MIN_BLOCKS_PER_SM))
    for t, bias in downs:
        sig = (A(f32, 2), A(i32, 1), A(i32, 1), i64, A(i32, 1), wt[t], A(f32, 2), A(f32, 1), A(f32, 2))
        out.append(Variant(f"down {qtypes.type_name(t)}{' bias' if bias else ''}", _down_kernel(cfg, t, bias),
                           sig, cfg.threads, cfg.shared_for(1), MIN_BLOCKS_PER_SM))
    if cfg.mma_unfit() is None:
        gate_up = [(t, a, b) for t in mma_types for a in ("swiglu_oai", "silu") for b in (True, False)]
        if not full:
            gate_up = [(t, a, b) for t in mma_types for a, b in (("swiglu_oai", True), ("silu", False))]
        for t, act, bias in gate_up:
            sig = (A(f32, 2), A(i32, 1), A(i32, 1), i64, A(i32, 1), i64, wt[t], wt[t], A(f32, 2), A(f32, 2),
                   A(f32, 2))
            out.append(Variant(f"gate_up {qtypes.type_name(t)} {act}{' bias' if bias else ''} mma",
                               _gate_up_mma_kernel(cfg, t, act, bias), sig, cfg.mma_threads, cfg.mma_shared_for(2),
                               MIN_BLOCKS_PER_SM, "mma"))
        for t in mma_types:
            for bias in (True, False):
                sig = (A(f32, 2), A(i32, 1), A(i32, 1), i64, A(i32, 1), wt[t], A(f32, 2), A(f32, 1), A(f32, 2))
                out.append(Variant(f"down {qtypes.type_name(t)}{' bias' if bias else ''} mma",
                                   _down_mma_kernel(cfg, t, bias), sig, cfg.mma_threads, cfg.mma_shared_for(1),
                                   MIN_BLOCKS_PER_SM, "mma"))
    out.append(Variant("reduce", _reduce_kernel, (A(f32, 2), i64, A(f32, 2)), _REDUCE_THREADS, 0, 1))
    return out


# ------------------------------------------------------------------ buckets on the device

@dataclass
class DeviceBuckets:
    """Device copies of a ``Buckets`` layout's ``pairs`` and ``tile_expert``, with the host layout."""

    host: Buckets
    pairs: object  # device int32 [P]
    tile_expert: object  # device int32 [n_tiles]

    @classmethod
    def from_host(cls, buckets: Buckets, stream=0) -> "DeviceBuckets":
        _check_buckets(buckets)
        return cls(buckets, cuda.to_device(buckets.pairs, stream=stream),
                   cuda.to_device(buckets.tile_expert, stream=stream))

    @property
    def n_tiles(self) -> int:
        return self.host.n_tiles

    @property
    def block_size(self) -> int:
        return self.host.block_size

    def tile_range(self, first: int, last: int) -> tuple[int, int]:
        """Tiles ``[begin, end)`` of the experts ``first..last`` (a copy range)."""
        bs, off = self.host.block_size, self.host.offsets
        if not 0 <= first <= last < self.host.n_experts:
            raise ValueError(f"expert range {first}..{last} outside [0, {self.host.n_experts})")
        return int(off[first]) // bs, int(off[last + 1]) // bs


def _check_buckets(b):
    if not isinstance(b, Buckets):
        raise TypeError(f"expected hybrid.moe.routing.Buckets, got {type(b).__name__}")
    P, bs, E = b.pairs.shape[0], b.block_size, b.n_experts
    for name in ("pairs", "tile_expert", "offsets"):
        a = getattr(b, name)
        if not isinstance(a, np.ndarray) or a.dtype != np.int32 or a.ndim != 1:
            raise TypeError(f"Buckets.{name} must be a 1-D int32 array")
    if P % bs or b.tile_expert.shape[0] != P // bs or b.offsets.shape[0] != E + 1 or b.offsets[-1] != P:
        raise ValueError("Buckets: pairs, tile_expert and offsets do not agree with block_size")
    if P and (b.pairs.min() < 0 or b.pairs.max() > b.sentinel):
        raise ValueError(f"Buckets.pairs hold values outside [0, {b.sentinel}]")
    # The kernels take a tile's real pairs to come first: padding only at its tail.
    live = (b.pairs < b.sentinel).reshape(-1, bs)
    if P and (live[:, 1:] & ~live[:, :-1]).any():
        tile = int(np.argmax((live[:, 1:] & ~live[:, :-1]).any(axis=1)))
        raise ValueError(f"Buckets.pairs: tile {tile} has padding before a real pair")
    real = b.pairs[::bs] < b.sentinel if P else np.zeros(0, bool)
    te = b.tile_expert[real]
    if te.size and (te.min() < 0 or te.max() >= E):
        raise ValueError(f"Buckets.tile_expert holds experts outside [0, {E})")


# ------------------------------------------------------------------ launches

def _int(name, v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(v)


def _is_array(a):
    return isinstance(a, np.ndarray) or qc.is_device_array(a)


def _check(name, a, shape, dtype):
    if not _is_array(a):
        raise TypeError(f"{name} must be a numpy or device array, got {type(a).__name__}")
    if np.dtype(a.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def check_experts(name, w, wtype, rows, cols):
    """A device expert tensor ``[n_slots >= 1, rows, ...]`` of GGML type ``wtype`` (the caller
    says which: rows of 18 bytes per 32 are Q4_0 or IQ4_NL, never guessed): uint8 rows of
    ``row_nbytes(wtype, cols)`` bytes, or (F32) float32 rows of ``cols``. Returns the id."""
    if not _is_array(w):
        raise TypeError(f"{name} must be a numpy or device array, got {type(w).__name__}")
    if not qregistry.has(wtype, "cuda_tile"):
        raise NotImplementedError(f"{name}: the CUDA kernels read {', '.join(qtypes.type_name(t) for t in expert_types())}"
                                  f" experts, not {qtypes.type_name(wtype)}")
    wtype = int(wtype)
    if len(w.shape) != 3 or w.shape[1] != rows or w.shape[0] < 1:
        raise ValueError(f"{name} must be [n_slots >= 1, {rows}, row], got {tuple(w.shape)}")
    if cols % qregistry.block_size(wtype):
        raise ValueError(f"{name}: {cols} columns are no whole {qtypes.type_name(wtype)} blocks of "
                         f"{qregistry.block_size(wtype)}")
    dt, rb = np.dtype(w.dtype), w.shape[2]
    kernel_dt = np.dtype(qregistry.get(wtype).cuda_dtype)
    if (dt == kernel_dt and rb * dt.itemsize == qtypes.row_nbytes(wtype, cols)) or \
            (dt == np.uint8 and rb == qtypes.row_nbytes(wtype, cols)):
        return wtype
    raise ValueError(f"{name}: {dt} rows of {rb} elements do not hold {cols} {qtypes.type_name(wtype)} columns "
                     f"({qtypes.row_nbytes(wtype, cols)} B)")


def _as_kernel_weights(w, wtype):
    # Experts may arrive as their raw bytes; the kernel reads the format's element type (F32: float32).
    kernel_dt = np.dtype(qregistry.get(wtype).cuda_dtype)
    if np.dtype(w.dtype) != kernel_dt:
        return w.view(kernel_dt)
    return w


def _check_slots(slots, bk, tile_begin, tile_end, n_slots):
    """Host slot maps are checked for the experts the launch touches, then uploaded."""
    E = bk.host.n_experts
    if not _is_array(slots):
        raise TypeError(f"slots must be a numpy or device array, got {type(slots).__name__}")
    if np.dtype(slots.dtype) != np.int32 or tuple(slots.shape) != (E,):
        raise ValueError(f"slots must be int32 [{E}] (expert -> slot), got {slots.dtype} {tuple(slots.shape)}")
    if isinstance(slots, np.ndarray):
        h, bs = bk.host, bk.block_size
        tiles = np.arange(tile_begin, tile_end)
        tiles = tiles[h.pairs[tiles * bs] < h.sentinel]
        used = np.unique(h.tile_expert[tiles])
        bad = used[(slots[used] < 0) | (slots[used] >= n_slots)]
        if bad.size:
            raise ValueError(f"expert {bad[0]} maps to slot {slots[bad[0]]}, outside the {n_slots} device slots")
    # Device slot maps are trusted for values; the kernels skip out-of-range slots.


def moe_launch(x_d, bk_d, tile_begin, tile_end, slots_d, gate_d, up_d, down_d, gate_b_d, up_b_d, down_b_d,
               weights_d, act_d, y_d, *, n_embd, n_ff, k, activation, tiles: TileConfig, gate_type, down_type,
               stream=0):
    """Kernels 1 (gate+up+activation) and 2 (down, times the routing weight) over tiles
    ``[tile_begin, tile_end)`` of ``bk_d`` (a ``DeviceBuckets`` built with
    ``block_size == tiles.block_pairs``), enqueued on ``stream``.

    x_d float32 [T, n_embd]; slots_d int32 [E] expert -> slot (numpy: checked
    for the experts launched; device: used as is); gate_d/up_d [n_slots, n_ff, ...]
    and down_d [n_slots, n_embd, ...] of GGML types ``gate_type`` (gate and up) and
    ``down_type`` (``expert_types()``: uint8 blocks, or F32 as float32 or its bytes;
    see ``check_experts``); biases float32 [n_slots, rows] or None
    (gate and up together); weights_d float32 [T, k] or [T*k]; scratch act_d
    float32 [T*k, n_ff] and y_d float32 [T*k, n_embd], written at the rows of
    the launched pairs only.
    """
    if not isinstance(tiles, TileConfig):
        raise TypeError(f"tiles must be a TileConfig, got {type(tiles).__name__}")
    if not isinstance(bk_d, DeviceBuckets):
        raise TypeError(f"bk_d must be a DeviceBuckets, got {type(bk_d).__name__}")
    check_activation(activation=activation)
    n_embd, n_ff, k = _int("n_embd", n_embd), _int("n_ff", n_ff), _int("k", k)
    tile_begin, tile_end = _int("tile_begin", tile_begin), _int("tile_end", tile_end)
    h = bk_d.host
    if bk_d.block_size != tiles.block_pairs:
        raise ValueError(f"buckets were built with block_size={bk_d.block_size}, "
                         f"tiles need block_pairs={tiles.block_pairs}")
    if k != h.k:
        raise ValueError(f"k={k} but the buckets hold k={h.k}")
    if n_embd < 1 or n_ff < 1:
        raise ValueError(f"n_embd={n_embd} and n_ff={n_ff} must be positive")
    if not 0 <= tile_begin <= tile_end <= bk_d.n_tiles:
        raise ValueError(f"tile range [{tile_begin}, {tile_end}) outside the {bk_d.n_tiles} tiles")
    T_, P = h.n_tokens, h.n_tokens * h.k
    _check("x_d", x_d, (T_, n_embd), np.float32)
    _check("act_d", act_d, (P, n_ff), np.float32)
    _check("y_d", y_d, (P, n_embd), np.float32)
    if _is_array(weights_d) and tuple(weights_d.shape) == (T_, k):
        weights_d = weights_d.reshape(P)
    _check("weights_d", weights_d, (P,), np.float32)
    gt = check_experts("gate_d", gate_d, gate_type, n_ff, n_embd)
    check_experts("up_d", up_d, gate_type, n_ff, n_embd)
    dt = check_experts("down_d", down_d, down_type, n_embd, n_ff)
    n_slots = gate_d.shape[0]
    if up_d.shape[0] != n_slots or down_d.shape[0] != n_slots:
        raise ValueError(f"gate/up/down hold {gate_d.shape[0]}/{up_d.shape[0]}/{down_d.shape[0]} slots; "
                         f"they must agree")
    if (gate_b_d is None) != (up_b_d is None):
        raise ValueError("gate_b_d and up_b_d must both be given or both be None")
    if gate_b_d is not None:
        _check("gate_b_d", gate_b_d, (n_slots, n_ff), np.float32)
        _check("up_b_d", up_b_d, (n_slots, n_ff), np.float32)
    if down_b_d is not None:
        _check("down_b_d", down_b_d, (n_slots, n_embd), np.float32)
    _check_slots(slots_d, bk_d, tile_begin, tile_end, n_slots)
    if isinstance(slots_d, np.ndarray):
        slots_d = cuda.to_device(slots_d, stream=stream)
    n_tiles = tile_end - tile_begin
    if n_tiles == 0:
        return
    m1, m2 = launch_math(tiles, gt), launch_math(tiles, dt)
    if m1 == "mma":
        k1, th1, sh1 = _gate_up_mma_kernel(tiles, gt, activation, gate_b_d is not None), \
            tiles.mma_threads, tiles.mma_shared_for(2)
    else:
        k1, th1, sh1 = _gate_up_kernel(tiles, gt, activation, gate_b_d is not None), tiles.threads, tiles.shared_for(2)
    if m2 == "mma":
        k2, th2, sh2 = _down_mma_kernel(tiles, dt, down_b_d is not None), tiles.mma_threads, tiles.mma_shared_for(1)
    else:
        k2, th2, sh2 = _down_kernel(tiles, dt, down_b_d is not None), tiles.threads, tiles.shared_for(1)
    # Unused bias arguments still need an array of the right type.
    gb = gate_b_d if gate_b_d is not None else _dummy_bias(stream)
    ub = up_b_d if up_b_d is not None else gb
    db = down_b_d if down_b_d is not None else _dummy_bias(stream)
    grid1 = (n_tiles, (n_ff + tiles.block_cols - 1) // tiles.block_cols)
    grid2 = (n_tiles, (n_embd + tiles.block_cols - 1) // tiles.block_cols)
    k1[grid1, th1, stream, sh1](x_d, bk_d.pairs, bk_d.tile_expert, tile_begin, slots_d, k,
                                _as_kernel_weights(gate_d, gt), _as_kernel_weights(up_d, gt), gb, ub, act_d)
    k2[grid2, th2, stream, sh2](act_d, bk_d.pairs, bk_d.tile_expert, tile_begin, slots_d,
                                _as_kernel_weights(down_d, dt), db, weights_d, y_d)


_CC = {}


def device_cc():
    """Compute capability of the current device, or None on the simulator (which emulates the MMA)."""
    if qc.SIMULATOR:
        return None
    key = id(cuda.current_context())
    if key not in _CC:
        _CC[key] = tuple(cuda.get_current_device().compute_capability)
    return _CC[key]


def launch_math(tiles: TileConfig, wtype: int) -> str:
    """``"mma"`` or ``"fma"``: the kernels ``moe_launch`` runs for ``wtype`` experts on this device."""
    cc = device_cc()
    if tiles.math == "mma" and cc is not None and cc < MMA_MIN_CC and qregistry.has(wtype, "mma"):
        raise ValueError(f"TileConfig(math='mma') needs compute capability >= {MMA_MIN_CC[0]}.{MMA_MIN_CC[1]} "
                         f"(mma.sync with BF16), this device has {cc[0]}.{cc[1]}; use math='auto' or 'fma'")
    math = tiles.math_for(wtype, cc)
    if math == "mma" and tiles.math == "auto" and cc is not None:  # trusted only once seen to work here
        if not mma.instruction_ok(id(cuda.current_context())):
            return "fma"
    return math


_DUMMY = {}


def _dummy_bias(stream):
    # One per context, so a launch without biases allocates nothing.
    key = id(cuda.current_context())
    if key not in _DUMMY:
        _DUMMY[key] = cuda.device_array((1, 1), np.float32)
    return _DUMMY[key]


def moe_reduce(y_d, out_d, k, stream=0):
    """Kernel 3: ``out_d[t] = sum_j y_d[t*k + j]`` in j order (bitwise reproducible)."""
    k = _int("k", k)
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if not _is_array(out_d) or len(out_d.shape) != 2:
        raise ValueError("out_d must be a 2-D float32 array [T, n_embd]")
    T_, D = out_d.shape
    _check("out_d", out_d, (T_, D), np.float32)
    _check("y_d", y_d, (T_ * k, D), np.float32)
    n = T_ * D
    if n:
        _reduce_kernel[qc.grid_blocks(n, _REDUCE_THREADS), _REDUCE_THREADS, stream](y_d, k, out_d)

