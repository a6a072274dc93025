"""The tensor-core instruction the grouped kernels use, and its emulation on the simulator.

``mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3) -> (d0, d1, d2, d3)`` is one
warp-wide ``mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32``:
D (16x8, float32) = A (16x16, bf16) @ B (16x8, bf16) + C (16x8, float32), every
lane of the warp passing its own registers in the fragment layout of the PTX
ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"), with
``g = lane >> 2`` and ``t = lane & 3``:

- A, four 32-bit registers of two bf16 each (lower column in the low half):
  ``a0 = A[g, 2t:2t+2]``, ``a1 = A[g+8, 2t:2t+2]``, ``a2 = A[g, 2t+8:2t+10]``,
  ``a3 = A[g+8, 2t+8:2t+10]``;
- B, two registers: ``b0 = B[2t:2t+2, g]``, ``b1 = B[2t+8:2t+10, g]`` (lower k in the low half);
- C and D, four floats: ``c0, c1 = C[g, 2t], C[g, 2t+1]``, ``c2, c3 = C[g+8, 2t], C[g+8, 2t+1]``.

On a GPU it is inline PTX: a numba ``@intrinsic`` whose code generation emits an
LLVM ``InlineAsm`` call (no CUDA C++ needed). The simulator cannot run PTX, so
under ``NUMBA_ENABLE_CUDASIM`` the same name is a device function that emulates
the instruction for the warp: each lane stores its registers in a per-warp
scratch, the block synchronises, and each lane rebuilds the A, B and C elements
it needs from the other lanes' registers through the same layout and computes
its four outputs (products exact, summed in float32 in k order). Like the real
instruction it must be reached by every thread of the block (the emulation's
barrier is the block's), so the kernels call it under block-uniform control
flow only. The hardware's order and rounding of the sum inside one MMA are its
own: bitwise agreement holds run to run on one path, not between the two.

``f32_bits`` / ``bits_f32`` (from ``quant.bits``, named here too) reinterpret a float32
as its uint32 bits and back (an LLVM bitcast on the GPU, a numpy view on the simulator).
"""
from __future__ import annotations

import functools
import logging

import numpy as np
from numba import cuda
from numba.cuda.core import config as cuda_config

from quant.bits import bits_f32, bits_to_f32 as _bits_to_f32, f32_bits  # noqa: F401

SIMULATOR = bool(cuda_config.ENABLE_CUDASIM)
PTX = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
M, N, K = 16, 8, 16
MAX_WARPS = 32  # warps per block (1024 threads): the emulation's scratch
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- simulator (plain numpy, run per thread)

def _bf16_pair(word, high):
    """The bf16 in the low (``high`` False) or high half of a 32-bit register, as float32."""
    w = int(word) & 0xFFFFFFFF
    return _bits_to_f32(((w >> 16) if high else (w & 0xFFFF)) << 16)


def _a_elem(regs, m, k):
    """A[m, k] from the warp's A registers ``regs[lane, 0:4]`` (layout above, inverted)."""
    lane = (m & 7) * 4 + ((k & 7) >> 1)
    reg = (1 if m >= 8 else 0) + (2 if k >= 8 else 0)
    return _bf16_pair(regs[lane, reg], k & 1)


def _b_elem(regs, k, n):
    """B[k, n] from the warp's B registers ``regs[lane, 4:6]``."""
    lane = n * 4 + ((k & 7) >> 1)
    return _bf16_pair(regs[lane, 4 + (1 if k >= 8 else 0)], k & 1)


def _emulate(regs, lane, c):
    """The four outputs of ``lane`` given every lane's registers ``regs`` [32, 6] and its own C."""
    g, t = lane >> 2, lane & 3
    out = []
    for i in range(4):
        m = g + (8 if i >= 2 else 0)
        n = 2 * t + (i & 1)
        acc = np.float32(c[i])
        for k in range(K):
            acc = np.float32(acc + np.float32(_a_elem(regs, m, k) * _b_elem(regs, k, n)))
        out.append(acc)
    return out


if SIMULATOR:
    import threading
    import weakref

    _SCRATCH = weakref.WeakKeyDictionary()
    _LOCK = threading.Lock()

    def _scratch(shared):
        # One scratch per block, keyed by the block's shared-memory object: [warp, lane,
        # register] as float64, which holds every uint32 exactly. Made under a lock: the
        # simulator's own static shared arrays are created racily by the first threads
        # to reach them, which could give two lanes of one warp different arrays.
        with _LOCK:
            s = _SCRATCH.get(shared)
            if s is None:
                s = _SCRATCH[shared] = np.zeros((MAX_WARPS, 32, 6), np.float64)
            return s

    @cuda.jit(device=True)
    def mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        scratch = _scratch(cuda.shared)
        tid = cuda.threadIdx.x
        warp, lane = tid // 32, tid % 32
        for i, r in enumerate((a0, a1, a2, a3, b0, b1)):
            scratch[warp, lane, i] = int(r) & 0xFFFFFFFF
        cuda.syncthreads()
        d = _emulate(scratch[warp].astype(np.uint64), lane, (c0, c1, c2, c3))
        cuda.syncthreads()  # every lane has read the scratch before the next call writes it
        return d[0], d[1], d[2], d[3]

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def mma_bf16(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        regs, accs = (a0, a1, a2, a3, b0, b1), (c0, c1, c2, c3)
        if not all(isinstance(r, types.Integer) for r in regs) or not all(isinstance(c, types.Float) for c in accs):
            return None
        sig = types.UniTuple(types.float32, 4)(*regs, *accs)

        def codegen(context, builder, sig, args):
            i32, f32 = ir.IntType(32), ir.FloatType()
            ins = [context.cast(builder, v, ty, types.uint32) for v, ty in zip(args[:6], sig.args[:6])]
            ins += [context.cast(builder, v, ty, types.float32) for v, ty in zip(args[6:], sig.args[6:])]
            fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
            asm = ir.InlineAsm(fnty, PTX + " {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                               "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
            res = builder.call(asm, ins)
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(res, i) for i in range(4)])

        return sig, codegen


