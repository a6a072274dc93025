"""One expert matrix of each weight type on the CPU (ggml_mul_mat_id), beside the memory floor and ggml.

    python examples/bench_types.py [--types Q4_K,Q6_K,...] [--tokens 1,8,32] [--threads 2]
        [--ggml-lib .../build/bin/libggml-base.so] [--ggml .../build/bin/test-backend-ops]

Shape: [rows x cols] = [2048 x 2048] per expert, 32 experts, 4 used per token (distinct, uniform).
Weights: random normal floats quantised by ggml's own ``ggml_quantize_chunk`` (``--ggml-lib``; an
importance matrix of ones for the types that need one), else by gguf.quants for the types it can
quantise, else random codes under random half scales (the same bytes to read, the same work). The
floor reads the used experts' bytes once (numpy sums them on the same threads). ggml: llama.cpp's
test-backend-ops timing the same op shape (``--ggml``), random weights of its own, on half the
logical cores (it sets its CPU backend's threads itself).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid.kernels.cpu import experts as cpu  # noqa: E402
from hybrid.report import machine_line  # noqa: E402
from quant import registry as qregistry  # noqa: E402
from bench_experts import Floor  # noqa: E402

ROWS = COLS = 2048
E, K = 32, 4
DEFAULT = "Q4_0,Q5_0,Q8_0,Q2_K,Q4_K,Q6_K,IQ4_XS,IQ2_XXS,MXFP4"


def quantize(w, t, lib):
    """``w`` float32 [n, cols] in type ``t`` as stored (uint8 [n, row_bytes])."""
    block, size = GGML_QUANT_SIZES[t]
    if lib is None:
        return np.ascontiguousarray(quants.quantize(w, t))
    n, cols = w.shape
    out = np.empty((n, cols // block * size), np.uint8)
    imat = np.ones(cols, np.float32)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk(ctypes.c_int(int(t)), w.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
                            ctypes.c_int64(0), ctypes.c_int64(n), ctypes.c_int64(cols),
                            imat.ctypes.data_as(ctypes.c_void_p))
    return out


def weights(w, t, lib, rng, random_codes=False):
    """``w`` in type ``t`` (ggml's or gguf's quantiser); for a type neither quantises here (or
    with ``random_codes``), random codes under random half-precision scales: the same bytes to
    read and work to do."""
    try:
        if random_codes:
            raise NotImplementedError
        return quantize(w, t, lib)
    except NotImplementedError:
        f = qregistry.get(int(t))
        raw = rng.integers(0, 256, (w.size // f.block, f.block_bytes), dtype=np.uint8)
        for at in f.scale_offsets or ():  # f16 scales: finite, normal
            raw[:, at:at + 2] = rng.uniform(0.01, 0.1, raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
        return raw.reshape(w.shape[0], -1)


GGML_THREADS = max(1, (os.cpu_count() or 2) // 2)  # test-backend-ops: max(1, hardware_concurrency / 2)


def ggml_ms(binary, t, n, rb):
    """ms per run of ggml's MUL_MAT_ID for type ``t`` at this shape, from a generic-op test file."""
    # op MUL_MAT_ID (30): out f32 [ROWS, K, n]; a: t [COLS, ROWS, E]; b: f32 [COLS, 1, n]; ids: i32 [K, n]
    line = [30, 0, ROWS, K, n, 1, 0, 3, int(t), COLS, ROWS, E, 1, GGML_QUANT_SIZES[t][1], rb, rb * ROWS, rb * ROWS * E,
            0, COLS, 1, n, 1, 4, COLS * 4, COLS * 4, COLS * 4 * n, 26, K, n, 1, 1, 4, 4 * K, 4 * K * n, 4 * K * n]
    path = f"/tmp/hybrid_bench_types_{os.getpid()}.txt"
    with open(path, "w") as f:
        f.write(" ".join(map(str, line)) + " -\n")
    r = subprocess.run([binary, "perf", "-b", "CPU", "--test-file", path], capture_output=True, text=True, timeout=600)
    m = re.search(r"MUL_MAT_ID\(.*?([\d.]+) us/run", r.stdout)
    return float(m.group(1)) / 1e3 if m else None


def median_ms(fn, repeat):
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=DEFAULT)
    ap.add_argument("--tokens", default="1,8,32")
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--ggml-lib", help="libggml-base.so: quantise with ggml (every type)")
    ap.add_argument("--ggml", help="test-backend-ops: time ggml's MUL_MAT_ID on the same shapes")
    ap.add_argument("--random-codes", action="store_true",
                    help="random codes under random scales instead of quantised weights (the same work, no "
                         "quantiser's minutes: for timing two trees)")
    a = ap.parse_args(argv)
    numba.set_num_threads(a.threads)
    lib = ctypes.CDLL(a.ggml_lib) if a.ggml_lib else None
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((E * ROWS, COLS)) / np.sqrt(COLS)).astype(np.float32)
    tokens = [int(s) for s in a.tokens.split(",")]
    qregistry.activate(*(T[name] for name in a.types.split(",")))  # one compile for all, as the loader does
    print(f"# {machine_line()}; {a.threads} threads; [{ROWS} x {COLS}] x {E} experts, {K} used per token")
    if a.ggml:  # test-backend-ops sets the CPU backend's threads itself (tests/test-backend-ops.cpp)
        fair = "" if GGML_THREADS == a.threads else f": compare ours at --threads {GGML_THREADS} with it"
        print(f"# ggml: test-backend-ops runs its CPU backend on {GGML_THREADS} thread(s) (half the logical "
              f"cores), whatever --threads says{fair}")
    print()
    print("| type | bits/weight | tokens | ours ms | floor ms | ours / floor | ggml ms | ours / ggml |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in a.types.split(","):
        t = T[name]
        raw = weights(w, t, lib, rng, a.random_codes).reshape(E, ROWS, -1)
        rb = raw.shape[2]
        bits = 8 * rb / COLS
        cpu.check_experts(name, raw, int(t), E, ROWS, COLS)
        tl = cpu.check_tiles(None)
        for n in tokens:
            ids = np.stack([rng.choice(E, K, replace=False) for _ in range(n)]).astype(np.int64)
            x = rng.standard_normal((n, COLS)).astype(np.float32)
            ours = median_ms(lambda: cpu.mul_mat_id(raw, int(t), ROWS, COLS, x, ids, tl), a.repeat)
            used = np.unique(ids)
            floor = Floor([raw[e] for e in used], a.threads)
            fl = median_ms(floor, a.repeat)
            g = ggml_ms(a.ggml, t, n, rb) if a.ggml else None
            gs = f"{g:.2f} | {ours / g:.2f}x" if g else "- | -"
            print(f"| {name} | {bits:.2f} | {n} | {ours:.2f} | {fl:.2f} | {ours / fl:.2f}x | {gs} |", flush=True)


if __name__ == "__main__":
    main()
