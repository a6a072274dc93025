"""The GPU check script runs end to end on the simulator (so it is ready when a GPU is)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs the CUDA simulator")
def test_gpu_check_tiny_runs_on_the_simulator():
    code = ("import sys, runpy; sys.setswitchinterval(2e-4); "
            "sys.argv = ['gpu_check.py', '--tiny', '--skip', 'paths']; "
            "runpy.run_path('examples/gpu_check.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| gpt-oss-120b | 4 |" in r.stdout
    for variant in ("all", "used", "used+overlap", "used+per-range", "used+staged", "used+cache", "used+merge"):
        assert f"| {variant} |" in r.stdout
    assert "| 8 | used+staged | staged |" in r.stdout
    assert "| Q2_K |" in r.stdout and "every expert type: PASS" in r.stdout
    assert "simulator: ON" in r.stdout  # the doctor section runs and says where it is
    # the whole model at both shapes, built in memory: pp4 and pp8 copy-all vs used-only vs used+cache
    for model in ("gpt-oss-20b", "gpt-oss-120b"):
        for test in ("pp4", "pp8"):
            assert f"| {model} | 4 | {test} |" in r.stdout
        assert f"PR #15346 on {model} (the real model, pp2048)" in r.stdout
    assert "| t/s all (sim) | t/s used (sim) | speedup | t/s used+cache (sim) |" in r.stdout
