"""The in-memory gpt-oss builder: a loaded file's twin, its config, the forward, its random bytes.

Tiny dimensions with the real structure (sinks, YaRN, sliding window, MXFP4 experts,
Q8_0 matrices); seeds are drawn fresh and named in failures.
"""
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from hybrid.model import load
from hybrid.model.config import read_config
from hybrid.model.forward import Transformer
from hybrid.model.reference import forward_reference
from hybrid.model.synthetic import GPT_OSS, SHAPES, random_blocks, synthetic_layer, synthetic_model
from hybrid.model.tiny import write_gguf
from hybrid.moe.routing import bucket
from quant import types as qtypes

TINY = dict(n_embd=64, n_ff=64, n_experts=8, k=2, n_head=4, n_head_kv=2, head_dim=32, n_vocab=300, n_swa=5)


def fresh_seed():
    return int(np.random.SeedSequence().entropy % 2**31)


@pytest.fixture(scope="module")
def tiny():
    seed = fresh_seed()
    return synthetic_model("gpt-oss-120b", n_layers=3, seed=seed, **TINY), seed


def test_config_is_what_was_asked(tiny):
    model, _ = tiny
    cfg = read_config(model)
    assert (cfg.arch, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_vocab) == \
        ("gpt-oss", 3, 64, 4, 2, 32, 300)
    assert cfg.swa_layers == (True, False, True) and cfg.n_swa == 5 and cfg.sinks and cfg.qkv_bias
    assert cfg.ext_factor == 1.0 and cfg.freq_scale == 1 / 32 and cfg.n_ctx_train == GPT_OSS["n_ctx"]
    assert (model.n_experts, model.k, model.n_ff, len(model.layers), model.dense_blocks) == (8, 2, 64, 3, [])
    assert model.metadata["general.name"] == "gpt-oss-120b (3 of 36 layers), random weights"
    types = {n: t.ggml_type for n, t in model.tensors.items()}
    assert types["blk.0.ffn_up_exps.weight"] == T.MXFP4 and types["blk.1.attn_q.weight"] == T.Q8_0
    assert types["token_embd.weight"] == T.Q8_0 and types["blk.2.attn_sinks.weight"] == T.F32


def test_full_shapes_without_building_them():
    """The real dimensions reach the config (a 1-layer model with few experts: cheap)."""
    m = synthetic_model("gpt-oss-20b", n_layers=1, n_experts=4, n_vocab=64)
    cfg = read_config(m)
    assert (cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_swa) == (2880, 64, 8, 64, 128)
    assert m.layers[0].gate.raw.shape == (4, 2880, 2880 // 32 * 17)
    assert SHAPES["gpt-oss-120b"]["n_layers"] == 36 and SHAPES["gpt-oss-20b"]["n_experts"] == 32


def test_it_is_what_load_gives_for_the_same_tensors(tiny, tmp_path):
    model, seed = tiny
    tensors = [(n, model.raw(n) if t.ggml_type == T.F32 else (model.raw(n), t.ggml_type))
               for n, t in model.tensors.items()]
    meta = {k: v for k, v in model.metadata.items() if k != "general.architecture"}
    f = load(write_gguf(tmp_path / "twin.gguf", "gpt-oss", meta, tensors))
    assert {k: v for k, v in f.metadata.items() if k != "general.alignment"} == model.metadata
    for n, t in model.tensors.items():
        g = f.tensors[n]
        assert (g.ggml_type, g.shape, g.nbytes) == (t.ggml_type, t.shape, t.nbytes), n
        assert np.array_equal(np.asarray(f.raw(n)), model.raw(n)), n
    ids = np.random.default_rng(seed).integers(0, 300, 12)
    a = Transformer(model, n_ctx=12, n_ubatch=8).prefill(ids)
    assert np.array_equal(a, Transformer(f, n_ctx=12, n_ubatch=8).prefill(ids)), f"seed {seed}"


def test_forward_matches_the_float64_reference(tiny):
    model, seed = tiny
    ids = np.random.default_rng(seed + 1).integers(0, 300, 11)  # longer than the window of 5
    got = Transformer(model, n_ctx=11, n_ubatch=4, f32=True).prefill(ids)
    want = forward_reference(model, ids)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max(), err_msg=f"seed {seed}")


