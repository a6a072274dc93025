"""Routing + buckets + copy plan: speed (Numba vs numpy) and the bytes they save.

Prints markdown tables:
1. ms per ubatch for route -> bucket -> plan on one core, vs a numpy
   argpartition version of the same steps (written here);
2. per ubatch size, bytes and copies of used-only vs copy-all transfers with
   gpt-oss slabs (3 MXFP4 matrices of 4,406,400 B per expert), averaged over
   layers, on synthetic traffic: the transfer side of PR #15346's table;
3. the synthetic traffic's calibration (experts used per layer).

Run: .venv/bin/python examples/bench_routing.py [--quick]
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from hybrid.moe.copyplan import CostModel, plan, plan_for
from hybrid.moe.routing import bucket, route
from hybrid.moe.traffic import PRESETS, calibration_table, format_calibration, synthetic_logits

UBATCHES = (128, 256, 512, 1024, 2048)
PCIE = CostModel(latency_s=10e-6, bandwidth_Bps=25e9)  # ~PCIe 4.0 x16, pinned


# --------------------------------------------------------------------------- numpy baseline

def numpy_pipeline(z, k, n_experts, slab):
    """The same steps in plain numpy: top-k, softmax of the k, buckets, ranges, offsets."""
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    part = np.argpartition(-z, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(z, part, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    ids = np.take_along_axis(part, order, 1).astype(np.int32)
    vals = np.take_along_axis(vals, order, 1).astype(np.float64)
    w = np.exp(vals - vals[:, :1])
    w = (w / w.sum(1, keepdims=True)).astype(np.float32)
    flat = ids.ravel()
    counts = np.bincount(flat, minlength=n_experts).astype(np.int32)
    offsets = np.zeros(n_experts + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    pairs = np.argsort(flat, kind="stable").astype(np.int32)
    used = np.flatnonzero(counts).astype(np.int32)
    brk = np.flatnonzero(np.diff(used) != 1)
    first = np.concatenate([used[:1], used[brk + 1]])
    last = np.concatenate([used[brk], used[-1:]])
    src = first.astype(np.int64) * slab
    nbytes = (last - first + 1).astype(np.int64) * slab
    return ids, w, pairs, offsets, used, src, nbytes


def numba_pipeline(z, k, n_experts, slab):
    ids, w = route(z, k)
    b = bucket(ids, n_experts)
    p = plan(b.used, slab, n_experts)
    return ids, w, b.pairs, b.offsets, b.used, p.src, p.nbytes


def per_call_ms(fn, *args, reps):
    # Best of many short runs: on a shared machine the minimum is the quiet time.
    best = np.inf
    for _ in range(15):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(*args)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e3


def speed_table(reps):
    slab = PRESETS["gpt-oss-120b"].slab_bytes
    lines = ["Routing + buckets + plan per ubatch, one core (best of 15 runs, ms per call)", "",
             "| tokens x experts, k | route | bucket | plan | total (Numba) | numpy | numpy / Numba |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for preset, n in (("gpt-oss-120b", 2048), ("gpt-oss-20b", 512)):
        p = PRESETS[preset]
        z = synthetic_logits(preset, n, layer=p.n_layers // 2)
        a, b = numba_pipeline(z, p.k, p.n_experts, slab), numpy_pipeline(z, p.k, p.n_experts, slab)
        for x, y in zip(a, b):  # same answers, so the same work
            np.testing.assert_allclose(x, y, rtol=1e-6)
        ids, _ = route(z, p.k)
        bk = bucket(ids, p.n_experts)
        t_route = per_call_ms(route, z, p.k, reps=reps)
        t_bucket = per_call_ms(bucket, ids, p.n_experts, reps=reps)
        t_plan = per_call_ms(plan, bk.used, slab, p.n_experts, reps=reps)
        t_nb = per_call_ms(numba_pipeline, z, p.k, p.n_experts, slab, reps=reps)
        t_np = per_call_ms(numpy_pipeline, z, p.k, p.n_experts, slab, reps=reps)
        lines.append(f"| {n} x {p.n_experts}, k={p.k} | {t_route:.3f} | {t_bucket:.3f} | {t_plan:.3f} "
                     f"| {t_nb:.3f} | {t_np:.3f} | {t_np / t_nb:.1f}x |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- transfer table

def transfer_table(preset, seed=0, layers=None):
    p = PRESETS[preset]
    layers = range(p.n_layers) if layers is None else layers
    m, slab, E = p.n_matrices, p.slab_bytes, p.n_experts
    all_bytes = m * E * slab
    t_all = m * PCIE.of(plan(np.arange(E, dtype=np.int32), slab, E))
    lines = [f"Transfers per layer, {preset} ({E} experts, {m} x {slab:,} B per expert; "
             f"copy-all = {m} copies, {all_bytes / 2**20:,.0f} MiB; mean over {len(layers)} layers, "
             f"modelled at {PCIE.bandwidth_Bps / 1e9:.0f} GB/s + {PCIE.latency_s * 1e6:.0f} us/copy)", "",
             "| ubatch | experts used | copies used-only | MiB used-only | bytes vs copy-all "
             "| model ms copy-all | model ms used-only | transfer speedup |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ub in UBATCHES:
        used, copies, nbytes, t = [], [], [], []
        for layer in layers:
            ids, _ = route(synthetic_logits(p, ub, layer, seed), p.k)
            gate = plan(bucket(ids, E).used, slab, E, pad_tail=True)  # PR #15346's rule
            mats = [gate] + [plan_for(gate, slab) for _ in range(m - 1)]
            used.append(int((gate.slot >= 0).sum()))
            copies.append(sum(q.n_copies for q in mats))
            nbytes.append(sum(q.total_bytes for q in mats))
            t.append(sum(PCIE.of(q) for q in mats))
        lines.append(f"| {ub} | {np.mean(used):.1f} | {np.mean(copies):.1f} | {np.mean(nbytes) / 2**20:,.0f} "
                     f"| {np.mean(nbytes) / all_bytes:.2f} | {t_all * 1e3:.2f} | {np.mean(t) * 1e3:.2f} "
                     f"| {t_all / np.mean(t):.2f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and layers")
    args = ap.parse_args()
    numba.set_num_threads(1)
    numba_pipeline(synthetic_logits("gpt-oss-20b", 64), 4, 32, 1024)  # compile / load cache
    print(speed_table(reps=10 if args.quick else 50))
    for preset in ("gpt-oss-20b", "gpt-oss-120b", "uniform"):
        layers = range(0, PRESETS[preset].n_layers, 4) if args.quick else None
        print()
        print(transfer_table(preset, layers=layers))
    for preset in ("gpt-oss-20b", "gpt-oss-120b", "uniform"):
        print()
        print(format_calibration(preset, calibration_table(preset, UBATCHES)))


if __name__ == "__main__":
    main()
