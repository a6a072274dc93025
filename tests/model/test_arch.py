"""The architecture registry: one table, one file each, the block written once. Every test runs for
every registered architecture that tiny.py can write (a new one is tested without editing a list)."""
import re
from pathlib import Path

import numpy as np
import pytest

from hybrid.model import arch as archs, config, gguf, load, write_tiny
from hybrid.model.config import read_config
from hybrid.model.forward import Transformer
from hybrid.model.gguf import GGUFError
from hybrid.model.reference import forward_reference
from hybrid.model.tiny import TINY_PRE

WRITTEN = [n for n in archs.with_graph() if n in TINY_PRE]
SHAPE = dict(n_layers=3, n_embd=64, n_ff=64, n_experts=8, k=2, n_vocab=300, n_head=4, n_head_kv=2,
             head_dim=32, n_swa=5, skew=1.0)


def close(a, b, msg, rel=2e-5):
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * float(np.abs(b).max()), err_msg=msg)


def test_one_table():
    assert gguf.ARCHS is config.ARCHS is archs.REGISTRY
    assert set(WRITTEN) >= {"gpt-oss", "qwen3moe"}
    for name, a in archs.REGISTRY.items():
        assert a.name == name and issubclass(a, archs.Arch)
    with pytest.raises(GGUFError, match="'nope' is not supported; supported MoE architectures: gpt-oss"):
        archs.get("nope")
    for name in set(archs.names()) - set(archs.with_graph()):
        with pytest.raises(GGUFError, match=f"{name!r} has no whole-model graph"):
            archs.get(name, graph=True)


def test_architecture_names_live_in_their_files():
    # No code outside hybrid/model/arch/ compares against an architecture's name.
    root = Path(__file__).resolve().parents[2] / "hybrid"
    names = "|".join(re.escape(n) for n in archs.names())
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?["']({names})["']|["']({names})["']\s*(==|!=)""")
    bad = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if "arch" not in p.parent.name
           for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not bad, bad


@pytest.fixture(scope="module", params=WRITTEN)
def dense_first(request, tmp_path_factory):
    """A model whose block 0 has a dense FFN (a leading dense layer), the others experts."""
    path = write_tiny(tmp_path_factory.mktemp("a") / f"{request.param}.gguf", arch=request.param, seed=7,
                      dense_blocks=(0,), **SHAPE)
    return load(path)


def test_kinds_are_read_from_the_tensors(dense_first):
    cfg = read_config(dense_first)
    shared = archs.get(dense_first.arch).shared != "none"
    moe = "moe_shared" if shared else "moe"
    assert cfg.kinds == ("dense", moe, moe) and cfg.n_ff_dense == 64 and cfg.n_ff_shexp == (64 if shared else 0)
    assert dense_first.dense_blocks == [0] and [L.index for L in dense_first.layers] == [1, 2]


def test_a_dense_layer_runs_against_the_float64_reference(dense_first):
    toks = np.random.default_rng(3).integers(0, 300, 11)
    tr = Transformer(dense_first, n_ctx=16, n_ubatch=4, f32=True)
    got = tr.prefill(toks)
    want = forward_reference(dense_first, toks)
    close(got, want, dense_first.arch)
    # the same logits one token at a time
    tr.prefill(toks[:8], logits="last")
    steps = np.stack([tr.decode_one_token(int(t)) for t in toks[8:]])
    close(steps, want[8:], dense_first.arch, rel=1e-4)
    # the MoE backend saw only the MoE blocks, one record per ubatch and MoE layer
    assert {r.layer for r in tr.moe.stats.records} == {1, 2}


