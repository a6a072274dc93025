"""hybrid.model: GGUF round trips against gguf's own reader/quants, and every bad file a clear error."""
import dataclasses

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter, quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings, strategies as st

from hybrid.moe.layer import ExpertTensor
from hybrid.model.tiny import random_layer
from hybrid.model import (GGUFError, default_model_path, ensure_default_model, load, split_paths,
                          tiny_layers, write_tiny)
from hybrid.moe.reference import moe_reference, route_reference, router_logits_reference

TINY = dict(n_layers=4, n_embd=128, n_ff=128, n_experts=16, k=4, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny") / "tiny.gguf", **TINY)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 1-block gpt-oss file for the corruption tests (fast to rewrite and reload)."""
    return write_tiny(tmp_path_factory.mktemp("small") / "small.gguf", n_layers=1, n_embd=64, n_ff=64,
                      n_experts=8, k=2, n_vocab=64, seed=1)


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


# -- the tiny gpt-oss model ---------------------------------------------------------------

def test_tiny_round_trip(tiny):
    m = load(tiny)
    assert (m.arch, m.n_layers, m.n_embd, m.n_ff, m.n_experts, m.k) == ("gpt-oss", 4, 128, 128, 16, 4)
    assert m.paths == [tiny] and len(m.layers) == 4 and m.dense_blocks == []
    plain = {t.name: t for t in GGUFReader(tiny).tensors}  # gguf's own reader, independent of ours
    for want, got in zip(tiny_layers(**{k: v for k, v in TINY.items()}), m.layers):
        assert got.index == want.index
        assert (got.gating, got.activation, got.renormalize) == ("softmax_topk", "swiglu_oai", False)
        for f in ("router_w", "router_b", "gate_b", "up_b", "down_b"):
            np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
            assert getattr(got, f).dtype == np.float32
        for n in ("gate", "up", "down"):
            name = f"blk.{got.index}.ffn_{n}_exps.weight"
            g, w = getattr(got, n), getattr(want, n)
            assert g.ggml_type == T.MXFP4 and g.raw.shape == (16, 128, 128 // 32 * 17)
            np.testing.assert_array_equal(g.raw, w.raw)
            # Views of the memory map, not copies.
            assert isinstance(g.data, np.memmap) and not g.data.flags.writeable
            assert np.shares_memory(g.data, m.raw(name))
            # gguf's view of the same tensor: ggml order [n_embd, n_ff, E], MXFP4.
            assert plain[name].tensor_type == T.MXFP4 and list(plain[name].shape) == [128, 128, 16]
            np.testing.assert_array_equal(g.raw, plain[name].data)
            for e in (0, 7, 15):
                np.testing.assert_array_equal(_bits(g.dequantize(e)),
                                              _bits(quants.dequantize(plain[name].data[e], T.MXFP4)))


def test_tiny_routing_is_skewed(tiny):
    m = load(tiny)
    rng = np.random.default_rng(11)
    for layer in m.layers:
        x = rng.standard_normal((256, m.n_embd)).astype(np.float32)
        ids, _ = route_reference(router_logits_reference(layer, x), m.k)
        counts = np.sort(np.bincount(ids.ravel(), minlength=m.n_experts))[::-1]
        # Uniform routing gives the top quarter of the experts a quarter of the picks.
        assert counts[:4].sum() > 0.5 * counts.sum()
        # A small batch uses well under all experts (uniform: ~14.4 of 16 for 8 tokens).
        used = [len(np.unique(ids[i:i + 8])) for i in range(0, 256, 8)]
        assert np.mean(used) < 12
    # Each block favours different experts.
    x = rng.standard_normal((256, m.n_embd)).astype(np.float32)
    tops = {tuple(np.argsort(-np.bincount(route_reference(router_logits_reference(layer, x), 4)[0].ravel(),
                                          minlength=16))[:2]) for layer in m.layers}
    assert len(tops) > 1


def _independent_moe(reader_tensors, blk, x, k):
    """gpt-oss MoE from gguf's reader and gguf.quants, float64, written out from docs/design.md (section 4)."""
    t = lambda n: reader_tensors[f"blk.{blk}.{n}"].data  # noqa: E731
    deq = lambda n: quants.dequantize(t(n), T.MXFP4).astype(np.float64)  # noqa: E731
    Wg, Wu, Wd = deq("ffn_gate_exps.weight"), deq("ffn_up_exps.weight"), deq("ffn_down_exps.weight")
    z = x @ t("ffn_gate_inp.weight").astype(np.float64).T + t("ffn_gate_inp.bias")
    out = np.zeros_like(x)
    for i in range(len(x)):
        sel = np.argsort(-z[i], kind="stable")[:k]
        w = np.exp(z[i, sel] - z[i, sel].max())
        w /= w.sum()
        for e, we in zip(sel, w):
            g = np.minimum(Wg[e] @ x[i] + t("ffn_gate_exps.bias")[e], 7.0)
            u = np.clip(Wu[e] @ x[i] + t("ffn_up_exps.bias")[e], -7.0, 7.0)
            a = g / (1 + np.exp(-1.702 * g)) * (u + 1)
            out[i] += we * (Wd[e] @ a + t("ffn_down_exps.bias")[e])
    return out


def test_loaded_layer_matches_independent_moe(tiny):
    m = load(tiny)
    plain = {t.name: t for t in GGUFReader(tiny).tensors}
    x = np.random.default_rng(2).standard_normal((12, m.n_embd))
    for layer in (m.layers[0], m.layers[3]):
        ref = _independent_moe(plain, layer.index, x, m.k)
        np.testing.assert_allclose(moe_reference(layer, x), ref, rtol=1e-10, atol=1e-12)


def test_other_tensors_decode_by_type(tiny):
    m = load(tiny)
    plain = {t.name: t for t in GGUFReader(tiny).tensors}
    assert list(m.tensors) == list(plain)  # every tensor listed, in file order
    want = {"token_embd.weight": T.Q8_0, "output.weight": T.Q8_0, "output_norm.weight": T.F32,
            "blk.2.attn_q.weight": T.Q8_0, "blk.2.attn_output.weight": T.Q8_0, "blk.2.attn_k.bias": T.F32,
            "blk.2.attn_norm.weight": T.F32, "blk.2.post_attention_norm.weight": T.F32,
            "blk.2.attn_sinks.weight": T.F32, "blk.2.ffn_gate_inp.weight": T.F32}
    for name, t in want.items():
        assert m.tensors[name].ggml_type == t, name
    for name, info in m.tensors.items():
        p = plain[name]
        assert info.ggml_shape == tuple(int(d) for d in p.shape) and info.nbytes == p.n_bytes
        ref = quants.dequantize(p.data, p.tensor_type).astype(np.float32)
        got = m.tensor(name)
        assert got.dtype == np.float32 and got.shape == info.shape
        np.testing.assert_array_equal(_bits(got), _bits(ref), err_msg=name)
    assert m.tensor("token_embd.weight").shape == (1024, 128)
    assert m.tensor("blk.0.attn_sinks.weight").shape == (4,)
    for key, v in {"gpt-oss.context_length": 4096, "gpt-oss.attention.head_count": 4,
                   "gpt-oss.attention.head_count_kv": 2, "gpt-oss.attention.sliding_window": 128,
                   "gpt-oss.expert_feed_forward_length": 128, "gpt-oss.rope.freq_base": 150000.0,
                   "gpt-oss.rope.scaling.type": "yarn", "general.file_type": 38}.items():
        assert m.metadata[key] == v, key
    with pytest.raises(KeyError, match="no tensor named"):
        m.tensor("blk.9.nothing")
    assert "blk.0.ffn_gate_exps.weight: MXFP4" not in m.describe()  # summary only
    assert "| blk.3.ffn_down_exps.weight | MXFP4 | [128, 128, 16]" in m.describe(per_layer=True)


# -- other architectures, written here with GGUFWriter directly ---------------------------------

def _write_moe(path, arch, layers, *, kv=None, drop=(), extra=(), n_ff_key=True, arrays=None):
    """A MoE GGUF of ``layers`` (MoELayer) without hybrid.model's writer."""
    L0 = layers[0]
    w = GGUFWriter(path, arch)
    w.add_block_count(len(layers))
    w.add_embedding_length(L0.n_embd)
    w.add_expert_count(L0.n_experts)
    w.add_expert_used_count(L0.k)
    if n_ff_key:
        w.add_expert_feed_forward_length(L0.n_ff)
    else:
        w.add_feed_forward_length(L0.n_ff)
    for key, val in (arrays or {}).items():
        w.add_array(key, val)
    for key, (val, vtype) in (kv or {}).items():
        w.add_key_value(key, val, vtype)
    w.add_tensor("token_embd.weight", quants.quantize(np.ones((8, L0.n_embd), np.float32), T.Q8_0),
                 raw_dtype=T.Q8_0)
    for L in layers:
        b = f"blk.{L.index}."
        ts = [("ffn_gate_inp.weight", L.router_w, None), ("ffn_gate_inp.bias", L.router_b, None),
              ("ffn_gate_exps.weight", L.gate.data, L.gate.ggml_type), ("ffn_gate_exps.bias", L.gate_b, None),
              ("ffn_up_exps.weight", L.up.data, L.up.ggml_type), ("ffn_up_exps.bias", L.up_b, None),
              ("ffn_down_exps.weight", L.down.data, L.down.ggml_type), ("ffn_down_exps.bias", L.down_b, None)]
        for n, a, t in ts:
            if a is None or b + n in drop:
                continue
            raw_dtype = None if t is None or t in (T.F32, T.F16) else T(t)  # uint8 bytes need the type
            w.add_tensor(b + n, np.ascontiguousarray(a), raw_dtype=raw_dtype)
    for name, a, t in extra:
        w.add_tensor(name, a, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _qwen_layers(n, wtype, down_type, E=8, D=64, F=32, k=2, seed=0):
    out = []
    for i in range(n):
        L = random_layer(D, F, E, k, wtype=wtype, gpt_oss=False, seed=seed + i, index=i, skew=1.0)
        down = random_layer(D, F, E, k, wtype=down_type, gpt_oss=False, seed=100 + i).down
        out.append(dataclasses.replace(L, down=down))
    return out


@pytest.mark.parametrize("arch,wtype,down_type,norm_key,renorm", [
    ("qwen3moe", T.Q8_0, T.F16, None, True),
    ("qwen3moe", T.F16, T.Q8_0, False, False),
    ("llama", T.BF16, T.F32, None, True),  # Mixtral
])
def test_silu_archs_load(tmp_path, arch, wtype, down_type, norm_key, renorm):
    from gguf.constants import GGUFValueType as V
    layers = _qwen_layers(2, wtype, down_type)
    kv = {} if norm_key is None else {f"{arch}.expert_weights_norm": (norm_key, V.BOOL)}
    p = _write_moe(tmp_path / "m.gguf", arch, layers, kv=kv, n_ff_key=arch != "llama")
    m = load(p)
    assert (m.arch, m.n_layers, m.n_embd, m.n_ff, m.n_experts, m.k) == (arch, 2, 64, 32, 8, 2)
    x = np.random.default_rng(4).standard_normal((10, 64))
    for want, got in zip(layers, m.layers):
        assert (got.gating, got.activation, got.renormalize) == ("topk_softmax_all", "silu", renorm)
        assert got.gate_b is got.up_b is got.down_b is None
        assert (got.gate.ggml_type, got.down.ggml_type) == (wtype, down_type)
        for n in ("gate", "up", "down"):
            np.testing.assert_array_equal(getattr(got, n).raw, getattr(want, n).raw)
            assert isinstance(getattr(got, n).data, np.memmap)  # every type stays a view
        np.testing.assert_array_equal(got.router_w, want.router_w)
        for e in (0, 5):
            ref = quants.dequantize(np.ascontiguousarray(want.down.data[e]), down_type).astype(np.float32)
            np.testing.assert_array_equal(_bits(got.down.dequantize(e)), _bits(ref))
        expect = moe_reference(dataclasses.replace(want, renormalize=renorm), x)
        np.testing.assert_array_equal(moe_reference(got, x), expect)


def test_long_metadata_arrays_are_stepped_over(tmp_path):
    from gguf.constants import GGUFValueType as V
    rng = np.random.default_rng(8)
    tokens = ["".join(chr(c) for c in rng.integers(97, 123, rng.integers(0, 12))) + "\u00e9" * (i % 3)
              for i in range(3000)]
    arrays = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [1] * 3000,
              "tokenizer.ggml.scores": rng.standard_normal(500).tolist(), "qwen3moe.short": [3, 1, 2]}
    kv = {"general.after": ("still read", V.STRING)}
    p = _write_moe(tmp_path / "t.gguf", "qwen3moe", _qwen_layers(1, T.Q8_0, T.Q8_0), kv=kv, arrays=arrays)
    m = load(p)
    assert m.metadata_array_lengths == {"tokenizer.ggml.tokens": 3000, "tokenizer.ggml.token_type": 3000,
                                        "tokenizer.ggml.scores": 500}
    assert m.metadata["qwen3moe.short"] == [3, 1, 2] and m.metadata["general.after"] == "still read"
    assert m.metadata["qwen3moe.expert_count"] == 8 and len(m.layers) == 1
    data = p.read_bytes()
    cut = data.index(tokens[1500].encode()) if tokens[1500] else len(data) // 10
    p.write_bytes(data[:cut])
    with pytest.raises(GGUFError, match="truncated"):
        load(p)


def test_dense_blocks_are_skipped_not_dropped(tmp_path):
    layers = _qwen_layers(3, T.Q8_0, T.Q8_0)
    # Block 1 is a dense FFN: no router, no experts.
    drop = {f"blk.1.{n}" for n in ("ffn_gate_inp.weight", "ffn_gate_inp.bias", "ffn_gate_exps.weight",
                                   "ffn_up_exps.weight", "ffn_down_exps.weight")}
    dense = [("blk.1.ffn_up.weight", np.ones((32, 64), np.float32), None)]
    m = load(_write_moe(tmp_path / "d.gguf", "qwen3moe", layers, drop=drop, extra=dense))
    assert [L.index for L in m.layers] == [0, 2] and m.dense_blocks == [1]


# -- split files -------------------------------------------------------------------------

def test_split_files_load_as_one(tmp_path):
    kw = dict(n_layers=2, n_embd=64, n_ff=64, n_experts=8, k=2, n_vocab=64, seed=5)
    one = load(write_tiny(tmp_path / "one.gguf", **kw))
    first = write_tiny(tmp_path / "many.gguf", split_max_tensors=12, **kw)
    assert first.name == "many-00001-of-00004.gguf"
    m = load(first)
    assert len(m.paths) == 4 and len({t.part for t in m.tensors.values()}) == 4
    assert list(m.tensors) == list(one.tensors)
    for name in m.tensors:
        np.testing.assert_array_equal(_bits(m.tensor(name)), _bits(one.tensor(name)), err_msg=name)
    for a, b in zip(m.layers, one.layers):
        np.testing.assert_array_equal(a.down.raw, b.down.raw)
    assert load(tmp_path / "many-00003-of-00004.gguf").paths == m.paths  # any part finds the rest
    (tmp_path / "many-00003-of-00004.gguf").unlink()
    with pytest.raises(GGUFError, match="missing many-00003-of-00004.gguf"):
        load(first)
    with pytest.raises(GGUFError, match="missing"):
        split_paths(tmp_path / "many-00002-of-00004.gguf")


def test_split_part_renamed_is_refused(tmp_path):
    first = write_tiny(tmp_path / "s.gguf", n_layers=1, n_embd=64, n_ff=64, n_experts=8, k=2,
                       n_vocab=64, split_max_tensors=10)
    # The first part alone under a plain name: its split.count says there are others.
    first.rename(tmp_path / "plain.gguf")
    with pytest.raises(GGUFError, match="split.count = 3"):
        load(tmp_path / "plain.gguf")
    # Parts swapped: split.no disagrees with the name.
    a, b = tmp_path / "s-00002-of-00003.gguf", tmp_path / "s-00003-of-00003.gguf"
    (tmp_path / "plain.gguf").rename(tmp_path / "s-00001-of-00003.gguf")
    a.rename(tmp_path / "x")
    b.rename(a)
    (tmp_path / "x").rename(b)
    with pytest.raises(GGUFError, match="split.no = 1"):
        load(tmp_path / "s-00001-of-00003.gguf")


# -- bad files -----------------------------------------------------------------------------

def test_not_gguf(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGML" + bytes(100))
    with pytest.raises(GGUFError, match=r"a\.gguf: not a GGUF file"):
        load(tmp_path / "a.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load(tmp_path / "empty.gguf")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.gguf")


@pytest.mark.parametrize("frac", [0.002, 0.02, 0.5, 0.999])
def test_truncated(small, tmp_path, frac):
    data = small.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:max(8, int(len(data) * frac))])
    with pytest.raises(GGUFError, match=r"cut\.gguf: (truncated|corrupt)"):
        load(p)


def test_tensor_bytes_disagree_with_shape(tmp_path):
    # 16 float32 values stored, 64 declared: the next tensor is not where the shape says.
    w = GGUFWriter(tmp_path / "b.gguf", "qwen3moe")
    w.add_tensor("blk.0.bad.weight", np.ones(16, np.float32), raw_shape=(64,))
    w.add_tensor("blk.0.after.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = r"b\.gguf: .*after.* bytes stored for .blk\.0\.bad\.weight. .* do not match its type and shape"
    with pytest.raises(GGUFError, match=msg):
        load(tmp_path / "b.gguf")


def test_row_not_a_multiple_of_the_block(small, tmp_path):
    # Retype an F32 tensor whose rows are 64 long to Q4_K (256-element blocks) in the header.
    data = bytearray(small.read_bytes())
    name = b"blk.0.ffn_gate_inp.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    t_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[t_at:t_at + 4], "little") == T.F32
    data[t_at:t_at + 4] = int(T.Q4_K).to_bytes(4, "little")
    p = tmp_path / "r.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="not a multiple of the block size 256"):
        load(p)
    data[t_at:t_at + 4] = (999).to_bytes(4, "little")
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="unknown GGML type id 999"):
        load(p)


def test_non_moe_or_unsupported_arch(tmp_path):
    for arch, match in (("qwen2", "architecture 'qwen2' is not supported"),
                        ("llama", "not a Mixture-of-Experts model")):
        w = GGUFWriter(tmp_path / f"{arch}.gguf", arch)
        w.add_block_count(1)
        w.add_embedding_length(64)
        w.add_tensor("blk.0.ffn_up.weight", np.ones((32, 64), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(GGUFError, match=match):
            load(tmp_path / f"{arch}.gguf")


@pytest.mark.parametrize("drop", ["blk.1.ffn_up_exps.weight", "blk.0.ffn_down_exps.bias",
                                  "blk.1.ffn_gate_inp.weight"])
def test_missing_tensor(tmp_path, drop):
    layers = [random_layer(64, 32, 8, 2, seed=i, index=i) for i in range(2)]
    p = _write_moe(tmp_path / "g.gguf", "gpt-oss", layers, drop={drop})
    with pytest.raises(GGUFError, match=f"missing tensor.*{drop.replace('.', '[.]')}"):
        load(p)


def test_unsupported_expert_type(tmp_path):
    E, D, F = 4, 256, 32  # Q8_K (gguf knows it, no format decodes it) rows need 256 elements
    L = random_layer(D, F, E, 2, wtype=T.Q8_0, gpt_oss=False, seed=0)
    block, size = GGML_QUANT_SIZES[T.Q8_K]
    raw = np.random.default_rng(0).integers(0, 256, (E, F, D // block * size), dtype=np.uint8)
    q8k = ExpertTensor(raw, int(T.Q8_K), F, D)
    L = dataclasses.replace(L, gate=q8k, up=q8k)
    p = _write_moe(tmp_path / "q.gguf", "qwen3moe", [L])
    with pytest.raises(GGUFError, match=r"ffn_gate_exps.weight has type Q8_K; supported expert types"):
        load(p)


def _set_keys(path, **values):
    """Edit integer metadata in place through gguf's reader (r+ maps the file writable)."""
    r = GGUFReader(path, "r+")
    for key, v in values.items():
        r.fields[key.replace("__", ".")].parts[-1][0] = v
    r.data.flush()


def test_shapes_disagree_with_metadata(tmp_path):
    p = _write_moe(tmp_path / "k.gguf", "qwen3moe", _qwen_layers(1, T.Q8_0, T.Q8_0))
    _set_keys(p, qwen3moe__expert_used_count=9)
    with pytest.raises(GGUFError, match="expert_used_count = 9 is not in 1..8"):
        load(p)
    _set_keys(p, qwen3moe__expert_used_count=2, qwen3moe__expert_feed_forward_length=64)
    with pytest.raises(GGUFError, match=r"ffn_gate_exps.weight has shape \(8, 32, 64\).*expected \(8, 64, 64"):
        load(p)


def test_block_count_below_the_tensors_is_not_a_partial_model(tmp_path):
    p = _write_moe(tmp_path / "n.gguf", "qwen3moe", _qwen_layers(3, T.Q8_0, T.Q8_0))
    _set_keys(p, qwen3moe__block_count=2)
    with pytest.raises(GGUFError, match=r"block_count is 2 but the file has tensors of later blocks: blk\.2"):
        load(p)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupt_header_bytes_never_crash(small, data):
    """Random bytes in the header: the model loads, or a GGUFError says why."""
    raw = bytearray(small.read_bytes())
    header_end = raw.index(b"blk.0.ffn_down_exps.bias") + 64  # into the tensor infos
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(4, header_end))] = data.draw(st.integers(0, 255))
    p = small.with_name("fuzz.gguf")
    p.write_bytes(bytes(raw))
    try:
        m = load(p)
    except GGUFError:
        return
    assert m.layers and all(L.gate.raw.shape[0] == m.n_experts for L in m.layers)


def test_default_model_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_MOE_CACHE", str(tmp_path / "cache"))
    p = default_model_path()
    assert p == tmp_path / "cache" / "tiny-gpt-oss-32x4-tok.gguf" and not p.exists()
    assert ensure_default_model() == p and p.is_file()
    assert sorted(x.name for x in p.parent.iterdir()) == [p.name]  # no temp files left
    mtime = p.stat().st_mtime_ns
    assert ensure_default_model() == p and p.stat().st_mtime_ns == mtime
    m = load(p)
    assert (m.arch, len(m.layers), m.n_embd, m.n_experts, m.k) == ("gpt-oss", 4, 128, 32, 4)
    p.write_bytes(b"garbage")  # a damaged cache is rewritten
    assert load(ensure_default_model()).n_layers == 4


def test_write_tiny_stores_given_layers(tmp_path):
    seed = int(np.random.default_rng().integers(1 << 30))
    layers = [random_layer(64, 32, 8, 2, seed=seed + i, index=i) for i in range(2)]
    m = load(write_tiny(tmp_path / "given.gguf", n_layers=2, n_embd=64, n_ff=32, n_experts=8, k=2, layers=layers))
    for got, want in zip(m.layers, layers):
        assert np.array_equal(got.router_w, want.router_w) and np.array_equal(got.down_b, want.down_b)
        assert np.array_equal(got.gate.raw, want.gate.raw) and np.array_equal(got.down.raw, want.down.raw)
    with pytest.raises(ValueError, match="layers must be 3 MoELayers"):
        write_tiny(tmp_path / "bad.gguf", n_layers=3, n_embd=64, n_ff=32, n_experts=8, k=2, layers=layers)
