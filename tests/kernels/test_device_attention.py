"""hybrid.kernels.cuda.attention on the simulator: against ops.attention (with the host KVCache)
and a float64 attention written here from the formula over every position ever stored.

Shapes are tiny (the simulator runs every GPU thread as a Python thread); small tiles
make a few tokens span several row tiles, several key tiles, partial tiles and key splits.
"""
import math

import numpy as np
import pytest
from numba import cuda

from hybrid.model import ops
from hybrid.model.config import Config
from hybrid.kernels.cuda.attention import (MAX_SPLITS, AttentionConfig, AttentionTiles, DeviceKVCache, attention,
                                           launch_plan)
from hybrid.model.kvcache import KVCache, kv_sizes
from devices import DEVICE_TESTS

pytestmark = DEVICE_TESTS

# Rows in tiles of 4 (narrow, up to 4 rows) or 8 (wide), keys in tiles of 4 or 8, splits of 4+ keys.
SMALL = AttentionConfig(wide=AttentionTiles(rows=8, keys=8, thread_rows=2, thread_keys=2),
                        narrow=AttentionTiles(rows=4, keys=4, thread_rows=2, thread_keys=2),
                        narrow_rows=4, target_blocks=64, split_keys=4)


def make_cfg(n_head=4, n_head_kv=2, head_dim=8, head_dim_v=8, n_swa=5, swa_layers=(False, True)):
    return Config(arch="gpt-oss", n_layer=len(swa_layers), n_embd=n_head * head_dim, n_vocab=16, n_ctx_train=64,
                  n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v, n_rot=head_dim,
                  rms_eps=1e-5, rope_freq_base=1e4, rope_freq_base_swa=1e4, freq_scale=1.0, ext_factor=0.0,
                  attn_factor=1.0, beta_fast=32.0, beta_slow=1.0, n_ctx_orig=64, n_swa=n_swa,
                  swa_layers=tuple(swa_layers), qkv_bias=True, sinks=True, qk_norm=False,
                  ffn_norm="post_attention_norm", kq_scale=1 / math.sqrt(head_dim))


