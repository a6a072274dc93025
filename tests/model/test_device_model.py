"""The device-resident model on the simulator: everything but the experts on the device.

Tiny random models of both architectures, small kernel tiles (the simulator runs a
Python thread per GPU thread, and each launch costs tenths of a second): a 6-token
prompt in ubatches of 4 (experts offloaded: min_offload_batch 4) and 2 (CPU experts),
then decode steps, which run the experts on the CPU. The logits must match the CPU
target's and the float64 reference; every policy, layout and cache budget gives the
same bits on a prompt ubatch. Prompts are drawn fresh each run; the seed is in every
failure message.
"""
import functools

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from hybrid.model import load, write_tiny
from hybrid.model.forward import Transformer
from hybrid.model.reference import forward_reference
from hybrid.model import arch as archs
from hybrid.model.tiny import TINY_PRE, simulator_tiles
from hybrid.model.vram import VRAMError
from hybrid.moe.scheduler import HybridMoE
from devices import DEVICE, DEVICE_TESTS

pytestmark = DEVICE_TESTS

SHAPE = dict(n_layers=2, n_embd=32, n_ff=32, n_experts=4, k=2, n_head=2, n_head_kv=1, head_dim=32, n_vocab=40,
             n_swa=3, skew=1.0)
_SIM = simulator_tiles()
TILES, DENSE, ATTENTION = _SIM.moe, _SIM.dense, _SIM.attention
N, UB = 6, 4  # prompt tokens, ubatch: ubatches of 4 (offloaded) and 2 (CPU experts)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    @functools.cache
    def case(arch):
        """The model, a fresh prompt, and what the CPU target and the float64 reference say of it."""
        m = load(write_tiny(tmp_path_factory.mktemp("m") / f"{arch}.gguf", arch=arch, seed=5,
                            dense_type=T.Q8_0 if arch == "gpt-oss" else T.F16, **SHAPE))
        seed = int(np.random.SeedSequence().entropy % 2**32)
        toks = np.random.default_rng(seed).integers(0, SHAPE["n_vocab"], N)
        cpu = Transformer(m, n_ctx=N, n_ubatch=UB, f32=True)
        steps = np.concatenate([cpu.prefill(toks[:UB])] + [cpu.decode_one_token(int(t))[None] for t in toks[UB:]])
        return m, toks, f"{arch}, seed {seed}", dict(full=cpu.prefill(toks), steps=steps,
                                                      ref=forward_reference(m, toks))
    return case


def close(a, b, msg, rel=2e-5):
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * float(np.abs(b).max()), err_msg=msg)


def sim_model(m, n_ctx=N, n_ubatch=UB, vram_bytes=None, min_offload_batch=UB, **moe_kw):
    moe = HybridMoE(m.layers, device=DEVICE, min_offload_batch=min_offload_batch, tiles=TILES, dense_tiles=DENSE,
                    **moe_kw)
    return Transformer(m, moe, n_ctx=n_ctx, n_ubatch=n_ubatch, f32=True, vram_bytes=vram_bytes,
                       dense_tiles=DENSE, attention_config=ATTENTION)


def per_expert(m):
    return m.layers[0].expert_bytes


WRITTEN = [n for n in archs.with_graph() if n in TINY_PRE]  # every architecture tiny.py writes


@pytest.mark.parametrize("arch", [n for n in WRITTEN if archs.REGISTRY[n].device_graph])
def test_device_logits_match_the_cpu_target_and_the_reference(cases, arch, monkeypatch):
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    m, toks, msg, want = cases(arch)
    tr = sim_model(m)
    assert tr.on_device
    downloads = []  # the shape of every device -> host copy
    real = FakeCUDAArray.copy_to_host
    with monkeypatch.context() as mp:
        mp.setattr(FakeCUDAArray, "copy_to_host", lambda a, *r, **k: downloads.append(tuple(a.shape)) or real(a, *r, **k))
        full = tr.prefill(toks)
    # Per layer only the router logits come down (the 2-token ubatch, on the CPU experts, also
    # its hidden states); then each ubatch's logits. No other host round trip.
    E, D, V = m.n_experts, SHAPE["n_embd"], SHAPE["n_vocab"]
    assert downloads == [(UB, E)] * 2 + [(UB, V)] + [(2, E), (2, D)] * 2 + [(2, V)], downloads
    assert full.dtype == np.float32 and full.shape == (N, SHAPE["n_vocab"])
    close(full, want["full"], msg, rel=1e-5)
    close(full, want["ref"], msg)
    assert np.abs(want["ref"][-1] - want["ref"][0]).max() > 1e-2 * np.abs(want["ref"]).max()  # not degenerate
    # Prefill then decode (the experts of 1-token steps on the CPU) equals the full forward;
    # the first ubatch, run twice, gives identical bits.
    steps = np.concatenate([tr.prefill(toks[:UB])] + [tr.decode_one_token(int(t))[None] for t in toks[UB:]])
    assert np.array_equal(steps[:UB], full[:UB]), msg
    close(steps, want["steps"], msg, rel=1e-5)
    close(steps, full, msg)
    paths = [(r.n_tokens, r.path) for r in tr.moe.stats.records]
    assert paths == [(UB, "offload")] * 2 + [(1, "cpu")] * 4, paths


@pytest.mark.parametrize("arch", [n for n in WRITTEN if not archs.REGISTRY[n].device_graph])
def test_without_device_attention_the_experts_still_offload(cases, arch):
    # deepseek2's MLA has no device kernels: attention stays on the host, the routed experts go
    # through routing, the copy plan and the device experts as for every architecture
    m, toks, msg, want = cases(arch)
    tr = sim_model(m)
    assert not tr.on_device and tr.moe.engine is not None
    close(tr.prefill(toks), want["full"], msg, rel=1e-5)
    assert [r.path for r in tr.moe.stats.records][:2] == ["offload"] * 2
    assert sum(r.copies for r in tr.moe.stats.records) > 0


