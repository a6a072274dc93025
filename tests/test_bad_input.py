"""Bad input (issue 11): the NaN and overflow rules on every target, the full data check,
and the API edges that used to accept nonsense.

The NaN rule: router weights/biases and expert biases must be finite (checked when a
MoELayer is built, so at load); expert weights are scanned only by
``load(check_tensors=True)``; a non-finite value that reaches the compute anyway comes
out exactly where the float64 reference puts it, on the cpu and sim targets alike.
"""
import logging
import os

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from hybrid.model import GGUFError, load, write_tiny
from hybrid.model.tiny import random_layer
from hybrid.moe import copyplan, cpu
from hybrid.moe.reference import moe_reference
from hybrid.moe.cpu import F32_TILES, CpuTiles
from hybrid.moe.scheduler import HybridMoE
from hybrid.moe.stats import Stats
from quant import check as qcheck

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
needs_sim = pytest.mark.skipif(not SIM, reason="needs NUMBA_ENABLE_CUDASIM=1")


def _gpu():
    if SIM:
        return False
    from numba import cuda
    return cuda.is_available()


TARGETS = ["cpu", pytest.param("sim", marks=needs_sim),
           pytest.param("cuda", marks=pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU"))]
FLT_MAX = float(np.finfo(np.float32).max)
INT8_TILES = CpuTiles(q8_tokens=1 << 20)  # every expert on the integer path


def tiles():
    from hybrid.kernels.cuda.experts import TileConfig  # few threads per block: the simulator runs each as a thread
    return TileConfig(block_pairs=4, block_cols=32, k_chunk=32, thread_rows=1, thread_cols=8)


def forward(layer, x, target, cpu_tiles=F32_TILES):
    """The MoE output of ``layer`` through HybridMoE on ``target``, offloaded, with its routing
    (the CPU expert path in float32 by default: its finite values then match the reference)."""
    ids, w = layer.route(x)
    kw = dict(tiles=tiles()) if target == "sim" else {}  # (cuda: the default tiles)
    with HybridMoE([layer], device=target, min_offload_batch=1, **kw) as moe:
        out = moe.forward(0, x, cpu_tiles=cpu_tiles)
        assert moe.stats.records[0].path == "offload"
    return out, ids, w


def fresh_rng():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    return np.random.default_rng(seed), seed


def same_nonfinite(ours, ref, exact=True):
    """Non-finite values at the same places (``exact``: NaN, +inf and -inf each), finite ones close."""
    for f in ((np.isnan, np.isposinf, np.isneginf) if exact else (np.isfinite,)):
        if not np.array_equal(f(ours), f(ref)):
            return False
    fin = np.isfinite(ref)
    return not fin.any() or np.abs(ours[fin] - ref[fin]).max() <= 1e-4 * max(1.0, np.abs(ref[fin]).max())


# ------------------------------------------------------------------ the NaN rule, every target

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("where", ["gate_b", "up_b", "down_b", "gate", "up", "down", "q8_scale", "silu"])
def test_nonfinite_reaching_the_compute_propagates_as_in_the_reference(target, where):
    rng, seed = fresh_rng()
    wtype = T.Q8_0 if where == "q8_scale" else T.F32
    L = random_layer(32, 64, 5, 2, wtype=wtype, gpt_oss=where != "silu", seed=seed, skew=0.5)
    x = rng.standard_normal((12, 32)).astype(np.float32)
    ids, _ = L.route(x)
    e = int(ids[rng.integers(12), rng.integers(2)])  # an expert some token uses
    bad = rng.choice([np.nan, np.inf, -np.inf])
    if where.endswith("_b"):
        b = getattr(L, where)
        b[e, rng.integers(b.shape[1])] = bad  # changed after construction: only the compute can see it
    elif where == "q8_scale":
        t = L.up
        blk = rng.integers(t.raw.shape[2] // 34) * 34
        t.data[e, rng.integers(t.rows), blk:blk + 2] = np.array([bad], np.float16).view(np.uint8)
    else:
        t = getattr(L, "gate" if where == "silu" else where)
        t.data[e, rng.integers(t.rows), rng.integers(t.cols)] = bad
    out, ids, w = forward(L, x, target)
    ref = moe_reference(L, x, ids, w)
    if np.isnan(bad):  # (swiglu's clamps turn some infinities finite, in the reference too)
        assert np.isnan(ref).any(), f"seed {seed}: the poison must reach the reference"
    # An infinity may come out as NaN on one path and inf on another (g = -inf: the reference's
    # -inf/inf is NaN, the CPU's vector exp clamps its argument and gives -inf): non-finite
    # where the reference is, but only NaN is held to the exact place and kind.
    assert same_nonfinite(out, ref, exact=bool(np.isnan(bad))), \
        f"seed {seed}: {where}={bad} at expert {e}, target {target}"


@pytest.mark.parametrize("target", TARGETS)
def test_issue_example_nan_gate_bias_on_mxfp4(target):
    # The red-team case: MXFP4 experts (the CPU's direct and tile kernels), every gate bias NaN.
    rng, seed = fresh_rng()
    L = random_layer(64, 64, 4, 2, seed=seed)
    L.gate_b[:] = np.nan
    for n in (3, 40):  # few tokens per expert (direct kernel) and many (tile kernel)
        x = rng.standard_normal((n, 64)).astype(np.float32)
        out, ids, w = forward(L, x, target)
        assert np.isnan(out).all() and np.isnan(moe_reference(L, x, ids, w)).all(), f"seed {seed}"
        if target == "cpu":  # the integer path too: a NaN block's int8 scale is NaN
            assert np.isnan(forward(L, x, target, cpu_tiles=INT8_TILES)[0]).all(), f"seed {seed}"


@pytest.mark.parametrize("target", TARGETS)
def test_float32_overflow_is_inf_on_every_target(target):
    """Item 6: weights at the top of float32's range. The library computes in float32, as
    llama.cpp does: what overflows is inf (never hidden, never clamped away), although
    the float64 reference stays finite. MXFP4 exponent 252 is the largest at which every
    block decodes finite, so the full data check accepts it."""
    rng, seed = fresh_rng()
    L = random_layer(32, 32, 4, 2, seed=seed, skew=0.0)
    e = int(rng.integers(4))
    d = L.down.raw[e].reshape(32, -1, 17)
    d[:, :, 0] = qcheck.MXFP4_SAFE_EXPONENT
    d[:, :, 1:] = 0x77  # every element +12 * 2^124
    L.gate_b[e], L.up_b[e] = 5.0, 5.0  # activation > 0 on every row: each product overflows, +inf
    assert qcheck.first_bad(L.down.raw, T.MXFP4) is None
    x = (0.01 * rng.standard_normal((8, 32))).astype(np.float32)
    out, ids, w = forward(L, x, target)
    ref = moe_reference(L, x, ids, w)
    hit = (ids == e).any(axis=1)
    assert np.isfinite(ref).all() and (np.abs(ref[hit]) > FLT_MAX).all(), f"seed {seed}"
    assert np.isposinf(out[hit]).all() and np.isfinite(out[~hit]).all(), f"seed {seed}"
    if (~hit).any():
        assert np.abs(out[~hit] - ref[~hit]).max() < 1e-4 * np.abs(ref[~hit]).max(), f"seed {seed}"


@pytest.mark.parametrize("field", ["router_w", "router_b", "gate_b", "up_b", "down_b"])
def test_layers_refuse_nonfinite_router_and_biases(field):
    rng, seed = fresh_rng()
    L = random_layer(32, 32, 4, 2, seed=seed, index=3)
    a = getattr(L, field).copy()
    at = tuple(int(rng.integers(s)) for s in a.shape)
    a[at] = rng.choice([np.nan, np.inf, -np.inf])
    name = L.tensor_names()[field].replace(".", "[.]")
    with pytest.raises(ValueError, match=rf"{name} \({field}\) holds .*at \[{', '.join(map(str, at))}\]"):
        type(L)(**{**L.__dict__, field: a})
    # Changed after construction: routing refuses a NaN router (clean error, every target).
    if field.startswith("router"):
        getattr(L, field)[at] = np.nan
        with pytest.raises(ValueError, match="logits must be finite"):
            HybridMoE([L], device="cpu").forward(0, rng.standard_normal((4, 32)).astype(np.float32))


# ------------------------------------------------------------------ at load

@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("bad") / "good.gguf", n_layers=2, n_embd=64, n_ff=64,
                      n_experts=4, k=2, n_vocab=16, seed=7)




@pytest.mark.parametrize("name", ["blk.1.ffn_gate_inp.weight", "blk.0.ffn_gate_inp.bias",
                                  "blk.1.ffn_gate_exps.bias", "blk.0.ffn_up_exps.bias",
                                  "blk.1.ffn_down_exps.bias"])
def test_load_rejects_nonfinite_router_and_biases(good, tmp_path, name, edit_tensor):
    rng, _ = fresh_rng()
    bad = rng.choice([np.nan, np.inf, -np.inf])

    def edit(d):
        d.reshape(-1)[rng.integers(d.size)] = bad
    path = edit_tensor(good, tmp_path / f"{name}.gguf", name, edit)
    with pytest.raises(GGUFError, match=rf"{path.name}.*{name.replace('.', '[.]')}.*must be finite"):
        load(path)


def test_full_data_check_finds_what_loading_does_not_read(good, tmp_path, monkeypatch, edit_tensor):
    rng, seed = fresh_rng()
    e, r, b = (int(rng.integers(n)) for n in (4, 64, 2))
    exp = int(rng.choice([253, 254, 255]))

    def mx(d):
        d[e, r, b * 17:(b + 1) * 17] = [exp] + [0x77] * 16  # elements of 12: beyond float32 from 253
    cases = [
        ("blk.1.ffn_up_exps.weight", mx, rf"exponent {exp}.*expert {e}, row {r}, column {b * 32}\b"),
        ("blk.0.attn_q.bias", lambda d: d.__setitem__(int(rng.integers(d.size)), np.nan), "NaN or inf"),
        ("token_embd.weight", lambda d: d.__setitem__((int(rng.integers(16)), slice(0, 2)),
                                                      np.array([np.inf], np.float16).view(np.uint8)),
         "NaN or inf block scale"),
    ]
    # Loading alone reads no expert data: the check is never called.
    calls = []
    monkeypatch.setattr(qcheck, "first_bad", lambda *a: calls.append(a))
    load(good)
    assert calls == []
    monkeypatch.undo()
    assert load(good, check_tensors=True).n_layers == 2
    for name, edit, what in cases:
        path = edit_tensor(good, tmp_path / f"{name}.gguf", name, edit)
        assert load(path).n_layers == 2  # cheap load: not scanned
        with pytest.raises(GGUFError, match=rf"{name.replace('.', '[.]')}.*{what}"):
            load(path, check_tensors=True)
    with pytest.raises(TypeError, match="check_tensors"):
        load(good, check_tensors="yes")


def test_mxfp4_check_is_exactly_decodes_beyond_float32_or_0xff():
    from gguf import quants
    rng, seed = fresh_rng()
    for e in (0, 127, 200, 252, 253, 254, 255):
        for _ in range(20):
            blk = rng.integers(0, 256, (1, 17), dtype=np.uint8)
            blk[0, 0] = e
            with np.errstate(over="ignore"):
                finite = np.isfinite(quants.dequantize(blk, T.MXFP4)).all()
            assert (qcheck.first_bad(blk, T.MXFP4) is None) == (finite and e != 0xFF), f"seed {seed}: {blk}"
    # What gguf's own quantiser writes for finite weights, up to float32's max, always passes.
    for top in (1.0, 2.0**100, float(np.finfo(np.float32).max)):
        w = (rng.uniform(-1, 1, (8, 32)) * top).astype(np.float32)
        assert qcheck.first_bad(quants.quantize(w, T.MXFP4), T.MXFP4) is None, f"seed {seed}"


def test_load_names_folders_and_devices(tmp_path):
    with pytest.raises(GGUFError, match="is a directory"):
        load(tmp_path)
    if os.path.exists("/dev/null"):
        with pytest.raises(GGUFError, match="not a regular file"):
            load("/dev/null")
    with pytest.raises(FileNotFoundError, match="not found"):
        load(tmp_path / "nope.gguf")


# ------------------------------------------------------------------ API edges

@pytest.fixture(scope="module")
def layer():
    return random_layer(32, 32, 6, 2, seed=11)


def test_constructor_and_forward_refuse_wrong_types(layer):
    with pytest.raises(TypeError, match="stats"):
        HybridMoE([layer], device="cpu", stats=3)
    assert isinstance(HybridMoE([layer], device="cpu", stats=Stats()).stats, Stats)
    with pytest.raises(TypeError, match="tiles"):
        HybridMoE([layer], device="cpu", tiles="x")
    for v in (True, np.True_):
        with pytest.raises(ValueError, match="cache_bytes"):
            HybridMoE([layer], device="cpu", cache_bytes=v)
    x = np.random.default_rng().standard_normal((4, 32)).astype(np.float32)
    moe = HybridMoE([layer, random_layer(32, 32, 6, 2, seed=12, index=1)], device="cpu")
    for flag in (True, False, np.True_):
        with pytest.raises(TypeError, match="bool"):
            moe.forward(flag, x)
    assert moe.forward(np.int64(1), x).shape == x.shape
    for u in ("0", 1.0, True):
        with pytest.raises(TypeError, match="ubatch"):
            moe.forward(0, x, ubatch=u)


def test_cache_bytes_capped_at_what_the_model_can_use(layer, caplog):
    usable = 2 * layer.n_experts * layer.expert_bytes
    layers = [layer, random_layer(32, 32, 6, 2, seed=13, index=1)]
    with caplog.at_level(logging.INFO, logger="hybrid.moe.scheduler"):
        moe = HybridMoE(layers, device="cpu", cache_bytes=2**60)
    assert moe.cache_bytes == usable and moe.n_slots == 2 * layer.n_experts
    assert "capped" in caplog.text
    assert HybridMoE(layers, device="cpu", cache_bytes=usable - 1).cache_bytes == usable - 1
    x = np.random.default_rng().standard_normal((40, 32)).astype(np.float32)
    ref = cpu.moe_ffn_cpu(layer, x, *layer.route(x))
    assert np.array_equal(moe.forward(0, x), ref)


@pytest.mark.parametrize("target", TARGETS)
def test_forward_checks_once_and_calls_inside_trust_it(layer, target, monkeypatch):
    """Issue 9: the hidden states are checked for NaN once per ubatch, in forward; the CPU
    path and the device buckets are not re-validated behind it."""
    from hybrid.kernels.cpu import experts as kcpu
    from hybrid.kernels.cuda import experts as kernels

    def boom(*a, **k):
        raise AssertionError("re-validated inside forward")
    kw = dict(tiles=tiles()) if target == "sim" else {}
    with HybridMoE([layer], device=target, min_offload_batch=8, **kw) as moe:
        for mod, name in ((kcpu, "check_x"), (kcpu, "check_routing"), (cpu, "_check_tensor")):
            monkeypatch.setattr(mod, name, boom)
        monkeypatch.setattr(kernels, "_check_buckets", boom)
        for n in (3, 9):  # the CPU path, then offloaded
            x = np.random.default_rng().standard_normal((n, 32)).astype(np.float32)
            assert np.isfinite(moe.forward(0, x)).all()
            x[-1, 0] = np.nan
            with pytest.raises(ValueError, match="hidden states hold NaN"):
                moe.forward(0, x)
    with pytest.raises(AssertionError):  # the public entry points still check
        cpu.moe_ffn_cpu(layer, x, *layer.route(np.nan_to_num(x)))


def test_slot_runs_refuses_two_experts_in_one_slot():
    with pytest.raises(ValueError, match="experts 1 and 2 both go to slot 0"):
        copyplan.slot_runs([1, 2], [0, 0])
    with pytest.raises(ValueError, match="experts 3 and 9 both go to slot 5"):
        copyplan.slot_runs([0, 3, 9], [1, 5, 5])
    first, last, dst = copyplan.slot_runs([1, 2, 4], [3, 4, 0])
    assert first.tolist() == [1, 4] and last.tolist() == [2, 4] and dst.tolist() == [3, 0]


@needs_sim
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_device_path_refuses_nonfinite_weights_as_the_cpu_does(layer, bad):
    from hybrid.moe.scheduler import HybridMoE
    x = np.random.default_rng().standard_normal((3, 32)).astype(np.float32)
    ids, w = layer.route(x)
    w[1, 0] = bad
    with pytest.raises(ValueError, match="weights hold NaN or inf"):
        cpu.moe_ffn_cpu(layer, x, ids, w)
    with HybridMoE([layer], device="sim", min_offload_batch=1) as moe:
        with pytest.raises(ValueError, match="weights hold NaN or inf"):
            moe.forward_routed(0, x, ids, w)
