"""Float64 reference of the whole forward, written from the formulas (tests check the fast path against it).

One pass over all tokens, no cache, no ubatches, every weight decoded whole: the
architecture's block (``arch/``) run by ``ops_f64.F64Ops``, whose arithmetic shares
nothing with the fast paths; the MoE block is the float64 ``moe.reference``.
"""
from __future__ import annotations

import numpy as np

from . import arch as archs
from .config import read_config
from .ops_f64 import F64Ops
from .weights import F64Weights

__all__ = ["forward_reference"]


def forward_reference(model, tokens) -> np.ndarray:
    """Float64 logits ``[n_tokens, n_vocab]`` of ``tokens`` at positions 0..n-1."""
    cfg = read_config(model)
    arch = archs.get(model.arch, model.path, graph=True)
    w = F64Weights(model)
    tokens = np.asarray(tokens)
    ops = F64Ops(cfg, model.layers, np.arange(len(tokens)))
    h = w.mat("token_embd.weight", (cfg.n_vocab, cfg.n_embd))[tokens]
    for il in range(cfg.n_layer):
        arch.block(ops, cfg, il, arch.load_block(w, cfg, il, cfg.kinds[il]), h)
    head = "output.weight" if "output.weight" in model.tensors else "token_embd.weight"
    return ops.rmsnorm(h, w.vec("output_norm.weight", cfg.n_embd)) @ w.mat(head, (cfg.n_vocab, cfg.n_embd)).T
