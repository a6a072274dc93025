"""Kernels take shared memory dynamically (``cuda.shared.array(0, ...)``).

numba-cuda's simulator creates a static shared array when the first thread of a
block reaches its line, without a lock: two threads of one block can get two
different arrays, and the block computes garbage now and then (it failed the
device attention and whole-model tests under load). Its dynamic shared memory is
one buffer per block, made before the threads start.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATIC = re.compile(r"cuda\.shared\.array\(\s*(?!0\s*,)")  # a first argument other than 0


def test_no_kernel_declares_static_shared_memory():
    files = sorted((ROOT / "hybrid").rglob("*.py")) + sorted((ROOT / "quant").rglob("*.py"))
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if STATIC.search(line) and not line.lstrip().startswith("#")]
    assert not hits, f"static shared arrays (racy on the simulator): {hits}"


def test_the_check_sees_a_static_array():
    assert STATIC.search("sm = cuda.shared.array(WORDS, np.float32)")
    assert not STATIC.search("sm = cuda.shared.array(0, types.float32)")
