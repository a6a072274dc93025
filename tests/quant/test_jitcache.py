"""The disk cache behind ``cache=True``: two processes saving different keys at once never leave
one key naming the other's code (numba's numbered files did: two test workers then ran the wrong
CPU expert kernels and got NaN), and entries still load in the next process."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from numba.core.caching import IndexDataCacheFile

from quant import jitcache
from quant.jitcache import _KeyedCacheFile

K1, K2 = ("sig-1", "host", "fingerprint-a"), ("sig-1", "host", "fingerprint-b")


def _race(cls, tmp_path, defer_first_data):
    """Two writers that both read the index before either wrote it (what two processes compiling
    at once do); the first writer's data write optionally lands last. Returns what each key loads."""
    a, b = (cls(str(tmp_path), "f-1", ("stamp", 1)) for _ in range(2))
    deferred = []
    if defer_first_data:
        real = a._save_data
        a._save_data = lambda name, data: deferred.append((real, name, data))
    stale = b._load_index()  # b's read of the index, before a saves
    a.save(K1, "code for K1")
    b._load_index = lambda: dict(stale)
    b.save(K2, "code for K2")
    for real, name, data in deferred:
        real(name, data)
    reader = cls(str(tmp_path), "f-1", ("stamp", 1))
    return reader.load(K1), reader.load(K2)


@pytest.mark.parametrize("defer_first_data", [False, True])
def test_concurrent_saves_never_cross_keys(tmp_path, defer_first_data):
    got1, got2 = _race(_KeyedCacheFile, tmp_path, defer_first_data)
    assert got1 in (None, "code for K1") and got2 in (None, "code for K2")
    assert got2 == "code for K2"  # the last index write keeps its entry
    a = _KeyedCacheFile(str(tmp_path), "f-1", ("stamp", 1))
    a.save(K1, "code for K1")  # the lost entry, compiled again, is found again
    assert a.load(K1) == "code for K1" and a.load(K2) == "code for K2"


def test_the_race_is_real_in_numbas_numbered_files(tmp_path):
    # The same interleaving on numba's own class hands K2 the code compiled for K1: if this
    # ever stops holding, numba fixed it and quant.jitcache can go.
    assert _race(IndexDataCacheFile, tmp_path, defer_first_data=True)[1] == "code for K1"


def test_an_entry_holding_another_keys_code_is_a_miss(tmp_path):
    c = _KeyedCacheFile(str(tmp_path), "f-1", ("stamp", 1))
    c.save(K1, "code for K1")
    index = c._load_index()
    index[K2] = index[K1]  # an index naming K1's file for K2 (numba's layout, or a torn write)
    c._save_index(index)
    assert c.load(K2) is None and c.load(K1) == "code for K1"
    (tmp_path / index[K1]).write_bytes(b"truncated")
    assert c.load(K1) is None  # unreadable: compiled again, not an exception


def test_entries_load_in_the_next_process(tmp_path):
    # jitcache loaded by path: importing the quant package would compile its kernels first
    (tmp_path / "jc_mod.py").write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("jitcache", {str(Path(jitcache.__file__))!r})
        jitcache = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(jitcache)

        @jitcache.njit(cache=True)
        def f(x):
            return x * 2 + 1
    """))
    script = textwrap.dedent("""
        import jc_mod
        assert jc_mod.f(3) == 7 and jc_mod.f(1.5) == 4.0
        print(sum(jc_mod.f.stats.cache_hits.values()), sum(jc_mod.f.stats.cache_misses.values()))
    """)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    assert runs[0].stdout.split() == ["0", "2"]  # both signatures compiled and saved
    assert runs[1].stdout.split() == ["2", "0"]  # both loaded from disk
