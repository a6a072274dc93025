"""The scheduler on the simulator: every policy, layout, host mode and cache gives the reference."""
import numpy as np
import pytest

from hybrid.moe import copyplan
from hybrid.moe.cpu import F32_TILES as F32  # float32 activations: the CPU path checkable to rounding
from hybrid.kernels.cuda.experts import TileConfig
from hybrid.model.tiny import random_layer
from hybrid.moe.reference import moe_reference
from hybrid.moe.scheduler import HybridMoE, resolve_device

SHAPE = dict(n_embd=32, n_ff=64, n_experts=6, k=2)
# Few threads per block: the simulator runs each as a Python thread.
TILES = TileConfig(block_pairs=4, block_cols=32, k_chunk=32, thread_rows=1, thread_cols=8)


@pytest.fixture(scope="module")
def layers():
    return [random_layer(**SHAPE, seed=s, index=s, skew=2.0) for s in range(2)]


def hidden(n, seed=None):
    return np.random.default_rng(seed).standard_normal((n, SHAPE["n_embd"])).astype(np.float32)


def rel_err(a, ref):
    return np.abs(a - ref).max() / np.abs(ref).max()


def run(layers, xs, **kw):
    kw.setdefault("min_offload_batch", 4)
    kw.setdefault("tiles", TILES)
    with HybridMoE(layers, **kw) as moe:
        outs = []
        for x in xs:
            outs.append([moe.forward(i, x, cpu_tiles=F32) for i in range(len(layers))])
            moe.end_ubatch()
        return outs, moe.stats


CONFIGS = [
    dict(policy="all"),
    dict(policy="used"),
    dict(policy="used", overlap=False),
    dict(policy="used", layout="compact"),
    dict(policy="used", merge=copyplan.CostModel(latency_s=1.0, bandwidth_Bps=1e9)),  # merges every gap
    dict(policy="used", host="staged"),
    dict(policy="used", host="pageable"),
    dict(policy="used", cache_bytes=5 * 1),  # replaced below by a real size
    dict(policy="used", layout="compact", device_bytes=1),  # rounds; real size below
]


def sized(cfg, layers):
    per_expert = layers[0].expert_bytes
    cfg = dict(cfg)
    if "cache_bytes" in cfg:
        cfg["cache_bytes"] = 6 * per_expert
    if "device_bytes" in cfg:
        cfg["device_bytes"] = 2 * per_expert  # 2 slots: several rounds per ubatch
    return cfg


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_every_configuration_matches_the_reference(layers, cfg):
    cfg = sized(cfg, layers)
    xs = [hidden(6), hidden(5)]
    outs, stats = run(layers[:1], xs, device="sim", **cfg)
    for x, per_layer in zip(xs, outs):
        for L, out in zip(layers[:1], per_layer):
            assert out.dtype == np.float32 and out.shape == x.shape
            assert rel_err(out, moe_reference(L, x)) < 1e-5
    assert all(r.path == "offload" for r in stats.records)
    if "device_bytes" in cfg:
        assert max(r.rounds for r in stats.records) > 1
    if "merge" in cfg:  # one copy per tensor, from the first used expert to the last
        assert all(t.copies == 1 for r in stats.records for t in r.tensors)


def test_all_and_used_give_identical_bits_and_used_copies_less(layers):
    xs = [hidden(7, seed=1)]
    a, sa = run(layers, xs, device="sim", policy="all")
    u, su = run(layers, xs, device="sim", policy="used")
    c, _ = run(layers, xs, device="sim", policy="used", layout="compact", cache_bytes=10**6)
    for i in range(len(layers)):
        assert np.array_equal(a[0][i], u[0][i]) and np.array_equal(a[0][i], c[0][i])
    assert su.totals()["bytes"] < sa.totals()["bytes"]


def test_stats_equal_the_copy_plan(layers):
    x = hidden(7, seed=3)
    _, stats = run(layers[:1], [x], device="sim", policy="used")
    L = layers[0]
    from hybrid.moe.routing import bucket, route
    logits = x @ L.router_w.T + L.router_b
    ids, _ = route(logits, L.k, L.gating)
    used = bucket(ids, L.n_experts).used
    rec = stats.records[0]
    assert rec.used == used.size
    for t, tensor in zip(rec.tensors, (L.gate, L.up, L.down)):
        p = copyplan.plan(used, tensor.slab_bytes, L.n_experts)
        assert (t.copies, t.bytes, t.used, t.total) == (p.n_copies, p.total_bytes, used.size, L.n_experts)
    assert stats.usage_lines()[0] == f"blk.0.ffn_gate_exps.weight: {used.size}/{L.n_experts} experts used"


