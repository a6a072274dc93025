"""Compile every CUDA kernel for real architectures without a GPU and report what ptxas says.

    python examples/kernel_report.py               # table: sm_80 and sm_90, every variant
    python examples/kernel_report.py --json        # the same as JSON (what the tests read)
    python examples/kernel_report.py --subset      # one gate+up build per expert type (faster)

Needs a CUDA toolkit (ptxas, nvdisasm, libNVVM and libdevice: ``CUDA_HOME``,
else ``/usr/local/cuda``, else the newest ``/usr/local/cuda-*``); no GPU and
no NVRTC (numba-cuda only asks NVRTC which architectures exist; without it the
architectures asked for are taken as they are). The simulator is switched off
for this process: the kernels go through numba-cuda's real compiler to PTX,
then ptxas for each architecture.

Per kernel and architecture: registers, spills, static + dynamic shared memory,
the resident blocks per SM those allow and the occupancy that gives, and the
SASS instruction mix: FFMA and HMMA (tensor-core MMA) against everything else,
over the whole kernel and over its hot loop (the backward branch holding the
most FFMA + HMMA: one K step), with the math a K step issues per weight it
decodes (FFMA kernels: FFMAs per thread per weight that thread decodes; tensor-core
kernels: MMA instructions per warp per weight the warp decodes, each m16n8k16
MMA being 4,096 multiply-adds). These are static counts, the proxy for speed
until a GPU runs the kernels (``examples/gpu_check.py``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# Per-SM limits (CUDA occupancy calculator, compute capability 8.0 and 9.0).
ARCH = {
    80: dict(regs=65536, warps=64, blocks=32, smem=167936, smem_block_max=166912, reserved=1024),
    90: dict(regs=65536, warps=64, blocks=32, smem=233472, smem_block_max=232448, reserved=1024),
}
REG_UNIT = 256  # registers are allocated per warp in units of 256


def find_toolkit() -> Path | None:
    """The CUDA toolkit directory holding ptxas, libNVVM and libdevice, or None."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    cands += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in filter(None, cands):
        p = Path(c)
        nvvm = glob.glob(str(p / "nvvm" / "lib*" / "libnvvm.so*")) + glob.glob(str(p / "lib*" / "libnvvm.so*"))
        if (p / "bin" / "ptxas").exists() and nvvm and glob.glob(str(p / "nvvm" / "libdevice" / "*.bc")):
            return p
    return None


def find_nvdisasm(tk: Path) -> str | None:
    """nvdisasm from the toolkit, else from the ``nvidia-cuda-nvdisasm`` wheel, else PATH."""
    import shutil
    if (tk / "bin" / "nvdisasm").exists():
        return str(tk / "bin" / "nvdisasm")
    try:
        import nvidia
        for base in nvidia.__path__:
            hits = sorted(glob.glob(os.path.join(base, "cu*", "bin", "nvdisasm")))
            if hits:
                return hits[-1]
    except ImportError:
        pass
    return shutil.which("nvdisasm")


