"""Tiny qwen3moe models whose experts and dense weights are K-quants, legacy quants and
i-quants load, and their CPU logits match the float64 reference over the dequantized weights.
"""
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from hybrid.model import load
from hybrid.model.forward import Transformer
from hybrid.model.reference import forward_reference
from qtypes_models import DIMS, write_model


# (experts, dense): every new type as experts once, dense weights of another family
PAIRS = [(T.Q4_K, T.Q6_K), (T.Q2_K, T.Q4_0), (T.Q3_K, T.IQ4_NL), (T.Q5_K, T.Q5_1), (T.Q6_K, T.Q4_K),
         (T.Q4_0, T.Q8_0), (T.Q4_1, T.IQ4_XS), (T.Q5_0, T.Q5_K), (T.Q5_1, T.Q5_0), (T.IQ4_NL, T.Q2_K),
         (T.IQ4_XS, T.Q3_K), (T.IQ3_XXS, T.Q4_1), (T.IQ3_S, T.TQ2_0), (T.IQ2_XXS, T.IQ3_S), (T.IQ2_XS, T.Q8_0),
         (T.IQ2_S, T.IQ2_XXS), (T.IQ1_S, T.F16), (T.IQ1_M, T.IQ1_S), (T.TQ1_0, T.IQ2_S), (T.TQ2_0, T.TQ1_0)]


@pytest.mark.parametrize("etype,dtype", PAIRS, ids=[f"{e.name}-{d.name}" for e, d in PAIRS])
def test_logits_match_the_float64_reference(tmp_path, etype, dtype):
    # default tiles: the CPU expert path fits its decoded tile to 256-element super-blocks itself
    seed = int(np.random.SeedSequence().entropy % 2**32)
    model = load(write_model(tmp_path / "m.gguf", etype, dtype, seed=seed))
    assert model.layers[0].gate.ggml_type == etype and model.tensors["blk.0.attn_q.weight"].ggml_type == dtype
    toks = np.random.default_rng(seed).integers(0, DIMS["n_vocab"], 6)
    want = forward_reference(model, toks)
    scale = float(np.abs(want).max())
    assert np.abs(want[-1] - want[0]).max() > 1e-2 * scale  # not degenerate
    got = Transformer(model, n_ctx=16, n_ubatch=4, f32=True).prefill(toks)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale, err_msg=f"prefill, seed {seed}")
    # then decode steps, one token each, float32 activations (the int8 path: tests/kernels/test_cpu.py)
    tr = Transformer(model, n_ctx=16, n_ubatch=4, f32=True)
    steps = [tr.prefill(toks[:3])] + [tr.decode_one_token(int(t))[None] for t in toks[3:]]
    np.testing.assert_allclose(np.concatenate(steps), want, rtol=0, atol=2e-5 * scale,
                               err_msg=f"decode, seed {seed}")