def test_cache_hits_skip_copies(layers):
    x = hidden(5, seed=4)
    per_expert = layers[0].expert_bytes
    outs, stats = run(layers, [x, x], device="sim", cache_bytes=12 * per_expert)
    first, second = stats.records[:2], stats.records[2:]
    assert all(r.hits == 0 for r in first) and all(r.hits == r.used and r.bytes == 0 for r in second)
    assert np.array_equal(outs[0][0], outs[1][0])
    with HybridMoE(layers[:1], device="cpu", cache_bytes=12 * per_expert, min_offload_batch=1) as moe:
        moe.forward(0, x)
        moe.reset()  # a new prompt starts cold: nothing resident, no stats
        assert moe.stats.records == []
        moe.forward(0, x)
        assert moe.stats.records[0].hits == 0 and moe.stats.records[0].bytes > 0


def test_unused_slots_poisoned_with_nan_change_nothing(layers):
    x = hidden(6, seed=5)
    with HybridMoE(layers[:1], device="sim", min_offload_batch=1, tiles=TILES) as moe:
        clean = moe.forward(0, x)
        for flat, _, _ in moe.engine.dev:
            flat.copy_to_device(np.full(flat.shape[0] * flat.dtype.itemsize, 0xFF, np.uint8).view(flat.dtype))
        poisoned = moe.forward(0, x)
    assert np.array_equal(clean, poisoned)


def test_small_batches_run_on_the_cpu_and_cpu_target_counts_copies(layers):
    x = hidden(3, seed=6)
    _, stats = run(layers, [x], device="sim", min_offload_batch=32)
    assert all(r.path == "cpu" and r.bytes == 0 for r in stats.records)
    big = hidden(6, seed=7)
    outs_cpu, s_cpu = run(layers, [big], device="cpu")
    outs_sim, s_sim = run(layers, [big], device="sim")
    assert [r.bytes for r in s_cpu.records] == [r.bytes for r in s_sim.records]
    for L, o in zip(layers, outs_cpu[0]):
        assert rel_err(o, moe_reference(L, big)) < 1e-5


def test_bad_arguments(layers):
    with pytest.raises(ValueError, match="device"):
        HybridMoE(layers, device="tpu")
    with pytest.raises(ValueError, match="policy"):
        HybridMoE(layers, device="cpu", policy="some")
    with pytest.raises(ValueError, match="cache_bytes"):
        HybridMoE(layers, device="cpu", cache_bytes=-1)
    with pytest.raises(ValueError, match="natural layout needs"):
        HybridMoE(layers, device="cpu", device_bytes=1000)
    with pytest.raises(ValueError, match="cannot hold one expert"):
        HybridMoE(layers, device="cpu", layout="compact", device_bytes=10)
    with pytest.raises(ValueError, match="host mode"):
        HybridMoE(layers, device="cpu", host="fast")
    from gguf.constants import GGMLQuantizationType as T
    f16 = [random_layer(**SHAPE, wtype=T.F16, seed=9)]
    with pytest.raises(ValueError, match="not F16; use device='cpu'"):
        HybridMoE(f16, device="sim")
    with pytest.raises(ValueError, match="merge"):
        HybridMoE(layers, device="cpu", layout="compact", merge=copyplan.CostModel(1e-5, 1e10))
    odd = random_layer(**{**SHAPE, "k": 3}, seed=9)
    with pytest.raises(ValueError, match="share"):
        HybridMoE([layers[0], odd], device="cpu")
    plain = random_layer(**SHAPE, gpt_oss=False, seed=9)  # no biases
    with pytest.raises(ValueError, match="share"):
        HybridMoE([layers[0], plain], device="cpu")
    with pytest.raises(ValueError, match="needs NUMBA_ENABLE_CUDASIM|selects the simulator"):
        resolve_device("cuda")
    moe = HybridMoE(layers, device="cpu")
    D = SHAPE["n_embd"]
    with pytest.raises(ValueError, match=rf"\[n_tokens, {D}\]"):
        moe.forward(0, np.zeros((4, D + 32), np.float32))
    with pytest.raises(TypeError, match="float32"):
        moe.forward(0, np.zeros((4, D), np.float64))
    with pytest.raises(ValueError, match="no tokens"):
        moe.forward(0, np.zeros((0, D), np.float32))
    with pytest.raises(ValueError, match="outside"):
        moe.forward(5, hidden(4))
    bad = hidden(4)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        moe.forward(0, bad)


