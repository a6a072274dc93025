"""One script for a GPU session: every CUDA path against the CPU, then the timings.

    python examples/gpu_check.py            # real GPU, gpt-oss shapes (< 5 min on an H100)
    NUMBA_ENABLE_CUDASIM=1 python examples/gpu_check.py --tiny   # simulator smoke test

0. doctor: GPU, driver, CUDA libraries, VRAM, pinned vs pageable copy;
1. correctness: every policy x layout x host mode x cache x overlap (waves
   and per-range launches) through HybridMoE on the device, against the
   float64 reference; all configurations must give identical bits (they run
   the same kernels on the same data);
1b. types: every expert type the device kernels read, against the float64 reference, and
   (on a GPU) ms per layer with every expert resident at 2048 wide, 16 experts, 4 used;
2. kernels: grouped MoE FLOP/s per ubatch (all experts resident) at gpt-oss-20b
   and -120b shapes, FFMA kernels against the card's FP32 peak and tensor-core
   kernels (``TileConfig(math="mma")``, compute capability >= 8.0) against its
   dense BF16 tensor peak, and each kernel's time per layer against the time to
   copy that ubatch's used experts at 50 GB/s (issue 13's target: at most half
   of it at ubatch 512 and 2048 for gpt-oss-120b);
3. link: one large pinned host-to-device copy (the peak), then copy-all vs
   used-only vs used+overlap (waves, pinned) vs used+per-range (one launch per
   copy range) vs used+staged (pinned double buffer) vs used+cache vs used+merge
   at gpt-oss-120b layer shapes with skewed synthetic routing, ubatch
   128..2048: MoE-layer t/s, achieved GB/s, and the kernel launches per layer;
4. whole model: gpt-oss-20b and -120b shapes with random weights built in memory
   (nothing downloaded, no 65 GB file): pp512 and pp2048 (ubatch 512, llama-bench's
   default) copy-all vs used-only vs used+overlap+cache, beside PR #15346's measured
   speed-ups. 120b runs ``--layers-120b`` of its 36 blocks (default 8) to fit the
   budget: its t/s are for those blocks; the per-layer MoE costs and the speed-ups scale.
   ``--share-experts`` builds one block's experts for all (when filling tens of GB of
   fresh memory is slow where it runs: the build's GB/s is printed).
Prints markdown tables; exits non-zero if a correctness check fails.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from gguf.constants import GGMLQuantizationType as GT
from numba import cuda

from hybrid.kernels.cuda import experts as K
from hybrid.moe.copyplan import CostModel
from hybrid.moe.layer import ExpertTensor, MoELayer
from hybrid.model.tiny import random_layer
from hybrid.moe.reference import moe_reference
from hybrid.moe.routing import bucket, route
from hybrid.moe.scheduler import HybridMoE
from hybrid.moe.traffic import synthetic_logits
from quant import registry as qregistry

H100_FP32_TFLOPS = 67.0  # SXM5 datasheet figure (non-tensor FP32)
H100_BF16_TFLOPS = 989.0  # SXM5 dense BF16 tensor figure (wgmma; mma.sync reaches less)
TARGET_LINK_GBPS = 50.0  # issue 13: kernels at most half the used experts' copy time at this rate
# Per SM and clock (dense, FP32 accumulate): FP32 FMA lanes x 2 and BF16 tensor FLOP.
_PER_SM_CLK = {(8, 0): (128, 2048), (9, 0): (256, 4096)}
_PER_SM_CLK_OTHER = (256, 1024)  # sm_86/89 class (GeForce-like tensor rate): an estimate


def check_paths(tiny, device):
    D, F, E, k, T = (32, 64, 6, 2, 6) if tiny else (2880, 2880, 32, 4, 256)
    tiles = K.TileConfig(4, 32, 32, 1, 8) if tiny else None
    layers = [random_layer(D, F, E, k, seed=i, index=i, skew=2.0) for i in range(2)]
    x = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
    refs = [moe_reference(L, x) for L in layers]
    per_expert = layers[0].expert_bytes
    configs = [dict(policy="all"), dict(policy="used"), dict(policy="used", overlap=False),
               dict(layout="compact"), dict(host="staged"), dict(host="pageable"),
               dict(cache_bytes=E * 2 * per_expert), dict(layout="compact", device_bytes=2 * per_expert),
               dict(launch_tiles=1)]
    math = "fma" if device == "sim" else K.launch_math(tiles or K.TileConfig(), 39)
    # Tensor cores on hardware: their own tolerance (kernels.MMA_HW_REL_TOL says why).
    tol = K.MMA_HW_REL_TOL if math == "mma" else 1e-5
    print(f"kernels: {math} (TileConfig math={(tiles or K.TileConfig()).math!r}); tolerance {tol:g}\n")
    print("| configuration | layer | max rel err vs float64 | identical to first |")
    print("|---|---|---:|---|")
    ok, first = True, None
    for cfg in configs:
        with HybridMoE(layers, device=device, min_offload_batch=1, tiles=tiles, **cfg) as moe:
            outs = [[moe.forward(i, x) for i in range(2)] for _ in range(2)]  # 2 ubatches: cache hits
        first = first or outs[0]
        for i, (o, ref) in enumerate(zip(outs[1], refs)):
            err = float(np.abs(o - ref).max() / np.abs(ref).max())
            same = np.array_equal(o, first[i])
            ok &= err < tol and same
            print(f"| {cfg} host={moe.host_mode} | {i} | {err:.2e} | {same} |")
    return ok


def check_types(tiny, device, reps=3):
    """Every expert type the device kernels read (tiny: the first of each block size, as the
    tests): the layer on the device against the float64 reference (FFMA kernels), then on a GPU
    ms per layer with every expert resident (cache hits: the kernels, no copies)."""
    kinds = K.expert_types()
    if tiny:  # the block-decoder formats: one per block size
        parts = [t for t in kinds if qregistry.get(t).cuda_tile_parts]
        kinds = list({qregistry.block_size(t): t for t in reversed(parts)}.values())
    D, F, E, k, T = (256, 256, 3, 2, 2) if tiny else (512, 512, 8, 2, 16)
    tiles = K.TileConfig(4, 16, 256, 1, 8, math="fma") if tiny else K.TileConfig(math="fma")
    tD, tE, tk = 2048, 16, 4  # timing: a gpt-oss-20b-like width (2048 so blocks of 256 fit)
    print("\n| expert type | max rel err vs float64 |" + ("" if tiny else " ms T=32 | ms T=512 |"))
    print("|---|---:|" + ("" if tiny else "---:|---:|"))
    ok = True
    for t in kinds:
        L = random_layer(D, F, E, k, wtype=t, gpt_oss=False, seed=int(t))
        x = np.random.default_rng(int(t)).standard_normal((T, D)).astype(np.float32)
        ref = moe_reference(L, x)
        with HybridMoE([L], device=device, min_offload_batch=1, tiles=tiles) as moe:
            err = float(np.abs(moe.forward(0, x) - ref).max() / np.abs(ref).max())
        ok &= err < 1e-5
        row = f"| {qregistry.type_name(t)} | {err:.2e} |"
        if not tiny:
            L = random_layer(tD, tD, tE, tk, wtype=t, gpt_oss=False, seed=int(t))
            with HybridMoE([L], device=device, min_offload_batch=1, cache_bytes=tE * L.expert_bytes) as moe:
                for n in (32, 512):
                    xt = np.random.default_rng(n).standard_normal((n, tD)).astype(np.float32)
                    moe.forward(0, xt)  # every expert used at 512 tokens: resident afterwards
                    moe.forward(0, np.random.default_rng(0).standard_normal((512, tD)).astype(np.float32))
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        moe.forward(0, xt)
                    row += f" {(time.perf_counter() - t0) / reps * 1e3:.2f} |"
        print(row)
    return ok


def random_mxfp4(rng, e, rows, cols):
    b = rng.integers(0, 256, (e, rows, cols // 32, 17), dtype=np.uint8)
    b[..., 0] = rng.integers(118, 122, b.shape[:-1], dtype=np.uint8)  # scales near 2^-8
    return b.reshape(e, rows, cols // 32 * 17)


def device_peaks(tiny):
    """(FP32 TFLOP/s, BF16 tensor TFLOP/s, label) of the current device: SMs x clock x per-SM
    rate for its compute capability; the H100 SXM datasheet figures on the simulator."""
    if tiny:
        return H100_FP32_TFLOPS, H100_BF16_TFLOPS, "H100 SXM datasheet (simulator)"
    dev = cuda.get_current_device()
    cc = tuple(dev.compute_capability)
    sms, clk = dev.MULTIPROCESSOR_COUNT, dev.CLOCK_RATE * 1e3  # CLOCK_RATE is in kHz
    fp32, tc = _PER_SM_CLK.get(cc, _PER_SM_CLK_OTHER)
    return sms * clk * fp32 / 1e12, sms * clk * tc / 1e12, f"sm_{cc[0]}{cc[1]}, {sms} SMs at {clk / 1e9:.2f} GHz"


def bench_kernels(tiny, reps=5):
    """Both kernel kinds per ubatch, all experts resident; the tensor-core ones only where the
    device has them (the simulator emulates them: it runs, nothing is timed)."""
    fp32_peak, tc_peak, label = device_peaks(tiny)
    has_mma = tiny or tuple(cuda.get_current_device().compute_capability) >= K.MMA_MIN_CC
    print(f"\npeaks: FP32 {fp32_peak:.0f} TFLOP/s, BF16 tensor {tc_peak:.0f} TFLOP/s ({label}); "
          f"used-expert copy at {TARGET_LINK_GBPS:.0f} GB/s (issue 13's target: kernels <= half of it)")
    print("\n| model | ubatch | experts used | math | ms | TFLOP/s | of peak | copy used @50 GB/s ms "
          "| kernels / copy | target (<= 0.5) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
    rng = np.random.default_rng(0)
    maths = ("fma", "mma") if has_mma else ("fma",)
    for name, E in (("gpt-oss-20b", 32), ("gpt-oss-120b", 128)):
        D = F = 32 if tiny else 2880
        E, k = (6, 2) if tiny else (E, 4)
        tiles = {"fma": K.TileConfig(4, 32, 32, 1, 8, math="fma") if tiny else K.TileConfig(math="fma"),
                 "mma": K.TileConfig(16, 16, 32, math="mma", warp_cols=8) if tiny else K.TileConfig(math="mma")}
        gate, up = (cuda.to_device(random_mxfp4(rng, E, F, D)) for _ in range(2))
        down = cuda.to_device(random_mxfp4(rng, E, D, F))
        gb, ub = (cuda.to_device(rng.standard_normal((E, F)).astype(np.float32)) for _ in range(2))
        db = cuda.to_device(rng.standard_normal((E, D)).astype(np.float32))
        slots = cuda.to_device(np.arange(E, dtype=np.int32))
        expert_bytes = gate.shape[1] * gate.shape[2] + up.shape[1] * up.shape[2] + down.shape[1] * down.shape[2]
        for T in ([4] if tiny else [1, 32, 128, 512, 2048]):
            x = rng.standard_normal((T, D)).astype(np.float32)
            logits = synthetic_logits(name, T, seed=1)[:, :E] if not tiny else rng.standard_normal((T, E))
            ids, w = route(np.ascontiguousarray(logits, dtype=np.float32), k)
            copy_ms = None
            # The simulator emulates every MMA in Python: one model's tensor-core row shows they run.
            for math in (maths[:1] if tiny and name != "gpt-oss-20b" else maths):
                cfg = tiles[math]
                bk = bucket(ids, E, cfg.block_pairs)
                s = cuda.stream()
                bk_d = K.DeviceBuckets.from_host(bk, s)
                x_d, w_d = cuda.to_device(x, stream=s), cuda.to_device(w, stream=s)
                act = cuda.device_array((T * k, F), np.float32)
                y = cuda.device_array((T * k, D), np.float32)
                out = cuda.device_array((T, D), np.float32)

                def run():
                    K.moe_launch(x_d, bk_d, 0, bk_d.n_tiles, slots, gate, up, down, gb, ub, db, w_d, act, y,
                                 n_embd=D, n_ff=F, k=k, activation="swiglu_oai", tiles=cfg,
                                 gate_type=GT.MXFP4, down_type=GT.MXFP4, stream=s)
                    K.moe_reduce(y, out, k, stream=s)
                run()
                s.synchronize()
                t0, t1 = cuda.event(), cuda.event()
                t0.record(s)
                for _ in range(1 if tiny else reps):
                    run()
                t1.record(s)
                t1.synchronize()
                ms = cuda.event_elapsed_time(t0, t1) / reps if not tiny else float("nan")
                tflops = 2.0 * T * k * 3 * D * F / ms / 1e9
                peak = tc_peak if math == "mma" else fp32_peak
                copy_ms = bk.used.size * expert_bytes / (TARGET_LINK_GBPS * 1e9) * 1e3
                ratio = ms / copy_ms
                met = "-" if ms != ms else ("yes" if ratio <= 0.5 else "no")
                print(f"| {name} | {T} | {bk.used.size}/{E} | {math} | {ms:.2f} | {tflops:.1f} | "
                      f"{tflops / peak:.0%} | {copy_ms:.2f} | {ratio:.2f} | {met} |")
    if tiny:
        print("\n(simulator: nothing is timed; the rows show the kernels ran)")


def pinned_peak(nbytes):
    h = cuda.pinned_array(nbytes, np.uint8)
    h[:] = 1
    d = cuda.device_array(nbytes, np.uint8)
    d.copy_to_device(h)
    t = time.perf_counter()
    for _ in range(3):
        d.copy_to_device(h)
    cuda.synchronize()
    return 3 * nbytes / (time.perf_counter() - t) / 1e9


def synthetic_layers(tiny, n_layers, rng):
    """gpt-oss-120b layer shapes; the router passes x[:, :E] through, so the logits are synthetic traffic."""
    D = F = 32 if tiny else 2880
    E, k = (8, 2) if tiny else (128, 4)
    layers = []
    for i in range(n_layers):
        w = np.zeros((E, D), np.float32)
        w[np.arange(E), np.arange(E)] = 1.0
        mk = lambda r, c: ExpertTensor(random_mxfp4(rng, E, r, c), 39, r, c)
        b = lambda *s: (0.01 * rng.standard_normal(s)).astype(np.float32)
        layers.append(MoELayer(w, np.zeros(E, np.float32), mk(F, D), mk(F, D), mk(D, F),
                               b(E, F), b(E, F), b(E, D), k=k, index=i))
    return layers


def bench_link(tiny, device):
    n_layers = 1 if tiny else 4
    rng = np.random.default_rng(2)
    layers = synthetic_layers(tiny, n_layers, rng)
    L = layers[0]
    per_expert = L.expert_bytes
    peak = pinned_peak(1 << 20 if tiny else 1 << 30)
    print(f"\npinned host-to-device peak: {peak:.1f} GB/s (one {'1 MiB' if tiny else '1 GiB'} copy, x3)")
    variants = {"all": dict(policy="all"), "used": dict(policy="used", overlap=False),
                "used+overlap": dict(policy="used"),
                "used+per-range": dict(policy="used", launch_tiles=1),
                "used+staged": dict(policy="used", host="staged"),
                "used+cache": dict(policy="used", cache_bytes=n_layers * L.n_experts * per_expert // 2),
                "used+merge": dict(policy="used", merge=CostModel(latency_s=10e-6, bandwidth_Bps=peak * 1e9))}
    tiles = K.TileConfig(4, 32, 32, 1, 8) if tiny else None
    prompts = {}
    for T in ([8] if tiny else [128, 256, 512, 1024, 2048]):
        xs = []
        for u in range(2 if tiny else 3):  # consecutive ubatches of one prompt
            x = rng.standard_normal((T, L.n_embd)).astype(np.float32)
            x[:, :L.n_experts] = synthetic_logits("gpt-oss-120b", T, seed=3, start=u * T)[:, :L.n_experts]
            xs.append(x)
        prompts[T] = xs
    rows = {}
    for name, cfg in variants.items():  # one backend per variant: the host memory is pinned once
        with HybridMoE(layers, device=device, min_offload_batch=1, tiles=tiles, **cfg) as moe:
            launches = count_launches(moe)
            for T, xs in prompts.items():
                for i in range(n_layers):  # warm-up: compile, first touch
                    moe.forward(i, xs[0])
                moe.reset()  # cold cache: each prompt starts with nothing resident
                launches[0] = 0
                t = time.perf_counter()
                for x in xs:
                    for i in range(n_layers):
                        moe.forward(i, x)
                    moe.end_ubatch()
                rows[T, name] = (len(xs) * T / (time.perf_counter() - t), moe.stats.totals(), len(xs),
                                 launches[0] / (len(xs) * n_layers), moe.host_mode)
    print("\n| ubatch | variant | host | MoE t/s | speedup vs all | GB copied/ubatch | copy GB/s | of pinned peak "
          "| launches/layer |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for T in prompts:
        for name in variants:
            tps, tot, n, per_layer, host = rows[T, name]
            gb = tot["bytes"] / n / 1e9
            gbs = tot["bytes"] / max(tot["times"]["copy"], 1e-9) / 1e9  # device time of the copies
            print(f"| {T} | {name} | {host} | {tps:.1f} | {tps / rows[T, 'all'][0]:.2f}x | {gb:.2f} | {gbs:.1f} | "
                  f"{gbs / peak:.0%} | {per_layer:.1f} |")


def count_launches(moe):
    """Counts the engine's grouped launches (gate+up and down pairs) in ``[0]``."""
    box = [0]
    real = moe.engine._launch

    def counted(*a, **k):
        box[0] += 1
        return real(*a, **k)
    moe.engine._launch = counted
    return box


