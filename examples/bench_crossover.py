"""Where the integer path stops paying: int8 activations against float32 tiles, by tokens per expert.

    python examples/bench_crossover.py [--types Q4_0,Q4_K,...] [--per-expert 1,2,4,...] [--threads 2]
        [--ggml-lib .../libggml-base.so]

For each format with an integer dot on this CPU, E experts of [rows x cols] each receive exactly
``n`` tokens (k = 1) and one ``mul_mat_id`` call multiplies them twice: with ``q8_tokens=0`` (the
float path: each expert's weights decoded to float32 once per call, reused for all its tokens)
and with every expert forced onto the integer path (activations quantised to int8 blocks, integer
multiply-adds on the codes). The last column is the largest ``n`` at which the integer path is
still no slower; hybrid/kernels/cpu/experts.py keeps those numbers as ``Q8_MAX_TOKENS``.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import numba
import numpy as np
from gguf.constants import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid.kernels.cpu import experts as cpu  # noqa: E402
from hybrid.kernels.cpu.ir import q8_types  # noqa: E402
from quant import registry as qregistry  # noqa: E402
from hybrid.report import machine_line  # noqa: E402
from bench_types import median_ms, weights  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", help="comma-separated; default: every format with an integer dot here")
    ap.add_argument("--per-expert", default="1,2,4,8,16,24,32,48,64,96,128")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ggml-lib", help="libggml-base.so: quantise with ggml (every type)")
    a = ap.parse_args(argv)
    if a.cols % 256 or a.rows % 8 or a.experts < 1:
        ap.error("--cols must be a multiple of 256, --rows of 8, --experts positive")
    numba.set_num_threads(a.threads)
    per = [int(s) for s in a.per_expert.split(",")]
    if cpu.Q8_VARIANT is None:
        sys.exit("no integer path on this CPU (needs AVX2)")
    names = a.types.split(",") if a.types else [T(t).name for t in q8_types(cpu.Q8_VARIANT)]
    qregistry.activate(*(int(T[n]) for n in names))  # at once: one rebuild of the generated kernels
    rng = np.random.default_rng(0)
    lib = ctypes.CDLL(a.ggml_lib) if a.ggml_lib else None
    E, R, C = a.experts, a.rows, a.cols
    w = (rng.standard_normal((E * R, C)) / np.sqrt(C)).astype(np.float32)
    flt, q8 = cpu.check_tiles(cpu.F32_TILES), cpu.check_tiles(cpu.CpuTiles(q8_tokens=max(per)))
    print(f"# {machine_line()}; {a.threads} threads; {E} experts x [{R} x {C}], k=1, "
          f"n tokens per expert; medians of {a.repeat}\n")
    print("| type | " + " | ".join(f"n={n}" for n in per) + " | int8 no slower up to | Q8_MAX_TOKENS |")
    print("|---|" + "---:|" * (len(per) + 2))
    for name in names:
        t = T[name]
        if int(t) not in cpu.Q8_TYPES:
            print(f"| {name} | no integer dot on this CPU |")
            continue
        raw = weights(w, t, lib, rng).reshape(E, R, -1)
        cpu.check_experts(name, raw, int(t), E, R, C)
        cells, best = [], 0
        for n in per:
            ids = np.repeat(np.arange(E), n)[:, None].astype(np.int64)
            x = rng.standard_normal((E * n, C)).astype(np.float32)
            tf = median_ms(lambda: cpu.mul_mat_id(raw, int(t), R, C, x, ids, flt), a.repeat)
            tq = median_ms(lambda: cpu.mul_mat_id(raw, int(t), R, C, x, ids, q8), a.repeat)
            cells.append(f"{tf / tq:.2f}")
            if tq <= tf:
                best = n
        print(f"| {name} | " + " | ".join(cells) + f" | {best} | {cpu.q8_max_tokens(t)} |", flush=True)
    print("\ncells: float ms / int8 ms (above 1: the integer path is faster)")


if __name__ == "__main__":
    main()
