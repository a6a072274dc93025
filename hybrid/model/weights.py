"""A model's dense weights by name, with the checks a bad file can fail: what ``Arch.load_block``
reads a block through (``mat``, ``vec``, ``has``). The forward keeps matrices in the file's
type (``Dense``, views of the memory map); the float64 reference decodes them."""
from __future__ import annotations

import numpy as np

from ..kernels.cpu.dense import Dense
from .errors import GGUFError

__all__ = ["Weights", "F64Weights"]


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

    def vec(self, name, n, required=True):
        v = super().vec(name, n, required)
        return None if v is None else v.astype(np.float64)
