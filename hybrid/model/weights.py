"""A model's dense weights by name, with the checks a bad file can fail: what ``Arch.load_block``
reads a block through (``mat``, ``vec``, ``has``). The forward keeps matrices in the file's
type (``Dense``, views of the memory map); the float64 reference decodes them."""
from __future__ import annotations

import numpy as np

from quant import types as qtypes

from ..kernels.cpu.dense import Dense
from .errors import GGUFError

__all__ = ["Weights", "F64Weights", "Transposed"]


class Transposed:
    """``W [rows, cols]`` used as ``y = x @ W`` (``matmul``: float32 ``[n, rows]`` -> ``[n, cols]``),
    decoded per call: a legacy DeepSeek file's ``attn_kv_b`` keys, which MLA multiplies from the left."""

    def __init__(self, W: Dense):
        self.W, self.shape = W, W.shape[::-1]

    @property
    def nbytes(self) -> int:
        return self.W.nbytes

    def matmul(self, x: np.ndarray) -> np.ndarray:
        rows, cols = self.W.shape
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != rows:
            raise ValueError(f"{self.W.name}: input must be float32 [n, {rows}], got {x.dtype} {x.shape}")
        return x @ qtypes.dequantize(self.W.raw, self.W.ggml_type, self.W.shape)


class Weights:
    def __init__(self, model):
        self.model = model

    def has(self, name) -> bool:
        return name in self.model.tensors

    def _info(self, name, shape):
        m = self.model
        info = m.tensors.get(name)
        if info is None:
            raise GGUFError(f"{m.path}: missing tensor {name} (arch {m.arch})")
        if info.shape != tuple(shape):
            raise GGUFError(f"{m.path}: {name} has shape {info.shape}, expected {tuple(shape)}")
        return info

    def mat(self, name, shape) -> Dense:
        info = self._info(name, shape)
        try:
            return Dense(name, self.model.raw(name), info.ggml_type, shape)
        except TypeError as e:
            raise GGUFError(f"{self.model.path}: {e}") from None

    def heads(self, name, shape, rows=None, transposed=False) -> list:
        """Per-head matrices of ``name`` stored as ``shape = (H, R, cols)`` (3-D, or 2-D
        ``[H * R, cols]``): rows ``r0 .. r1`` of each head (``rows``; default all), as ``Dense``
        views, or ``Transposed`` ones (``x @ W``) when ``transposed``."""
        H, R, C = shape
        info = self.model.tensors.get(name)
        self._info(name, (H * R, C) if info is not None and len(info.shape) == 2 else shape)
        r0, r1 = (0, R) if rows is None else rows
        raw = self.model.raw(name).reshape(H, R, -1)
        out = []
        for h in range(H):
            try:
                W = Dense(f"{name}[{h}]", raw[h, r0:r1], info.ggml_type, (r1 - r0, C))
            except TypeError as e:
                raise GGUFError(f"{self.model.path}: {e}") from None
            out.append(Transposed(W) if transposed else W)
        return out

    def vec(self, name, n, required=True):
        """A float32 vector ``[n]`` (also stored as one row ``[1, n]``, as converters write a
        ``Linear(n, 1)``: Qwen2-MoE's ffn_gate_inp_shexp)."""
        if not required and name not in self.model.tensors:
            return None
        info = self.model.tensors.get(name)
        self._info(name, (1, n) if info is not None and info.shape == (1, n) else (n,))
        try:
            return self.model.tensor(name).reshape(n)
        except NotImplementedError as e:
            raise GGUFError(f"{self.model.path}: {name}: {e}") from None


class F64Weights(Weights):
    """Every weight decoded whole to float64 (the reference)."""

    def mat(self, name, shape) -> np.ndarray:
        self._info(name, shape)
        return self.model.tensor(name).astype(np.float64)

    def heads(self, name, shape, rows=None, transposed=False) -> np.ndarray:
        """As ``Weights.heads``, one float64 array ``[H, r1 - r0, cols]`` (transposed: ``[H, cols, r1 - r0]``)."""
        H, R, C = shape
        info = self.model.tensors.get(name)
        self._info(name, (H * R, C) if info is not None and len(info.shape) == 2 else shape)
        r0, r1 = (0, R) if rows is None else rows
        w = self.model.tensor(name).astype(np.float64).reshape(H, R, C)[:, r0:r1]
        return w.transpose(0, 2, 1) if transposed else w

    def vec(self, name, n, required=True):
        v = super().vec(name, n, required)
        return None if v is None else v.astype(np.float64)