def attention_f64(q, K, V, pos0, scale, n_swa, sinks):
    """Float64 attention of queries at pos0.. against keys K, V at positions 0..len(K)-1."""
    T, H, _ = q.shape
    r = H // K.shape[1]
    out = np.zeros((T, H, V.shape[2]))
    for t in range(T):
        p1 = pos0 + t
        seen = [p0 for p0 in range(p1 + 1) if not (n_swa and p1 - p0 >= n_swa)]
        for h in range(H):
            z = [float(np.dot(q[t, h].astype(np.float64), K[p0, h // r].astype(np.float64))) * scale for p0 in seen]
            m = max(z + ([float(sinks[h])] if sinks is not None else []))
            e = [math.exp(x - m) for x in z]
            den = sum(e) + (math.exp(float(sinks[h]) - m) if sinks is not None else 0.0)
            for w, p0 in zip(e, seen):
                out[t, h] += w / den * V[p0, h // r].astype(np.float64)
    return out.reshape(T, -1)


def run_steps(cfg, steps, n_ctx, n_ubatch, sinks, scale, config=SMALL, q_gain=1.0, seed=0):
    """Store and attend ubatches of ``steps`` tokens on every layer, host and device side by side;
    yields (il, pos0, T, device out, ops.attention out, float64 out)."""
    rng = np.random.default_rng(seed)
    H, Hkv, d, dv = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
    host, dev = KVCache(cfg, n_ctx, n_ubatch), DeviceKVCache(cfg, n_ctx, n_ubatch)
    d_sinks = cuda.to_device(sinks) if sinks is not None else None
    K_all = [np.zeros((0, Hkv, d), np.float32) for _ in range(cfg.n_layer)]
    V_all = [np.zeros((0, Hkv, dv), np.float32) for _ in range(cfg.n_layer)]
    pos0 = 0
    for T in steps:
        for il in range(cfg.n_layer):
            q = (rng.standard_normal((T, H, d)) * q_gain).astype(np.float32)
            k = rng.standard_normal((T, Hkv, d)).astype(np.float32)
            v = rng.standard_normal((T, Hkv, dv)).astype(np.float32)
            K_all[il], V_all[il] = np.concatenate([K_all[il], k]), np.concatenate([V_all[il], v])
            n_swa = cfg.n_swa if cfg.swa_layers[il] else 0
            host.store(il, pos0, k, v)
            Kw, Vw, kpos = host.window(il, pos0, T)
            ref = ops.attention(q, Kw, Vw, np.arange(pos0, pos0 + T), kpos, scale, n_swa, sinks)
            dev.store(il, pos0, cuda.to_device(k), cuda.to_device(v))
            out = attention(dev, il, cuda.to_device(q), pos0, scale, n_swa, d_sinks, config=config).copy_to_host()
            yield il, pos0, T, out, ref, attention_f64(q, K_all[il], V_all[il], pos0, scale, n_swa, sinks)
        pos0 += T
        dev.n_past = host.n_past = pos0


# Prompt ubatches of 5, 5 and 3 tokens, then decode steps: the SWA ring (5 + 5 = 10 slots) wraps
# from position 10 on; rows span several tiles and decode steps split their keys.
STEPS = (5, 5, 3, 1, 1, 1)


@pytest.mark.parametrize("n_head,n_head_kv,with_sinks", [(2, 2, True), (4, 2, False), (6, 2, True)])
def test_prefill_and_decode_match_references(n_head, n_head_kv, with_sinks):
    cfg = make_cfg(n_head=n_head, n_head_kv=n_head_kv)
    rng = np.random.default_rng(1)
    sinks = (rng.standard_normal(n_head) * 2).astype(np.float32) if with_sinks else None
    assert kv_sizes(cfg, 20, 5) == [20, 10]
    plans = []
    for il, pos0, T, out, ref, ref64 in run_steps(cfg, STEPS, 20, 5, sinks, cfg.kq_scale):
        assert out.shape == (T, n_head * cfg.head_dim_v) and out.dtype == np.float32
        assert np.abs(out - ref).max() < 1e-5, (il, pos0)
        assert np.abs(out - ref64).max() < 1e-5, (il, pos0)
        n_swa = cfg.n_swa if cfg.swa_layers[il] else 0
        plans.append(launch_plan(cfg, T, pos0 + T - (max(0, pos0 - n_swa + 1) if n_swa else 0), SMALL))
    # the launches these steps made: split keys, several row tiles, both tile shapes
    assert any(p.n_splits > 1 for p in plans)
    assert any(p.row_tiles > 1 for p in plans) or n_head == n_head_kv
    assert {p.tiles.rows for p in plans} == ({4, 8} if n_head // n_head_kv <= 4 else {8})


def test_large_logits_and_sinks_stay_finite():
    # Logits of a few hundred overflow exp in float32 unless the max is subtracted; a sink far above
    # every logit takes nearly all the probability.
    cfg = make_cfg(n_head=4, n_head_kv=1, swa_layers=(True,), n_swa=3)
    sinks = np.array([40.0, -40.0, 0.0, 5.0], np.float32)
    for il, pos0, T, out, ref, ref64 in run_steps(cfg, (4, 2, 1), 12, 4, sinks, 2.0, q_gain=12.0, seed=3):
        assert np.isfinite(out).all()
        assert np.abs(out - ref64).max() < 1e-5 * max(1.0, np.abs(ref64).max())
        assert np.abs(out - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())


def test_default_config_prompt_and_decode():
    # The tiles and split policy a GPU runs: a decode step at 512 keys splits them in two
    # (split_keys 256); 40 tokens of 2 heads are 80 rows, past narrow_rows: wide tiles.
    cfg = make_cfg(n_head=2, n_head_kv=1, head_dim=8, head_dim_v=4, swa_layers=(False,))
    n = 511
    plan = launch_plan(cfg, 1, n + 1)
    assert plan.tiles.rows == 8 and plan.n_splits == 2
    assert launch_plan(cfg, 40, 100).tiles.rows == 32
    rng = np.random.default_rng(5)
    K = rng.standard_normal((n + 1, 1, 8)).astype(np.float32)
    V = rng.standard_normal((n + 1, 1, 4)).astype(np.float32)
    dev = DeviceKVCache(cfg, 600, 256)
    for p, e in ((0, 256), (256, n), (n, n + 1)):
        dev.store(0, p, cuda.to_device(K[p:e]), cuda.to_device(V[p:e]))
    q = rng.standard_normal((1, 2, 8)).astype(np.float32)
    out = attention(dev, 0, cuda.to_device(q), n, 0.25).copy_to_host()
    assert np.abs(out - attention_f64(q, K, V, n, 0.25, 0, None)).max() < 1e-5
    q = rng.standard_normal((40, 2, 8)).astype(np.float32)  # positions 60..99, cache restarted
    dev.clear()
    stream = cuda.stream()  # on a stream of its own, into a given output
    dev.store(0, 0, cuda.to_device(K[:100], stream=stream), cuda.to_device(V[:100], stream=stream), stream=stream)
    out = cuda.device_array((40, 8), np.float32)
    assert attention(dev, 0, cuda.to_device(q, stream=stream), 60, 0.25, out=out, stream=stream) is out
    stream.synchronize()
    assert np.abs(out.copy_to_host() - attention_f64(q, K[:100], V[:100], 60, 0.25, 0, None)).max() < 1e-5


def test_store_places_positions_in_ring_slots():
    cfg = make_cfg(swa_layers=(True, False), n_swa=3)  # ring of 3 + 4 = 7 slots on layer 0
    host, dev = KVCache(cfg, 30, 4), DeviceKVCache(cfg, 30, 4)
    assert dev.size == host.size == [7, 30]
    rng = np.random.default_rng(2)
    pos0 = 0
    for T in (4, 4, 3, 4):  # the third and fourth ubatch cross the wrap
        for il in range(2):
            k = rng.standard_normal((T, 2, 8)).astype(np.float32)
            v = rng.standard_normal((T, 2, 8)).astype(np.float32)
            host.store(il, pos0, k, v)
            dev.store(il, pos0, cuda.to_device(k), cuda.to_device(v))
            written = np.arange(pos0, pos0 + T) % host.size[il]
            np.testing.assert_array_equal(dev.k[il].copy_to_host()[written], host.k[il][written])
            np.testing.assert_array_equal(dev.v[il].copy_to_host()[written], host.v[il][written])
        pos0 += T
    assert sum(a.nbytes for a in dev.k + dev.v) == host.nbytes
    extra = dev.part_acc.nbytes + dev.part_m.nbytes + dev.part_l.nbytes + dev.no_sinks.nbytes
    assert dev.nbytes == DeviceKVCache.nbytes_for(cfg, 30, 4) == host.nbytes + extra
    assert dev.part_acc.shape == (MAX_SPLITS * cfg.n_head, cfg.head_dim_v)


def test_bad_input():
    cfg = make_cfg()
    dev = DeviceKVCache(cfg, 12, 4)
    f32 = lambda *s: cuda.to_device(np.zeros(s, np.float32))  # noqa: E731
    k, v, q = f32(3, 2, 8), f32(3, 2, 8), f32(3, 4, 8)
    with pytest.raises(TypeError, match="device array"):
        dev.store(0, 0, np.zeros((3, 2, 8), np.float32), v)
    with pytest.raises(TypeError, match="float32"):
        dev.store(0, 0, cuda.to_device(np.zeros((3, 2, 8))), v)
    with pytest.raises(ValueError, match="shape"):
        dev.store(0, 0, k, f32(3, 2, 7))
    with pytest.raises(ValueError, match="shape"):
        dev.store(0, 0, f32(3, 16), v)
    with pytest.raises(ValueError, match="do not fit"):
        dev.store(0, 0, f32(5, 2, 8), f32(5, 2, 8))  # T > n_ubatch
    with pytest.raises(ValueError, match="layer"):
        dev.store(2, 0, k, v)
    with pytest.raises(TypeError, match="pos0"):
        dev.store(0, 0.0, k, v)
    with pytest.raises(ValueError, match="unstored"):
        dev.store(0, 3, k, v)  # a gap: positions 0..2 never stored
    with pytest.raises(ValueError, match="stored first"):
        attention(dev, 0, q, 0, 0.3)  # keys not stored yet
    for il in range(2):
        for p in (0, 3, 6):
            dev.store(il, p, k, v)
    with pytest.raises(ValueError, match="do not fit"):
        dev.store(0, 10, k, v)  # beyond n_ctx
    with pytest.raises(ValueError, match="do not fit"):
        attention(dev, 0, q, 10, 0.3)
    with pytest.raises(ValueError, match="do not fit"):
        attention(dev, 0, q, -1, 0.3)
    with pytest.raises(TypeError, match="device array"):
        attention(dev, 0, np.zeros((3, 4, 8), np.float32), 0, 0.3)
    with pytest.raises(ValueError, match="shape"):
        attention(dev, 0, f32(3, 2, 8), 0, 0.3)
    with pytest.raises(ValueError, match="C-contiguous"):
        attention(dev, 0, f32(3, 4, 16)[:, :, ::2], 0, 0.3)
    with pytest.raises(ValueError, match="shape"):
        attention(dev, 0, q, 0, 0.3, sinks=f32(3))
    with pytest.raises(ValueError, match="shape"):
        attention(dev, 0, q, 0, 0.3, out=f32(3, 16))
    with pytest.raises(TypeError, match="scale"):
        attention(dev, 0, q, 0, float("nan"))
    with pytest.raises(ValueError, match="n_swa"):
        attention(dev, 0, q, 0, 0.3, n_swa=-1)
    # layer 1's ring keeps 5 + 4 = 9 positions: full attention over 12 no longer fits, nor
    # a window reaching back to keys the ring overwrote (after a rollback to position 3, too)
    dev.store(1, 9, k, v)
    with pytest.raises(ValueError, match="holds positions 3..11"):
        attention(dev, 1, q, 9, 0.3, n_swa=0)
    attention(dev, 1, q, 9, 0.3, n_swa=5)
    with pytest.raises(ValueError, match="need keys from 1"):
        attention(dev, 1, q, 5, 0.3, n_swa=5)
    dev.store(1, 3, k, v)
    with pytest.raises(ValueError, match="need keys from 0"):
        attention(dev, 1, q, 3, 0.3, n_swa=5)
    attention(dev, 1, q, 3, 0.3, n_swa=1)  # positions 0..2 were overwritten by 9..11 before the rollback
    with pytest.raises(TypeError, match="DeviceKVCache"):
        attention(KVCache(cfg, 12, 4), 0, q, 0, 0.3)


def test_tiles_validation_and_fit():
    with pytest.raises(ValueError):
        AttentionTiles(rows=6, thread_rows=4)
    with pytest.raises(ValueError):
        AttentionTiles(rows=8, keys=4, thread_rows=4, thread_keys=4)  # 2 threads for 8 rows
    with pytest.raises(ValueError):
        AttentionTiles(rows=0)
    with pytest.raises(ValueError):
        AttentionConfig(split_keys=0)
    t = AttentionTiles().fit(128, 128)  # 32 keys at head dim 128 exceed 48 KB: halved
    assert (t.keys, t.thread_keys, t.threads) == (16, 2, 128) and t.shared_bytes(128, 128) <= 48 * 1024
    assert AttentionTiles().fit(64, 64) == AttentionTiles()
    with pytest.raises(ValueError, match="shared memory"):
        AttentionTiles(rows=8, keys=1, thread_rows=1, thread_keys=1).fit(2048, 2048)
