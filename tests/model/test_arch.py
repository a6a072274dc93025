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
    tr = Transformer(dense_first, n_ctx=16, n_ubatch=4, q8_decode=False)
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
@pytest.mark.parametrize("arch", WRITTEN)
def test_a_dense_layer_on_the_device(arch, tmp_path):
    from hybrid.model.tiny import simulator_tiles
    from hybrid.moe.scheduler import HybridMoE
    shape = dict(SHAPE, n_layers=2, n_embd=32, n_ff=32, n_experts=4, n_head=2, n_head_kv=1, n_vocab=40, n_swa=3)
    m = load(write_tiny(tmp_path / "m.gguf", arch=arch, seed=5, dense_blocks=(0,), **shape))
    toks = np.random.default_rng(1).integers(0, 40, 6)
    want = Transformer(m, n_ctx=6, n_ubatch=4, q8_decode=False).prefill(toks)
    t = simulator_tiles()
    moe = HybridMoE(m.layers, device="sim", min_offload_batch=4, tiles=t.moe, dense_tiles=t.dense)
    tr = Transformer(m, moe, n_ctx=6, n_ubatch=4, q8_decode=False, dense_tiles=t.dense, attention_config=t.attention)
    assert tr.on_device and tr.cfg.kinds[0] == "dense"
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