# ---------------------------------------------------------------- host-side reference of the layout (tests)

def fragments(A, B, C):
    """Per-lane registers of A [16, 16], B [16, 8] (bf16 values given as float32) and C [16, 8]
    (float32), in the PTX layout: ``(regs uint32 [32, 6], c float32 [32, 4])``; the forward
    map, written from the PTX ISA's tables (the emulation inverts it)."""
    hb = lambda v: int(np.array(v, np.float32).view(np.uint32)) >> 16  # noqa: E731 (exact for bf16 values)
    pack = lambda lo, hi: hb(lo) | (hb(hi) << 16)  # noqa: E731
    regs = np.zeros((32, 6), np.uint32)
    c = np.zeros((32, 4), np.float32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        regs[lane, 0] = pack(A[g, 2 * t], A[g, 2 * t + 1])
        regs[lane, 1] = pack(A[g + 8, 2 * t], A[g + 8, 2 * t + 1])
        regs[lane, 2] = pack(A[g, 2 * t + 8], A[g, 2 * t + 9])
        regs[lane, 3] = pack(A[g + 8, 2 * t + 8], A[g + 8, 2 * t + 9])
        regs[lane, 4] = pack(B[2 * t, g], B[2 * t + 1, g])
        regs[lane, 5] = pack(B[2 * t + 8, g], B[2 * t + 9, g])
        c[lane] = C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]
    return regs, c


def unfragment(d):
    """D [16, 8] from the lanes' outputs ``d`` [32, 4] (the C/D layout)."""
    D = np.zeros((16, 8), np.float32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1] = d[lane]
    return D


# ---------------------------------------------------------------- a check of the instruction where it runs

@cuda.jit
def probe_kernel(regs, c, d):
    """One warp: ``d[lane] = mma_bf16(regs[lane], c[lane])``, the instruction alone."""
    lane = cuda.threadIdx.x
    d0, d1, d2, d3 = mma_bf16(regs[lane, 0], regs[lane, 1], regs[lane, 2], regs[lane, 3],
                              regs[lane, 4], regs[lane, 5], c[lane, 0], c[lane, 1], c[lane, 2], c[lane, 3])
    d[lane, 0] = d0
    d[lane, 1] = d1
    d[lane, 2] = d2
    d[lane, 3] = d3


def check_instruction(seed: int = 0) -> str | None:
    """Run one MMA on random fragments and compare it with numpy: None when it agrees,
    else what went wrong. The fragment layout is written from the PTX ISA and checked on
    the simulator against its emulation; this checks it (and the instruction) on the
    device itself, once, before ``math="auto"`` trusts the tensor cores."""
    rng = np.random.default_rng(seed)
    bf16 = lambda a: (np.asarray(a, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # noqa: E731
    A, B = bf16(rng.standard_normal((M, K))), bf16(rng.standard_normal((K, N)))
    C = rng.standard_normal((M, N)).astype(np.float32)
    regs, c = fragments(A, B, C)
    d = np.zeros((32, 4), np.float32)
    try:
        probe_kernel[1, 32](regs, c, d)
    except Exception as e:  # a compile or launch failure: report it, the caller falls back
        return f"{type(e).__name__}: {e}"
    D = unfragment(d)
    ref = A.astype(np.float64) @ B.astype(np.float64) + C
    # Products are exact; K + 1 float32 additions, truncating on tensor cores: 2 ulps each.
    bound = (K + 1) * 2.0 ** -22 * (np.abs(A.astype(np.float64)) @ np.abs(B.astype(np.float64)) + np.abs(C))
    bad = np.argwhere(~(np.abs(D - ref) <= bound))
    if bad.size:
        m, n = bad[0]
        return f"D[{m}, {n}] = {D[m, n]!r}, expected {ref[m, n]!r} ({len(bad)} of {M * N} elements off)"
    return None


@functools.cache
def instruction_ok(context_key: int) -> bool:
    """``check_instruction`` once per CUDA context (device) and process; a failure is logged once."""
    err = check_instruction()
    if err is not None:
        log.warning("tensor-core check failed on this device (%s): the expert kernels use FFMA", err)
    return err is None
