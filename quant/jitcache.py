"""numba's on-disk cache, made safe for processes that compile at the same time.

numba names a function's cache entries ``<base>.1.nbc``, ``<base>.2.nbc``, ... by the first number
its index does not hold yet. Two processes that compile the same function for different keys at
once (two signatures; two registry fingerprints, ``quant.registry.jit``) each read the index
before the other writes it, both take number 1, and the index ends up naming one key with the
other's machine code: every later load of that key runs the wrong code (numba issue #4807).

Here each entry's file is named by a hash of its key, and holds its key, checked on load: an
index that lost a race costs a compile, never wrong code. ``njit`` is ``numba.njit`` with this
cache behind ``cache=True``; ``KeyedCache`` is the cache class for other wrappers.
"""
from __future__ import annotations

import hashlib

import numba as nb
from numba.core.caching import FunctionCache, IndexDataCacheFile

__all__ = ["KeyedCache", "njit"]

_MARK = "quant.jitcache/1"  # what a data file written here starts with


class _KeyedCacheFile(IndexDataCacheFile):
    """The index and data files of one function: data named by its key's hash, key inside."""

    def _key_name(self, key):
        return self._data_name_pattern.replace("{number:d}", hashlib.sha256(self._dump(key)).hexdigest()[:20])

    def save(self, key, data):
        name = self._key_name(key)
        self._save_data(name, (_MARK, key, data))  # data first: an index entry never names a missing file
        overloads = self._load_index()
        if overloads.get(key) != name:
            overloads[key] = name
            self._save_index(overloads)

    def load(self, key):
        name = self._load_index().get(key)
        if name is None:
            return None
        try:
            entry = self._load_data(name)
        except Exception:  # removed, truncated or from another numba: a miss, compiled again
            return None
        if not (isinstance(entry, tuple) and len(entry) == 3 and entry[0] == _MARK and entry[1] == key):
            return None  # another key's code (numba's numbered files) or an older layout
        return entry[2]


class KeyedCache(FunctionCache):
    """``FunctionCache`` whose entries cannot be crossed between keys by concurrent writers."""

    def __init__(self, py_func):
        super().__init__(py_func)
        plain = self._cache_file
        self._cache_file = _KeyedCacheFile(plain._cache_path, self._impl.filename_base, plain._source_stamp)


def njit(*args, **kw):
    """``numba.njit``; with ``cache=True`` its disk cache is a ``KeyedCache``."""
    cache = kw.pop("cache", False)

    def wrap(fn):
        d = nb.njit(**kw)(fn)
        if cache:
            d._cache = KeyedCache(d.py_func)
        return d
    if args:  # @njit without arguments
        if len(args) != 1 or not callable(args[0]) or kw:
            raise TypeError("quant.jitcache.njit takes a function or keyword options only")
        return wrap(args[0])
    return wrap
