"""What ptxas says of the dense-weight, small-op and attention kernels (``hybrid/kernels/cuda/dense.py``,
``ops.py``, ``attention.py``) for sm_80 and sm_90, no GPU needed.

    python examples/dense_kernel_report.py            # table: every build (GEMV at T = 1, 4, 8)
    python examples/dense_kernel_report.py --subset   # the builds tests/kernels/test_ptx.py checks, one PTX each
    python examples/dense_kernel_report.py --json     # rows as JSON

``kernel_report.py`` does the compiling (same toolkit rules, simulator off); this
script only hands it these kernels instead of the expert kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# The builds tests/kernels/test_ptx.py checks: the GEMV at T=8 (the most accumulators) for MXFP4 and BF16,
# the GEMM for MXFP4, Q8_0 and BF16 (F32 decodes as the first two, F16 as BF16), the ops, and
# attention at head dim 64 (``device_attention.variants(full=False)``).
SUBSET = ("dense gemv MXFP4 T=8", "dense gemv BF16 T=8", "dense gemm MXFP4", "dense gemm Q8_0", "dense gemm BF16",
          "dense gemv Q4_K T=8", "dense gemm Q4_K", "dense rows Q4_K")  # Q4_K: the block-decoder builds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", action="store_true", help="the builds the tests check, one PTX for both archs")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    a = ap.parse_args(argv)
    import kernel_report
    from hybrid.kernels.cuda import attention as device_attention, dense as device_dense, ops as device_ops
    from hybrid.kernels.cuda import experts as kernels

    def dense_variants(cfg=None, full=True):
        vs = (device_dense.variants(gemv_tokens=(1, 4, 8) if full else (8,)) + device_ops.variants()
              + device_attention.variants(full=full))
        return vs if full else [v for v in vs if v.name in SUBSET or not v.name.startswith("dense")]

    kernels.variants = dense_variants  # kernel_report compiles what this lists
    _, _, _, rows = kernel_report.compile_all([80, 90], full=not a.subset, shared_ptx=a.subset)
    if a.json:
        print(json.dumps(rows))
        return 0
    print("| kernel | registers sm_80 / sm_90 | spills | stack | shared B | threads | blocks/SM sm_80 / sm_90 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], {})[r["arch"]] = r
    for name, arch in by_kernel.items():
        a80, a90 = arch["sm_80"], arch["sm_90"]
        spills = max(r["spill_stores"] + r["spill_loads"] for r in (a80, a90))
        stack = max(r["stack"] for r in (a80, a90))
        print(f"| {name} | {a80['registers']} / {a90['registers']} | {spills} | {stack} | {a80['shared_bytes']:,} | "
              f"{a80['threads']} | {a80['blocks_per_sm']} / {a90['blocks_per_sm']} |")
    return 0


if __name__ == "__main__":
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)  # the real compiler, before numba is imported
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here)]
    sys.exit(main())