def test_every_policy_layout_and_cache_gives_the_same_bits(cases):
    # The MoE engine does not depend on the architecture: gpt-oss (MXFP4 experts, biases) only.
    m, toks, msg, want = cases("gpt-oss")
    runs = {}
    for name, kw in {"all": dict(policy="all"),
                     "compact-rounds": dict(layout="compact", device_bytes=per_expert(m))}.items():
        tr = sim_model(m, **kw)
        runs[name] = tr.prefill(toks[:UB])
        if name == "compact-rounds":
            assert min(r.rounds for r in tr.moe.stats.records) > 1
    # The cache, with both ubatches offloaded: the second finds experts resident.
    tr = sim_model(m, cache_bytes=2 * m.n_experts * per_expert(m), min_offload_batch=2)
    runs["cache"] = tr.prefill(toks)
    assert sum(r.hits for r in tr.moe.stats.records) > 0 and {r.path for r in tr.moe.stats.records} == {"offload"}
    close(runs["cache"], want["full"], msg, rel=1e-5)
    assert np.array_equal(runs["all"], runs["compact-rounds"]) and np.array_equal(runs["all"], runs["cache"][:UB])
    close(runs["all"], want["full"][:UB], msg, rel=1e-5)


def test_decode_steps_offloaded_too(tmp_path):
    # min_offload_batch 1: every ubatch, decode steps included, runs the experts' CUDA kernels.
    m = load(write_tiny(tmp_path / "micro.gguf", n_layers=1, n_embd=32, n_ff=32, n_experts=4, k=2, n_head=1,
                        n_head_kv=1, head_dim=32, n_vocab=40, n_swa=3, seed=8))
    seed = int(np.random.SeedSequence().entropy % 2**32)
    toks = np.random.default_rng(seed).integers(0, 40, 6)
    out = {}
    for device in ("cpu", DEVICE):
        moe = HybridMoE(m.layers, device=device, min_offload_batch=1, tiles=TILES, dense_tiles=DENSE)
        tr = Transformer(m, moe, n_ctx=7, n_ubatch=3, f32=True, dense_tiles=DENSE, attention_config=ATTENTION)
        out[device] = np.concatenate([tr.prefill(toks), tr.decode_one_token(int(toks[0]))[None]])
        assert {r.path for r in moe.stats.records} == {"offload"} and tr.on_device == (device == DEVICE)
    close(out[DEVICE], out["cpu"], f"seed {seed}", rel=1e-5)


def test_vram_budget_is_checked_before_allocating_and_its_hints_fit(cases, monkeypatch):
    from numba import cuda
    m, toks, msg, _ = cases("gpt-oss")
    with monkeypatch.context() as mp:  # no backend given: nothing is allocated before the check
        for name in ("to_device", "device_array", "pinned_array", "stream"):
            mp.setattr(cuda, name, lambda *a, **k: pytest.fail("allocated before the VRAM check"))
        with pytest.raises(VRAMError) as e:
            Transformer(m, n_ctx=N, n_ubatch=UB, device=DEVICE, vram_bytes=1000)
    text = str(e.value)
    assert "does not fit in device memory" in text and f"KV cache (n_ctx {N}, n_ubatch {UB})" in text
    need = int(text.split("it needs ")[1].split(" bytes")[0].replace(",", ""))
    assert f"{need - 1000:,} bytes short" in text
    tr = Transformer(m, n_ctx=N, n_ubatch=UB, device=DEVICE, vram_bytes=need)  # exactly enough
    assert tr.on_device and tr.moe.device == DEVICE
    with pytest.raises(VRAMError, match=r"available: 1 bytes short"):
        Transformer(m, n_ctx=N, n_ubatch=UB, device=DEVICE, vram_bytes=need - 1)

    # A budget the default misses by a little: each hint, applied alone, must fit.
    short = 64
    with pytest.raises(VRAMError) as e:
        Transformer(m, n_ctx=N, n_ubatch=UB, device=DEVICE, vram_bytes=need - short)
    hints = dict(line.split(" -> ") for line in str(e.value).splitlines()[1:])
    by = {k.split(" (")[0].split(":")[0].strip(): v for k, v in hints.items()}
    assert by["dense weights"] == "fixed"
    n_ctx = int(by["KV cache"].split("-c ")[1].split()[0])
    assert n_ctx < N
    Transformer(m, n_ctx=n_ctx, n_ubatch=UB, device=DEVICE, vram_bytes=need - short)
    n_ub = int(by["ubatch scratch"].split("-ub ")[1].split()[0])
    assert n_ub < UB
    Transformer(m, n_ctx=N, n_ubatch=n_ub, device=DEVICE, vram_bytes=need - short)
    mb = float(by["MoE backend"].split("--device-mb ")[1].split()[0])
    moe = HybridMoE(m.layers, device=DEVICE, layout="compact", device_bytes=round(mb * 2**20))
    Transformer(m, moe, n_ctx=N, n_ubatch=UB, vram_bytes=need - short)
    # A built backend counts as allocated, and still counts against an explicit budget.
    with pytest.raises(VRAMError, match=r"\(allocated\)"):
        Transformer(m, HybridMoE(m.layers, device=DEVICE), n_ctx=N, n_ubatch=UB, vram_bytes=need - short)
    with pytest.raises(ValueError, match="vram_bytes must be"):
        Transformer(m, n_ctx=N, n_ubatch=UB, device=DEVICE, vram_bytes=-1)