def test_missing_dense_tensor_is_named(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", arch=WRITTEN[0], dense_blocks=(1,), **SHAPE)
    m = load(path)
    del m.tensors["blk.1.ffn_down.weight"]
    with pytest.raises(GGUFError, match=r"missing tensor blk\.1\.ffn_down\.weight"):
        Transformer(m)


def test_write_tiny_refuses_all_dense(tmp_path):
    with pytest.raises(ValueError, match="at least one block must be MoE"):
        write_tiny(tmp_path / "m.gguf", dense_blocks=(0, 1, 2), **SHAPE)


@pytest.mark.skipif(__import__("os").environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs the simulator")
@pytest.mark.parametrize("arch", [n for n in WRITTEN if archs.REGISTRY[n].leading_dense and archs.REGISTRY[n].device_graph])
def test_a_dense_layer_on_the_device(arch, tmp_path):
    # (the dense FFN's device path is the same for every architecture; each one's own device graph
    # is tests/model/test_device_model.py's, so the architectures with leading dense layers suffice)
    from hybrid.model.tiny import simulator_tiles
    from hybrid.moe.scheduler import HybridMoE
    shape = dict(SHAPE, n_layers=2, n_embd=32, n_ff=32, n_experts=4, n_head=2, n_head_kv=1, n_vocab=40, n_swa=3)
    m = load(write_tiny(tmp_path / "m.gguf", arch=arch, seed=5, dense_blocks=(0,), **shape))
    toks = np.random.default_rng(1).integers(0, 40, 6)
    want = Transformer(m, n_ctx=6, n_ubatch=4, f32=True).prefill(toks)
    t = simulator_tiles()
    moe = HybridMoE(m.layers, device="sim", min_offload_batch=4, tiles=t.moe, dense_tiles=t.dense)
    tr = Transformer(m, moe, n_ctx=6, n_ubatch=4, f32=True, dense_tiles=t.dense, attention_config=t.attention)
    # (an architecture without device kernels keeps attention on the host; its experts still offload)
    assert tr.on_device == archs.get(arch).device_graph and tr.cfg.kinds[0] == "dense"
    close(tr.prefill(toks), want, arch, rel=1e-5)
    close(want, forward_reference(m, toks), arch)


def test_moe_keys_are_read_where_the_architecture_reads_them():
    from gguf.constants import Keys
    from hybrid.moe.spec import MoESpec
    L = Keys.LLM

    class AllKeys(archs.Arch):  # not registered: only its key reading is under test
        name = "all-keys"
        moe_keys = frozenset({"gating", "norm", "scale", "groups"})

    meta = {L.EXPERT_GATING_FUNC: 2, L.EXPERT_WEIGHTS_NORM: True, L.EXPERT_WEIGHTS_SCALE: 2.5,
            L.EXPERT_GROUP_COUNT: 4, L.EXPERT_GROUP_USED_COUNT: 2}
    assert AllKeys.moe_spec(meta.get) == MoESpec(gating="sigmoid", norm=True, scale=2.5, n_group=4, topk_group=2,
                                                 activation="silu")
    assert AllKeys.moe_spec({L.EXPERT_WEIGHTS_SCALE: 0.0}.get).scale == 1.0  # llama.cpp's 0: no scale
    for bad, match in (({L.EXPERT_GATING_FUNC: 9}, "expert_gating_func = 9 is not a gating"),
                       ({L.EXPERT_WEIGHTS_SCALE: "x"}, "expert_weights_scale = 'x' is not a non-negative"),
                       ({L.EXPERT_GROUP_COUNT: 4, L.EXPERT_GROUP_USED_COUNT: 5}, "topk_group = 5")):
        with pytest.raises(GGUFError, match=match):
            AllKeys.moe_spec(bad.get, "f.gguf: ")
    # An architecture that does not read a key is not changed by it (llama.cpp's graph hard-codes it).
    for name in WRITTEN:
        a = archs.get(name)
        spec = a.moe_spec(meta.get)
        assert spec.gating == (a.gating if "gating" not in a.moe_keys else "sigmoid")
        assert spec.scale == (1.0 if "scale" not in a.moe_keys else 2.5)


def test_groups_that_do_not_fit_the_experts_are_one_clear_line(tmp_path):
    from hybrid.model.arch.base import REGISTRY

    class Grouped(archs.Arch, name="grouped-test"):
        moe_keys = frozenset({"groups"})
        tiny = dict(REGISTRY["qwen3moe"].tiny)
    try:
        path = write_tiny(tmp_path / "g.gguf", arch="qwen3moe", **SHAPE)
        m = load(path)
        m.metadata["grouped-test.expert_group_count"] = 3  # 8 experts in 3 groups
        m.metadata["grouped-test.expert_group_used_count"] = 1
        with pytest.raises(GGUFError, match="expert count 8 is not a multiple of the group count 3"):
            m.arch = "grouped-test"
            m.metadata = {k.replace("qwen3moe.", "grouped-test."): v for k, v in m.metadata.items()}
            m._read_hparams()
            m._layer(0)
    finally:
        del REGISTRY["grouped-test"]


VARIANTS = [(n, v) for n in WRITTEN for v in archs.REGISTRY[n].tiny.get("variants", ())[1:]]


@pytest.mark.parametrize("arch,variant", VARIANTS)
def test_variants_run_against_the_float64_reference(arch, variant, tmp_path):
    # deepseek2: "lite" (q without its low rank, softmax), "legacy" (attn_kv_b): the reference runs
    # the multi-head attention that MLA absorbs, so this checks the absorption too.
    m = load(write_tiny(tmp_path / "m.gguf", arch=arch, seed=3, variant=variant, dense_blocks=(0,), **SHAPE))
    toks = np.random.default_rng(4).integers(0, 300, 9)
    tr = Transformer(m, n_ctx=12, n_ubatch=4, f32=True)
    want = forward_reference(m, toks)
    close(tr.prefill(toks), want, f"{arch} {variant}")
    tr.prefill(toks[:6], logits="last")
    close(np.stack([tr.decode_one_token(int(t)) for t in toks[6:]]), want[6:], f"{arch} {variant}", rel=1e-4)


@pytest.mark.parametrize("arch", [n for n in WRITTEN if archs.REGISTRY[n].nextn])
def test_next_token_prediction_blocks_are_skipped(arch, tmp_path):
    m = load(write_tiny(tmp_path / "m.gguf", arch=arch, seed=2, n_nextn=1, dense_blocks=(0,), **SHAPE))
    cfg = read_config(m)
    assert (cfg.n_layer, cfg.n_layer_nextn, len(cfg.kinds)) == (3, 1, 3)
    assert [L.index for L in m.layers] == [1, 2] and "blk.3.nextn.eh_proj.weight" in m.tensors
    toks = np.random.default_rng(1).integers(0, 300, 7)
    close(Transformer(m, n_ctx=8, n_ubatch=8, f32=True).prefill(toks), forward_reference(m, toks), arch)


def _mla(tmp_path, **kw):
    return load(write_tiny(tmp_path / "mla.gguf", arch="deepseek2", seed=1, dense_blocks=(0,), **dict(SHAPE, **kw)))


def test_mla_cache_holds_the_latent_and_the_rope_key(tmp_path):
    m = _mla(tmp_path)
    cfg = read_config(m)
    kv, rope = cfg.kv_lora_rank, cfg.n_rot
    assert (cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v, cfg.head_dim_k_mla) == (1, kv + rope, kv, 48)
    tr = Transformer(m, n_ctx=16, n_ubatch=4)
    assert tr.cache.nbytes == 16 * cfg.n_layer * (kv + rope) * 4  # no per-head K or V
    toks = np.random.default_rng(0).integers(0, 300, 6)
    tr.prefill(toks)
    assert np.shares_memory(tr.cache.v[1], tr.cache.k[1])
    # a legacy file (attn_kv_b) caches the same latent, not n_head full keys and values
    assert Transformer(_mla(tmp_path, variant="legacy"), n_ctx=16, n_ubatch=4).cache.nbytes == tr.cache.nbytes


def test_mla_yarn_kq_scale_is_llama_cpps(tmp_path):
    cfg = read_config(_mla(tmp_path))
    f = 40.0  # tiny's YaRN factor; the file's yarn_log_multiplier is 0.1 * 0.707 (the converter's 0.1x)
    m = 1.0 + 0.1 * 0.707 * np.log(f)
    assert cfg.kq_scale == pytest.approx(m * m / np.sqrt(48), rel=1e-6)
    assert cfg.attn_factor == pytest.approx(1.0 / (1.0 + 0.1 * np.log(f)), rel=1e-6)


@pytest.mark.parametrize("key,value,match", [
    ("deepseek2.attention.key_length", 70, "MLA keys disagree"),
    ("deepseek2.attention.kv_lora_rank", 48, "MLA keys disagree"),
    ("deepseek2.attention.head_count_kv", 2, "MLA keys disagree"),
    ("deepseek2.attention.key_length_mla", 16, "leaves no dims beside the 16 rope dims"),
    ("deepseek2.leading_dense_block_count", 2, "leading_dense_block_count = 2, but the tensors make blocks"),
])
def test_mla_keys_that_disagree_are_one_clear_line(tmp_path, key, value, match):
    m = _mla(tmp_path)
    m.metadata[key] = value
    with pytest.raises(GGUFError, match=match):
        read_config(m)


def test_mla_missing_kv_lora_rank_is_named(tmp_path):
    m = _mla(tmp_path)
    del m.metadata["deepseek2.attention.kv_lora_rank"]
    with pytest.raises(GGUFError, match="kv_lora_rank is missing"):
        read_config(m)
    # an older file (attn_kv_b) with a wrong rank: the tensors' shapes say so
    m = _mla(tmp_path, variant="legacy")
    m.metadata["deepseek2.attention.kv_lora_rank"] = 48
    with pytest.raises(GGUFError, match=r"attn_kv_a_mqa\.weight has shape"):
        Transformer(m, n_ctx=8)


def test_glm4moe_optional_tensors_and_required_bias(tmp_path):
    path = write_tiny(tmp_path / "g.gguf", arch="glm4moe", seed=4, dense_blocks=(0,), **SHAPE)
    m = load(path)
    for il in range(3):  # GLM-4.5-Air has q/k/v biases and no q/k norms: both optional
        for n in ("attn_q_norm", "attn_k_norm"):
            del m.tensors[f"blk.{il}.{n}.weight"]
    toks = np.random.default_rng(2).integers(0, 300, 5)
    tr = Transformer(m, n_ctx=8, f32=True)
    assert tr.blocks[1].q_norm is None and tr.blocks[1].bq is not None
    close(tr.prefill(toks), forward_reference(m, toks), "glm4moe without q/k norms")
    m = load(path)
    del m.tensors["blk.1.exp_probs_b.bias"]
    with pytest.raises(GGUFError, match=r"missing tensor\(s\) blk\.1\.exp_probs_b\.bias"):
        m._layer(1)


@pytest.mark.skipif(not __import__("os").environ.get("LLAMACPP_DUMP_LOGITS"),
                    reason="needs llama.cpp: LLAMACPP_DUMP_LOGITS=<built examples/llamacpp/dump_logits.cpp>")
def test_every_architecture_against_llama_cpp(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("cmp", Path(__file__).parents[2] / "examples" / "compare_llamacpp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    worst = mod.main(["--all", "--tokenizer", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert worst < 2e-5, out  # F32 weights and KV cache: float32 rounding only
    assert "DIFFERENT" not in out and out.count("| 1.00 |") == len(list(mod.cases())), out


def test_expert_types_may_differ_between_layers(tmp_path):
    # llama.cpp's Q4_K_M gives some layers' ffn_down Q6_K: the CPU path and the device path (each
    # layer its own view of the slots) run such files as they are; the expert cache, whose slots
    # outlive a layer, refuses them with a line that says so.
    from gguf.constants import GGMLQuantizationType as T
    from hybrid.model.tiny import random_layer
    from hybrid.moe.scheduler import HybridMoE
    types = (T.Q8_0, T.Q4_0, T.Q5_1)
    layers = [random_layer(64, 64, 8, 2, wtype=t, gpt_oss=False, seed=i, index=i, skew=0.0)
              for i, t in enumerate(types)]
    m = load(write_tiny(tmp_path / "mixed.gguf", arch="qwen3moe", layers=layers, **SHAPE))
    assert [L.down.ggml_type for L in m.layers] == [int(t) for t in types]
    toks = np.random.default_rng(6).integers(0, 300, 9)
    tr = Transformer(m, n_ctx=12, n_ubatch=4, f32=True)
    close(tr.prefill(toks), forward_reference(m, toks), "mixed expert types")
    if __import__("os").environ.get("NUMBA_ENABLE_CUDASIM") == "1":  # the expert path (the rest of
        # the device graph reads no expert type)
        from hybrid.kernels.cuda.experts import TileConfig
        x = np.random.default_rng(7).standard_normal((2, m.layers[0].n_embd)).astype(np.float32)
        from hybrid.kernels.cpu.experts import F32_TILES
        with HybridMoE(m.layers, device="cpu") as cpu:  # float32 activations, as the device's
            want = [cpu.forward(i, x, cpu_tiles=F32_TILES) for i in range(len(m.layers))]
        small = TileConfig(block_pairs=4, block_cols=32, k_chunk=64, thread_rows=1, thread_cols=8)
        # slots from a pool, fewer than the experts used: rounds, and each layer's slots at its own size
        with HybridMoE(m.layers, device="sim", min_offload_batch=1, tiles=small, layout="compact",
                       device_bytes=3 * max(L.expert_bytes for L in m.layers)) as moe:
            for i, w in enumerate(want):
                close(moe.forward(i, x), w, f"block {i} ({types[i].name}) on the device", rel=1e-5)
            assert {r.path for r in moe.stats.records} == {"offload"}
        with pytest.raises(ValueError, match="mixes them .*block 0 Q8_0/Q8_0/Q8_0, block 1 Q4_0.*--cache-mb 0"):
            HybridMoE(m.layers, device="sim", cache_bytes=10**6)
