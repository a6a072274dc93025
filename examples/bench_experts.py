"""CPU expert path at gpt-oss-20b shapes: one expert matrix (ggml_mul_mat_id) and the whole MoE FFN.

n_embd = n_ff = 2880, 32 MXFP4 experts, k = 4. Weights are random MXFP4 bytes
(speed does not depend on the values). Per token count it prints, as medians of
interleaved repeats: ours; the memory floor (a numpy read of the same experts'
bytes, split over the same number of threads); at decode sizes the float path
(``q8_tokens=0``, the path before int8 activations) and the error int8
activations introduce; optionally plain-@njit baselines of the n=1 kernel (the
check that the hand-written IR earns its place) and ggml's own numbers from
llama.cpp's ``test-backend-ops perf -o MUL_MAT_ID`` on this machine.

``--isa avx2`` reruns the script with numba's JIT target forced to Zen 3
(AVX2, no AVX-512, no VNNI) through NUMBA_CPU_NAME/NUMBA_CPU_FEATURES: the AVX2
kernels on this CPU. A forced build on Intel says nothing of AMD's shuffle and
gather costs; it only shows the instruction mix.

Run: .venv/bin/python examples/bench_experts.py [--threads 2] [--tokens 1,32,128,512] [--repeat 7]
     [--routing uniform|traffic] [--isa native|avx2] [--baseline] [--ggml PATH/test-backend-ops]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

FORCED = "HYBRID_BENCH_FORCED_ISA"


def _avx2_env():
    """numba's host features with AVX-512, AVX-VNNI and AMX switched off, tuned for Zen 3."""
    from numba.core import codegen
    off = ("avx512", "avx10", "amx", "avxvnni", "avxifma", "avxneconvert")
    feats = ["-" + f[1:] if f[1:].startswith(off) else f for f in codegen.get_host_cpu_features().split(",")]
    return {"NUMBA_CPU_NAME": "znver3", "NUMBA_CPU_FEATURES": ",".join(feats), FORCED: "avx2"}


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="1,32,128,512")
    ap.add_argument("--repeat", type=int, default=7, help="interleaved rounds per timing (median reported)")
    ap.add_argument("--routing", choices=("uniform", "first4", "traffic"), default="uniform",
                    help="uniform: 4 distinct uniform-random experts per token, as ggml's perf cases; "
                         "first4: experts 0..3 in random order for every token, as ggml's test files "
                         "(ggml timed at any n); traffic: the gpt-oss-20b synthetic router (hybrid.moe.traffic)")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native")
    ap.add_argument("--baseline", action="store_true", help="time plain @njit n=1 kernels too")
    ap.add_argument("--ggml", metavar="TEST_BACKEND_OPS", help="run llama.cpp's test-backend-ops as the peer")
    ap.add_argument("--no-ffn", action="store_true", help="skip the whole-FFN table")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.isa == "avx2" and os.environ.get(FORCED) != "avx2":
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **_avx2_env()})

import numba  # noqa: E402  (after the ISA is fixed)
import numpy as np  # noqa: E402
from gguf.constants import GGMLQuantizationType as T  # noqa: E402

from hybrid.moe import cpu, traffic  # noqa: E402
from hybrid.moe.layer import ExpertTensor, MoELayer  # noqa: E402
from hybrid.moe.routing import route  # noqa: E402
from quant import cpu as qcpu, jitcache, mxfp4  # noqa: E402

D = F = 2880
E, K = 32, 4
FLOAT = cpu.CpuTiles(q8_tokens=0)