from hypothesis import given, settings, strategies as st  # noqa: E402

from hybrid.moe.engine import fill_tiles, waves  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 15), min_size=1), st.integers(1, 6), st.data())
def test_property_each_wave_waits_for_the_copies_of_its_experts(used, min_tiles, data):
    # The simulator copies synchronously, so ordering is checked on the plan of launches:
    # every expert's tiles are launched exactly once, after the event of the range that
    # copies it; waves hold at least min_tiles tiles (but the last) and wait for no copy
    # later than the last one their experts need.
    experts = np.array(sorted(used), np.int32)
    missing = [e for e in experts.tolist() if data.draw(st.booleans())]  # the rest are cache hits
    runs = []
    for e in missing:
        if runs and runs[-1][1] == e - 1 and data.draw(st.booleans()):
            runs[-1][1] = e
        else:
            runs.append([e, e])
    events = [(f, l, i) for i, (f, l) in enumerate(runs)]  # event = its index in copy order
    counts = np.zeros(16, np.int64)
    counts[experts] = np.random.default_rng(len(experts)).integers(1, 3, experts.size)  # unused: no tiles
    tile_of = np.concatenate([[0], np.cumsum(counts)])
    need = {e: next((i for f, l, i in events if f <= e <= l), None) for e in experts.tolist()}
    for overlap in (True, False):
        launched = {}
        waited = -1  # the compute stream is in order: waits accumulate
        out = waves(experts, tile_of, events, overlap, min_tiles)
        for n, (lo, hi, ev) in enumerate(out):
            if ev is not None:
                waited = max(waited, ev)
            for t in range(lo, hi):
                assert t not in launched
                launched[t] = waited
            if overlap:
                if n < len(out) - 1:
                    assert hi - lo >= min_tiles
                wave_needs = [need[e] for e in experts.tolist() if lo <= tile_of[e] < hi and need[e] is not None]
                assert ev == (max(wave_needs) if wave_needs else None)
        for e in experts.tolist():
            for t in range(tile_of[e], tile_of[e + 1]):
                assert t in launched
                if need[e] is not None:
                    assert launched[t] >= need[e]
        if not overlap:
            assert len(out) == 1


def test_waves_fill_the_gpu():
    tiles = TileConfig()  # 64 columns per block
    # 45 blocks a tile at n_ff 2880; 132 SMs x 8 blocks = 1056 blocks: 24 tiles, 4 waves of ~90 tiles
    assert fill_tiles(tiles, 2880, 132) == 24
    assert fill_tiles(tiles, 64, 1) == 8 and fill_tiles(tiles, 2880, 1) == 1


# ------------------------------------------------------------------ the copy record

@pytest.mark.parametrize("cfg", [dict(), dict(layout="compact", device_bytes=2), dict(cache_bytes=4),
                                 dict(host="staged"), dict(merge=copyplan.CostModel(1.0, 1e9))],
                         ids=["natural", "rounds", "cache", "staged", "merge"])
def test_the_engine_executes_the_plan_and_stats_count_what_it_enqueued(layers, cfg, monkeypatch):
    cfg = {k: v * layers[0].expert_bytes if k in ("device_bytes", "cache_bytes") else v for k, v in cfg.items()}
    L = layers[0]
    with HybridMoE(layers[:1], device="sim", min_offload_batch=1, tiles=TILES, **cfg) as moe:
        plans, calls = [], []
        real_rounds, real_copy = moe._rounds, moe.engine.host.copy
        monkeypatch.setattr(moe, "_rounds", lambda *a: plans.append(real_rounds(*a)) or plans[-1])

        def spy(i, dev, src, dst, n, stream):
            calls[-1].append((i, src, dst, n))
            return real_copy(i, dev, src, dst, n, stream)
        monkeypatch.setattr(moe.engine.host, "copy", spy)
        for seed in (11, 12):  # two ubatches: with a cache the second hits
            calls.append([])
            moe.forward(0, hidden(6, seed=seed))
        assert len(plans) == len(calls) == len(moe.stats.records) == 2
        for rounds, sent, rec in zip(plans, calls, moe.stats.records):
            # The copies enqueued are the plan's rows, each for every tensor, in order.
            expect = [(t, f * per, d * per, (l - f + 1) * per) for r in rounds
                      for f, l, d in zip(r.first.tolist(), r.last.tolist(), r.dst_slot.tolist())
                      for t, (_, per, _) in enumerate(moe.engine.dev)]
            assert sent == expect
            # The statistics are what was enqueued, tensor by tensor.
            for t, (tr, c) in enumerate(zip(rec.tensors, L.copied())):
                mine = [x for x in sent if x[0] == t]
                assert tr.name == c.name
                assert (tr.copies, tr.bytes) == (len(mine), sum(x[3] for x in mine) * c.host.itemsize)
        if "cache_bytes" in cfg:
            assert moe.stats.records[1].bytes < moe.stats.records[0].bytes


