"""hybrid.kernels.cuda.experts on the simulator against the float64 reference (same routing).

Whole layers go through the scheduler's own device path (``HybridMoE.forward_routed``
on ``device="sim"``: plan, copies, waves of launches, reduce), so the tests run
the code a GPU runs; ``moe_launch`` is also driven directly over copy ranges.
Shapes are tiny: the simulator runs every GPU thread as a Python thread.
"""

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from hypothesis import given, settings, strategies as st
from numba import cuda

from cases import blockwise, one_per_block_size
from devices import DEVICE, DEVICE_TESTS, rel_tol
from hybrid.kernels.cuda import experts as K
from hybrid import random_layer
from hybrid.moe.reference import moe_reference, router_logits_reference
from hybrid.moe.routing import bucket, route
from hybrid.moe.scheduler import HybridMoE
from quant.registry import block_size, type_name

pytestmark = DEVICE_TESTS

# 16 threads, one pair row per thread (padding rows are skipped exactly).
SMALL = K.TileConfig(block_pairs=4, block_cols=32, k_chunk=64, thread_rows=1, thread_cols=8)
WIDE = K.TileConfig(block_pairs=4, block_cols=64, k_chunk=64, thread_rows=1, thread_cols=16)


def _routed(layer, n_tokens, seed=0):
    x = np.random.default_rng(seed).standard_normal((n_tokens, layer.n_embd)).astype(np.float32)
    logits = router_logits_reference(layer, x).astype(np.float32)
    ids, w = route(logits, layer.k, layer.gating, layer.renormalize)
    return x, ids, w


def _rel_err(out, ref):
    return np.abs(out - ref).max() / np.abs(ref).max()


def device_ffn(layer, x, ids, w, *, layout="natural", tiles=None, poison=None, launch_tiles=None):
    """The layer's experts on the device for a given routing, through the scheduler's path.
    ``poison`` (a byte) first fills every device slot, so tests can prove unused slots
    are never read (0xFF bytes are NaN)."""
    with HybridMoE([layer], device=DEVICE, min_offload_batch=1, tiles=tiles, layout=layout,
                   launch_tiles=launch_tiles) as moe:
        if poison is not None:
            for flat, _, _ in moe.engine.dev:
                flat.copy_to_device(np.full(flat.shape[0] * flat.dtype.itemsize, poison, np.uint8).view(flat.dtype))
        return moe.forward_routed(0, x, ids, w)


def _check(layer, x, ids, w, **kw):
    out = device_ffn(layer, x, ids, w, **kw)
    ref = moe_reference(layer, x, ids, w)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.isfinite(out).all()
    assert _rel_err(out, ref) < rel_tol(getattr(kw.get("tiles"), "math", "fma"))
    return out


# ------------------------------------------------------------------ correctness

@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_gpt_oss_matches_reference_k(k):
    layer = random_layer(64, 64, 8, k, seed=k)
    x, ids, w = _routed(layer, 3, seed=k)
    _check(layer, x, ids, w, tiles=SMALL)


def test_widths_not_multiples_of_the_tiles():
    # 96 and 160 are not multiples of 64 columns nor of a 64-wide K step.
    layer = random_layer(96, 160, 6, 2, seed=3)
    x, ids, w = _routed(layer, 2, seed=3)
    _check(layer, x, ids, w, tiles=WIDE)


def test_silu_without_biases():
    layer = random_layer(64, 64, 6, 2, seed=4, gpt_oss=False)
    assert layer.gate_b is None and layer.activation == "silu"
    x, ids, w = _routed(layer, 4, seed=4)
    _check(layer, x, ids, w, tiles=SMALL, layout="compact")


def test_one_token():
    layer = random_layer(64, 64, 8, 4, seed=5)
    x, ids, w = _routed(layer, 1, seed=5)
    _check(layer, x, ids, w, tiles=SMALL)