def random_mxfp4(rng, rows, cols):
    """E x [rows, cols] MXFP4 with realistic exponents (|w| ~ 0.01..0.1) and random nibbles."""
    raw = rng.integers(0, 256, (E, rows, cols // 32, 17), dtype=np.uint8)
    raw[..., 0] = rng.integers(118, 124, raw.shape[:-1], dtype=np.uint8)
    return ExpertTensor(raw.reshape(E, rows, -1), int(T.MXFP4), rows, cols)


def make_layer(seed=0):
    rng = np.random.default_rng(seed)
    bias = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    return MoELayer(router_w=(rng.standard_normal((E, D)) / np.sqrt(D)).astype(np.float32), router_b=bias(E),
                    gate=random_mxfp4(rng, F, D), up=random_mxfp4(rng, F, D), down=random_mxfp4(rng, D, F),
                    gate_b=bias(E, F), up_b=bias(E, F), down_b=bias(E, D), k=K)


def interleaved(fns, rounds):
    """Median and least seconds of each function, run in turn ``rounds`` times (after a warm-up
    each), the order rotating: a shared machine's load falls on all of them alike."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):  # the order rotates: none always follows ggml (which evicts our weights)
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t = time.perf_counter()
            fns[k]()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}, {k: min(v) for k, v in ts.items()}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class Floor:
    """Read the used experts' bytes (summed as uint64 by numpy, which releases the GIL) in
    ``threads`` equal parts on as many threads: the memory floor for the same work."""

    def __init__(self, slabs, threads):
        words = [s.reshape(-1).view(np.uint64) for s in slabs]
        parts = [p for w in words for p in np.array_split(w, threads)]
        self.groups = [parts[i::threads] for i in range(threads)]
        self.pool = ThreadPoolExecutor(threads)

    @staticmethod
    def _read(group):
        for p in group:
            np.add.reduce(p)

    def __call__(self):
        list(self.pool.map(self._read, self.groups))


# ---------------------------------------------------------------- plain @njit baselines (n = 1)
_KV = mxfp4.KVALUES.astype(np.int32)
_KVF = mxfp4.KVALUES_F32


@jitcache.njit(parallel=True, cache=True)
def njit_q8(raw, experts, qc, d, out):
    """out[j, r] = W[experts[j], r] . x with x as int8 blocks (quant.cpu.quantize_q8): integer block
    sums through the 16-entry table, then half(e) * d_x, as the IR kernel, written as plain loops."""
    nblk = d.size // qcpu.Q8_DREP
    for i in numba.prange(experts.size * raw.shape[1]):
        j, r = i // raw.shape[1], i % raw.shape[1]
        row = raw[experts[j], r]
        acc = np.float32(0.0)
        for b in range(nblk):
            s = 0
            for t in range(16):
                v = row[b * 17 + 1 + t]
                s += _KV[v & 15] * np.int32(np.int8(qc[b * 64 + t])) + _KV[v >> 4] * np.int32(np.int8(qc[b * 64 + 16 + t]))
            acc += np.float32(s) * (mxfp4.SCALES[row[b * 17]] * d[b * qcpu.Q8_DREP])
        out[j, r] = acc


@jitcache.njit(parallel=True, cache=True)
def njit_f32(raw, experts, x, out):
    """The float path as plain loops: decode each weight through the table, FMA with float x."""
    for i in numba.prange(experts.size * raw.shape[1]):
        j, r = i // raw.shape[1], i % raw.shape[1]
        row = raw[experts[j], r]
        acc = np.float32(0.0)
        for b in range(x.size // 32):
            s = np.float32(0.0)
            for t in range(16):
                v = row[b * 17 + 1 + t]
                s += _KVF[v & 15] * x[b * 32 + t] + _KVF[v >> 4] * x[b * 32 + 16 + t]
            acc += s * mxfp4.SCALES[row[b * 17]]
        out[j, r] = acc


def ggml_ms(binary, n, kind):
    """ms per run of llama.cpp's MUL_MAT_ID, MXFP4 2880x2880, 32 experts, 4 used, n tokens, or None.
    uniform: its own perf cases (n = 1, 4, 8, 512; distinct uniform-random experts per token);
    first4: a generic-op case from a test file (any n; its ids are experts 0..3 in random order)."""
    if kind == "uniform":
        if n not in (1, 4, 8, 512):
            return None
        cmd = [binary, "perf", "-b", "CPU", "-o", "MUL_MAT_ID", "-p", f"type_a=mxfp4.*,n={n},k=2880,"]
        pat = rf"MUL_MAT_ID\(type_a=mxfp4,type_b=f32,n_mats=32,n_used=4,b=0,m=2880,n={n},k=2880.*?([\d.]+) us/run"
    else:
        # op MUL_MAT_ID (30), out f32 [2880, 4, n], sources: MXFP4 [2880, 2880, 32] (type 39, 17-byte
        # blocks, 1530-byte rows), f32 x [2880, 1, n], i32 ids [4, n]: type, ne[4], nb[4] each
        rb = 2880 // 32 * 17
        line = [30, 0, 2880, 4, n, 1, 0, 3, 39, 2880, 2880, E, 1, 17, rb, rb * 2880, rb * 2880 * E,
                0, 2880, 1, n, 1, 4, 2880 * 4, 2880 * 4, 2880 * 4 * n, 26, K, n, 1, 1, 4, 4 * K, 4 * K * n, 4 * K * n]
        path = f"/tmp/hybrid_bench_mmid_{os.getpid()}_{n}.txt"
        with open(path, "w") as f:
            f.write(" ".join(map(str, line)) + " -\n")
        cmd = [binary, "perf", "-b", "CPU", "--test-file", path]
        pat = r"MUL_MAT_ID\(type=f32,ne=\[2880,4,\d+,1\].*?([\d.]+) us/run"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    m = re.search(pat, r.stdout)
    return float(m.group(1)) / 1e3 if m else None


def routing(kind, n, rng):
    if kind in ("uniform", "first4"):  # as ggml's perf cases / its generic-op test files
        ids = np.argsort(rng.random((n, E if kind == "uniform" else K)), axis=1)[:, :K]
        w = rng.random((n, K)).astype(np.float32)
        return ids, w / w.sum(1, keepdims=True)
    return route(traffic.synthetic_logits("gpt-oss-20b", n, layer=12, seed=3), K)


def rel(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def main():
    args = ARGS
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    nt = numba.get_num_threads()
    tokens = [int(s) for s in args.tokens.split(",")]
    layer = make_layer()
    rng = np.random.default_rng(1)
    forced = os.environ.get(FORCED) == "avx2"
    print(f"CPU: {cpu_name()}, {nt} threads; kernels: {cpu.ISA}, int8 dot: {cpu.Q8_VARIANT} "
          f"({'forced AVX2 build: numba target znver3 without AVX-512/VNNI on this CPU; says nothing of AMD costs' if forced else 'native'}); "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; routing {args.routing}")
    print(f"gpt-oss-20b shapes: {E} experts x [{F} x {D}] MXFP4, k={K}; medians of {args.repeat} interleaved rounds\n")
    peer = {}

    rows = []
    for n in tokens:
        x = rng.standard_normal((n, D)).astype(np.float32)
        ids, wts = routing(args.routing, n, rng)
        used = np.unique(ids)
        nbytes = used.size * layer.gate.slab_bytes
        floor = Floor([layer.gate.raw[e] for e in used], nt)
        fns = {"ours": lambda: cpu.mul_mat_id_cpu(layer.gate, x, ids), "floor": floor}
        if n <= cpu.TILES.q8_tokens:
            fns["float"] = lambda: cpu.mul_mat_id_cpu(layer.gate, x, ids, tiles=FLOAT)
        if args.baseline and n == 1:
            nblk = D // 32
            qc, dx = np.zeros(nblk * qcpu.Q8_REC, np.uint8), np.zeros(nblk * qcpu.Q8_DREP, np.float32)
            qcpu.quantize_q8(x, 1, nblk, qc, dx)
            ex, o = ids[0].astype(np.int64), np.zeros((K, F), np.float32)
            fns["njit q8"] = lambda: njit_q8(layer.gate.raw, ex, qc, dx, o)
            fns["njit f32"] = lambda: njit_f32(layer.gate.raw, ex, x[0], o)
        if not args.no_ffn:
            fns["ffn"] = lambda: cpu.moe_ffn_cpu(layer, x, ids, wts)
            fns["ffn floor"] = Floor([t.raw[e] for t in (layer.gate, layer.up, layer.down) for e in used], nt)
        # ggml first, 3 runs of its own timing loop (it reports us/run over many runs): run between
        # ours, its process evicts our weights from the caches and the next of ours runs cold
        gt = [ggml_ms(args.ggml, n, args.routing) for _ in range(3)] if args.ggml else []
        if gt and None not in gt:
            peer[n] = (statistics.median(gt), min(gt))
        t, tmin = interleaved(fns, args.repeat)
        err = {}
        if "float" in t:
            err["matrix"] = rel(cpu.mul_mat_id_cpu(layer.gate, x, ids), cpu.mul_mat_id_cpu(layer.gate, x, ids, tiles=FLOAT))
            err["ffn"] = rel(cpu.moe_ffn_cpu(layer, x, ids, wts), cpu.moe_ffn_cpu(layer, x, ids, wts, tiles=FLOAT))
        rows.append((n, used.size, nbytes, t, err, tmin))
        print(f"  n={n}: done", file=sys.stderr, flush=True)

    ms = lambda v: f"{v * 1e3:.2f}" if v is not None else "-"  # noqa: E731
    print("### One expert matrix (ggml_mul_mat_id: [2880 x 2880] MXFP4, 32 experts, k=4)\n")
    print("ms: median / least of the interleaved rounds; ratios of medians\n")
    print("| n_tokens | experts used | weights MB | ours ms | floor ms | ours / floor | float path ms "
          "| ggml ms (this machine) | ggml / ours | GFLOP/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, u, nb_, t, _, tm in rows:
        g = peer.get(n)
        gs, gr = (f"{g[0]:.2f} / {g[1]:.2f}", f"{g[0] / (t['ours'] * 1e3):.2f}x") if g else ("-", "-")
        fl = f"{ms(t['float'])} / {ms(tm['float'])}" if "float" in t else "-"
        print(f"| {n} | {u} | {nb_ / 1e6:.1f} | {ms(t['ours'])} / {ms(tm['ours'])} | {ms(t['floor'])} / "
              f"{ms(tm['floor'])} | {t['ours'] / t['floor']:.2f} | {fl} | {gs} | {gr} "
              f"| {2.0 * n * K * F * D / t['ours'] / 1e9:.1f} |")
    for n, _, _, t, err, tm in rows:
        if err:
            print(f"\nn={n}: int8 activations vs the float path, max |diff| / max |float|: "
                  f"matrix {err['matrix']:.1e}, whole FFN {err['ffn']:.1e}")
        if "njit q8" in t:
            print(f"n={n} plain @njit baselines (same threads, median / least): int8 dot {ms(t['njit q8'])} / "
                  f"{ms(tm['njit q8'])} ms, float dot {ms(t['njit f32'])} / {ms(tm['njit f32'])} ms; the IR "
                  f"kernels {ms(t['ours'])} / {ms(tm['ours'])} ms (int8), {ms(t['float'])} / {ms(tm['float'])} ms (float)")
    if not args.no_ffn:
        print("\n### Whole MoE FFN (gate + up + swiglu_oai + down + weighted sum)\n")
        print("| n_tokens | ours ms | floor ms (gate, up, down bytes) | ours / floor |")
        print("|---:|---:|---:|---:|")
        for n, _, _, t, _, tm in rows:
            print(f"| {n} | {ms(t['ffn'])} / {ms(tm['ffn'])} | {ms(t['ffn floor'])} / {ms(tm['ffn floor'])} "
                  f"| {t['ffn'] / t['ffn floor']:.2f} |")
    print(f"\nfloor: the used experts' bytes read by numpy on {nt} threads (the weights may stay in L3 "
          "between runs, for ours and the floor alike). ggml: llama.cpp's test-backend-ops perf, median / least "
          "of its us/run over 3 runs just before ours (the same routing kind, its own draw; plain "
          "CPU buffer, so no CPU_REPACK; its default threads = all cores; uniform: its cases n = 1, 4, 8, 512)"
          + (" -- not run" if not args.ggml else "") + ".")


if __name__ == "__main__":
    main()