def test_cpu_target_counts_the_plan_as_the_engine_would_enqueue(layers):
    x = hidden(6, seed=13)
    _, s_cpu = run(layers[:1], [x], device="cpu", layout="compact", device_bytes=2 * layers[0].expert_bytes)
    _, s_sim = run(layers[:1], [x], device="sim", layout="compact", device_bytes=2 * layers[0].expert_bytes)
    key = lambda s: [(t.name, t.copies, t.bytes) for r in s.records for t in r.tensors]  # noqa: E731
    assert key(s_cpu) == key(s_sim) and s_sim.records[0].rounds > 1


def test_forward_routed_validates_the_routing(layers):
    x = hidden(4, seed=14)
    ids = np.array([[0, 1], [1, 2], [2, 3], [3, 4]], np.int32)
    w = np.full((4, 2), 0.5, np.float32)
    with HybridMoE(layers[:1], device="cpu", min_offload_batch=1) as moe:
        out = moe.forward_routed(0, x, ids, w, cpu_tiles=F32)
        assert rel_err(out, moe_reference(layers[0], x, ids, w)) < 1e-5
        with pytest.raises(ValueError, match="ids must be"):
            moe.forward_routed(0, x, ids[:, :1], w)
        with pytest.raises(ValueError, match="outside"):
            moe.forward_routed(0, x, ids + 5, w)
        with pytest.raises(ValueError, match="repeat"):
            moe.forward_routed(0, x, np.zeros_like(ids), w)
        with pytest.raises(ValueError, match="weights must be float32"):
            moe.forward_routed(0, x, ids, w.astype(np.float64))
        bad = w.copy()
        bad[0, 0] = np.inf
        with pytest.raises(ValueError, match="NaN or inf"):
            moe.forward_routed(0, x, ids, bad)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="launch_tiles"):
            HybridMoE(layers[:1], device="cpu", launch_tiles=bad)


@pytest.mark.parametrize("host", ["staged", "pinned"])
def test_a_failed_copy_surfaces_in_forward(layers, host, monkeypatch):
    # staged copies run on a host thread; its error must reach the caller, not hang it.
    with HybridMoE(layers[:1], device="sim", min_offload_batch=1, tiles=TILES, host=host) as moe:
        def broken(*a, **k):
            raise OSError("read error in the memory map")
        monkeypatch.setattr(moe.engine.host, "copy", broken)
        with pytest.raises(OSError, match="read error"):
            moe.forward(0, hidden(6, seed=15))


def test_expert_copies_are_enqueued_before_the_uploads(layers, monkeypatch):
    # The hidden states, weights and buckets go up on the compute stream after the
    # first round's copies are enqueued: the experts never queue behind them.
    with HybridMoE(layers[:1], device="sim", min_offload_batch=1, tiles=TILES) as moe:
        log = []
        real_copy, real_upload = moe.engine.host.copy, moe.engine._upload
        monkeypatch.setattr(moe.engine.host, "copy", lambda *a: log.append("copy") or real_copy(*a))
        monkeypatch.setattr(moe.engine, "_upload", lambda *a: log.append("upload") or real_upload(*a))
        moe.forward(0, hidden(6, seed=16))
    assert log.count("upload") == 1 and log[0] == "copy" and log.index("upload") == len(log) - 1


