"""Tiny qwen3moe GGUFs of any registered weight types, for the tests of tests/quant.

gguf-py quantises few of the K-quants and i-quants, so weights are random blocks (every
code drawn) with f16 scales set so values have the spread of real weights.
"""
import dataclasses

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from hybrid.model.tiny import model_metadata, model_tensors, random_blocks as weight_blocks, random_layer, write_gguf
from hybrid.moe.layer import ExpertTensor
from quant import registry

DIMS = dict(n_embd=256, n_ff=256, n_experts=4, k=2, n_head=4, n_head_kv=2, head_dim=64, n_vocab=300)


def write_model(path, etype, dtype, seed=0, n_layers=2):
    rng = np.random.default_rng([seed, 7])
    fe, fd = registry.get(etype), registry.get(dtype)
    E, D, F = DIMS["n_experts"], DIMS["n_embd"], DIMS["n_ff"]

    def experts(rows, cols):
        return ExpertTensor(np.ascontiguousarray(weight_blocks(fe, (E, rows, cols), rng, cols ** -0.5)),
                            int(etype), rows, cols)
    layers = []
    for i in range(n_layers):
        L = random_layer(D, F, E, DIMS["k"], wtype=T.F32, gpt_oss=False, seed=seed * 31 + i, index=i, skew=0.0)
        layers.append(dataclasses.replace(L, gate=experts(F, D), up=experts(F, D), down=experts(D, F)))
    f32 = lambda *s, scale=0.1: (scale * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    norm = lambda n: (1.0 + f32(n)).astype(np.float32)  # noqa: E731
    mat = lambda *s: (weight_blocks(fd, s, rng, s[-1] ** -0.5), dtype)  # noqa: E731
    sh = {k: DIMS[k] for k in ("n_embd", "n_head", "n_head_kv", "head_dim", "n_vocab")}
    tensors = model_tensors("qwen3moe", layers, mat=mat, f32=f32, norm=norm, **sh)
    meta = model_metadata("qwen3moe", name="tiny-qtypes", n_layers=n_layers, n_ctx=256, n_embd=D, n_ff=F,
                          n_head=DIMS["n_head"], n_head_kv=DIMS["n_head_kv"], head_dim=DIMS["head_dim"],
                          n_experts=E, k=DIMS["k"], n_swa=0, expert_type=etype)
    return write_gguf(path, "qwen3moe", meta, tensors)
