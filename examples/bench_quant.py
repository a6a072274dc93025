"""Dequantise throughput for an 8-expert 2880x2880 MXFP4 tensor (GB/s of float32 written).

    python examples/bench_quant.py [--threads 2] [--repeat 5]

Compares our Numba path with gguf's numpy reference and with a plain numpy
copy of the same output size (the memory bound on this machine).
"""
import argparse
import platform
import time

import numba
import numpy as np
from gguf import quants
from gguf.constants import GGMLQuantizationType as T

from quant import mxfp4


def best_of(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    rows, cols = 2880, 2880
    w = rng.standard_normal((args.experts, rows, cols), dtype=np.float32)
    blocks = mxfp4.quantize(w)
    del w
    out_bytes = args.experts * rows * cols * 4
    src = np.empty(out_bytes // 4, np.float32)
    src[:] = 1.0
    dst = np.empty_like(src)

    mxfp4.dequantize(blocks[:1])  # compile
    t_ours = best_of(lambda: mxfp4.dequantize(blocks), args.repeat)
    t_gguf = best_of(lambda: quants.dequantize(blocks, T.MXFP4), max(1, args.repeat // 2))
    t_copy = best_of(lambda: np.copyto(dst, src), args.repeat)

    print(f"MXFP4 dequantise, {args.experts} experts x {rows}x{cols} "
          f"({blocks.nbytes / 1e6:.1f} MB in, {out_bytes / 1e6:.1f} MB float32 out), "
          f"{args.threads} threads, {cpu_name()}\n")
    print("| path | ms | GB/s written | vs gguf | vs numpy copy |")
    print("|---|---:|---:|---:|---:|")
    for name, t in (("quant.mxfp4 (Numba)", t_ours), ("gguf.quants (numpy)", t_gguf),
                    ("numpy copy, same size", t_copy)):
        print(f"| {name} | {t * 1e3:.1f} | {out_bytes / t / 1e9:.2f} | {t_gguf / t:.1f}x | {t_copy / t:.2f} |")


if __name__ == "__main__":
    main()