def test_cpu_tiles_reach_the_cpu_path():
    from hybrid.moe import cpu
    layer = random_layer(64, 64, 8, 2, seed=int(np.random.default_rng().integers(1 << 30)))
    x = np.random.default_rng().standard_normal((1, 64)).astype(np.float32)
    f32 = F32
    with HybridMoE([layer], device="cpu") as moe:
        q8, exact = moe.forward(0, x), moe.forward(0, x, cpu_tiles=f32)
        with pytest.raises(TypeError, match="cpu_tiles must be a cpu.CpuTiles"):
            moe.forward(0, x, cpu_tiles="f32")
    ids, w = layer.route(x)
    assert np.array_equal(exact, cpu.moe_ffn_cpu(layer, x, ids, w, tiles=f32))
    assert np.array_equal(q8, cpu.moe_ffn_cpu(layer, x, ids, w))  # the default: int8 for one token
    assert not np.array_equal(q8, exact)


def test_hidden_states_on_the_device_stay_there(layers):
    # Device in -> device out: the router logits are computed on the device, the offload path
    # reads x in place, the CPU path (2 tokens < 4) takes x down and its result back up.
    # Router weights and x on a grid of 1/8 make every logit exact in float32 whatever the
    # summation order, so the routing is the numpy path's and the outputs are its bits.
    import dataclasses

    from numba import cuda

    from hybrid.kernels.cuda.dense import DenseTiles
    seed = int(np.random.default_rng().integers(1 << 30))
    on_grid = lambda a: (np.round(a * 8) / 8).astype(np.float32)  # noqa: E731
    ls = [dataclasses.replace(L, router_w=on_grid(L.router_w)) for L in layers]
    xs = {T: on_grid(hidden(T, seed + T)) for T in (6, 2)}
    router = DenseTiles(gemv_tokens=1, gemv_warps=1, gemv_rows=8, gemm=TILES)  # few threads: the simulator runs each
    for cfg, ls in ((dict(), ls), (dict(cache_bytes=3 * layers[0].expert_bytes), ls[:1])):
        with HybridMoE(ls, device="sim", min_offload_batch=4, tiles=TILES, dense_tiles=router, **cfg) as moe:
            for T, x in xs.items():
                for i, L in enumerate(ls):
                    want = moe.forward(i, x, cpu_tiles=F32)
                    x_d = cuda.to_device(x)
                    out = cuda.device_array_like(x)
                    assert moe.forward(i, x_d, out=out, cpu_tiles=F32) is out
                    got = out.copy_to_host()
                    assert np.array_equal(got, want) and rel_err(got, moe_reference(L, x)) < 1e-5, (cfg, seed)
                    assert np.array_equal(x_d.copy_to_host(), x)
                    a, b = moe.stats.records[-2:]
                    assert (a.path, a.used) == (b.path, b.used), (cfg, seed)
                    if not cfg:  # (the cache turns the second call's copies into hits)
                        assert a.copies == b.copies
                    assert b.path == ("offload" if T >= 4 else "cpu")
            moe.synchronize()
            assert all(r.times["compute"] > 0 for r in moe.stats.records)


def test_device_hidden_states_are_checked(layers):
    from numba import cuda
    x = hidden(5, seed=3)
    with HybridMoE(layers[:1], device="cpu") as moe:
        with pytest.raises(TypeError, match="need device='cuda' or 'sim'"):
            moe.forward(0, cuda.to_device(x))
    with HybridMoE(layers[:1], device="sim", min_offload_batch=4, tiles=TILES) as moe:
        with pytest.raises(TypeError, match="out is for hidden states on the device"):
            moe.forward(0, x, out=cuda.to_device(x))
        for bad_out, exc, match in ((cuda.device_array((4, 32), np.float32), ValueError, r"out must be \[n_tokens"),
                                    (cuda.device_array((5, 32), np.float64), TypeError, "out must be float32"),
                                    (np.zeros((5, 32), np.float32), TypeError, "out must be a device array")):
            with pytest.raises(exc, match=match):
                moe.forward(0, cuda.to_device(x), out=bad_out)
        with pytest.raises(ValueError, match=r"\[n_tokens, 32\]"):
            moe.forward(0, cuda.to_device(x[:, :16].copy()))
        with pytest.raises(ValueError, match="C-contiguous"):
            moe.forward(0, cuda.to_device(np.zeros((32, 5), np.float32)).T)
        for T in (5, 2):  # offload and CPU paths
            bad = hidden(T, seed=4)
            bad[1, 7] = np.nan
            with pytest.raises(ValueError, match="router logits hold NaN or inf"):
                moe.forward(0, cuda.to_device(bad))