def test_every_token_to_one_expert():
    # 6 tokens on one expert: more pairs than a tile, so the expert spans two tiles.
    layer = random_layer(64, 64, 8, 1, seed=6)
    x, _, _ = _routed(layer, 6, seed=6)
    ids = np.full((6, 1), 5, np.int32)
    w = np.random.default_rng(6).uniform(0.2, 1.0, (6, 1)).astype(np.float32)
    _check(layer, x, ids, w, tiles=SMALL, layout="compact")


def test_default_tiles():
    layer = random_layer(64, 64, 4, 2, seed=7)
    x, ids, w = _routed(layer, 2, seed=7)
    _check(layer, x, ids, w)


@pytest.mark.parametrize("wtype,gpt_oss", [(T.Q8_0, False), (T.F32, True)])
def test_other_expert_types(wtype, gpt_oss):
    layer = random_layer(64, 64, 6, 2, seed=8, wtype=wtype, gpt_oss=gpt_oss)
    x, ids, w = _routed(layer, 3, seed=8)
    _check(layer, x, ids, w, tiles=SMALL, layout="compact", poison=0xFF)


# Blocks of 256 by K steps of 256 here (the K steps that split a block are the tile decoder's
# own test): 4 pairs x 16 columns, 8 threads.
WHOLE_256 = K.TileConfig(block_pairs=4, block_cols=16, k_chunk=256, thread_rows=1, thread_cols=8)


@pytest.mark.parametrize("wtype", one_per_block_size(blockwise(K.expert_types())), ids=type_name)
def test_expert_types_read_through_their_block_decoder(wtype):
    B = block_size(wtype)
    D = max(64, B)
    layer = random_layer(D, D, 3, 2, seed=9, wtype=wtype, gpt_oss=B == 32)
    x, ids, w = _routed(layer, 2, seed=9)
    _check(layer, x, ids, w, tiles=SMALL if B <= 64 else WHOLE_256, layout="compact", poison=0xFF)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(n_tokens=st.integers(1, 4), k=st.integers(1, 4), extra=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_random_routing_property(n_tokens, k, extra, seed):
    # Any routing (distinct experts per token, any weights) matches the reference.
    E = k + extra
    layer = random_layer(32, 64, E, k, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_tokens, 32)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(n_tokens)]).astype(np.int32)
    w = rng.uniform(-1.0, 1.0, (n_tokens, k)).astype(np.float32)
    _check(layer, x, ids, w, tiles=SMALL, layout="compact", poison=0xFF)


# ------------------------------------------------------------------ slots, poison, determinism

@pytest.fixture(scope="module")
def runs():
    """One routed batch with an unused expert, run clean and NaN-poisoned in both layouts."""
    layer = random_layer(64, 64, 8, 2, seed=9, skew=3.0)
    x, ids, w = _routed(layer, 4, seed=9)
    assert np.unique(ids).size < layer.n_experts  # some experts get no tokens
    out = {(layout, poison): device_ffn(layer, x, ids, w, tiles=SMALL, layout=layout, poison=poison)
           for layout in ("natural", "compact") for poison in (0x00, 0xFF)}
    out["again"] = device_ffn(layer, x, ids, w, tiles=SMALL, poison=0x00)
    out["per_range"] = device_ffn(layer, x, ids, w, tiles=SMALL, launch_tiles=1)  # one launch per copy range
    return layer, x, ids, w, out


def _bits(a):
    return a.view(np.uint32)


def test_layouts_match_reference(runs):
    layer, x, ids, w, out = runs
    assert _rel_err(out["natural", 0], moe_reference(layer, x, ids, w)) < 1e-5


def test_unused_slots_are_never_read(runs):
    *_, out = runs
    for layout in ("natural", "compact"):
        np.testing.assert_array_equal(_bits(out[layout, 0xFF]), _bits(out[layout, 0x00]))


def test_compact_equals_natural_bitwise(runs):
    *_, out = runs
    np.testing.assert_array_equal(_bits(out["compact", 0]), _bits(out["natural", 0]))


def test_two_runs_bit_identical(runs):
    *_, out = runs
    np.testing.assert_array_equal(_bits(out["again"]), _bits(out["natural", 0]))


