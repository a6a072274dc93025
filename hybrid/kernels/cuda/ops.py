"""The small per-token ops of a block on the device (numba-cuda): RMSNorm, RoPE, add, GLU, gate.

The device twins of ``ops.rmsnorm`` and ``ops.rope_neox`` (same formulas, float32),
for hidden states that stay on the GPU, plus ``add`` (residuals, biases) and
``to_device_f32``, and the dense FFN's gated activation and the shared experts' gate
(``glu``, ``gate_rows``: the model's own buffers, unchecked). The other functions take
device arrays, check them here (numba does no bounds checking); each enqueues one kernel
on ``stream``.

``warp_sum`` is the warp reduction the dense GEMV shares: a shuffle butterfly on a
GPU; the simulator has no shuffles, so there the same butterfly goes through
shared memory (identical sums in identical order).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from quant import cuda as qc

from ...moe import activation as act
from .tiles import Variant

__all__ = ["rmsnorm", "rope", "rope_neox", "add", "glu", "gate_rows",
           "to_device_f32", "check_device", "warp_sum", "WARP", "variants"]

WARP = 32
_FULL_MASK = 0xFFFFFFFF
_NORM_WARPS = 4  # rows (one a warp) per rmsnorm block
_THREADS = 256  # block size of the element-wise kernels


# ------------------------------------------------------------------ warp reduction

if qc.SIMULATOR:
    @cuda.jit(device=True, inline=True)
    def warp_sum(vals, n, scratch, tid, n_threads):
        """``vals[a]`` for a < n replaced by its sum over the warp, in every lane (butterfly:
        offsets 16, 8, 4, 2, 1). Simulator: through ``scratch`` (shared, n words a thread of
        the block, ``scratch_words``); every thread of the block must call it."""
        off = WARP // 2
        while off > 0:
            for a in range(n):
                scratch[a * n_threads + tid] = vals[a]
            cuda.syncthreads()
            for a in range(n):
                vals[a] += scratch[a * n_threads + (tid ^ off)]
            cuda.syncthreads()
            off //= 2
else:
    @cuda.jit(device=True, inline=True)
    def warp_sum(vals, n, scratch, tid, n_threads):
        """``vals[a]`` for a < n replaced by its sum over the warp, in every lane (butterfly:
        offsets 16, 8, 4, 2, 1)."""
        for a in range(n):
            v = vals[a]
            off = WARP // 2
            while off > 0:
                v += cuda.shfl_xor_sync(_FULL_MASK, v, off)
                off //= 2
            vals[a] = v


def scratch_words(threads: int, n: int = 1) -> int:
    """Shared float32 words ``warp_sum`` of ``n`` values needs per block: n a thread on the
    simulator, else none."""
    return threads * n if qc.SIMULATOR else 0


# ------------------------------------------------------------------ checks at the boundary

def check_device(name, a, dtype, shape=None, ndims=None):
    """``a`` is a C-contiguous device array of ``dtype`` (and ``shape``, or one of ``ndims``), else
    TypeError/ValueError naming ``name``."""
    if not qc.is_device_array(a):
        raise TypeError(f"{name} must be a device array (numba.cuda), got {type(a).__name__}")
    if np.dtype(a.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if ndims is not None and len(a.shape) not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(a.shape)}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if not a.is_c_contiguous():
        raise ValueError(f"{name} must be C-contiguous")


def to_device_f32(a, stream=0):
    """A host array as a C-contiguous float32 device array (copied on ``stream``)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"to_device_f32: expected a numpy array, got {type(a).__name__}")
    return cuda.to_device(np.ascontiguousarray(a, np.float32), stream=stream)