def test_activations_stay_finite_through_36_layers():
    """120b's depth at tiny width: the scales keep every layer's output near unit size."""
    seed = fresh_seed()
    model = synthetic_model("gpt-oss-120b", seed=seed, **TINY)
    logits = Transformer(model, n_ctx=6, n_ubatch=6).prefill(np.random.default_rng(seed).integers(0, 300, 6))
    assert len(model.layers) == 36 and np.isfinite(logits).all()
    assert 0.05 < float(np.sqrt(np.mean(logits.astype(np.float64) ** 2))) < 20, f"seed {seed}"


def test_shared_experts_are_one_blocks_bytes():
    seed = fresh_seed()
    a = synthetic_model("gpt-oss-20b", n_layers=3, seed=seed, **TINY)
    b = synthetic_model("gpt-oss-20b", n_layers=3, seed=seed, share_experts=True, **TINY)
    for L in b.layers[1:]:
        for n in ("gate", "up", "down"):
            assert np.shares_memory(getattr(L, n).raw, getattr(b.layers[0], n).raw)
    for La, Lb in zip(a.layers, b.layers):  # routers and biases are each block's own, as without sharing
        assert np.array_equal(La.router_w, Lb.router_w) and np.array_equal(La.down_b, Lb.down_b)
    assert np.array_equal(a.layers[0].gate.raw, b.layers[0].gate.raw)
    assert not np.array_equal(a.layers[1].gate.raw, b.layers[1].gate.raw)
    logits = Transformer(b, n_ctx=6, n_ubatch=6).prefill(np.random.default_rng(seed).integers(0, 300, 6))
    assert np.isfinite(logits).all()


def test_random_blocks_are_sane_and_reproducible():
    seed = fresh_seed()
    x = np.random.default_rng(seed).standard_normal((4, 2880)).astype(np.float32)
    for t, sb in ((T.MXFP4, 17), (T.Q8_0, 34)):
        raw = random_blocks(96, 2880, t, seed)
        assert raw.shape == (96, 2880 // 32 * sb) and raw.dtype == np.uint8
        assert np.array_equal(raw, random_blocks(96, 2880, t, seed))
        assert not np.array_equal(raw, random_blocks(96, 2880, t, seed + 1))
        w = qtypes.dequantize(raw, int(t), (96, 2880))
        assert np.isfinite(w).all()
        rms = float(np.sqrt(np.mean((x @ w.T) ** 2)))
        assert 0.5 < rms < 2.0, (t, rms, seed)  # about the input's RMS (1)
        if t == T.MXFP4:
            e = raw.reshape(-1, 17)[:, 0]
            assert set(np.unique(e)) == {118, 119, 120, 121}  # four exponents around 2^-8.3 at 2880 columns
        body = raw.reshape(-1, sb)[:, sb - 16:]
        assert abs(float(body.mean()) - 127.5) < 3  # the non-scale bytes look uniform


def test_routing_is_skewed():
    """Unit-RMS random tokens use fewer experts than unbiased routers would, and about what
    SHAPES' skew was fitted to (77 of 128 at ubatch 512)."""
    seed = fresh_seed()
    x = np.random.default_rng(seed).standard_normal((512, 64)).astype(np.float32)
    used = lambda skew, i: bucket(synthetic_layer(i, n_embd=64, n_ff=32, n_experts=128, k=4, skew=skew,  # noqa: E731
                                                  seed=seed).route(x)[0], 128).used.size
    skewed = [used(SHAPES["gpt-oss-120b"]["skew"], i) for i in range(4)]
    flat = [used(0.0, i) for i in range(4)]
    assert 55 < np.mean(skewed) < 100 and np.mean(flat) > 120, (skewed, flat, seed)


@pytest.mark.parametrize("kw, match", [
    (dict(shape="gpt-oss-7b"), "shape must be one of"),
    (dict(n_layers=0), "n_layers must be a positive int"),
    (dict(n_embd=100), "n_embd = 100 must be a positive multiple of 32"),
    (dict(k=9, n_experts=8), "k = 9 exceeds n_experts = 8"),
    (dict(skew=float("nan")), "skew must be a finite number"),
    (dict(n_heads=4), "unknown dimension"),
    (dict(share_experts=1), "share_experts must be a bool"),
])
def test_bad_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        synthetic_model(**kw)