def test_waves_and_per_range_launches_bit_identical(runs):
    *_, out = runs
    np.testing.assert_array_equal(_bits(out["per_range"]), _bits(out["natural", 0]))


# ------------------------------------------------------------------ moe_launch over copy ranges

MARK = np.float32(-12345.0)


def _device_setup(layer, ids, w, x, tiles):
    """Natural layout, every expert uploaded; scratch pre-filled with a marker."""
    T_, k = ids.shape
    bk = bucket(ids, layer.n_experts, tiles.block_pairs)
    d = dict(
        x_d=cuda.to_device(x), bk_d=K.DeviceBuckets.from_host(bk),
        gate_d=cuda.to_device(layer.gate.raw), up_d=cuda.to_device(layer.up.raw),
        down_d=cuda.to_device(layer.down.raw), gate_b_d=cuda.to_device(layer.gate_b),
        up_b_d=cuda.to_device(layer.up_b), down_b_d=cuda.to_device(layer.down_b),
        weights_d=cuda.to_device(w), act_d=cuda.to_device(np.full((T_ * k, layer.n_ff), MARK)),
        y_d=cuda.to_device(np.full((T_ * k, layer.n_embd), MARK)))
    kw = dict(n_embd=layer.n_embd, n_ff=layer.n_ff, k=k, activation=layer.activation, tiles=tiles,
              gate_type=layer.gate.ggml_type, down_type=layer.down.ggml_type, stream=0)
    return bk, d, kw


def _launch(d, kw, tb, te, slots):
    K.moe_launch(d["x_d"], d["bk_d"], tb, te, slots, d["gate_d"], d["up_d"], d["down_d"], d["gate_b_d"],
                 d["up_b_d"], d["down_b_d"], d["weights_d"], d["act_d"], d["y_d"], **kw)


@pytest.fixture(scope="module")
def launched():
    layer = random_layer(32, 64, 8, 2, seed=10, skew=2.0)
    x, ids, w = _routed(layer, 4, seed=10)
    return layer, x, ids, w


def test_launch_per_copy_range_then_reduce(launched):
    layer, x, ids, w = launched
    bk, d, kw = _device_setup(layer, ids, w, x, SMALL)
    used = bk.used
    split = used.size // 2
    first = d["bk_d"].tile_range(int(used[0]), int(used[split - 1]))
    second = d["bk_d"].tile_range(int(used[split]), int(used[-1]))
    slots = cuda.to_device(np.arange(layer.n_experts, dtype=np.int32))
    _launch(d, kw, *first, slots)
    # Only the pairs of the first range's experts have been written.
    y = d["y_d"].copy_to_host()
    done = np.isin(ids.reshape(-1), used[:split])
    assert (y[~done] == MARK).all() and (y[done] != MARK).all()
    _launch(d, kw, *second, slots)
    out_d = cuda.device_array((x.shape[0], layer.n_embd), np.float32)
    K.moe_reduce(d["y_d"], out_d, layer.k)
    out = out_d.copy_to_host()
    assert _rel_err(out, moe_reference(layer, x, ids, w)) < 1e-5
    np.testing.assert_array_equal(_bits(out), _bits(device_ffn(layer, x, ids, w, tiles=SMALL)))


def test_device_slot_outside_buffer_is_skipped(launched):
    # A device slot map is not read back for checking; a slot past the buffer
    # must make the kernels skip that expert, never read or write out of bounds.
    layer, x, ids, w = launched
    bk, d, kw = _device_setup(layer, ids, w, x, SMALL)
    bad = int(bk.used[0])
    slots = np.arange(layer.n_experts, dtype=np.int32)
    slots[bad] = 1000
    _launch(d, kw, 0, bk.n_tiles, cuda.to_device(slots))
    y = d["y_d"].copy_to_host()
    skipped = ids.reshape(-1) == bad
    assert (y[skipped] == MARK).all() and np.isfinite(y[~skipped]).all() and (y[~skipped] != MARK).all()