def bench_whole_model(tiny, device, n_layers, share_experts=False):
    """PR #15346's comparison on the whole model at gpt-oss shapes, built in memory (``synthetic_model``)."""
    import gc

    from hybrid.bench import PR_15346, compare_whole_model
    from hybrid.model.config import read_config
    from hybrid.model.synthetic import SHAPES, synthetic_model
    from hybrid.model.tiny import simulator_tiles
    from hybrid.report import bench_table, machine_line

    print("\n" + machine_line(device))
    variants = ["all", "used", "used+cache"]
    ub, tests = (4, (4, 8)) if tiny else (512, (512, 2048))
    opts, model_opts = {}, {}
    if tiny:  # the simulator's tiles for every kernel of the model
        sim = simulator_tiles()
        opts = dict(min_offload_batch=1, tiles=sim.moe, dense_tiles=sim.dense)
        model_opts = dict(dense_tiles=sim.dense, attention_config=sim.attention)
    for shape, want in n_layers.items():
        full = SHAPES[shape]["n_layers"]
        t0 = time.perf_counter()
        if tiny:  # the same structure at simulator sizes
            model = synthetic_model(shape, n_layers=1, n_embd=32, n_ff=32, n_experts=SHAPES[shape]["n_experts"] // 8,
                                    k=2, n_head=1, n_head_kv=1, head_dim=32, n_vocab=64, n_swa=4)
        else:
            model = synthetic_model(shape, n_layers=min(want, full), share_experts=share_experts)
        t_build = time.perf_counter() - t0
        gb = sum({model.raw(t).ctypes.data: model.raw(t).nbytes for t in model.tensors}.values()) / 1e9  # held once
        n = len(model.layers)
        print(f"\n{model.metadata['general.name']}: built in memory in {t_build:.1f} s ({gb:.1f} GB, "
              f"{gb / t_build:.1f} GB/s)" + ("; every block's experts are block 0's bytes" if share_experts else ""))
        if n < full and not tiny:
            print(f"only {n} of {full} blocks, to fit the time budget: t/s below are for {n} "
                  f"block{'s' * (n > 1)} (the full model's are about {n}/{full} of them, less the embedding and "
                  "output); the speed-ups scale")
        rng = np.random.default_rng(7)
        for n_p in tests:
            t0 = time.perf_counter()
            c = compare_whole_model(model, rng.integers(0, read_config(model).n_vocab, n_p), [ub], variants,
                                    device=device, model_options=model_opts, **opts)
            print(f"\n{bench_table(shape, n_p, c.rows, variants, device)}\n"
                  f"({time.perf_counter() - t0:.1f} s; used+cache: {c.cache_bytes / 2**30:.2f} GiB of VRAM)")
        before, after = PR_15346[shape][512]
        lo, hi = (min(b / a for a, b in PR_15346[shape].values()), max(b / a for a, b in PR_15346[shape].values()))
        print(f"PR #15346 on {shape} (the real model, pp2048): ubatch 512 {before} -> {after} t/s "
              f"({after / before:.2f}x); ubatch 128..2048: {lo:.2f}x-{hi:.2f}x")
        del model, c
        gc.collect()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes (simulator smoke test)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: doctor,paths,types,kernels,link,whole")
    ap.add_argument("--layers-20b", type=int, default=24, help="whole model: blocks of gpt-oss-20b (of 24)")
    ap.add_argument("--layers-120b", type=int, default=8, help="whole model: blocks of gpt-oss-120b (of 36)")
    ap.add_argument("--share-experts", action="store_true", help="whole model: one block's experts for all blocks")
    a = ap.parse_args()
    device = "sim" if a.tiny else "cuda"
    skip = set(filter(None, a.skip.split(",")))
    ok = True
    if "doctor" not in skip:
        from hybrid.doctor import diagnose, render
        print("\n".join(render(diagnose(copy_mb=0 if a.tiny else 256))) + "\n")
    if "paths" not in skip:
        ok = check_paths(a.tiny, device)
        print(f"\ncorrectness: {'PASS' if ok else 'FAIL'}")
    if "types" not in skip:
        ok_types = check_types(a.tiny, device)
        print(f"\nevery expert type: {'PASS' if ok_types else 'FAIL'}")
        ok &= ok_types
    if "kernels" not in skip:
        bench_kernels(a.tiny)
    if "link" not in skip:
        bench_link(a.tiny, device)
    if "whole" not in skip:
        bench_whole_model(a.tiny, device, {"gpt-oss-20b": a.layers_20b, "gpt-oss-120b": a.layers_120b},
                          a.share_experts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