def _blocks(n, per_block):
    return max(1, -(-int(n) // int(per_block)))


# ------------------------------------------------------------------ rmsnorm

@cuda.jit
def _rmsnorm_kernel(x, w, eps, out):
    """Tiling: a warp per row of ``x [rows, n]`` (rows = all but the last axis), _NORM_WARPS
    rows a block. Lanes stride the row (coalesced), sum squares in float32, warp_sum; a
    second pass scales. Warps past the last row still join the reductions (the
    simulator's warp_sum is a block barrier)."""
    tid = cuda.threadIdx.x
    lane = tid % WARP
    row = cuda.blockIdx.x * _NORM_WARPS + tid // WARP
    n = x.shape[1]
    live = row < x.shape[0]
    scratch = cuda.shared.array(0, types.float32)
    ss = cuda.local.array(1, np.float32)
    ss[0] = np.float32(0.0)
    if live:
        for c in range(lane, n, WARP):
            v = x[row, c]
            ss[0] += v * v
    warp_sum(ss, 1, scratch, tid, _NORM_WARPS * WARP)
    if live:
        scale = np.float32(1.0) / math.sqrt(ss[0] / np.float32(n) + eps)
        for c in range(lane, n, WARP):
            out[row, c] = x[row, c] * scale * w[c]


def rmsnorm(x, w, eps, out=None, stream=0):
    """``x / sqrt(mean(x^2) + eps) * w`` over the last axis of device float32 ``x`` (2-D ``[T, n]``
    or 3-D ``[T, H, d]``), ``w`` device float32 ``[n]``; into ``out`` (``x`` itself is allowed)."""
    check_device("x", x, np.float32, ndims=(2, 3))
    n = tuple(x.shape)[-1]  # (the simulator's shapes take no negative index)
    check_device("w", w, np.float32, shape=(n,))
    if out is None:
        out = cuda.device_array(x.shape, np.float32, stream=stream)
    check_device("out", out, np.float32, shape=x.shape)
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    rows = x.size // n if n else 0
    if rows and n:
        threads = _NORM_WARPS * WARP
        _rmsnorm_kernel[_blocks(rows, _NORM_WARPS), threads, stream, 4 * scratch_words(threads)](
            x.reshape(rows, n), w, np.float32(eps), out.reshape(rows, n))
    return out


# ------------------------------------------------------------------ rope

def _rope_kernel(neox):
    """The RoPE kernel for one pairing: ``neox`` is a compile-time constant (a closure), so
    each build holds only its own indexing."""
    @cuda.jit
    def rope_kernel(x, cos, sin):
        """Tiling: grid-stride over (token, head, i < n_rot/2); each step rotates one pair of
        one head in place: (i, i + n_rot/2) for NEOX, (2i, 2i + 1) for ggml's normal RoPE;
        dims past n_rot are never touched."""
        n_tok, n_head, _ = x.shape
        half = cos.shape[1]
        per_tok = n_head * half
        for idx in range(cuda.grid(1), n_tok * per_tok, cuda.gridsize(1)):
            t = idx // per_tok
            rem = idx - t * per_tok
            h = rem // half
            i = rem - h * half
            if neox:
                j0, j1 = i, i + half
            else:
                j0, j1 = 2 * i, 2 * i + 1
            c = cos[t, i]
            s = sin[t, i]
            x0 = x[t, h, j0]
            x1 = x[t, h, j1]
            x[t, h, j0] = x0 * c - x1 * s
            x[t, h, j1] = x0 * s + x1 * c
    return rope_kernel


_rope_neox_kernel = _rope_kernel(True)
_rope_norm_kernel = _rope_kernel(False)


def rope(x, cos, sin, neox=True, stream=0):
    """RoPE of device float32 ``x [T, H, d]`` in place, by ``cos``/``sin`` device float32
    ``[T, n_rot/2]`` (``ops.rope_cos_sin``, uploaded): NEOX pairs, else ggml's normal (adjacent)
    pairs; dims past n_rot stay. Returns ``x``."""
    check_device("x", x, np.float32, ndims=(3,))
    check_device("cos", cos, np.float32, ndims=(2,))
    check_device("sin", sin, np.float32, shape=cos.shape)
    T, H, d = x.shape
    if cos.shape[0] != T or 2 * cos.shape[1] > d:
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not fit x {tuple(x.shape)}: need [{T}, n_rot/2] "
                         f"with n_rot <= {d}")
    n = T * H * cos.shape[1]
    if n:
        kernel = _rope_neox_kernel if neox else _rope_norm_kernel
        kernel[qc.grid_blocks(n, _THREADS), _THREADS, stream](x, cos, sin)
    return x


def rope_neox(x, cos, sin, stream=0):
    """``rope`` with NEOX pairs (i, i + n_rot/2)."""
    return rope(x, cos, sin, True, stream)


# ------------------------------------------------------------------ add

@cuda.jit
def _add_kernel(x, y):
    """Tiling: grid-stride over the flat ``x``; ``y`` repeats every ``len(y)`` elements
    (the same shape, or a bias over rows)."""
    n_y = y.shape[0]
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        x[i] += y[i % n_y]


def add(x, y, stream=0):
    """``x += y`` in place on the device: ``y`` of ``x``'s shape, or 1-D ``[x.shape[-1]]`` added to
    every row (a bias). Both float32, C-contiguous. Returns ``x``."""
    check_device("x", x, np.float32)
    check_device("y", y, np.float32)
    xs, ys = tuple(x.shape), tuple(y.shape)
    if ys != xs and not (len(ys) == 1 and xs and ys[0] == xs[-1]):
        raise ValueError(f"y {ys} must have x's shape {xs} or be [{xs[-1] if xs else 1}]")
    if x.size and y.size:
        _add_kernel[qc.grid_blocks(x.size, _THREADS), _THREADS, stream](x.reshape(x.size), y.reshape(y.size))
    return x


# ------------------------------------------------------------------ dense FFN and shared-expert gate

_silu = cuda.jit(device=True)(act.silu_f32)
_swiglu = cuda.jit(device=True)(act.swiglu_oai_f32)
_SWIGLU = act.ACT_CODE["swiglu_oai"]


@cuda.jit
def _glu_kernel(g, u, code):
    """Tiling: grid-stride over the flat ``g``; ``g = act(g, u)`` in place."""
    for i in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        g[i] = _swiglu(g[i], u[i]) if code == _SWIGLU else _silu(g[i], u[i])


def glu(g, u, activation, stream=0):
    """``g = act(g, u)`` in place (``hybrid.moe.activation``'s formula, by name), device float32
    arrays of one size. Returns ``g``."""
    n = g.size
    if n:
        _glu_kernel[qc.grid_blocks(n, _THREADS), _THREADS, stream](g.reshape(n), u.reshape(n),
                                                                 act.ACT_CODE[activation])
    return g


@cuda.jit
def _gate_rows_kernel(y, x, w):
    """Tiling: a thread per token: ``y[t] *= sigmoid(x[t] . w)`` (float32, in id order)."""
    t = cuda.grid(1)
    if t < y.shape[0]:
        s = np.float32(0.0)
        for c in range(x.shape[1]):
            s += x[t, c] * w[c]
        gate = np.float32(1.0) / (np.float32(1.0) + math.exp(-s))
        for c in range(y.shape[1]):
            y[t, c] *= gate


def gate_rows(y, x, w, stream=0, threads=128):
    """``y[t] *= sigmoid(x[t] . w)`` in place on the device (the shared experts' gate)."""
    T = y.shape[0]
    if T:
        _gate_rows_kernel[-(-T // threads), threads, stream](y, x, w)
    return y


# ------------------------------------------------------------------ variants (for compile checks)

def variants():
    """Every kernel here with the argument types the functions above pass (``kernels.Variant``)."""
    A = lambda dt, nd: types.Array(dt, nd, "C")  # noqa: E731
    f32 = types.float32
    threads = _NORM_WARPS * WARP
    return [Variant("rmsnorm", _rmsnorm_kernel, (A(f32, 2), A(f32, 1), f32, A(f32, 2)), threads, 0, 1),
            Variant("rope_neox", _rope_neox_kernel, (A(f32, 3), A(f32, 2), A(f32, 2)), _THREADS, 0, 1),
            Variant("rope_norm", _rope_norm_kernel, (A(f32, 3), A(f32, 2), A(f32, 2)), _THREADS, 0, 1),
            Variant("add", _add_kernel, (A(f32, 1), A(f32, 1)), _THREADS, 0, 1),
            Variant("gate_rows", _gate_rows_kernel, (A(f32, 2), A(f32, 2), A(f32, 1)), 128, 0, 1)]