def test_empty_ranges(launched):
    layer, x, ids, w = launched
    bk, d, kw = _device_setup(layer, ids, w, x, SMALL)
    _launch(d, kw, 2, 2, np.arange(layer.n_experts, dtype=np.int32))
    assert (d["y_d"].copy_to_host() == MARK).all()


# ------------------------------------------------------------------ bad inputs

def test_bad_inputs_raise(launched):
    layer, x, ids, w = launched
    bk, d, kw = _device_setup(layer, ids, w, x, SMALL)
    slots = np.arange(layer.n_experts, dtype=np.int32)

    def launch(**over):
        args = dict(d, slots_d=slots, tile_begin=0, tile_end=bk.n_tiles)
        args.update({k: v for k, v in over.items() if k in args})
        kws = dict(kw, **{k: v for k, v in over.items() if k in kw})
        K.moe_launch(args["x_d"], args["bk_d"], args["tile_begin"], args["tile_end"], args["slots_d"],
                     args["gate_d"], args["up_d"], args["down_d"], args["gate_b_d"], args["up_b_d"],
                     args["down_b_d"], args["weights_d"], args["act_d"], args["y_d"], **kws)

    with pytest.raises(ValueError, match="tile range"):
        launch(tile_end=bk.n_tiles + 1)
    with pytest.raises(ValueError, match="tile range"):
        launch(tile_begin=3, tile_end=2)
    with pytest.raises(TypeError, match="tile_begin"):
        launch(tile_begin=0.0)
    with pytest.raises(ValueError, match="block_size"):
        launch(tiles=K.TileConfig(8, 32, 64, 2, 8))
    with pytest.raises(ValueError, match="k=3"):
        launch(k=3)
    with pytest.raises(TypeError, match="x_d must be float32"):
        launch(x_d=cuda.to_device(x.astype(np.float64)))
    with pytest.raises(ValueError, match="x_d has shape"):
        launch(x_d=cuda.to_device(x[:, :16].copy()))
    with pytest.raises(ValueError, match="act_d has shape"):
        launch(act_d=cuda.device_array((1, layer.n_ff), np.float32))
    with pytest.raises(ValueError, match="weights_d"):
        launch(weights_d=cuda.to_device(w[:, :1].copy()))
    with pytest.raises(ValueError, match="slot 8, outside the 8 device slots"):
        launch(slots_d=np.where(slots == bk.used[0], 8, slots).astype(np.int32))
    with pytest.raises(ValueError, match="slots must be int32"):
        launch(slots_d=slots.astype(np.int64))
    with pytest.raises(ValueError, match="gate_d: uint8 rows of 16 elements do not hold 32 MXFP4 columns"):
        launch(gate_d=cuda.to_device(layer.gate.raw[:, :, :-1].copy()))
    with pytest.raises(ValueError, match="up_d: float32 rows of 32 elements do not hold 32 MXFP4 columns"):
        launch(up_d=cuda.to_device(np.zeros((8, 64, 32), np.float32)))
    # the type is the caller's word, never a guess from the row size: MXFP4 bytes are no Q8_0 ...
    with pytest.raises(ValueError, match="gate_d: uint8 rows of 17 elements do not hold 32 Q8_0 columns"):
        launch(gate_type=T.Q8_0)
    with pytest.raises(ValueError, match="down_d: uint8 rows of 34 elements do not hold 64 F32 columns"):
        launch(down_type=T.F32)
    # ... and a type without CUDA tile decoder is refused by name
    with pytest.raises(NotImplementedError, match="not F16"):
        launch(gate_type=T.F16)
    with pytest.raises(ValueError, match="must agree"):
        launch(down_d=cuda.to_device(layer.down.raw[:4].copy()))
    with pytest.raises(ValueError, match="both be given"):
        launch(up_b_d=None)
    with pytest.raises(ValueError, match="down_b_d has shape"):
        launch(down_b_d=cuda.to_device(layer.gate_b))
    with pytest.raises(ValueError, match="activation"):
        launch(activation="relu")
    with pytest.raises(ValueError, match="must be positive"):
        launch(n_embd=0)
    # K must hold whole blocks of the format (MXFP4: 32), whatever the other shapes say
    P = x.shape[0] * layer.k
    with pytest.raises(ValueError, match="48 columns are no whole MXFP4 blocks of 32"):
        launch(n_embd=48, x_d=cuda.to_device(np.zeros((x.shape[0], 48), np.float32)),
               y_d=cuda.device_array((P, 48), np.float32))
    # and so must the tile's K step: 48 is a well-formed k_chunk, no multiple of MXFP4's block
    with pytest.raises(ValueError, match=r"k_chunk \(48\) must be a positive multiple of MXFP4's block of 32"):
        launch(tiles=K.TileConfig(4, 32, 48, 1, 8))
    with pytest.raises(TypeError, match="TileConfig"):
        launch(tiles=(4, 32, 64, 1, 8))
    with pytest.raises(ValueError, match="y_d has shape"):
        K.moe_reduce(d["y_d"], cuda.device_array((3, layer.n_embd), np.float32), layer.k)


