"""Device attention (``hybrid.kernels.cuda.attention``) at gpt-oss shapes: time, FLOP/s, KV read rate, error.

64 query heads, 8 KV heads, head dim 64, sinks; a full-attention layer and a
sliding-window one (window 128). Per case: a prompt ubatch or a decode step
after ``pos0`` positions already in the cache (random K and V, stored through
``DeviceKVCache.store``). It prints the launch (tiles, row tiles, key splits),
the median time of ``--repeat`` launches (CUDA events), GFLOP/s
(``2 * n_head * sum over queries of keys seen * (head_dim + head_dim_v)``), the
K/V bytes a launch must read once divided by its time, and the largest
difference to ``ops.attention`` on the host.

Run: .venv/bin/python examples/bench_attention.py [--repeat 20] [--tiny]
(``--tiny``: small shapes and contexts, for the simulator: NUMBA_ENABLE_CUDASIM=1).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from numba import cuda  # noqa: E402

from hybrid.model import ops  # noqa: E402
from hybrid.kernels.cuda.attention import DeviceKVCache, attention, launch_plan  # noqa: E402

GPT_OSS = dict(n_head=64, n_head_kv=8, head_dim=64, head_dim_v=64, n_swa=128)
TINY = dict(n_head=4, n_head_kv=2, head_dim=8, head_dim_v=8, n_swa=8)
# (label, tokens, positions before them)
CASES = [("prompt", 512, 0), ("prompt", 512, 3584), ("prompt", 512, 31744),
         ("decode", 1, 1023), ("decode", 1, 8191), ("decode", 1, 32767), ("decode", 1, 131071)]
TINY_CASES = [("prompt", 12, 0), ("prompt", 12, 20), ("decode", 1, 40)]


def _keys_seen(T, pos0, n_swa):
    q = np.arange(pos0, pos0 + T)
    return int(np.sum(np.minimum(q + 1, n_swa) if n_swa else q + 1))


def run_case(shape, label, T, pos0, swa, repeat, n_ubatch, rng):
    cfg = types.SimpleNamespace(n_layer=1, swa_layers=(swa,), **shape)
    H, Hkv, d, dv = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
    n_ctx = pos0 + T
    cache = DeviceKVCache(cfg, n_ctx, max(n_ubatch, T))
    n_swa = cfg.n_swa if swa else 0
    # One random chunk of keys and values stored over and over: the host copy tiles it.
    chunk = max(n_ubatch, T)
    k = rng.standard_normal((chunk, Hkv, d)).astype(np.float32)
    v = rng.standard_normal((chunk, Hkv, dv)).astype(np.float32)
    dk, dvv = cuda.to_device(k), cuda.to_device(v)
    for p in range(0, n_ctx, chunk):
        n = min(chunk, n_ctx - p)
        cache.store(0, p, dk[:n], dvv[:n])
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    sinks = rng.standard_normal(H).astype(np.float32)
    dq, ds = cuda.to_device(q), cuda.to_device(sinks)
    out = cuda.device_array((T, H * dv), np.float32)
    scale = 1.0 / np.sqrt(d)
    attention(cache, 0, dq, pos0, scale, n_swa, ds, out)  # compile, warm up
    times = []
    for _ in range(repeat):
        start, stop = cuda.event(), cuda.event()
        start.record()
        attention(cache, 0, dq, pos0, scale, n_swa, ds, out)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    t = statistics.median(times)
    k_lo = max(0, pos0 - n_swa + 1) if n_swa else 0
    kpos = np.arange(k_lo, n_ctx)
    ref = ops.attention(q, k[kpos % chunk], v[kpos % chunk], np.arange(pos0, n_ctx), kpos, scale, n_swa, sinks)
    err = float(np.abs(out.copy_to_host() - ref).max())
    plan = launch_plan(cfg, T, n_ctx - k_lo)
    flops = 2.0 * H * _keys_seen(T, pos0, n_swa) * (d + dv)
    kv_bytes = (n_ctx - k_lo) * Hkv * (d + dv) * 4
    return (f"| {label} | {'SWA' if swa else 'full'} | {T} | {pos0} | {plan.tiles.rows}x{plan.tiles.keys} | "
            f"{plan.row_tiles} | {plan.n_splits} | {timed(t * 1e3, '.3f')} | {timed(flops / t / 1e9, '.1f')} | "
            f"{timed(kv_bytes / t / 1e9, '.1f')} | {err:.1e} |")


def timed(v, fmt):
    return format(v, fmt) if v > 0 else "-"  # the simulator's events time nothing


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="small shapes (simulator smoke test)")
    a = ap.parse_args()
    shape, cases = (TINY, TINY_CASES) if a.tiny else (GPT_OSS, CASES)
    repeat = 2 if a.tiny else a.repeat
    n_ubatch = 12 if a.tiny else 512
    dev = cuda.get_current_device()
    name = getattr(dev, "name", "the CUDA simulator")  # the simulator's device has no name
    print(f"device: {name.decode() if isinstance(name, bytes) else name}; shapes {shape}; median of {repeat}")
    print("| case | layer | tokens | pos0 | tiles | row tiles | splits | ms | GFLOP/s | KV GB/s | max err |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for label, T, pos0 in cases:
        for swa in (False, True):
            print(run_case(shape, label, T, pos0, swa, repeat, n_ubatch, rng), flush=True)


if __name__ == "__main__":
    main()
