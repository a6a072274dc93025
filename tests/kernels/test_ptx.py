"""The CUDA kernels compiled for real GPUs (sm_80, sm_90) with the machine's CUDA toolkit, no GPU needed.

numba-cuda's compiler (not the simulator) lowers every kernel to PTX, ptxas
assembles it; ptxas must report no spills, and the registers and shared memory
must let as many blocks share an SM as the launch configuration assumes
(``kernels.MIN_BLOCKS_PER_SM``), and the tensor-core kernels' SASS must hold
their HMMA instructions (when nvdisasm is found). The suite checks one gate+up build per expert
type (together every activation and bias setting) and every down build, from one
PTX per kernel; ``HYBRID_PTX_ALL=1`` checks every variant with PTX per arch.
The dense-weight, small-op and attention kernels (``examples/dense_kernel_report.py``:
its ``SUBSET``, the ops and attention at head dim 64, or every build with
``HYBRID_PTX_ALL=1``) are held to no spills, no stack and their assumed occupancy
the same way.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType as T

from hybrid.kernels.cuda.experts import expert_types
from quant import registry

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import kernel_report  # noqa: E402

TOOLKIT = kernel_report.find_toolkit()
pytestmark = pytest.mark.skipif(TOOLKIT is None, reason="no CUDA toolkit (ptxas, libNVVM, libdevice; set CUDA_HOME)")


FULL = os.environ.get("HYBRID_PTX_ALL") == "1"


def _run_json(script, *args):
    """``examples/<script> --json args`` with the simulator off, its JSON output."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--json", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def report():
    return _run_json("kernel_report.py", "--arch", "80,90", *([] if FULL else ["--subset", "--shared-ptx"]))


@pytest.fixture(scope="module")
def dense_rows():
    return _run_json("dense_kernel_report.py", *([] if FULL else ["--subset"]))


def _stack_limit(kernel):
    """The stack a build may have: none, but for the formats read through their block decoder
    (``quant.cuda.block_tile_decoder``), whose local one-block buffers (1 KB for 256 values)
    stay in memory where they do not fit registers: one per decoder a K step inlines
    (gate+up: 2; the row lookup decodes in place; the GEMV's sums too)."""
    words = kernel.split()
    f = next((registry.get(getattr(T, w)) for w in words if hasattr(T, w) and registry.has(getattr(T, w))), None)
    if f is None or not f.cuda_tile_parts or words[1] == "rows":
        return 0
    if words[1] == "gemv":  # and its T x gemv_rows sums, indexed in the loop over a row's blocks
        from hybrid.kernels.cuda.dense import DenseTiles
        return 4 * f.block + 4 * int(words[-1].removeprefix("T=")) * DenseTiles().gemv_rows
    return (2 if words[0] == "gate_up" else 1) * 4 * f.block


def test_every_kernel_compiles_for_both_archs(report):
    names = {row["kernel"] for row in report["rows"]}
    for t in ("MXFP4", "Q8_0", "F32"):
        assert any(n.startswith(f"gate_up {t}") for n in names)
        assert {f"down {t}", f"down {t} bias"} <= names
    assert "reduce" in names
    for t in expert_types():  # every format's decoder compiled for hardware at least once
        assert f"down {registry.type_name(t)}" in names
    # The tensor-core builds (MXFP4): both activations, both bias settings, and down.
    assert {"gate_up MXFP4 swiglu_oai bias mma", "gate_up MXFP4 silu mma", "down MXFP4 mma",
            "down MXFP4 bias mma"} <= names
    assert {row["arch"] for row in report["rows"]} == {"sm_80", "sm_90"}


def test_tensor_core_kernels_run_hmma(report):
    if not report["nvdisasm"]:
        pytest.skip("no nvdisasm (pip install nvidia-cuda-nvdisasm): no SASS to read")
    for row in report["rows"]:
        mix = row["sass"]
        if row["math"] == "mma":
            # Fully unrolled K step: 3 BF16 pieces x 2 (K 32 / 16) x 2 (M 32 / 16) x 2 (N 16 / 8) per matrix.
            n_mats = 2 if row["kernel"].startswith("gate_up") else 1
            assert mix["hot_loop"]["hmma"] == 24 * n_mats, row
            assert mix["hot_loop"]["ffma"] == 0, row
        else:
            assert mix["kernel"]["hmma"] == 0, row


def test_no_spills_and_no_stack(report):
    for row in report["rows"]:
        assert (row["spill_stores"], row["spill_loads"]) == (0, 0) and row["stack"] <= _stack_limit(row["kernel"]), row


def test_occupancy_the_launch_assumes(report):
    for row in report["rows"]:
        assert row["blocks_per_sm"] >= row["assumed_blocks_per_sm"], row


def test_occupancy_model():
    # 128 threads at 128 registers: 4096 registers a warp, 16 warps, 4 blocks.
    o = kernel_report.occupancy(90, 128, 22 * 1024, 128)
    assert o["blocks_per_sm"] == 4 and o["limited_by"] == "registers" and o["occupancy"] == 0.25
    assert kernel_report.occupancy(80, 32, 100 * 1024, 128)["limited_by"] == "shared memory"


def test_sass_mix_finds_the_hot_loop():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDS R2, [R3] ;
        /*0020*/                   FFMA R4, R2, R2, R4 ;
        /*0030*/                   FFMA R5, R2, R2, R5 ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
        /*0050*/                   EXIT ;
"""
    m = kernel_report.sass_mix(sass)
    assert m["kernel"]["total"] == 6 and m["kernel"]["ffma"] == 2
    assert m["hot_loop"]["total"] == 4 and m["hot_loop"]["ffma_share"] == 0.5 and m["hot_loop"]["lds_sts"] == 1
    hmma = sass.replace("FFMA R4, R2, R2, R4", "HMMA.16816.F32.BF16 R4, R2, R8, R4")
    m = kernel_report.sass_mix(hmma)
    assert m["hot_loop"]["hmma"] == 1 and m["hot_loop"]["ffma"] == 1 and m["hot_loop"]["hmma_share"] == 0.25


def test_dense_kernels_compile_for_both_archs(dense_rows):
    names = {row["kernel"] for row in dense_rows}
    assert {"dense gemm MXFP4", "dense gemm Q8_0", "dense gemm BF16", "dense gemv MXFP4 T=8", "dense gemv BF16 T=8",
            "rmsnorm", "rope_neox", "add", "attention wide d64", "attention narrow d64", "attention combine",
            "kv store"} <= names
    assert {row["arch"] for row in dense_rows} == {"sm_80", "sm_90"}


def test_dense_kernels_no_spills_no_stack_and_the_assumed_occupancy(dense_rows):
    for row in dense_rows:
        assert (row["spill_stores"], row["spill_loads"]) == (0, 0) and row["stack"] <= _stack_limit(row["kernel"]), row
        assert row["blocks_per_sm"] >= row["assumed_blocks_per_sm"], row
