"""The dense and small-op kernels compiled for sm_80 and sm_90 with the machine's CUDA toolkit, no GPU needed.

As ``test_ptx.py`` does for the expert kernels, through ``examples/dense_kernel_report.py``
(simulator off, in a subprocess): ptxas must report no spills and no stack frame,
and the GEMM as many resident blocks per SM as its ``Variant`` assumes. The suite
checks the script's ``SUBSET`` and the ops, one PTX for both archs;
``HYBRID_PTX_ALL=1`` checks every build, with PTX per architecture.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import kernel_report  # noqa: E402

TOOLKIT = kernel_report.find_toolkit()
pytestmark = pytest.mark.skipif(TOOLKIT is None, reason="no CUDA toolkit (ptxas, libNVVM, libdevice; set CUDA_HOME)")


@pytest.fixture(scope="module")
def rows():
    full = os.environ.get("HYBRID_PTX_ALL") == "1"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    args = [sys.executable, str(ROOT / "examples" / "dense_kernel_report.py"), "--json"]
    args += [] if full else ["--subset"]
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_dense_kernels_compile_for_both_archs(rows):
    names = {row["kernel"] for row in rows}
    assert {"dense gemm MXFP4", "dense gemm Q8_0", "dense gemm BF16", "dense gemv MXFP4 T=8", "dense gemv BF16 T=8",
            "rmsnorm", "rope_neox", "add"} <= names
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}


def test_no_spills_no_stack_and_the_assumed_occupancy(rows):
    for row in rows:
        assert (row["spill_stores"], row["spill_loads"], row["stack"]) == (0, 0, 0), row
        assert row["blocks_per_sm"] >= row["assumed_blocks_per_sm"], row