def _setup_numba(tk: Path, archs):
    os.environ["CUDA_HOME"] = str(tk)
    from numba.cuda import cuda_paths
    from numba.cuda.cudadrv import nvrtc
    try:
        nvrtc.get_supported_ccs()
    except Exception:  # no NVRTC: it is only asked which architectures exist
        ccs = tuple(sorted({(a // 10, a % 10) for a in archs}))
        nvrtc.get_supported_ccs = lambda: ccs
        cuda_paths._get_nvrtc_path = lambda: cuda_paths._env_path_tuple("absent", None)


def occupancy(arch: int, regs: int, smem: int, threads: int) -> dict:
    """Resident blocks per SM and the fraction of the SM's warps they fill."""
    a = ARCH[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = (a["regs"] // per_warp) // warps
    by_smem = a["smem"] // (smem + a["reserved"]) if smem else a["blocks"]
    by_warps = a["warps"] // warps
    blocks = min(by_regs, by_smem, by_warps, a["blocks"])
    limit = min(("registers", by_regs), ("shared memory", by_smem), ("warps", by_warps), ("blocks", a["blocks"]),
                key=lambda kv: kv[1])[0]
    return dict(blocks_per_sm=blocks, occupancy=blocks * warps / a["warps"], limited_by=limit)


_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INT = ("IMAD", "IADD", "VIADD", "LEA", "SHF", "LOP", "ISETP", "IMNMX", "SEL", "PRMT", "I2F", "F2I", "MOV", "S2R",
        "CS2R", "UMOV", "UIADD", "ULEA", "USHF", "ULOP", "UIMAD", "UISETP", "USEL", "ULDC", "LDC")
_FP = ("FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "MUFU", "FCHK")


def _mix(ops):
    c = Counter(ops)
    n = sum(c.values())
    g = dict(ffma=c["FFMA"], hmma=c["HMMA"], fp_other=sum(v for k, v in c.items() if k in _FP), lds_sts=c["LDS"] + c["STS"],
             ldg_stg=c["LDG"] + c["STG"], int_addr=sum(v for k, v in c.items() if k.startswith(_INT)))
    g["other"] = n - sum(g.values())
    return dict(total=n, ffma_share=c["FFMA"] / n if n else 0.0, hmma_share=c["HMMA"] / n if n else 0.0, **g)


def sass_mix(sass: str) -> dict:
    """Static opcode mix of a kernel's SASS, and of its hot loop: the loop (a backward
    branch) holding the most FFMAs + HMMAs, the smallest such: the unrolled reduction step."""
    ins, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INS.search(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            t = _TARGET.search(m.group(3))
            ins.append((addr, m.group(2), t.group(1) if t else None))
    loops = [(labels[t], a) for a, op, t in ins if op == "BRA" and t in labels and labels[t] <= a]
    best, best_key = None, (0, 0)
    for lo, hi in loops:
        body = [op for a, op, _ in ins if lo <= a <= hi]
        key = (body.count("FFMA") + body.count("HMMA"), -len(body))
        if key > best_key:
            best, best_key = body, key
    return dict(kernel=_mix([op for _, op, _ in ins]), hot_loop=_mix(best or []))


def compile_all(archs, full=True, cfg=None, shared_ptx=False):
    import numba
    if numba.config.ENABLE_CUDASIM:
        raise SystemExit("kernel_report needs numba's real CUDA compiler: run it without NUMBA_ENABLE_CUDASIM")
    tk = find_toolkit()
    if tk is None:
        raise SystemExit("no CUDA toolkit found (ptxas, libNVVM, libdevice): set CUDA_HOME")
    _setup_numba(tk, archs)
    nvdisasm = find_nvdisasm(tk)
    from numba import cuda
    from hybrid.kernels.cuda import experts as K
    cfg = cfg or K.TileConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in K.variants(cfg, full=full):
            ptx = None
            for arch in archs:
                t0 = time.perf_counter()
                if ptx is None or not shared_ptx:
                    cc = min(archs) if shared_ptx else arch
                    ptx, _ = cuda.compile_ptx(v.kernel.py_func, v.signature, cc=(cc // 10, cc % 10))
                src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
                src.write_text(ptx)
                r = subprocess.run([str(tk / "bin" / "ptxas"), f"-arch=sm_{arch}", "-v", "-O3", str(src), "-o",
                                    str(cubin)], capture_output=True, text=True, check=True)
                info = r.stderr
                regs = int(re.search(r"Used (\d+) registers", info).group(1))
                spill_st = int(re.search(r"(\d+) bytes spill stores", info).group(1))
                spill_ld = int(re.search(r"(\d+) bytes spill loads", info).group(1))
                stack = int(re.search(r"(\d+) bytes stack frame", info).group(1))
                m = re.search(r"(\d+) bytes smem", info)
                static_smem = int(m.group(1)) if m else 0
                smem = static_smem + v.shared_bytes
                sass = None
                if nvdisasm:
                    sass = sass_mix(subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True,
                                                   text=True, check=True).stdout)
                row = dict(kernel=v.name, math=v.math, arch=f"sm_{arch}", registers=regs, spill_stores=spill_st,
                           spill_loads=spill_ld, stack=stack, shared_bytes=smem, threads=v.threads,
                           assumed_blocks_per_sm=v.min_blocks_per_sm,
                           **occupancy(arch, regs, smem, v.threads), sass=sass,
                           compile_s=round(time.perf_counter() - t0, 2))
                if v.name.startswith(("gate_up", "down")) and v.math == "mma":
                    # One K step, one warp, every m16 row tile live: 3 BF16 pieces x
                    # (BK/16) x (BM/16) x (warp_cols/8) MMAs per matrix, against the
                    # BN*BK/warps weights per matrix the warp decodes.
                    warps = cfg.block_cols // cfg.warp_cols
                    n_mma = 3 * (cfg.k_chunk // 16) * (cfg.block_pairs // 16) * (cfg.warp_cols // 8)
                    row["mma_per_decoded_weight"] = n_mma / (cfg.block_cols * cfg.k_chunk / warps)
                elif v.name.startswith(("gate_up", "down")):
                    n_mats = 2 if v.name.startswith("gate_up") else 1
                    # One K step, one thread: TM*TN*BK FFMAs per matrix against
                    # BN*BK/threads weights decoded per matrix.
                    ffma = cfg.thread_rows * cfg.thread_cols * cfg.k_chunk * n_mats
                    decoded = cfg.block_cols * cfg.k_chunk * n_mats / cfg.threads
                    row["ffma_per_decoded_weight"] = ffma / decoded
                rows.append(row)
    return tk, nvdisasm, cfg, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="80,90", help="comma list of sm numbers (default 80,90)")
    ap.add_argument("--subset", action="store_true", help="one gate+up build per expert type")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--shared-ptx", action="store_true",
                    help="one PTX per kernel (for the lowest arch), assembled by ptxas for every arch: half the "
                         "compile time; a real GPU gets PTX for its own arch")
    a = ap.parse_args(argv)
    archs = [int(s) for s in a.arch.split(",") if s]
    bad = [x for x in archs if x not in ARCH]
    if bad:
        ap.error(f"--arch: no limits known for sm_{bad[0]} (known: {', '.join(f'sm_{k}' for k in ARCH)})")
    tk, nvdisasm, cfg, rows = compile_all(archs, full=not a.subset, shared_ptx=a.shared_ptx)
    if a.json:
        print(json.dumps(dict(toolkit=str(tk), nvdisasm=nvdisasm, tiles=cfg.__dict__, rows=rows)))
        return 0
    print(f"toolkit: {tk}; nvdisasm: {nvdisasm or 'not found (pip install nvidia-cuda-nvdisasm): no SASS mix'}")
    print(f"tiles: {cfg}")
    print("\n| kernel | arch | regs | spills (st/ld B) | smem B | threads | blocks/SM (limit) | occupancy | "
          "SASS FFMA / HMMA share: kernel / hot loop | hot loop: FFMA, HMMA, LDS+STS, int/addr, other | "
          "math per decoded weight |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        nil = dict(ffma_share=None, hmma_share=None, ffma="-", hmma="-", lds_sts="-", int_addr="-", other=0,
                   fp_other=0, ldg_stg=0)
        k, ml = (r["sass"]["kernel"], r["sass"]["hot_loop"]) if r["sass"] else (nil, nil)
        rest = ml["other"] + ml["fp_other"] + ml["ldg_stg"] if r["sass"] else "-"
        share = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731 (no SASS without nvdisasm)
        fpw = "-"
        if "ffma_per_decoded_weight" in r:
            fpw = f"{r['ffma_per_decoded_weight']:.0f} FFMA/thread"
        elif "mma_per_decoded_weight" in r:
            fpw = f"{r['mma_per_decoded_weight']:.3f} HMMA/warp"
        tc = r["math"] == "mma"
        kshare = share(k["hmma_share"] if tc else k["ffma_share"])
        lshare = share(ml["hmma_share"] if tc else ml["ffma_share"])
        print(f"| {r['kernel']} | {r['arch']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
              f"{r['shared_bytes']} | {r['threads']} | {r['blocks_per_sm']} ({r['limited_by']}) | "
              f"{r['occupancy']:.0%} | {'HMMA' if tc else 'FFMA'} {kshare} / {lshare} | "
              f"{ml['ffma']}, {ml['hmma']}, {ml['lds_sts']}, {ml['int_addr']}, {rest} | "
              f"{fpw} |")
    return 0


if __name__ == "__main__":
    # The real compiler, not the simulator: before numba is imported (only when run
    # as a script; the tests import this module for its helpers).
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
