"""Dense weights (attention, embeddings, output) in the type the file holds, read from the memory map.

``Dense.matmul(x)`` is ``x @ W.T`` without ever decoding the whole matrix:
- a batch of tokens decodes W a tile of rows at a time (``quant.types``, float32)
  and multiplies each tile with BLAS, so the decoded copy stays a few MB;
- one to a few tokens (decode steps) run a Numba kernel on the stored bytes
  (Q8_0, F16, BF16, MXFP4 blocks decoded in registers by the block dots of ``hybrid.kernels.cpu.ir``;
  F32 goes to BLAS): every weight byte is read once, at memory speed.
``Dense.rows(ids)`` decodes only the given rows (the embedding lookup).
"""
from __future__ import annotations

import functools

import numba as nb
import numpy as np
from gguf.constants import GGMLQuantizationType as T

from quant import registry as qregistry, types as qtypes

from .ir import GROUP, best_isa, block_dot_types, make_block_dot, make_mx_dot

__all__ = ["Dense"]

_TILE_BYTES = 1 << 21  # decoded float32 tile: fits in L2/L3
_DIRECT_MAX_TOKENS = 4  # up to this many tokens, the direct kernel
_PARALLEL_BYTES = 1 << 18  # smaller matrices run on one thread
_R = 4  # rows per block-dot call: R x 1 token of accumulators fit the registers on AVX2 and AVX-512


def _direct_types():
    """Types the direct kernel reads in registers (``ir.block_dot_types``); F32 goes to BLAS."""
    return tuple(t for t in block_dot_types() if t != int(T.F32))


@functools.lru_cache(maxsize=None)
def _dots(wtype, n_rows):
    return make_mx_dot(n_rows, 1, best_isa()) if wtype == int(T.MXFP4) else make_block_dot(wtype, n_rows, 1, best_isa())


def _build_block_dot():
    """``_block_dot(fmt, ...)``: one call site per intrinsic (each compiled once into the kernel),
    ``fmt`` the GGML id; generated from the registry (Numba cannot call through a dict)."""
    types = _direct_types()
    ns, lines = {}, ["def _block_dot(fmt, raw, woff, row_bytes, nblk, x, xoff, cols, out, ooff, rows, n_rows):"]
    args = "(raw, woff, row_bytes, nblk, x, xoff, cols, out, ooff, rows)"
    for head, n in (("    if n_rows == _R:", _R), ("    else:", 1)):
        lines.append(head)
        for i, t in enumerate(types):
            ns[f"dot_{t}_{n}"] = _dots(t, n)
            lines += [f"        {'if' if i == 0 else 'elif'} fmt == {t}:", f"            dot_{t}_{n}{args}"]
        if not types:
            lines.append("        pass")
    ns["_R"] = _R
    exec(compile("\n".join(lines), "<hybrid.kernels.cpu.dense._block_dot>", "exec"), ns)
    return nb.njit(inline="always")(ns["_block_dot"])


_block_dot = _build_block_dot()


@qregistry.on_change
def _rebuild():
    global _block_dot
    _block_dot = _build_block_dot()


class Dense:
    """A weight matrix ``W [rows, cols]`` (y = W x) of any registered type (``quant.registry``), stored bytes as given."""

    def __init__(self, name: str, raw: np.ndarray, ggml_type: int, shape):
        self.name, self.ggml_type = name, int(ggml_type)
        self.shape = tuple(int(s) for s in shape)
        if not qregistry.has(self.ggml_type):
            raise TypeError(f"tensor {name}: type {qtypes.type_name(ggml_type)} is not supported for dense "
                            f"weights (supported: {', '.join(qtypes.type_name(t) for t in qregistry.types())})")
        if len(self.shape) != 2:
            raise ValueError(f"tensor {name}: a dense weight must be 2-D, got shape {self.shape}")
        rows, cols = self.shape
        self.row_bytes = qtypes.row_nbytes(self.ggml_type, cols)
        # a plain ndarray view of the map: np.memmap's per-slice bookkeeping costs more than a small matmul
        self.raw = raw.view(np.ndarray).view(np.uint8).reshape(rows, self.row_bytes)
        self.tile = max(8, _TILE_BYTES // (4 * cols))

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` decoded to float32 ``[len(ids), cols]`` (ids checked by the caller)."""
        return qtypes.dequantize(self.raw[ids], self.ggml_type, (len(ids), self.shape[1]))

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T``: float32 ``[n, rows]`` for float32 ``x [n, cols]``."""
        rows, cols = self.shape
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != cols:
            raise ValueError(f"{self.name}: input must be float32 [n, {cols}], got {x.dtype} {x.shape}")
        x = np.ascontiguousarray(x)
        out = np.empty((x.shape[0], rows), np.float32)
        if self.ggml_type in _direct_types() and x.shape[0] <= _DIRECT_MAX_TOKENS and cols % GROUP == 0:
            _direct(self.ggml_type, x, self.raw, out)
            return out
        if self.ggml_type == T.F32:
            return np.matmul(x, self.raw.view(np.float32).T, out=out)
        for r0 in range(0, rows, self.tile):
            r1 = min(rows, r0 + self.tile)
            w = qtypes.dequantize(self.raw[r0:r1], self.ggml_type, (r1 - r0, cols))
            np.matmul(x, w.T, out=out[:, r0:r1])
        return out


@qregistry.jit(parallel=True, cache=True)  # reads the generated _block_dot
def _block_kernel(fmt, x, raw, out, n_chunks):
    """out[t, r] += W[r] . x[t] on the stored bytes: blocks of 32 weights decoded in registers
    and multiplied in one pass (``ir``'s block dots, which sum in a fixed order, so the
    chunking does not change a bit), ``_R`` rows at a time."""
    rows, row_bytes = raw.shape
    n_tok, cols = x.shape
    nblk = cols // GROUP
    groups = rows // _R
    per = (groups + n_chunks - 1) // n_chunks
    for c in nb.prange(n_chunks):
        for g in range(c * per, min(groups, (c + 1) * per)):
            for t in range(n_tok):
                _block_dot(fmt, raw, g * _R * row_bytes, row_bytes, nblk, x, t * cols, cols, out, t * rows + g * _R,
                           rows, _R)
    for r in range(groups * _R, rows):
        for t in range(n_tok):
            _block_dot(fmt, raw, r * row_bytes, row_bytes, nblk, x, t * cols, cols, out, t * rows + r, rows, 1)


def _direct(ggml_type, x, raw, out):
    # Waking the thread pool costs more than a small matrix takes on one core.
    chunks = 4 * nb.get_num_threads() if raw.size >= _PARALLEL_BYTES else 1
    out[:] = 0.0  # the kernels add
    with nb.parallel_chunksize(1):
        _block_kernel(int(ggml_type), x, raw, out, chunks)