def test_bad_device_path_inputs_raise(launched):
    layer, x, ids, w = launched
    with pytest.raises(ValueError, match="layout"):
        device_ffn(layer, x, ids, w, layout="sparse")
    with pytest.raises(TypeError, match="float32"):
        device_ffn(layer, x.astype(np.float64), ids, w)
    with pytest.raises(ValueError, match="ids must be"):
        device_ffn(layer, x, ids[:, :1], w)
    with pytest.raises(ValueError, match="outside"):
        device_ffn(layer, x, np.full_like(ids, 8), w, tiles=SMALL)
    f16 = random_layer(32, 32, 4, 2, wtype=T.F16)
    with pytest.raises(ValueError, match="F16"):
        device_ffn(f16, x[:, :32].copy(), ids % 4, w)


def test_bad_buckets_and_tiles_raise():
    bk = bucket(np.array([[0, 1], [1, 2]], np.int32), 4, 4)
    bad = bucket(np.array([[0, 1], [1, 2]], np.int32), 4, 4)
    bad.pairs[0] = 99
    with pytest.raises(ValueError, match="pairs hold values"):
        K.DeviceBuckets.from_host(bad)
    bad = bucket(np.array([[0, 1], [1, 2]], np.int32), 4, 4)
    bad.tile_expert[0] = 7
    with pytest.raises(ValueError, match="tile_expert"):
        K.DeviceBuckets.from_host(bad)
    with pytest.raises(TypeError, match="Buckets"):
        K.DeviceBuckets.from_host(bk.pairs)
    with pytest.raises(ValueError, match="expert range"):
        K.DeviceBuckets.from_host(bk).tile_range(2, 4)
    with pytest.raises(ValueError, match="multiple of 16"):
        K.TileConfig(k_chunk=40)
    with pytest.raises(ValueError, match="multiple of thread_rows"):
        K.TileConfig(block_pairs=6, thread_rows=4)
    with pytest.raises(ValueError, match="threads per block"):
        K.TileConfig(block_pairs=64, block_cols=128, thread_rows=1, thread_cols=1, k_chunk=32)
    with pytest.raises(ValueError, match="shared memory"):
        K.TileConfig(block_pairs=64, block_cols=128, k_chunk=64, thread_rows=8, thread_cols=8)
    with pytest.raises(ValueError, match="positive int"):
        K.TileConfig(block_pairs=0)


def test_padding_inside_a_tile_is_rejected():
    # The kernels take the real pairs of a tile to come first (padding only at
    # its tail): a hand-built layout with a sentinel before a real pair would
    # make them write act/y at row n_tokens*k, past the end.
    bad = bucket(np.array([[0, 1], [1, 2]], np.int32), 4, 4)
    t = bad.offsets[1] // 4  # expert 1's tile: pairs [1, 2, pad, pad]
    bad.pairs[t * 4:t * 4 + 4] = [1, bad.sentinel, bad.sentinel, 2]
    with pytest.raises(ValueError, match="padding"):
        K.DeviceBuckets.from_host(bad)
