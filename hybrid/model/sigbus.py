"""A clean message when a memory-mapped GGUF file shrinks under us.

Reading a page of a mapped file past its new end raises SIGBUS, which kills the
process without a word (llama.cpp dies the same way). Python cannot handle that
signal (the faulting load would repeat), so the handler is a Numba ``cfunc``: it
writes a message naming the mapped files (async-signal-safe ``write``), then dies
of SIGBUS as before. Linux only; anything that fails here leaves the default.
"""
from __future__ import annotations

import ctypes
import signal
import sys
import threading

import numpy as np

__all__ = ["watch"]

_BUF = np.zeros(4096, np.uint8)  # the message, NUL-terminated: its address is compiled into the handler
_paths: list[str] = []
_lock = threading.Lock()
_installed = False


def _install():
    import numba
    from numba import types
    libc = ctypes.CDLL(None)
    write, strlen, sig, kill = libc.write, libc.strlen, libc.signal, getattr(libc, "raise")
    write.argtypes, write.restype = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_ssize_t
    strlen.argtypes, strlen.restype = [ctypes.c_void_p], ctypes.c_size_t
    sig.argtypes, sig.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
    kill.argtypes, kill.restype = [ctypes.c_int], ctypes.c_int
    addr, bus = _BUF.ctypes.data, int(signal.SIGBUS)

    @numba.cfunc(types.void(types.int32))
    def on_sigbus(signum):
        write(2, addr, strlen(addr))
        sig(bus, 0)  # SIG_DFL: die of SIGBUS, as without the handler
        kill(bus)

    global _handler
    _handler = on_sigbus  # kept alive: the kernel calls its address
    sig(bus, on_sigbus.address)


def watch(paths):
    """Name ``paths`` (files now mapped) in the message a SIGBUS prints."""
    global _installed
    if not sys.platform.startswith("linux"):
        return
    with _lock:
        _paths.extend(str(p) for p in paths if str(p) not in _paths)
        msg = ("hybrid: error: bus error (SIGBUS), most likely a memory-mapped model file was truncated or "
               f"changed while in use, or its disk failed: {', '.join(_paths[-8:])}\n").encode("utf-8", "replace")
        msg = msg[:_BUF.size - 2] + (b"\n" if len(msg) > _BUF.size - 2 else b"")
        _BUF[:] = 0
        _BUF[:len(msg)] = np.frombuffer(msg, np.uint8)
        if not _installed:
            try:
                _install()
            except Exception:  # no libc, no Numba cfunc: the default death, as before
                pass
            _installed = True
